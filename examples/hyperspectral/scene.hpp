#pragma once
// A synthetic hyperspectral scene from a linear mixing model: every pixel's reflectance spectrum
// over 400-900 nm is a mix of a few material spectra (vegetation, soil, water, iron-oxide rock),
// smooth in wavelength, with abundances that vary smoothly over the image, plus sensor noise.
// In every scene a few bands saturate (clipped at full scale): those are the bands the mask marks
// missing. Everything is a function of (scene, band, pixel), so each rank generates only its own
// bands and all ranks agree on the abundances without communicating.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

namespace hyperspectral {

inline constexpr int materials = 4;

// splitmix64: a counter-based generator, so any value is reachable from its indices alone.
inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
inline std::uint64_t key(std::uint64_t a, std::uint64_t b, std::uint64_t c = 0,
                         std::uint64_t d = 0) {
  return mix(mix(mix(mix(a) ^ b) ^ c) ^ d);
}
// Uniform in (0, 1).
inline double uniform(std::uint64_t k) { return (double(k >> 11) + 0.5) * 0x1.0p-53; }
inline double gaussian(std::uint64_t k) {
  const double u = uniform(k), v = uniform(mix(k));
  return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
}

inline double bump(double x, double centre, double width) {
  const double t = (x - centre) / width;
  return std::exp(-0.5 * t * t);
}
inline double step(double x, double centre, double width) {
  return 1.0 / (1.0 + std::exp(-(x - centre) / width));
}

// Reflectance of material m at wavelength nm (0..1), shapes after typical library spectra.
inline double material_reflectance(int m, double nm) {
  switch (m) {
    case 0:  // vegetation: green peak, chlorophyll absorption at 670 nm, red edge, NIR plateau
      return 0.04 + 0.06 * bump(nm, 550, 30) - 0.02 * bump(nm, 670, 20) + 0.42 * step(nm, 720, 14);
    case 1:  // dry soil: rising slowly through the visible and the near infrared
      return 0.10 + 0.26 * std::pow((nm - 400) / 500, 0.8);
    case 2:  // water: dark, falling towards the infrared
      return 0.01 + 0.07 * std::exp(-(nm - 400) / 110);
    default:  // iron-oxide rock: steep rise past 550 nm, ferric absorption near 870 nm
      return 0.08 + 0.30 * step(nm, 580, 25) - 0.10 * bump(nm, 870, 40);
  }
}

inline double wavelength(int band, int bands) {
  return bands == 1 ? 650.0 : 400.0 + 500.0 * band / (bands - 1);
}

struct SceneOptions {
  int bands = 500;
  int height = 64, width = 64;
  int saturated = 3;         // saturated bands per scene
  double noise = 0.004;      // sensor noise, reflectance units
  double smoothness = 0.35;  // abundance blob width, fraction of the image side
  std::uint64_t seed = 1;
};

// The abundances of every material at every pixel of scene `s`: [materials][H * W], sum 1.
inline std::vector<std::array<double, materials>> abundances(const SceneOptions& o,
                                                             std::uint64_t s) {
  const int H = o.height, W = o.width, blobs = 3;
  std::vector<std::array<double, materials>> a(std::size_t(H) * W);
  struct Blob {
    double y, x, w, amp;
  };
  std::array<std::array<Blob, blobs>, materials> b{};
  for (int m = 0; m < materials; ++m)
    for (int k = 0; k < blobs; ++k) {
      const auto r = [&](int i) { return uniform(key(o.seed, s, 16 * m + k, i)); };
      b[m][k] = {r(0) * H, r(1) * W, (0.6 + 0.8 * r(2)) * o.smoothness * std::max(H, W),
                 1.0 + 2.0 * r(3)};
    }
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      std::array<double, materials> f{};
      double total = 0;
      for (int m = 0; m < materials; ++m) {
        double v = 0;
        for (const Blob& q : b[m]) {
          const double dy = (y - q.y) / q.w, dx = (x - q.x) / q.w;
          v += q.amp * std::exp(-0.5 * (dy * dy + dx * dx));
        }
        f[m] = std::exp(2.0 * v);  // softmax over materials: positive, summing to one
        total += f[m];
      }
      for (int m = 0; m < materials; ++m) a[std::size_t(y) * W + x][m] = f[m] / total;
    }
  return a;
}

// The bands that saturate in scene s (distinct, ascending).
inline std::vector<int> saturated_bands(const SceneOptions& o, std::uint64_t s) {
  std::vector<int> out;
  for (int i = 0; out.size() < std::size_t(std::min(o.saturated, o.bands)); ++i) {
    const int c = int(key(o.seed, s, 0x5a7, i) % std::uint64_t(o.bands));
    if (std::find(out.begin(), out.end(), c) == out.end()) out.push_back(c);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Reflectance of band `band` of scene s at every pixel, into out[H * W]; a saturated band reads
// full scale (1.0) everywhere, as a clipped detector does.
inline void render_band(const SceneOptions& o, std::uint64_t s,
                        const std::vector<std::array<double, materials>>& a,
                        const std::vector<int>& saturated, int band, float* out) {
  const std::size_t n = std::size_t(o.height) * o.width;
  if (std::binary_search(saturated.begin(), saturated.end(), band)) {
    std::fill(out, out + n, 1.0f);
    return;
  }
  const double nm = wavelength(band, o.bands);
  std::array<double, materials> r{};
  for (int m = 0; m < materials; ++m) r[m] = material_reflectance(m, nm);
  for (std::size_t i = 0; i < n; ++i) {
    double v = 0;
    for (int m = 0; m < materials; ++m) v += a[i][m] * r[m];
    v += o.noise * gaussian(key(o.seed ^ 0xabcdef, s, std::uint64_t(band), i));
    out[i] = float(std::clamp(v, 0.0, 1.0));
  }
}

}  // namespace hyperspectral
