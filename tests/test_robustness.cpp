// Robustness of the building blocks and front ends: a strategy switched between forward and
// backward, gradients under a saturated softmax, allocation failures.
#include <catch2/catch.hpp>

#include <dchag/aggregate.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace dchag_test;
using dchag::Convention;
using dchag::Segments;
using dchag::Strategy;

namespace {

constexpr double kParamSd = 0.3;

// The group reduction of a channel group of one rank: exercises the grouped (exact_flat) code
// path of the pooled kernels without MPI.
template <class T>
struct OneRankGroup final : dchag::GroupReduce<T, Mem> {
  void max(const dchag::Unmanaged1<T, Mem>&) const override {}
  void sum(const dchag::Unmanaged1<T, Mem>&) const override {}
};

struct Gradients {
  std::vector<double> out;
  std::vector<std::vector<double>> params;
};

template <class FrontEnd, class Images>
Gradients step(FrontEnd& fe, const Images& images, const V3<double>& d_out, bool switch_strategy) {
  Exec exec;
  V3<double> out("out", d_out.extent(0), d_out.extent(1), d_out.extent(2));
  fe.set_strategy(Strategy::pooled);
  fe.zero_gradients(exec);
  fe.forward(exec, images, out);
  if (switch_strategy) fe.set_strategy(Strategy::materialized);
  fe.backward(exec, d_out);
  exec.fence();
  return {to_host(out), snapshot(fe.gradients())};
}

}  // namespace

TEST_CASE("Backward follows the strategy its forward ran with", "[robustness][strategy]") {
  Exec exec;
  dchag::FrontEndConfig cfg;
  cfg.channels = 5;
  cfg.height = 4;
  cfg.width = 6;
  cfg.patch = 2;
  cfg.dim = 8;
  cfg.heads = 2;
  const int B = 2, L = cfg.patches();
  V4<double> images("images", B, cfg.channels, cfg.height, cfg.width);
  V3<double> d_out("d_out", B, L, cfg.dim);
  fill_normal(images, 1);
  fill_normal(d_out, 2);

  SECTION("FlatFrontEnd") {
    dchag::FlatFrontEnd<Exec, double> fe(exec, cfg);
    fill_normal(fe.parameters(), 3, kParamSd);
    const Gradients plain = step(fe, images, d_out, false);
    const Gradients switched = step(fe, images, d_out, true);
    for (std::size_t t = 0; t < plain.params.size(); ++t) {
      INFO(fe.gradients()[t].name);
      CHECK(max_abs_diff(plain.params[t], switched.params[t]) == 0.0);
    }
  }
  SECTION("DchagEmulation, cross-attention partial aggregation with a tree") {
    dchag::DchagEmulation<Exec, double> fe(exec, cfg, {dchag::PartialKind::cross_attention, 2},
                                           {{0, 1, 2}, {3, 4}});
    fill_normal(fe.parameters(), 4, kParamSd);
    const Gradients plain = step(fe, images, d_out, false);
    const Gradients switched = step(fe, images, d_out, true);
    for (std::size_t t = 0; t < plain.params.size(); ++t) {
      INFO(fe.gradients()[t].name);
      CHECK(max_abs_diff(plain.params[t], switched.params[t]) == 0.0);
    }
  }
  SECTION("CrossAttention: a materialized forward, then pooled, then backward") {
    dchag::CrossAttention<Exec, double> att(exec,
                                            {8, 2, Convention::climax, Strategy::materialized});
    fill_normal(att.parameters(), 5, kParamSd);
    V4<double> x("x", B, 4, L, 8), g("g", B, 1, L, 8), out("out", B, 1, L, 8), dx("dx", B, 4, L, 8);
    fill_normal(x, 6);
    fill_normal(g, 7);
    typename dchag::CrossAttention<Exec, double>::Saved saved;
    att.forward(exec, x, Segments::whole(4), out, saved);
    att.set_strategy(Strategy::pooled);
    REQUIRE_NOTHROW(att.backward(exec, x, saved, g, dx));
    // The chunked backward exists for pooled forwards only: a clear error, not a crash.
    require_invalid([&] { att.backward_begin(exec, saved, g); },
                    {"dchag::CrossAttention::backward_begin", "materialized forward"});
  }
}

