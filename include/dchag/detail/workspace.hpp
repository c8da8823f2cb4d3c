#pragma once
/// Workspace Views that plan objects keep across calls: reallocated (uninitialised) only when
/// the shape a call needs differs from what they hold.
#include <Kokkos_Core.hpp>

#include <cstddef>
#include <string>

namespace dchag::detail {

/// Makes `v` a View of extents `ext...` labelled `label`, keeping it when it already is one.
template <class V, class... Ext>
void ensure_view(V& v, const char* label, Ext... ext) {
  const std::size_t want[] = {std::size_t(ext)...};
  bool same = v.data() != nullptr;
  for (std::size_t i = 0; i < sizeof...(Ext); ++i) same = same && v.extent(i) == want[i];
  if (!same) v = V(Kokkos::view_alloc(std::string(label), Kokkos::WithoutInitializing), ext...);
}

}  // namespace dchag::detail
