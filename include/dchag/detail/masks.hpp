#pragma once
/// Per-sample channel masks (DESIGN 3.10) as the modules see them. A front end takes one mask
/// M [B, C] over the model's channels and hands every module the mask of its own inputs: the
/// flat fold its selected channels, a D-CHAG rank its own channels, the final fold one slot per
/// rank (valid where the rank holds any valid channel of the sample), a local tree one slot per
/// group. Masks are small (B x inputs bytes): they are checked and derived on the host and copied
/// to the memory space once per forward.
#include <dchag/attention_state.hpp>
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/detail/workspace.hpp>
#include <dchag/error.hpp>
#include <dchag/tensor.hpp>

#include <cstdint>
#include <vector>

namespace dchag::detail {

using HostMask = View2<std::uint8_t, Kokkos::HostSpace>;

/// The caller's mask [B, C] on the host, checked: extents, and every value 0 or 1. Empty when
/// the caller gave none.
template <class MemSpace>
HostMask host_mask(const char* where, const InputMask<MemSpace>& mask, std::size_t B,
                   std::size_t C) {
  if (mask.data() == nullptr) return {};
  DCHAG_EXPECT(mask.extent(0) == B && mask.extent(1) == C, where, "mask is [", mask.extent(0), ", ",
               mask.extent(1), "], expected [B, C] = [", B, ", ", C, "]");
  HostMask h("dchag::mask::host", B, C);
  Kokkos::deep_copy(h, mask);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t c = 0; c < C; ++c)
      DCHAG_EXPECT(h(b, c) <= 1, where, "mask(", b, ", ", c, ") is ", int(h(b, c)),
                   ", expected 0 (missing) or 1 (valid)");
  return h;
}

/// The mask of a module's inputs: input j is model channel ids[j]. Refuses a sample with no valid
/// input among them when `require_one` (the sample's output would be undefined).
inline HostMask select_mask(const char* where, const HostMask& mask, const std::vector<int>& ids,
                            bool require_one) {
  if (mask.data() == nullptr) return {};
  const std::size_t B = mask.extent(0), J = ids.size();
  HostMask out("dchag::mask::selected", B, J);
  for (std::size_t b = 0; b < B; ++b) {
    bool any = false;
    for (std::size_t j = 0; j < J; ++j) {
      out(b, j) = mask(b, std::size_t(ids[j]));
      any = any || out(b, j) != 0;
    }
    DCHAG_EXPECT(any || !require_one, where, "sample ", b,
                 " has no valid channel in mask, expected at least one");
  }
  return out;
}

/// One slot per group of channel ids: valid where the group holds a valid channel of the sample.
inline HostMask group_mask(const HostMask& mask, const std::vector<std::vector<int>>& groups) {
  if (mask.data() == nullptr) return {};
  const std::size_t B = mask.extent(0);
  HostMask out("dchag::mask::groups", B, groups.size());
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t r = 0; r < groups.size(); ++r) {
      std::uint8_t any = 0;
      for (int c : groups[r]) any = any | mask(b, std::size_t(c));
      out(b, r) = any;
    }
  return out;
}

/// `host` copied into `dst` (allocated to its shape); empty stays empty.
template <class MemSpace>
InputMask<MemSpace> to_device(const HostMask& host, View2<std::uint8_t, MemSpace>& dst) {
  if (host.data() == nullptr) {
    dst = {};
    return {};
  }
  ensure_view(dst, "dchag::mask", host.extent(0), host.extent(1));
  Kokkos::deep_copy(dst, host);
  return dst;
}

/// out [B, k]: 1 where segment j of numpy.array_split(N inputs, k) holds a valid input under
/// `valid` [B, N] (the local tree's second level). Empty in, empty out.
template <class ExecSpace, class MemSpace>
InputMask<MemSpace> split_any(const ExecSpace& exec, const InputMask<MemSpace>& valid, int k,
                              View2<std::uint8_t, MemSpace>& out) {
  if (valid.data() == nullptr) {
    out = {};
    return {};
  }
  const int N = static_cast<int>(valid.extent(1));
  ensure_view(out, "dchag::mask::tree", valid.extent(0), std::size_t(k));
  auto dst = out;
  Kokkos::parallel_for(
      "dchag::mask::split_any",
      Kokkos::RangePolicy<ExecSpace>(exec, 0, std::int64_t(valid.extent(0)) * k),
      KOKKOS_LAMBDA(const std::int64_t i) {
        const int b = static_cast<int>(i / k), j = static_cast<int>(i % k);
        // Segment j of array_split: the first N % k segments hold one input more.
        const int lo = j * (N / k) + (j < N % k ? j : N % k);
        const int hi = lo + N / k + (j < N % k ? 1 : 0);
        std::uint8_t any = 0;
        for (int n = lo; n < hi; ++n) any = any | valid(b, n);
        dst(b, j) = any;
      });
  return out;
}

}  // namespace dchag::detail