namespace {

struct AttentionResult {
  std::vector<double> out, dx;
  std::vector<std::vector<double>> grads;
};

enum class Path { one_shot, streamed, grouped };

// One forward and backward of `att` (set to `strategy`) on x and g; `path` picks the one-shot
// forward, the streamed forward with a chunked backward, or the grouped (one-rank group) stream.
template <class T>
AttentionResult run_attention(dchag::CrossAttention<Exec, T>& att, Strategy strategy, Path path,
                              const V4<T>& x, const V4<T>& g) {
  Exec exec;
  const int B = x.extent(0), N = x.extent(1), L = x.extent(2), D = x.extent(3);
  V4<T> out("out", B, 1, L, D), dx("dx", B, N, L, D);
  typename dchag::CrossAttention<Exec, T>::Saved saved;
  att.set_strategy(strategy);
  att.zero_gradients(exec);
  if (path == Path::one_shot || strategy == Strategy::materialized) {
    att.forward(exec, x, Segments::whole(N), out, saved);
    att.backward(exec, x, saved, g, dx);
  } else {
    OneRankGroup<T> one;
    const dchag::GroupReduce<T, Mem>* group = path == Path::grouped ? &one : nullptr;
    att.stream_begin(exec, x, saved, group != nullptr);
    const int cuts[] = {0, N / 3, N};  // two chunks: the winner may sit in either
    for (int c = 0; c < 2; ++c) att.stream_chunk(exec, x, cuts[c], cuts[c + 1], saved);
    att.stream_end(exec, saved, out, group);
    att.backward_begin(exec, saved, g, group);
    for (int c = 0; c < 2; ++c) {
      V4<T> part("dx_chunk", B, cuts[c + 1] - cuts[c], L, D);
      att.backward_chunk(exec, x, saved, cuts[c], cuts[c + 1], part);
      Kokkos::deep_copy(exec,
                        Kokkos::subview(dx, Kokkos::ALL, Kokkos::make_pair(cuts[c], cuts[c + 1]),
                                        Kokkos::ALL, Kokkos::ALL),
                        part);
    }
    att.backward_end(exec, saved, group);
  }
  exec.fence();
  return {to_host(out), to_host(dx), snapshot(att.gradients())};
}

template <class T>
double max_error(const AttentionResult& a, const AttentionResult& ref) {
  // Relative to the largest reference value of each tensor, so that every tensor counts.
  auto rel = [](const std::vector<double>& v, const std::vector<double>& r) {
    return max_abs_diff(v, r) / std::max(max_abs(r), std::numeric_limits<double>::min());
  };
  double e = std::max(rel(a.out, ref.out), rel(a.dx, ref.dx));
  for (std::size_t t = 0; t < a.grads.size(); ++t) {
    // Gradients that are exactly zero in the reference (key and query under a one-hot softmax)
    // are measured against the scale of the value gradients instead.
    const double scale = std::max(max_abs(ref.grads[t]), max_abs(ref.dx));
    e = std::max(e, max_abs_diff(a.grads[t], ref.grads[t]) / scale);
  }
  return e;
}

}  // namespace

TEMPLATE_TEST_CASE("Pooled gradients stay accurate when the softmax saturates",
                   "[robustness][saturated][attention]", float, double) {
  using T = TestType;
  Exec exec;
  const int B = 2, N = 9, L = 3, D = 16, heads = 2;
  // Inputs of about 1e3 and queries scaled by up to 1e4 give scores up to about 1e7: the softmax
  // is one-hot to the last bit and the key and query gradients are exactly zero.
  for (const double query_scale : {1.0, 1e2, 1e4}) {
    for (const auto conv : kConventions) {
      INFO("query scale " << query_scale << ", convention " << dchag::to_string(conv));
      dchag::CrossAttention<Exec, double> ref_att(exec, {D, heads, conv, Strategy::materialized});
      dchag::CrossAttention<Exec, T> att(exec, {D, heads, conv, Strategy::pooled});
      fill_normal(ref_att.parameters(), 11, kParamSd);
      {
        auto qv = flat(ref_att.parameters().front().pieces.front().values);
        auto h = to_host(qv);
        for (auto& v : h) v *= query_scale;
        from_host(qv, h);
      }
      {
        const auto from = ref_att.parameters();
        const auto to = att.parameters();
        for (std::size_t t = 0; t < to.size(); ++t)
          from_host(flat(to[t].pieces.front().values), to_host(from[t].pieces.front().values));
      }
      V4<double> xd("x", B, N, L, D), gd("g", B, 1, L, D);
      fill_normal(xd, 12, 1e3);
      fill_normal(gd, 13);
      V4<T> x("x", B, N, L, D), g("g", B, 1, L, D);
      from_host(x, to_host(xd));
      from_host(g, to_host(gd));
      // The reference: materialized in double on the inputs rounded to T.
      V4<double> xr("xr", B, N, L, D);
      from_host(xr, to_host(x));
      const AttentionResult ref =
          run_attention<double>(ref_att, Strategy::materialized, Path::one_shot, xr, gd);
      // The materialized strategy's error in float, against the double reference; in double it
      // is that error scaled by the ratio of the unit roundoffs (an error bound is linear in it),
      // since the reference itself is materialized double.
      dchag::CrossAttention<Exec, float> att_f(exec, {D, heads, conv, Strategy::materialized});
      {
        const auto from = ref_att.parameters();
        const auto to = att_f.parameters();
        for (std::size_t t = 0; t < to.size(); ++t)
          from_host(flat(to[t].pieces.front().values), to_host(from[t].pieces.front().values));
      }
      V4<float> xf("x", B, N, L, D), gf("g", B, 1, L, D);
      from_host(xf, to_host(x));
      from_host(gf, to_host(g));
      const double mat_error_float = max_error<float>(
          run_attention<float>(att_f, Strategy::materialized, Path::one_shot, xf, gf), ref);
      const double mat_error = mat_error_float * std::numeric_limits<T>::epsilon() /
                               std::numeric_limits<float>::epsilon();
      // Floor: a few unit roundoffs of T (a one-hot softmax can make the error exactly zero).
      const double floor = 64 * std::numeric_limits<T>::epsilon();
      for (const Path path : {Path::one_shot, Path::streamed, Path::grouped}) {
        const AttentionResult pooled = run_attention<T>(att, Strategy::pooled, path, x, g);
        const double err = max_error<T>(pooled, ref);
        INFO("path " << int(path) << ": pooled error " << err << ", materialized error "
                     << mat_error);
        CHECK(err <= 10 * mat_error + floor);
      }
    }
  }
}

TEST_CASE("A failed allocation is a dchag::error naming the View and its bytes",
          "[robustness][allocation]") {
  using Big = dchag::View1<float, Mem>;
  Big v;
  bool thrown = false;
  try {
    dchag::detail::ensure_view(v, "dchag::test::huge", std::size_t(1) << 60);
  } catch (const dchag::error& e) {
    thrown = true;
    const std::string what = e.what();
    INFO(what);
    CHECK_THAT(what, Catch::Matchers::Contains("dchag::test::huge"));
    CHECK_THAT(what, Catch::Matchers::Contains(std::to_string((std::size_t(1) << 60) * 4)));
  }
  CHECK(thrown);
}
