#pragma once
/// Register-tiled loops of one lane (the host shape of the pooled attention, where a thread owns
/// whole token rows): blocks of values stay in registers across the heads they sum over. Fixed
/// block sizes let host compilers keep them in vector registers; every function also compiles for
/// devices, which do not call them.
#include <Kokkos_Core.hpp>
#include <cstdint>

namespace dchag::detail {

/// Values per block of the tiled loops.
inline constexpr int value_block = 16;

/// The token gradient of the pooled backward for one token row, in one pass over its values:
/// dx[d] = sum_h a[h] g[h * g_stride + d] + ds[h] u[h * D + d], and du[h * D + d] += ds[h] x[d].
template <class Scalar>
KOKKOS_INLINE_FUNCTION void tiled_token_grad(const Scalar* x, const Scalar* a, const Scalar* ds,
                                             const Scalar* g, std::int64_t g_stride,
                                             const Scalar* u, int D, int heads,
                                             Scalar* KOKKOS_RESTRICT dx,
                                             Scalar* KOKKOS_RESTRICT du) {
  int d = 0;
  for (; d + value_block <= D; d += value_block) {
    Scalar acc[value_block] = {};
    for (int h = 0; h < heads; ++h) {
      const Scalar ah = a[h], dsh = ds[h];
      const Scalar* gh = g + h * g_stride + d;
      const Scalar* uh = u + h * D + d;
      Scalar* duh = du + h * D + d;
      for (int v = 0; v < value_block; ++v) {
        acc[v] += ah * gh[v] + dsh * uh[v];
        duh[v] += dsh * x[d + v];
      }
    }
    for (int v = 0; v < value_block; ++v) dx[d + v] = acc[v];
  }
  for (; d < D; ++d) {
    Scalar acc = 0;
    for (int h = 0; h < heads; ++h) {
      acc += a[h] * g[h * g_stride + d] + ds[h] * u[h * D + d];
      du[h * D + d] += ds[h] * x[d];
    }
    dx[d] = acc;
  }
}

}  // namespace dchag::detail
