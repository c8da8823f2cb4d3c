#pragma once
// How far the weather example's tokens are from PyTorch's, and the float32 bound they are held to.
#include <dchag/config.hpp>
#include <dchag/front_end_config.hpp>
#include <dchag/safetensors.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace weather {

using dchag::safetensors::File;

// The float32 bound of the tokens against float64: a sum of n terms in float32 is off by at most
// n * u times the sum of their magnitudes (first order, u = 2^-24), and the errors of a chain of
// sums add. Per token: the input's rounding (1), the tokenizer (p^2 products, bias, var_embed);
// each cross-attention over N inputs: the scores (D), max and exponent (2), the softmax
// denominator and the pooled sum (N each), the value and output projections (D + 1 each);
// exact_flat's merge of the P ranks' partial sums (P); the positional embedding (1). The tokens
// here are sums of terms of their own size (no cancellation across the stages), so the bound is
// taken relative to max |ref|.
inline double bound(const dchag::FrontEndConfig& cfg, dchag::Mode mode, int largest_rank, int P) {
  const double u = std::ldexp(1.0, -24);
  const auto attention = [&](int N) { return 3.0 * cfg.dim + 2.0 * N + 4; };
  double n = 1 + cfg.patch * cfg.patch + 2 + 1;
  if (mode == dchag::Mode::dchag_xattn)
    n += attention(largest_rank) + attention(P);
  else
    n += attention(cfg.channels) + P;
  return n * u;
}

struct Agreement {
  double error = 0, vs_f32 = 0, torch = 0, bound = 0;  // torch: PyTorch float32 vs float64
  bool holds() const { return error <= bound; }
};

inline double relative(const std::vector<float>& x, const std::vector<double>& ref) {
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    diff = std::max(diff, std::abs(double(x[i]) - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  return diff / (scale > 0 ? scale : 1.0);
}

inline Agreement agreement(const File& ref, const std::string& key,
                           const std::vector<float>& tokens, const std::vector<std::int64_t>& shape,
                           double bound) {
  for (const char* kind : {".f64", ".f32"})
    if (ref.info(key + kind).shape != shape)
      throw std::invalid_argument("dchag_weather: tensor '" + key + kind + "' of '" + ref.source() +
                                  "' is not [T, L, D] = [" + std::to_string(shape[0]) + ", " +
                                  std::to_string(shape[1]) + ", " + std::to_string(shape[2]) +
                                  "], expected PyTorch's " +
                                  "tokens of every time of the data file");
  const auto f64 = ref.values<double>(key + ".f64"), f32 = ref.values<double>(key + ".f32");
  Agreement a;
  a.error = relative(tokens, f64);
  std::vector<float> torch(f32.begin(), f32.end());  // exact: these were float32
  a.torch = relative(torch, f64);
  a.vs_f32 = relative(tokens, f32);
  a.bound = bound;
  return a;
}

}  // namespace weather
