// Storage types (DESIGN 3.12, precision.hpp): the 16-bit conversions against the host reference
// of detail/half_bits.hpp, and front ends storing images and tokens in bf16 or fp16 against the
// same model in double, within tolerances set by the storage type's unit roundoff u.
//
// Tolerances. Every token is rounded once: x(1 + e), |e| <= u. The output is a softmax-weighted
// mean of projections of the tokens plus the positional embedding; with weights and inputs of
// order one (param_sd), each output element moves by at most a few u times the largest output,
// and so does each gradient relative to its largest element (the gradients are linear in the
// tokens and in the softmax weights, both perturbed by O(u)). The bound is 4u of the largest
// reference value; measured errors are 0.02 .. 0.92 u (Serial; the linear partials average the
// rounding errors of many tokens). A lower bound of u / 256 shows that the rounding happened:
// float storage errs by at most 0.0007 u here.
#include <catch2/catch.hpp>

#include <dchag/aggregate.hpp>
#include <dchag/check.hpp>
#include <dchag/detail/half_bits.hpp>
#include <dchag/precision.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "test_support.hpp"

using namespace dchag_test;
using dchag::ChannelSelection;
using dchag::Convention;
using dchag::DchagOptions;
using dchag::FrontEndConfig;
using dchag::MemoryPolicy;
using dchag::PartialKind;
using dchag::Strategy;

