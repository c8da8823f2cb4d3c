#pragma once
/// Workspace Views that plan objects keep across calls: reallocated (uninitialised) only when
/// the shape a call needs differs from what they hold. Every dchag allocation of a call goes
/// through allocate_view, so a failed allocation is a dchag::error naming the View and its bytes.
#include <dchag/error.hpp>

#include <Kokkos_Core.hpp>
#include <cstddef>
#include <new>
#include <stdexcept>
#include <string>

namespace dchag::detail {

/// Test hook: while non-empty, an allocation whose label contains this text fails as if the
/// memory space were exhausted (used to prove that one rank's failure reaches every rank).
inline std::string& failing_allocation_label() {
  static std::string label;
  return label;
}

/// A new View of extents `ext...`, uninitialised. Kokkos reports exhausted memory as
/// std::bad_alloc (4.x) or std::runtime_error (3.4); both become dchag::error.
template <class V, class... Ext>
V allocate_view(const char* label, Ext... ext) {
  std::size_t elements = 1;
  ((elements *= std::size_t(ext)), ...);
  const std::size_t bytes = elements * sizeof(typename V::value_type);
  const auto fail = [&](const char* why) {
    throw error(concat("dchag: allocating View \"", label, "\" (", bytes, " bytes in ",
                       V::memory_space::name(), ") failed: ", why));
  };
  const std::string& injected = failing_allocation_label();
  if (!injected.empty() && std::string(label).find(injected) != std::string::npos) {
    fail("injected failure");
  }
  try {
    return V(Kokkos::view_alloc(std::string(label), Kokkos::WithoutInitializing), ext...);
  } catch (const std::bad_alloc& e) {
    fail(e.what());
  } catch (const std::runtime_error& e) {
    fail(e.what());
  }
  return V();  // not reached
}

/// Makes `v` a View of extents `ext...` labelled `label`, keeping it when it already is one.
template <class V, class... Ext>
void ensure_view(V& v, const char* label, Ext... ext) {
  const std::size_t want[] = {std::size_t(ext)...};
  bool same = v.data() != nullptr;
  for (std::size_t i = 0; i < sizeof...(Ext); ++i) same = same && v.extent(i) == want[i];
  if (!same) {
    v = V();  // release the old buffer first: the peak is the larger of the two, not their sum
    v = allocate_view<V>(label, ext...);
  }
}

}  // namespace dchag::detail
