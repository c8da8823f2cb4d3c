#pragma once
/// Deterministic ClimaX initialisation (DESIGN 6): truncated normal(0, 0.02) for linear and conv
/// weights, zero biases and queries, sin-cos channel and positional embeddings. Values are drawn on
/// the host from a counter-based generator keyed by (seed, tensor name, element), so a tensor gets
/// the same values on every backend and on whichever rank holds it.
#include <Kokkos_Core.hpp>

#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

namespace dchag {
namespace detail {

inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline std::uint64_t hash_name(std::string_view s) {
  std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

/// Standard normal number `i` of stream (seed, name), by Box-Muller on two counter-based uniforms.
inline double normal_at(std::uint64_t seed, std::uint64_t stream, std::uint64_t i,
                        std::uint64_t attempt) {
  const std::uint64_t key = splitmix64(seed ^ splitmix64(stream ^ (attempt << 40)));
  const double u1 = (static_cast<double>(splitmix64(key + 2 * i) >> 11) + 0.5) * 0x1.0p-53;
  const double u2 = (static_cast<double>(splitmix64(key + 2 * i + 1) >> 11) + 0.5) * 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

template <class V>
void copy_from_host(const V& v, const std::vector<double>& values) {
  auto h = Kokkos::create_mirror_view(v);
  auto* p = h.data();
  for (std::size_t i = 0; i < values.size(); ++i)
    p[i] = static_cast<typename V::value_type>(values[i]);
  Kokkos::deep_copy(v, h);
}

/// Uniform number `i` in [-1, 1) of stream (seed, name).
inline double uniform_at(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) {
  const std::uint64_t key = splitmix64(seed ^ splitmix64(stream ^ 0x5bd1e995ull));
  return 2.0 * (static_cast<double>(splitmix64(key + i) >> 11) * 0x1.0p-53) - 1.0;
}

/// 1-D sin-cos embedding of `pos` into `dim` values: first dim/2 sines, then cosines of
/// pos * 10000^(-k/(dim/2)) (MAE / ClimaX); an odd last value is zero.
inline void sincos_1d(double pos, int dim, double* out) {
  const int half = dim / 2;
  for (int k = 0; k < half; ++k) {
    const double omega = std::pow(10000.0, -static_cast<double>(k) / (half > 0 ? half : 1));
    out[k] = std::sin(pos * omega);
    out[half + k] = std::cos(pos * omega);
  }
  if (dim % 2 != 0) out[dim - 1] = 0.0;
}

}  // namespace detail

/// Fills `v` (any rank, contiguous) with normal(0, std) values truncated to [-2, 2] (timm's
/// trunc_normal_ bounds, as ClimaX calls it), stream keyed by `name`.
template <class V>
void init_trunc_normal(const V& v, double std_dev, std::uint64_t seed, std::string_view name) {
  const std::uint64_t stream = detail::hash_name(name);
  std::vector<double> values(v.span());
  for (std::size_t i = 0; i < values.size(); ++i) {
    double x = 0;
    for (std::uint64_t attempt = 0;; ++attempt) {
      x = std_dev * detail::normal_at(seed, stream, i, attempt);
      if (x >= -2.0 && x <= 2.0) break;
    }
    values[i] = x;
  }
  detail::copy_from_host(v, values);
}

/// Fills `v` with uniform(-bound, bound) values (PyTorch's xavier_uniform_ for
/// nn.MultiheadAttention.in_proj_weight uses bound = sqrt(6 / (fan_in + fan_out))).
template <class V>
void init_uniform(const V& v, double bound, std::uint64_t seed, std::string_view name) {
  const std::uint64_t stream = detail::hash_name(name);
  std::vector<double> values(v.span());
  for (std::size_t i = 0; i < values.size(); ++i)
    values[i] = bound * detail::uniform_at(seed, stream, i);
  detail::copy_from_host(v, values);
}

/// Row `r` of a [rows, D] view gets the 1-D sin-cos embedding of global index row_ids[r]
/// (ClimaX var_embed: channel index).
template <class V>
void init_sincos_rows(const V& v, const std::vector<int>& row_ids) {
  const int dim = static_cast<int>(v.extent(1));
  std::vector<double> values(v.span());
  for (std::size_t r = 0; r < row_ids.size(); ++r)
    detail::sincos_1d(row_ids[r], dim, &values[r * dim]);
  detail::copy_from_host(v, values);
}

/// [L, D] 2-D sin-cos positional embedding over an h_p x w_p patch grid (row-major), as ClimaX's
/// (MAE's) get_2d_sincos_pos_embed: its meshgrid puts the patch column in the first D/2 values and
/// the row in the last D - D/2 (DESIGN 3.5).
template <class V>
void init_sincos_2d(const V& v, int grid_h, int grid_w) {
  const int dim = static_cast<int>(v.extent(1));
  const int half = dim / 2;
  std::vector<double> values(v.span());
  for (int r = 0; r < grid_h; ++r) {
    for (int c = 0; c < grid_w; ++c) {
      double* row = &values[(static_cast<std::size_t>(r) * grid_w + c) * dim];
      detail::sincos_1d(c, half, row);
      detail::sincos_1d(r, dim - half, row + half);
    }
  }
  detail::copy_from_host(v, values);
}

}  // namespace dchag