namespace {

float float_of(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Same value, or both NaN.
bool same_float(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

// Float bit patterns: a stride through all 2^32 (every exponent, both signs), plus the edges.
std::vector<float> float_samples() {
  std::vector<float> v;
  for (std::uint64_t b = 0; b < (std::uint64_t(1) << 32); b += 4093) v.push_back(float_of(b));
  for (float x :
       {0.0f, -0.0f, 1.0f, 65504.0f, 65519.99f, 65520.0f, 65536.0f, 6.1035156e-05f, 5.9604645e-08f,
        2.9802322e-08f, 2.9802326e-08f, 1.0e-30f, 3.3895314e+38f, std::numeric_limits<float>::max(),
        std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
        std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min()}) {
    v.push_back(x);
  }
  // Exact ties of both formats around 1: 1 + 2^-8 (bf16) and 1 + 2^-11 (fp16), odd and even.
  for (int k = 0; k < 8; ++k) {
    v.push_back(1.0f + float(k) * 0.0078125f + 0.00390625f);
    v.push_back(1.0f + float(k) * 0.0009765625f + 0.00048828125f);
  }
  return v;
}

// Host copies through the storage type, as doubles.
template <class T>
std::vector<double> host_doubles(const V4<T>& v) {
  auto h = Kokkos::create_mirror_view(v);
  Kokkos::deep_copy(h, v);
  std::vector<double> out(h.span());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = dchag::detail::convert<double>(h.data()[i]);
  return out;
}

// images in Storage, from the double values `src` (rounded once, directly from double).
template <class T>
V4<T> images_as(const V4<double>& src) {
  V4<T> dst("images", src.extent(0), src.extent(1), src.extent(2), src.extent(3));
  auto hs = Kokkos::create_mirror_view(src);
  Kokkos::deep_copy(hs, src);
  auto hd = Kokkos::create_mirror_view(dst);
  for (std::size_t i = 0; i < hs.span(); ++i)
    hd.data()[i] = dchag::detail::convert<T>(hs.data()[i]);
  Kokkos::deep_copy(dst, hd);
  return dst;
}

// src rounded to T in place (double, on the host): what a T image holds.
template <class T>
void round_in_place(const V4<double>& v) {
  auto h = Kokkos::create_mirror_view(v);
  Kokkos::deep_copy(h, v);
  for (std::size_t i = 0; i < h.span(); ++i) {
    const double x = h.data()[i];
    if constexpr (std::is_same_v<T, dchag::bf16>) {
      h.data()[i] = dchag::detail::bf16_bits_to_float(dchag::detail::double_to_bf16_bits(x));
    } else if constexpr (std::is_same_v<T, dchag::fp16>) {
      h.data()[i] = dchag::detail::half_bits_to_float(dchag::detail::double_to_half_bits(x));
    } else {
      h.data()[i] = static_cast<double>(static_cast<T>(x));
    }
  }
  Kokkos::deep_copy(v, h);
}

double param_sd(int D) { return D <= 8 ? 0.3 : 0.3 * std::sqrt(8.0 / D); }

struct Result {
  std::vector<double> out;
  std::vector<std::vector<double>> grads;
};

// One forward and backward of `fe` (Scalar S) on images, with upstream gradient g.
template <class FE, class Images>
Result step(FE& fe, const Images& images, const V3<double>& g_double, bool backward = true) {
  using S = typename FE::scalar_type;
  Exec exec;
  const int B = int(g_double.extent(0)), L = int(g_double.extent(1)), D = int(g_double.extent(2));
  V3<S> out("out", B, L, D), g("g", B, L, D);
  from_host(g, to_host(g_double));
  fe.zero_gradients(exec);
  fe.forward(exec, images, out);
  Result r{to_host(out), {}};
  if (backward) {
    fe.backward(exec, g);
    r.grads = snapshot(fe.gradients());
  }
  exec.fence();
  return r;
}

// |got - ref| against c u of each tensor's largest reference value; returns the largest error in
// units of u * max|ref|.
double worst_in_u(const Result& got, const Result& ref, double u) {
  double worst = max_abs_diff(got.out, ref.out) / (u * max_abs(ref.out));
  for (std::size_t t = 0; t < ref.grads.size(); ++t) {
    const double scale = max_abs(ref.grads[t]);
    if (scale == 0) continue;
    worst = std::max(worst, max_abs_diff(got.grads[t], ref.grads[t]) / (u * scale));
  }
  return worst;
}

template <class Storage>
void storage_matches_double(const char* name) {
  const double u = dchag::StorageTraits<Storage>::unit_roundoff;
  Exec exec;
  const int B = 2;
  for (const auto strategy : kStrategies) {
    for (const auto memory :
         {MemoryPolicy::keep, MemoryPolicy::recompute, MemoryPolicy::inference}) {
      if (strategy == Strategy::materialized && memory != MemoryPolicy::keep) continue;
      FrontEndConfig cfg{8, 8, 8, 4, 16, 4, strategy, Convention::climax, 4100};
      cfg.memory = memory;
      INFO(name << ", " << dchag::to_string(strategy) << ", " << dchag::to_string(memory));
      V4<double> images("images", B, cfg.channels, cfg.height, cfg.width);
      V3<double> g("g", B, cfg.patches(), cfg.dim);
      fill_normal(images, 4101);
      fill_normal(g, 4102);
      round_in_place<Storage>(images);  // both models read the same pixels

      dchag::FlatFrontEnd<Exec, double> ref_flat(exec, cfg);
      fill_normal(ref_flat.parameters(), 4103, param_sd(cfg.dim));
      dchag::FlatFrontEnd<Exec, float, Storage> flat(exec, cfg);
      fill_normal(flat.parameters(), 4103, param_sd(cfg.dim));
      dchag::FlatFrontEnd<Exec, float, float> flat32(exec, cfg);
      fill_normal(flat32.parameters(), 4103, param_sd(cfg.dim));
      flat.set_chunk_channels(3);  // several chunks, one of them partial
      const bool train = memory != MemoryPolicy::inference;
      const auto ref = step(ref_flat, images, g, train);
      const double err = worst_in_u(step(flat, images_as<Storage>(images), g, train), ref, u);
      const double err32 = worst_in_u(step(flat32, images_as<float>(images), g, train), ref, u);
      INFO("flat: error " << err << " u, float storage " << err32 << " u");
      CHECK(err <= 4.0);
      CHECK(err >= 1.0 / 256);
      CHECK(err32 < 1.0 / 256);

      for (const auto kind : {PartialKind::linear, PartialKind::cross_attention}) {
        INFO("D-CHAG " << dchag::to_string(kind));
        const std::vector<std::vector<int>> groups{{0, 1, 2, 3}, {4, 5, 6, 7}};
        dchag::DchagEmulation<Exec, double> ref_emu(exec, cfg, DchagOptions{kind, 2}, groups);
        fill_normal(ref_emu.parameters(), 4104, param_sd(cfg.dim));
        dchag::DchagEmulation<Exec, float, Storage> emu(exec, cfg, DchagOptions{kind, 2}, groups);
        fill_normal(emu.parameters(), 4104, param_sd(cfg.dim));
        const double e = worst_in_u(step(emu, images_as<Storage>(images), g, train),
                                    step(ref_emu, images, g, train), u);
        INFO("error " << e << " u");
        CHECK(e <= 4.0);
        CHECK(e >= 1.0 / 256);
      }
    }
  }
}

}  // namespace

TEST_CASE("16-bit storage types convert like the host reference", "[precision]") {
  using dchag::detail::bf16_storage;
  using dchag::detail::fp16_storage;
  STATIC_REQUIRE(sizeof(dchag::bf16) == 2);
  STATIC_REQUIRE(sizeof(dchag::fp16) == 2);
  SECTION("widening, every 16-bit pattern") {
    for (std::uint32_t b = 0; b < 65536; ++b) {
      const auto bits = static_cast<std::uint16_t>(b);
      INFO("bits " << b);
      REQUIRE(same_float(static_cast<float>(bf16_storage::from_bits(bits)),
                         dchag::detail::bf16_bits_to_float(bits)));
      REQUIRE(same_float(static_cast<float>(fp16_storage::from_bits(bits)),
                         dchag::detail::half_bits_to_float(bits)));
    }
  }
  SECTION("narrowing rounds to nearest even, with subnormals, overflow and NaN") {
    for (const float x : float_samples()) {
      INFO("x = " << x);
      const std::uint16_t bf = bf16_storage(x).bits, hf = fp16_storage(x).bits;
      if (std::isnan(x)) {
        REQUIRE(std::isnan(dchag::detail::bf16_bits_to_float(bf)));
        REQUIRE(std::isnan(dchag::detail::half_bits_to_float(hf)));
        continue;
      }
      REQUIRE(bf == dchag::detail::double_to_bf16_bits(x));
      REQUIRE(hf == dchag::detail::double_to_half_bits(x));
    }
  }
  SECTION("dchag::bf16 and dchag::fp16 on the execution space") {
    // Kokkos' own types where they are 16-bit (CUDA, HIP), dchag's elsewhere: same rounding.
    const auto all = float_samples();
    std::vector<float> xs;
    for (std::size_t i = 0; i < all.size(); i += 7) xs.push_back(all[i]);
    const auto n = xs.size();
    Kokkos::View<float*, Mem> in("in", n), bf("bf", n), hf("hf", n);
    auto h_in = Kokkos::create_mirror_view(in);
    for (std::size_t i = 0; i < n; ++i) h_in(i) = xs[i];
    Kokkos::deep_copy(in, h_in);
    Kokkos::parallel_for(
        "round_trip", Kokkos::RangePolicy<Exec>(0, n), KOKKOS_LAMBDA(const std::size_t i) {
          bf(i) = dchag::detail::round_to<dchag::bf16>(in(i));
          hf(i) = dchag::detail::round_to<dchag::fp16>(in(i));
        });
    auto h_bf = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), bf);
    auto h_hf = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), hf);
    for (std::size_t i = 0; i < n; ++i) {
      const float x = xs[i];
      INFO("x = " << x);
      if (std::isnan(x)) continue;
      // A finite value, or an infinity of the right sign.
      CHECK(same_float(h_bf(i),
                       dchag::detail::bf16_bits_to_float(dchag::detail::double_to_bf16_bits(x))));
      CHECK(same_float(h_hf(i),
                       dchag::detail::half_bits_to_float(dchag::detail::double_to_half_bits(x))));
    }
  }
}

