#pragma once
/// Register-tiled loops of one lane (the host shape of the pooled attention, where a thread owns
/// whole patch positions): several heads share each load of a token row, and blocks of values
/// stay in registers across the inputs they sum. Fixed tile sizes let host compilers keep the
/// tiles in vector registers; every function also compiles for devices, which do not call them.
#include <Kokkos_Core.hpp>
#include <cstdint>

namespace dchag::detail {

/// Heads per tile and values per block of the tiled loops.
inline constexpr int head_tile = 4;
inline constexpr int value_block = 16;

/// out[h * out_stride] = sum_d x[d] * w[h * D + d] for every h < heads.
template <class Scalar>
KOKKOS_INLINE_FUNCTION void tiled_dots(const Scalar* x, const Scalar* w, int D, int heads,
                                       Scalar* out, int out_stride) {
  int h0 = 0;
  for (; h0 + head_tile <= heads; h0 += head_tile) {
    Scalar part[head_tile][value_block] = {};
    int d = 0;
    for (; d + value_block <= D; d += value_block) {
      for (int t = 0; t < head_tile; ++t) {
        const Scalar* wt = w + (h0 + t) * D + d;
        for (int v = 0; v < value_block; ++v) part[t][v] += x[d + v] * wt[v];
      }
    }
    for (int t = 0; t < head_tile; ++t) {
      Scalar sum = 0;
      for (int v = 0; v < value_block; ++v) sum += part[t][v];
      for (int r = d; r < D; ++r) sum += x[r] * w[(h0 + t) * D + r];
      out[(h0 + t) * out_stride] = sum;
    }
  }
  for (; h0 < heads; ++h0) {
    Scalar part[value_block] = {};
    int d = 0;
    for (; d + value_block <= D; d += value_block) {
      for (int v = 0; v < value_block; ++v) part[v] += x[d + v] * w[h0 * D + d + v];
    }
    Scalar sum = 0;
    for (int v = 0; v < value_block; ++v) sum += part[v];
    for (int r = d; r < D; ++r) sum += x[r] * w[h0 * D + r];
    out[h0 * out_stride] = sum;
  }
}

/// acc[h * acc_stride + d] += sum_{n < rows} e[n * e_stride + h] * x[n * x_stride + d] for every
/// h < heads and d < D: blocks of head_tile heads by 2 * value_block values are held in
/// registers across the rows.
template <class Scalar>
KOKKOS_INLINE_FUNCTION void tiled_pool(const Scalar* e, int e_stride,
                                       const Scalar* KOKKOS_RESTRICT x, std::int64_t x_stride,
                                       int rows, int D, int heads, Scalar* KOKKOS_RESTRICT acc,
                                       std::int64_t acc_stride) {
  constexpr int width = 2 * value_block;
  for (int h0 = 0; h0 < heads; h0 += head_tile) {
    const int nt = heads - h0 < head_tile ? heads - h0 : head_tile;
    int d0 = 0;
    for (; d0 + width <= D; d0 += width) {
      Scalar tile[head_tile][width];
      for (int t = 0; t < head_tile; ++t)
        for (int v = 0; v < width; ++v)
          tile[t][v] = t < nt ? acc[(h0 + t) * acc_stride + d0 + v] : Scalar(0);
      for (int n = 0; n < rows; ++n) {
        const Scalar* xr = x + n * x_stride + d0;
        for (int t = 0; t < head_tile; ++t) {
          const Scalar w = t < nt ? e[n * e_stride + h0 + t] : Scalar(0);
          for (int v = 0; v < width; ++v) tile[t][v] += w * xr[v];
        }
      }
      for (int t = 0; t < nt; ++t)
        for (int v = 0; v < width; ++v) acc[(h0 + t) * acc_stride + d0 + v] = tile[t][v];
    }
    for (int t = 0; t < nt; ++t) {
      for (int d = d0; d < D; ++d) {
        Scalar sum = acc[(h0 + t) * acc_stride + d];
        for (int n = 0; n < rows; ++n) sum += e[n * e_stride + h0 + t] * x[n * x_stride + d];
        acc[(h0 + t) * acc_stride + d] = sum;
      }
    }
  }
}

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
