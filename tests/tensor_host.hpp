#pragma once
// Test helpers: host copies of named tensors in file order, written here independently of
// dchag/weights.hpp so that the tests check its layout conversion instead of reusing it.
#include <Kokkos_Core.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "dchag/tensor.hpp"

namespace dchag_test {

/// The tensor named `name` in `list`; throws when there is none.
template <class Scalar, class MemSpace>
const dchag::NamedTensor<Scalar, MemSpace>& find(const dchag::TensorList<Scalar, MemSpace>& list,
                                                 const std::string& name) {
  for (const auto& t : list)
    if (t.name == name) return t;
  throw std::logic_error("test: no tensor '" + name + "' in the list");
}

/// The values of `t` as a row-major host vector in file order; elements no piece holds are NaN.
template <class Scalar, class MemSpace>
std::vector<double> file_order(const dchag::NamedTensor<Scalar, MemSpace>& t) {
  const std::int64_t n = t.numel();
  std::vector<double> out(static_cast<std::size_t>(n), std::numeric_limits<double>::quiet_NaN());
  for (const auto& piece : t.pieces) {
    auto h = Kokkos::create_mirror_view(piece.values);
    Kokkos::deep_copy(h, piece.values);
    if (t.transposed_rows > 0) {
      // Memory is the transpose of the file's [R, n / R] matrix: memory (k, r) = file (r, k).
      const std::int64_t R = t.transposed_rows, K = n / R;
      for (std::int64_t k = 0; k < K; ++k)
        for (std::int64_t r = 0; r < R; ++r)
          out[static_cast<std::size_t>(r * K + k)] = static_cast<double>(h(k * R + r));
    } else {
      for (std::size_t k = 0; k < h.extent(0); ++k)
        out[static_cast<std::size_t>(piece.offset) + k] = static_cast<double>(h(k));
    }
  }
  return out;
}

/// Overwrites every piece of every tensor of `list` with distinct float-representable values
/// (so that they survive an F32 file exactly), different for every `salt`.
template <class Scalar, class MemSpace>
void fill_distinct(const dchag::TensorList<Scalar, MemSpace>& list, int salt) {
  std::uint64_t state = 0x243F6A8885A308D3ull + static_cast<std::uint64_t>(salt);
  for (const auto& t : list) {
    for (const auto& piece : t.pieces) {
      auto h = Kokkos::create_mirror_view(piece.values);
      for (std::size_t k = 0; k < h.extent(0); ++k) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        // A multiple of 2^-24 in [-1/2, 1/2): exact in float (24-bit significand).
        const auto bits = static_cast<std::int64_t>(state >> 40) - (std::int64_t(1) << 23);
        h(k) = static_cast<Scalar>(std::ldexp(static_cast<double>(bits), -24));
      }
      Kokkos::deep_copy(piece.values, h);
    }
  }
}

}  // namespace dchag_test