TEST_CASE("bf16 storage agrees with double within its unit roundoff", "[precision][front_end]") {
  storage_matches_double<dchag::bf16>("bf16");
}

TEST_CASE("fp16 storage agrees with double within its unit roundoff", "[precision][front_end]") {
  storage_matches_double<dchag::fp16>("fp16");
}

TEST_CASE("With 16-bit storage every policy and strategy sees the same tokens", "[precision]") {
  // Both strategies and all three policies round each token once, where it is formed: their
  // results differ only by float arithmetic (the pooled and materialized kernels sum in other
  // orders), orders of magnitude below the bf16 rounding that the previous tests see.
  Exec exec;
  const int B = 2;
  FrontEndConfig cfg{9, 8, 8, 4, 16, 4, Strategy::pooled, Convention::climax, 4200};
  V4<double> images("images", B, cfg.channels, cfg.height, cfg.width);
  V3<double> g("g", B, cfg.patches(), cfg.dim);
  fill_normal(images, 4201);
  fill_normal(g, 4202);
  const auto x = images_as<dchag::bf16>(images);
  dchag::FlatFrontEnd<Exec, float, dchag::bf16> flat(exec, cfg);
  fill_normal(flat.parameters(), 4203, param_sd(cfg.dim));
  flat.set_chunk_channels(2);
  const Result keep = step(flat, x, g);
  const double u32 = 5.9604644775390625e-08;
  for (const auto memory : {MemoryPolicy::recompute, MemoryPolicy::inference}) {
    INFO(dchag::to_string(memory));
    flat.set_memory_policy(memory);
    const Result r = step(flat, x, g, memory != MemoryPolicy::inference);
    CHECK(max_abs_diff(r.out, keep.out) == 0.0);  // the same kernels on the same tokens
    for (std::size_t t = 0; t < r.grads.size(); ++t)
      CHECK(max_abs_diff(r.grads[t], keep.grads[t]) == 0.0);
  }
  flat.set_memory_policy(MemoryPolicy::keep);
  flat.set_strategy(Strategy::materialized);
  const double e = worst_in_u(step(flat, x, g), keep, u32);
  INFO("materialized against pooled: " << e << " float ulps");
  CHECK(e <= 64.0);
}

