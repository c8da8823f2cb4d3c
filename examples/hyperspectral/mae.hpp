#pragma once
// The MAE parts around the front end (He et al., masked autoencoders), on any Kokkos execution
// space. Each rank holds its own bands end to end: their pixels, its share of the decoder (the
// rows of those bands) and its share of the loss; only the tokens' gradient is summed over ranks.
//
//   hide:      75% of the patches of every scene are masked; the encoder sees zeros there.
//   decoder:   z_l = sum over visible patches l' of k(l, l') t_l' for three fixed weightings k of
//              the visible tokens by distance (their mean and first moments in y and x, see
//              neighbour_weights: it fills a hidden patch from its visible neighbours), then
//              pixels_l = W z_l + b, the C * p * p pixels of patch l (rank r: the rows of its C_r
//              bands). Linear in the tokens.
//   loss:      mean squared error over masked patches and valid (unsaturated) bands, in
//              per-band standardised units: predicting each band's mean scores 1.
#include <dchag/tensor.hpp>

#include <KokkosBlas3_gemm.hpp>
#include <Kokkos_Core.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

namespace hyperspectral {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;
template <class T>
using V1 = dchag::View1<T, Mem>;
template <class T>
using V2 = dchag::View2<T, Mem>;
template <class T>
using V3 = dchag::View3<T, Mem>;
template <class T>
using V4 = dchag::View4<T, Mem>;

struct Geometry {
  int B, Cr, H, W, p, D;
  int gw() const { return W / p; }
  int L() const { return (H / p) * (W / p); }
  int row() const { return Cr * p * p; }  // decoder rows of this rank, per patch
};

// images = standardised raw pixels, zero in hidden patches; targets [B, L, Cr * p * p] the
// standardised pixels of every patch, band-major (j, py, px).
inline void hide_and_standardise(const Exec& exec, const Geometry& g, const V4<const float>& raw,
                                 const V1<const float>& mean, const V1<const float>& inv_std,
                                 const V2<const std::uint8_t>& visible, const V4<float>& images,
                                 const V3<float>& targets) {
  const int Cr = g.Cr, H = g.H, W = g.W, p = g.p, gw = g.gw();
  Kokkos::parallel_for(
      "hyperspectral::hide_and_standardise",
      Kokkos::MDRangePolicy<Exec, Kokkos::Rank<4>>(exec, {0, 0, 0, 0}, {g.B, Cr, H, W}),
      KOKKOS_LAMBDA(const int b, const int j, const int y, const int x) {
        const float v = (raw(b, j, y, x) - mean(j)) * inv_std(j);
        const int l = (y / p) * gw + x / p;
        targets(b, l, (j * p + y % p) * p + x % p) = v;
        images(b, j, y, x) = visible(b, l) ? v : 0.0f;
      });
}

// k [B, 3L, L], per scene three [L, L] blocks: row l of block 0 weights the visible patches l' by
// w = exp(-d^2 / (2 r^2)) (d in patches) normalised to sum one, blocks 1 and 2 by w * dy / r and
// w * dx / r (offsets of l' from l). Block 0 fills a hidden patch with its neighbours' mean,
// blocks 1 and 2 with their first moments, from which a linear decoder can read how the scene
// changes across the patch. Every scene keeps at least one visible patch.
inline constexpr int moments = 3;

inline std::vector<float> neighbour_weights(const Geometry& g,
                                            const std::vector<std::uint8_t>& visible,
                                            double radius) {
  const int L = g.L(), gw = g.gw();
  std::vector<float> k(std::size_t(g.B) * moments * L * L, 0.0f);
  std::vector<double> w(L);
  for (int b = 0; b < g.B; ++b)
    for (int l = 0; l < L; ++l) {
      double total = 0;
      for (int m = 0; m < L; ++m) {
        const double dy = m / gw - l / gw, dx = m % gw - l % gw;
        w[m] = visible[std::size_t(b) * L + m]
                   ? std::exp(-(dy * dy + dx * dx) / (2 * radius * radius)) + 1e-30
                   : 0.0;
        total += w[m];
      }
      for (int m = 0; m < L; ++m) {
        const double dy = (m / gw - l / gw) / radius, dx = (m % gw - l % gw) / radius;
        const double v = w[m] / total, moment[moments] = {v, v * dy, v * dx};
        for (int q = 0; q < moments; ++q)
          k[((std::size_t(b) * moments + q) * L + l) * L + m] = float(moment[q]);
      }
    }
  return k;
}

inline dchag::Unmanaged2<float, Mem> matrix(float* data, int rows, int cols) {
  return dchag::Unmanaged2<float, Mem>(data, rows, cols);
}

// The decoder's input z [B, L, 3D] from the tokens t [B, L, D]: s[b] = k[b] t[b] ([3L, D]), then
// z(b, l, q * D + d) = s(b, q * L + l, d).
inline void mix_patches(const Exec& exec, const Geometry& g, const V3<const float>& k,
                        const V3<const float>& tokens, const V3<float>& s, const V3<float>& z) {
  const int L = g.L(), D = g.D;
  for (int b = 0; b < g.B; ++b) {
    const dchag::Unmanaged2<const float, Mem> kb(k.data() + std::size_t(b) * moments * L * L,
                                                 moments * L, L);
    const dchag::Unmanaged2<const float, Mem> t(tokens.data() + std::size_t(b) * L * D, L, D);
    KokkosBlas::gemm("N", "N", 1.0f, kb, t, 0.0f,
                     matrix(s.data() + std::size_t(b) * moments * L * D, moments * L, D));
  }
  Kokkos::parallel_for(
      "hyperspectral::gather_moments",
      Kokkos::MDRangePolicy<Exec, Kokkos::Rank<3>>(exec, {0, 0, 0}, {g.B, L, moments * D}),
      KOKKOS_LAMBDA(const int b, const int l, const int c) {
        z(b, l, c) = s(b, (c / D) * L + l, c % D);
      });
}

// The adjoint: d_tokens[b] = k[b]^T d_s[b] with d_s(b, q * L + l, d) = d_z(b, l, q * D + d).
inline void mix_patches_backward(const Exec& exec, const Geometry& g, const V3<const float>& k,
                                 const V3<const float>& d_z, const V3<float>& d_s,
                                 const V3<float>& d_tokens) {
  const int L = g.L(), D = g.D;
  Kokkos::parallel_for(
      "hyperspectral::scatter_moments",
      Kokkos::MDRangePolicy<Exec, Kokkos::Rank<3>>(exec, {0, 0, 0}, {g.B, moments * L, D}),
      KOKKOS_LAMBDA(const int b, const int r, const int d) {
        d_s(b, r, d) = d_z(b, r % L, (r / L) * D + d);
      });
  for (int b = 0; b < g.B; ++b) {
    const dchag::Unmanaged2<const float, Mem> kb(k.data() + std::size_t(b) * moments * L * L,
                                                 moments * L, L);
    const dchag::Unmanaged2<const float, Mem> ds(d_s.data() + std::size_t(b) * moments * L * D,
                                                 moments * L, D);
    KokkosBlas::gemm("T", "N", 1.0f, kb, ds, 0.0f,
                     matrix(d_tokens.data() + std::size_t(b) * L * D, L, D));
  }
}

struct Decoder {
  V2<float> weight, d_weight;  // [Cr * p * p, 3D]
  V1<float> bias, d_bias;      // [Cr * p * p]
};

// pred = z W^T + b from z [B, L, 3D] (mix_patches): pred [B, L, Cr * p * p].
inline void decode(const Exec& exec, const Geometry& g, const V3<const float>& z,
                   const Decoder& dec, const V3<float>& pred) {
  const int rows = g.B * g.L(), n = g.row();
  const dchag::Unmanaged2<const float, Mem> zz(z.data(), rows, moments * g.D);
  KokkosBlas::gemm("N", "T", 1.0f, zz, dec.weight, 0.0f, matrix(pred.data(), rows, n));
  const auto bias = dec.bias;
  const auto flat = matrix(pred.data(), rows, n);
  Kokkos::parallel_for(
      "hyperspectral::decoder_bias",
      Kokkos::MDRangePolicy<Exec, Kokkos::Rank<2>>(exec, {0, 0}, {rows, n}),
      KOKKOS_LAMBDA(const int i, const int c) { flat(i, c) += bias(c); });
}

// The loss terms of this rank: sum of squared errors over hidden patches and valid bands, and
// d_pred = 2 (pred - target) / count there (count: over all ranks), zero elsewhere.
// band_valid [B, Cr]: 1 where band j of scene b is not saturated.
inline double squared_error(const Exec& exec, const Geometry& g, const V3<const float>& pred,
                            const V3<const float>& targets, const V2<const std::uint8_t>& visible,
                            const V2<const std::uint8_t>& band_valid, double count,
                            const V3<float>& d_pred) {
  const int L = g.L(), n = g.row(), pp = g.p * g.p;
  const float scale = float(2.0 / count);
  double sse = 0;
  Kokkos::parallel_reduce(
      "hyperspectral::squared_error",
      Kokkos::MDRangePolicy<Exec, Kokkos::Rank<3>>(exec, {0, 0, 0}, {g.B, L, n}),
      KOKKOS_LAMBDA(const int b, const int l, const int c, double& acc) {
        const bool counted = !visible(b, l) && band_valid(b, c / pp);
        const float e = pred(b, l, c) - targets(b, l, c);
        d_pred(b, l, c) = counted ? scale * e : 0.0f;
        if (counted) acc += double(e) * e;
      },
      sse);
  return sse;
}

// Decoder gradients from d_pred, and this rank's share of d_z = d_pred W (summed over ranks by
// the caller before mix_patches_backward).
inline void decoder_backward(const Exec& exec, const Geometry& g, const V3<const float>& z,
                             const V3<const float>& d_pred, const Decoder& dec,
                             const V3<float>& d_z) {
  const int rows = g.B * g.L(), n = g.row();
  const dchag::Unmanaged2<const float, Mem> dp(d_pred.data(), rows, n),
      zz(z.data(), rows, moments * g.D);
  KokkosBlas::gemm("T", "N", 1.0f, dp, zz, 1.0f, dec.d_weight);
  KokkosBlas::gemm("N", "N", 1.0f, dp, dec.weight, 0.0f, matrix(d_z.data(), rows, moments * g.D));
  const auto db = dec.d_bias;
  Kokkos::parallel_for(
      "hyperspectral::decoder_bias_grad", Kokkos::RangePolicy<Exec>(exec, 0, n),
      KOKKOS_LAMBDA(const int c) {
        float s = 0;
        for (int i = 0; i < rows; ++i) s += dp(i, c);
        db(c) += s;
      });
}

// The decoder as named tensors of the whole model's file: `decoder.weight` [C * p * p, D] and
// `decoder.bias` [C * p * p], one piece per band this rank holds (global ids `bands`); D here is
// the decoder's input width, 3 times the token width.
inline dchag::TensorList<float, Mem> decoder_tensors(const Decoder& dec, bool grads,
                                                     const std::vector<int>& bands, int C, int p,
                                                     int D) {
  const std::int64_t pp = std::int64_t(p) * p;
  dchag::NamedTensor<float, Mem> w{"decoder.weight", {C * pp, D}, {}, 0};
  dchag::NamedTensor<float, Mem> b{"decoder.bias", {C * pp}, {}, 0};
  float* wd = grads ? dec.d_weight.data() : dec.weight.data();
  float* bd = grads ? dec.d_bias.data() : dec.bias.data();
  for (std::size_t j = 0; j < bands.size(); ++j) {
    w.pieces.push_back({bands[j] * pp * D, dchag::Unmanaged1<float, Mem>(wd + j * pp * D, pp * D)});
    b.pieces.push_back({bands[j] * pp, dchag::Unmanaged1<float, Mem>(bd + j * pp, pp)});
  }
  return {w, b};
}

}  // namespace hyperspectral