TEST_CASE("16-bit storage halves the kept tokens in the estimate", "[precision][memory]") {
  FrontEndConfig cfg{64, 32, 32, 4, 64, 4, Strategy::pooled, Convention::climax, 1};
  const std::int64_t B = 2, tokens = B * cfg.channels * cfg.patches() * cfg.dim;
  using F32 = dchag::FlatFrontEnd<Exec, float>;
  using B16 = dchag::FlatFrontEnd<Exec, float, dchag::bf16>;
  const auto f = F32::estimate(cfg, B), b = B16::estimate(cfg, B);
  CHECK(f.parameters == b.parameters);
  CHECK(f.gradients == b.gradients);
  // The kept tokens take 2 bytes instead of 4; the patches are extracted per chunk again.
  CHECK(f.activations - b.activations >= 2 * tokens);
  CHECK(b.total() < f.total());
  cfg.memory = MemoryPolicy::recompute;
  CHECK(B16::estimate(cfg, B).total() <= F32::estimate(cfg, B).total());
}

TEST_CASE("check_finite reads 16-bit images", "[precision][check_finite]") {
  Exec exec;
  V4<double> images("images", 1, 2, 4, 4);
  fill_normal(images, 4300);
  auto h = Kokkos::create_mirror_view(images);
  Kokkos::deep_copy(h, images);
  h(0, 1, 2, 3) = std::numeric_limits<double>::quiet_NaN();
  Kokkos::deep_copy(images, h);
  const auto x = images_as<dchag::bf16>(images);
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(
      dchag::check_finite(exec, "images", x),
      Contains("dchag::check_finite: images element 27 ([0, 1, 2, 3] of") && Contains("is nan"));
  const auto finite = images_as<dchag::fp16>(V4<double>("zeros", 1, 2, 4, 4));
  dchag::check_finite(exec, "images", finite);
}
