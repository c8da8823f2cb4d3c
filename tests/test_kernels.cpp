// Building blocks: every backward against central differences (double), pooled against
// materialized cross-attention, streaming against one-shot, initialisation, and bad input.
#include <catch2/catch.hpp>

#include <dchag/aggregate.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace dchag_test;
using dchag::AttentionConfig;
using dchag::ChannelSelection;
using dchag::Convention;
using dchag::MemoryPolicy;
using dchag::PartialKind;
using dchag::Segments;
using dchag::Strategy;

namespace {

// Random parameters for gradient tests: N(0, 0.3^2). The ClimaX initialisation (zero query, zero
// biases) makes every score equal and hides the query and key gradients.
constexpr double kParamSd = 0.3;

std::vector<std::string> attention_names(Convention c, const std::string& prefix = "") {
  if (c == Convention::climax)
    return {prefix + "var_query", prefix + "var_agg.in_proj_weight",
            prefix + "var_agg.in_proj_bias", prefix + "var_agg.out_proj.weight",
            prefix + "var_agg.out_proj.bias"};
  return {prefix + "query", prefix + "q.weight", prefix + "kv.weight", prefix + "proj.weight",
          prefix + "proj.bias"};
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

// Tokenizer holding `owned` of C channels, images [B, Cimg, H, W], selection `sel`.
void fd_tokenizer(int C, std::vector<int> owned, int Cimg, const ChannelSelection& sel,
                  std::uint64_t seed) {
  Exec exec;
  const int B = 2, p = 2, H = 4, W = 6, D = 6, L = (H / p) * (W / p);
  dchag::Tokenizer<Exec, double> tok(exec, C, p, D, owned, seed);
  fill_normal(tok.parameters(), seed + 1, kParamSd);
  V4<double> images("images", B, Cimg, H, W), tokens("tokens", B, sel.size(), L, D),
      g("g", B, sel.size(), L, D);
  fill_normal(images, seed + 2);
  fill_normal(g, seed + 3);
  auto loss = [&] {
    tok.forward(exec, images, sel, tokens);
    exec.fence();
    return dot(tokens, g);
  };
  tok.zero_gradients(exec);
  loss();
  tok.backward(exec, g);
  exec.fence();
  const auto rs = fd_check(tok.parameters(), tok.gradients(), loss);
  for (int c : sel.channel_id) {
    require_live(rs, "token_embeds." + std::to_string(c) + ".proj.weight");
    require_live(rs, "token_embeds." + std::to_string(c) + ".proj.bias");
  }
  require_live(rs, "var_embed");
}

}  // namespace

TEST_CASE("Tokenizer backward matches finite differences", "[kernels][fd][tokenizer]") {
  SECTION("all channels, in order") {
    fd_tokenizer(5, {0, 1, 2, 3, 4}, 5, ChannelSelection::own({0, 1, 2, 3, 4}), 10);
  }
  SECTION("images hold a permuted subset of the owned channels") {
    // Channel 3 is owned but not selected: its gradients must stay zero (and are checked).
    fd_tokenizer(8, {1, 3, 4, 6}, 3, ChannelSelection::own({6, 1, 4}), 20);
  }
  SECTION("channels picked from a full image, out of order") {
    fd_tokenizer(8, {1, 3, 4, 6}, 8, ChannelSelection::from_full_image({4, 1, 6, 3}), 30);
  }
}

// ---------------------------------------------------------------------------------------------
// CrossAttention
// ---------------------------------------------------------------------------------------------

namespace {

void fd_attention(Convention conv, Strategy strat, int B, int N, int L, int D, int heads,
                  const Segments& seg, std::uint64_t seed) {
  INFO("convention " << dchag::to_string(conv) << ", strategy " << dchag::to_string(strat) << ", B "
                     << B << ", N " << N << ", L " << L << ", D " << D << ", heads " << heads
                     << ", segments " << seg.count());
  Exec exec;
  dchag::CrossAttention<Exec, double> att(exec, {D, heads, conv, strat}, seed, "var_agg");
  fill_normal(att.parameters(), seed + 1, kParamSd);
  const int k = seg.count();
  V4<double> x("x", B, N, L, D), out("out", B, k, L, D), g("g", B, k, L, D), dx("dx", B, N, L, D);
  fill_normal(x, seed + 2);
  fill_normal(g, seed + 3);
  typename dchag::CrossAttention<Exec, double>::Saved saved;
  auto loss = [&] {
    att.forward(exec, x, seg, out, saved);
    exec.fence();
    return dot(out, g);
  };
  att.zero_gradients(exec);
  loss();
  att.backward(exec, x, saved, g, dx);
  exec.fence();
  const auto rs = fd_check(att.parameters(), att.gradients(), loss);
  const auto rx = fd_check_input("x", x, dx, loss);
  CHECK(rx.max_grad > 1e-6);
  // With N = 1 per segment the softmax is constant: no gradient reaches the query or Wq/Wk.
  bool single = true;
  for (int j = 0; j < k; ++j) single = single && seg.size(j) == 1;
  for (const auto& name : attention_names(conv)) {
    if (!single || name.find("out") != std::string::npos || name.find("proj.") != std::string::npos)
      require_live(rs, name);
  }
}

}  // namespace

TEST_CASE("CrossAttention backward matches finite differences", "[kernels][fd][attention]") {
  struct Case {
    const char* what;
    int B, N, L, D, heads;
    Segments seg;
  };
  const Case cases[] = {
      {"basic", 2, 5, 3, 8, 2, Segments::whole(5)},
      {"one head", 2, 4, 2, 6, 1, Segments::whole(4)},
      {"D = 20 with 5 heads", 1, 4, 2, 20, 5, Segments::whole(4)},
      {"N = 1", 2, 1, 3, 8, 2, Segments::whole(1)},
      {"B * L = 1", 1, 6, 1, 8, 4, Segments::whole(6)},
      {"uneven segments", 2, 7, 2, 8, 2, Segments{{0, 1, 4, 7}}},
      {"array_split segments", 1, 7, 3, 6, 3, Segments::split(7, 3)},
  };
  std::uint64_t seed = 100;
  for (const auto& c : cases) {
    for (const auto conv : kConventions) {
      for (const auto strat : kStrategies) {
        INFO("case " << c.what);
        fd_attention(conv, strat, c.B, c.N, c.L, c.D, c.heads, c.seg, seed += 10);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// LinearAggregation, PartialAggregator, PositionalEmbedding
// ---------------------------------------------------------------------------------------------

TEST_CASE("LinearAggregation backward matches finite differences", "[kernels][fd][linear]") {
  Exec exec;
  const int B = 2, n = 3, L = 4, D = 5;
  for (const int k : {1, 3}) {
    INFO("segments " << k);
    dchag::LinearAggregation<Exec, double> lin(exec, n, 7, "linear");
    fill_normal(lin.parameters(), 70 + k, kParamSd);
    const auto seg = Segments::split(n * k, k);
    V4<double> x("x", B, n * k, L, D), y("y", B, k, L, D), g("g", B, k, L, D),
        dx("dx", B, n * k, L, D);
    fill_normal(x, 71 + k);
    fill_normal(g, 72 + k);
    auto loss = [&] {
      lin.forward(exec, x, seg, y);
      exec.fence();
      return dot(y, g);
    };
    lin.zero_gradients(exec);
    loss();
    lin.backward(exec, x, seg, g, dx);
    exec.fence();
    const auto rs = fd_check(lin.parameters(), lin.gradients(), loss);
    require_live(rs, "weight");
    require_live(rs, "bias");
    CHECK(fd_check_input("x", x, dx, loss).max_grad > 1e-6);
  }
}

namespace {

void fd_partial(PartialKind kind, int inputs, int tree, Convention conv, Strategy strat,
                std::uint64_t seed) {
  INFO("partial " << dchag::to_string(kind) << ", inputs " << inputs << ", tree " << tree
                  << ", convention " << dchag::to_string(conv) << ", strategy "
                  << dchag::to_string(strat));
  Exec exec;
  const int B = 2, L = 3, D = 6, heads = 2;
  dchag::PartialAggregator<Exec, double> part(exec, kind, inputs, tree, {D, heads, conv, strat},
                                              seed, "partial.1.");
  fill_normal(part.parameters(), seed + 1, kParamSd);
  V4<double> tokens("tokens", B, inputs, L, D), out("out", B, 1, L, D), g("g", B, 1, L, D),
      d_tokens("d_tokens", B, inputs, L, D);
  fill_normal(tokens, seed + 2);
  fill_normal(g, seed + 3);
  auto loss = [&] {
    part.forward(exec, tokens, out);
    exec.fence();
    return dot(out, g);
  };
  part.zero_gradients(exec);
  loss();
  part.backward(exec, tokens, g, d_tokens);
  exec.fence();
  const auto rs = fd_check(part.parameters(), part.gradients(), loss);
  for (const auto& r : rs) require_live(rs, r.name);  // every tensor matters here
  CHECK(fd_check_input("tokens", tokens, d_tokens, loss).max_grad > 1e-6);
}

}  // namespace

TEST_CASE("PartialAggregator backward matches finite differences", "[kernels][fd][partial]") {
  SECTION("linear, no tree") {
    fd_partial(PartialKind::linear, 5, 1, Convention::climax, Strategy::pooled, 300);
  }
  SECTION("linear, tree of 2") {
    fd_partial(PartialKind::linear, 6, 2, Convention::climax, Strategy::pooled, 310);
  }
  SECTION("cross-attention, trees of 1, 2 (3 + 2) and 3 (3 + 2 + 2)") {
    std::uint64_t seed = 320;
    for (const auto conv : kConventions) {
      for (const auto strat : kStrategies) {
        fd_partial(PartialKind::cross_attention, 5, 1, conv, strat, seed += 10);
        fd_partial(PartialKind::cross_attention, 5, 2, conv, strat, seed += 10);
        fd_partial(PartialKind::cross_attention, 7, 3, conv, strat, seed += 10);
      }
    }
  }
}

TEST_CASE("PositionalEmbedding backward matches finite differences", "[kernels][fd][pos_embed]") {
  Exec exec;
  const int B = 3, gh = 2, gw = 3, D = 4, L = gh * gw;
  dchag::PositionalEmbedding<Exec, double> pos(exec, gh, gw, D);
  fill_normal(pos.parameters(), 400, kParamSd);
  V3<double> out("out", B, L, D), g("g", B, L, D);
  fill_normal(g, 401);
  auto loss = [&] {
    Kokkos::deep_copy(out, 0.5);  // forward adds to what is there
    pos.forward(exec, out);
    exec.fence();
    return dot(out, g);
  };
  pos.zero_gradients(exec);
  loss();
  pos.backward(exec, g);
  exec.fence();
  require_live(fd_check(pos.parameters(), pos.gradients(), loss), "pos_embed");
}

// ---------------------------------------------------------------------------------------------
// Pooled against materialized, streaming against one-shot
//
// Tolerance. The two strategies compute the same real numbers through different chains of sums:
// the materialized one forms K and V (dot products of length D), the scores (length hd) and sums
// a V over a segment's inputs (N); the pooled one forms u (length hd), the scores (length D), z (a
// sum over N) and Wv z (length D). Both then project out (length D). Every computed sum of n terms
// is within n u sum|terms| of the exact one (Higham, "Accuracy and Stability of Numerical
// Algorithms", 3.1), u = eps / 2 the unit roundoff of the scalar type, and errors of chained stages
// add. The longer of the two chains sets the bound: at most D + N + D for the outputs (one more D
// for dx), and parameter gradients add a sum over all B N L tokens: n_chain = 2 D + N (+ D) (+ B N
// L). Each result is within n_chain u S of the exact one, S the size of the terms, so the two
// differ by at most 2 n_chain u S. With inputs N(0, 1) and parameters N(0, 0.3^2) the terms are no
// bigger than the results: S = max(1, max |reference|). The check allows 4 n_chain u S, twice that,
// for the O(1) stages not counted one by one (softmax, scaling). Rounding errors of random sign
// grow like sqrt(n) u rather than n u: the largest difference seen is about 1/20 of the tolerance
// and the median about 1/100, while a dropped or doubled term in a backward is O(1e-2..1).
//
// Streaming computes the same sums as the one-shot pooled forward in another order, with each
// chunk's partial sums rescaled by exp(old max - new max) (one more rounding per chunk, at most N
// chunks): the same chain length and the same bound apply.
// ---------------------------------------------------------------------------------------------

namespace {

template <class T>
double rounding_tolerance(std::int64_t n_chain, double scale) {
  return 4.0 * static_cast<double>(n_chain) * std::numeric_limits<T>::epsilon() / 2 *
         std::max(1.0, scale);
}

struct AttentionRun {
  std::vector<double> out, dx;
  std::vector<std::vector<double>> grads;
};

}  // namespace

TEMPLATE_TEST_CASE("Pooled and materialized cross-attention agree on random problems",
                   "[kernels][equivalence][attention]", float, double) {
  using T = TestType;
  Exec exec;
  std::mt19937 gen(2024);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); };
  for (int trial = 0; trial < 12; ++trial) {
    const int B = pick(1, 3), N = pick(1, 10), L = pick(1, 7), heads = pick(1, 4);
    const int D = heads * (trial == 11 ? 16 : pick(1, 6));
    const Convention conv = kConventions[trial % 2];
    const int k = pick(1, std::min(N, 3));
    const Segments seg = Segments::split(N, k);
    INFO("trial " << trial << ": B " << B << ", N " << N << ", L " << L << ", D " << D << ", heads "
                  << heads << ", segments " << k << ", convention " << dchag::to_string(conv));
    dchag::CrossAttention<Exec, T> att(exec, {D, heads, conv, Strategy::pooled}, 500 + trial);
    fill_normal(att.parameters(), 600 + trial, kParamSd);
    V4<T> x("x", B, N, L, D), g("g", B, k, L, D), out("out", B, k, L, D), dx("dx", B, N, L, D);
    fill_normal(x, 700 + trial);
    fill_normal(g, 800 + trial);
    AttentionRun run[2];
    for (int s = 0; s < 2; ++s) {
      att.set_strategy(kStrategies[s]);
      typename dchag::CrossAttention<Exec, T>::Saved saved;
      att.zero_gradients(exec);
      att.forward(exec, x, seg, out, saved);
      att.backward(exec, x, saved, g, dx);
      exec.fence();
      run[s] = {to_host(out), to_host(dx), snapshot(att.gradients())};
    }
    const auto& pooled = run[0];
    const auto& ref = run[1];  // materialized, the PyTorch-shaped reference
    const std::int64_t n_fwd = 2 * D + N;
    const std::int64_t n_grad = n_fwd + std::int64_t(B) * N * L;
    {
      const double tol = rounding_tolerance<T>(n_fwd, max_abs(ref.out));
      INFO("out: max diff " << max_abs_diff(pooled.out, ref.out) << ", tolerance " << tol);
      CHECK(max_abs_diff(pooled.out, ref.out) <= tol);
    }
    {
      const double tol = rounding_tolerance<T>(n_fwd + D, max_abs(ref.dx));
      INFO("dx: max diff " << max_abs_diff(pooled.dx, ref.dx) << ", tolerance " << tol);
      CHECK(max_abs_diff(pooled.dx, ref.dx) <= tol);
    }
    const auto names = att.gradients();
    for (std::size_t t = 0; t < names.size(); ++t) {
      const double tol = rounding_tolerance<T>(n_grad, max_abs(ref.grads[t]));
      const double diff = max_abs_diff(pooled.grads[t], ref.grads[t]);
      INFO(names[t].name << ": max diff " << diff << ", tolerance " << tol << ", max |ref| "
                         << max_abs(ref.grads[t]));
      CHECK(diff <= tol);
    }
  }
}

TEMPLATE_TEST_CASE("Streaming cross-attention equals one-shot forward and backward",
                   "[kernels][equivalence][stream]", float, double) {
  using T = TestType;
  Exec exec;
  const int B = 2, N = 7, L = 5, D = 12, heads = 3;
  const std::vector<std::vector<int>> splits = {
      {0, 7}, {0, 1, 2, 3, 4, 5, 6, 7}, {0, 3, 7}, {0, 5, 6, 7}, {0, 2, 4, 7}};
  for (const auto conv : kConventions) {
    dchag::CrossAttention<Exec, T> att(exec, {D, heads, conv, Strategy::pooled}, 900);
    fill_normal(att.parameters(), 901, kParamSd);
    V4<T> x("x", B, N, L, D), g("g", B, 1, L, D), out("out", B, 1, L, D), dx("dx", B, N, L, D);
    fill_normal(x, 902);
    fill_normal(g, 903);
    typename dchag::CrossAttention<Exec, T>::Saved once;
    att.zero_gradients(exec);
    att.forward(exec, x, Segments::whole(N), out, once);
    att.backward(exec, x, once, g, dx);
    exec.fence();
    const auto ref_out = to_host(out), ref_dx = to_host(dx);
    const auto ref_grads = snapshot(att.gradients());
    const std::int64_t n_fwd = 2 * D + N, n_grad = n_fwd + std::int64_t(B) * N * L;
    for (const auto& split : splits) {
      INFO("convention " << dchag::to_string(conv) << ", chunks " << split.size() - 1);
      typename dchag::CrossAttention<Exec, T>::Saved streamed;
      Kokkos::deep_copy(out, T(0));
      att.stream_begin(exec, x, streamed);
      for (std::size_t c = 0; c + 1 < split.size(); ++c)
        att.stream_chunk(exec, x, split[c], split[c + 1], streamed);
      att.stream_end(exec, streamed, out);
      att.zero_gradients(exec);
      att.backward(exec, x, streamed, g, dx);
      exec.fence();
      CHECK(max_abs_diff(to_host(out), ref_out) <= rounding_tolerance<T>(n_fwd, max_abs(ref_out)));
      CHECK(max_abs_diff(to_host(dx), ref_dx) <= rounding_tolerance<T>(n_fwd + D, max_abs(ref_dx)));
      const auto grads = snapshot(att.gradients());
      const auto names = att.gradients();
      for (std::size_t t = 0; t < grads.size(); ++t) {
        INFO(names[t].name);
        CHECK(max_abs_diff(grads[t], ref_grads[t]) <=
              rounding_tolerance<T>(n_grad, max_abs(ref_grads[t])));
      }
    }
  }
}

// Recompute (DESIGN 3.8) runs the keep policy's kernels on the same tokens: the softmax weights
// are the same expression of the same scores, so the two agree to a few ulps of the results'
// scale (bit for bit on host spaces, where every dot product has a fixed order).
TEMPLATE_TEST_CASE("Streamed cross-attention: every memory policy, chunk views and segments",
                   "[kernels][equivalence][stream][recompute]", float, double) {
  using T = TestType;
  using Saved = typename dchag::CrossAttention<Exec, T>::Saved;
  Exec exec;
  const int B = 2, N = 7, L = 3, D = 8, heads = 2;
  const std::vector<std::vector<int>> splits = {
      {0, 7}, {0, 1, 2, 3, 4, 5, 6, 7}, {0, 3, 7}, {0, 5, 6, 7}};
  dchag::CrossAttention<Exec, T> att(exec, {D, heads, Convention::climax, Strategy::pooled}, 910);
  fill_normal(att.parameters(), 911, kParamSd);
  V4<T> x("x", B, N, L, D), dx("dx", B, N, L, D);
  fill_normal(x, 912);
  const std::int64_t n_fwd = 2 * D + N, n_grad = n_fwd + std::int64_t(B) * N * L;
  const double ulps = 8 * std::numeric_limits<T>::epsilon();
  for (int k = 1; k <= 3; ++k) {
    const Segments seg = Segments::split(N, k);
    V4<T> g("g", B, k, L, D), out("out", B, k, L, D);
    fill_normal(g, 913 + k);
    Saved once;
    att.zero_gradients(exec);
    att.forward(exec, x, seg, out, once);
    att.backward(exec, x, once, g, dx);
    exec.fence();
    const auto ref_out = to_host(out), ref_dx = to_host(dx);
    const auto ref_grads = snapshot(att.gradients());
    const auto names = att.gradients();
    for (const auto& split : splits) {
      AttentionRun kept;
      for (const auto memory : {MemoryPolicy::keep, MemoryPolicy::recompute}) {
        for (const bool chunk_views : {false, true}) {
          INFO("segments " << k << ", chunks " << split.size() - 1 << ", memory "
                           << dchag::to_string(memory) << ", chunk views " << chunk_views);
          // The chunk's tokens in a view of their own, as the fused front ends pass them.
          auto input = [&](int n0, int n1) {
            if (!chunk_views) return x;
            V4<T> xc("xc", B, n1 - n0, L, D);
            Kokkos::deep_copy(xc, Kokkos::subview(x, Kokkos::ALL, Kokkos::make_pair(n0, n1),
                                                  Kokkos::ALL, Kokkos::ALL));
            return xc;
          };
          Saved saved;
          Kokkos::deep_copy(out, T(0));
          Kokkos::deep_copy(dx, T(0));
          att.stream_begin(exec, saved, B, N, L, seg, memory);
          for (std::size_t c = 0; c + 1 < split.size(); ++c)
            att.stream_chunk(exec, input(split[c], split[c + 1]), split[c], split[c + 1], saved);
          att.stream_end(exec, saved, out);
          att.zero_gradients(exec);
          att.backward_begin(exec, saved, g);
          for (std::size_t c = 0; c + 1 < split.size(); ++c) {
            const int n0 = split[c], n1 = split[c + 1];
            V4<T> dxc("dxc", B, n1 - n0, L, D);
            att.backward_chunk(exec, input(n0, n1), saved, n0, n1, dxc);
            Kokkos::deep_copy(Kokkos::subview(dx, Kokkos::ALL, Kokkos::make_pair(n0, n1),
                                              Kokkos::ALL, Kokkos::ALL),
                              dxc);
          }
          att.backward_end(exec, saved);
          exec.fence();
          const AttentionRun run{to_host(out), to_host(dx), snapshot(att.gradients())};
          CHECK(max_abs_diff(run.out, ref_out) <= rounding_tolerance<T>(n_fwd, max_abs(ref_out)));
          CHECK(max_abs_diff(run.dx, ref_dx) <= rounding_tolerance<T>(n_fwd + D, max_abs(ref_dx)));
          for (std::size_t t = 0; t < run.grads.size(); ++t) {
            INFO(names[t].name);
            CHECK(max_abs_diff(run.grads[t], ref_grads[t]) <=
                  rounding_tolerance<T>(n_grad, max_abs(ref_grads[t])));
          }
          if (memory == MemoryPolicy::keep && !chunk_views) {
            kept = run;
            continue;
          }
          CHECK(max_abs_diff(run.out, kept.out) <= ulps * std::max(1.0, max_abs(kept.out)));
          CHECK(max_abs_diff(run.dx, kept.dx) <= ulps * std::max(1.0, max_abs(kept.dx)));
          for (std::size_t t = 0; t < run.grads.size(); ++t) {
            INFO(names[t].name);
            CHECK(max_abs_diff(run.grads[t], kept.grads[t]) <=
                  ulps * std::max(1.0, max_abs(kept.grads[t])));
          }
        }
      }
    }
    // Inference: the same output, and no backward.
    Saved inferred;
    att.stream_begin(exec, inferred, B, N, L, seg, MemoryPolicy::inference);
    att.stream_chunk(exec, x, 0, N, inferred);
    att.stream_end(exec, inferred, out);
    exec.fence();
    CHECK(max_abs_diff(to_host(out), ref_out) <= rounding_tolerance<T>(n_fwd, max_abs(ref_out)));
    require_invalid([&] { att.backward_begin(exec, inferred, g); },
                    {"dchag::CrossAttention::backward_begin", "MemoryPolicy::inference"});
    require_invalid([&] { att.backward(exec, x, inferred, g, dx); },
                    {"dchag::CrossAttention::backward", "MemoryPolicy::inference"});
  }
}

// ---------------------------------------------------------------------------------------------
// Initialisation
// ---------------------------------------------------------------------------------------------

namespace {

// 1-D sin-cos of `pos` into `dim` values, written out independently of the library: the first
// dim/2 values sin(pos w_k), the next dim/2 cos(pos w_k), w_k = 10000^(-k / (dim/2)); odd: last 0.
std::vector<double> sincos(double pos, int dim) {
  std::vector<double> v(dim, 0.0);
  const int half = dim / 2;
  for (int k = 0; k < half; ++k) {
    const double w = 1.0 / std::pow(10000.0, double(k) / half);
    v[k] = std::sin(pos * w);
    v[half + k] = std::cos(pos * w);
  }
  return v;
}

void require_all_zero(const List<float>& list, const std::string& name) {
  INFO(name);
  const auto* t = find(list, name);
  REQUIRE(t != nullptr);
  CHECK(max_abs(held_values(*t)) == 0.0);
}

// Sample standard deviation of a tensor, for the trunc-normal(0.02) initialisation.
double sd_of(const std::vector<double>& v) {
  double s = 0, s2 = 0;
  for (double x : v) {
    s += x;
    s2 += x * x;
  }
  const double n = double(v.size());
  return std::sqrt(s2 / n - (s / n) * (s / n));
}

}  // namespace

TEST_CASE("Initialisation is deterministic and independent of which channels a rank owns",
          "[kernels][init]") {
  Exec exec;
  const int C = 8, p = 3, D = 16;
  dchag::Tokenizer<Exec, float> all(exec, C, p, D, {0, 1, 2, 3, 4, 5, 6, 7}, 42);
  dchag::Tokenizer<Exec, float> again(exec, C, p, D, {0, 1, 2, 3, 4, 5, 6, 7}, 42);
  dchag::Tokenizer<Exec, float> some(exec, C, p, D, {5, 3}, 42);
  dchag::Tokenizer<Exec, float> other_seed(exec, C, p, D, {0, 1, 2, 3, 4, 5, 6, 7}, 43);
  require_same(all.parameters(), again.parameters(), [](const std::string&) { return 0.0; });
  for (const int c : {3, 5}) {
    for (const auto& suffix : {".proj.weight", ".proj.bias"}) {
      const std::string name = "token_embeds." + std::to_string(c) + suffix;
      INFO(name);
      CHECK(values_of(some.parameters(), name) == values_of(all.parameters(), name));
    }
  }
  // var_embed rows 3 and 5 of the small tokenizer equal those rows of the full one.
  const auto some_params = some.parameters();
  const auto* e_some = find(some_params, "var_embed");
  const auto e_all = values_of(all.parameters(), "var_embed");
  REQUIRE(e_some->pieces.size() == 2);
  for (const auto& piece : e_some->pieces) {
    const auto row = to_host(piece.values);
    CHECK(row ==
          std::vector<double>(e_all.begin() + piece.offset, e_all.begin() + piece.offset + D));
  }
  // Different seeds give different weights; different channels too.
  const auto w0 = values_of(all.parameters(), "token_embeds.0.proj.weight");
  CHECK(w0 != values_of(other_seed.parameters(), "token_embeds.0.proj.weight"));
  CHECK(w0 != values_of(all.parameters(), "token_embeds.1.proj.weight"));

  // Cross-attention: same seed and name, same values; another name, another stream.
  for (const auto conv : kConventions) {
    dchag::CrossAttention<Exec, float> a(exec, {D, 4, conv, Strategy::pooled}, 42, "var_agg");
    dchag::CrossAttention<Exec, float> b(exec, {D, 4, conv, Strategy::materialized}, 42, "var_agg");
    dchag::CrossAttention<Exec, float> c(exec, {D, 4, conv, Strategy::pooled}, 42, "final.");
    require_same(a.parameters(), b.parameters(), [](const std::string&) { return 0.0; });
    const auto wa = snapshot(a.parameters()), wc = snapshot(c.parameters());
    CHECK(wa[1] != wc[1]);
  }
}

TEST_CASE("Initialisation follows ClimaX: zero queries and biases, sin-cos embeddings",
          "[kernels][init]") {
  Exec exec;
  const int D = 32;
  SECTION("cross-attention, climax convention") {
    dchag::CrossAttention<Exec, float> att(exec, {D, 4, Convention::climax, Strategy::pooled}, 3);
    const auto ps = att.parameters();
    require_all_zero(ps, "var_query");
    require_all_zero(ps, "var_agg.in_proj_bias");
    require_all_zero(ps, "var_agg.out_proj.bias");
    // xavier_uniform over [3D, D] as nn.MultiheadAttention: bound sqrt(6 / (D + 3D)).
    const auto w_in = values_of(ps, "var_agg.in_proj_weight");
    const double bound = std::sqrt(6.0 / (4.0 * D));
    CHECK(max_abs(w_in) <= bound);
    CHECK(max_abs(w_in) > 0.9 * bound);
    // trunc-normal(0.02): 1024 samples, the sample sd is within 0.02 +- 3 * 0.02 / sqrt(2 * 1024).
    CHECK(sd_of(values_of(ps, "var_agg.out_proj.weight")) == Approx(0.02).margin(0.002));
  }
  SECTION("cross-attention, artifact convention") {
    dchag::CrossAttention<Exec, float> att(exec, {D, 4, Convention::artifact, Strategy::pooled}, 3);
    const auto ps = att.parameters();
    require_all_zero(ps, "query");
    require_all_zero(ps, "proj.bias");
    for (const auto& name : {"q.weight", "kv.weight", "proj.weight"}) {
      INFO(name);
      CHECK(sd_of(values_of(ps, name)) == Approx(0.02).margin(0.002));
    }
  }
  SECTION("linear aggregation") {
    dchag::LinearAggregation<Exec, float> lin(exec, 6, 3, "partial.0.weight");
    require_all_zero(lin.parameters(), "bias");
    const auto w = values_of(lin.parameters(), "weight");
    CHECK(max_abs(w) > 0);
    CHECK(max_abs(w) < 0.1);  // 5 sd of 0.02
  }
  SECTION("tokenizer: zero biases, sin-cos channel embedding of the channel id") {
    for (const int dim : {D, 7}) {
      INFO("D " << dim);
      const std::vector<int> owned = {6, 2, 5};
      dchag::Tokenizer<Exec, float> tok(exec, 9, 2, dim, owned, 5);
      const auto ps = tok.parameters();
      for (int c : owned) require_all_zero(ps, "token_embeds." + std::to_string(c) + ".proj.bias");
      const auto* e = find(ps, "var_embed");
      REQUIRE(e->shape == std::vector<std::int64_t>{1, 9, dim});
      REQUIRE(e->pieces.size() == owned.size());
      for (std::size_t s = 0; s < owned.size(); ++s) {
        INFO("channel " << owned[s]);
        CHECK(e->pieces[s].offset == std::int64_t(owned[s]) * dim);
        const auto row = to_host(e->pieces[s].values);
        const auto want = sincos(owned[s], dim);
        // float storage of a double value: within half an ulp of numbers <= 1.
        CHECK(max_abs_diff(row, want) <= std::numeric_limits<float>::epsilon());
      }
      if (dim == D) {  // 128 samples: sd within 0.02 +- 3 * 0.02 / sqrt(256)
        CHECK(sd_of(values_of(ps, "token_embeds.2.proj.weight")) == Approx(0.02).margin(0.004));
      }
    }
  }
  SECTION("positional embedding: first D/2 from the patch column, last D/2 from the row") {
    const int gh = 3, gw = 4, dim = 16;
    dchag::PositionalEmbedding<Exec, double> pos(exec, gh, gw, dim);
    const auto ps = pos.parameters();
    REQUIRE(ps.size() == 1);
    CHECK(ps[0].name == "pos_embed");
    CHECK(ps[0].shape == std::vector<std::int64_t>{1, gh * gw, dim});
    const auto v = held_values(ps[0]);
    for (int r = 0; r < gh; ++r) {
      for (int c = 0; c < gw; ++c) {
        INFO("patch row " << r << ", column " << c);
        const auto want_r = sincos(r, dim / 2), want_c = sincos(c, dim / 2);
        const double* got = &v[std::size_t(r * gw + c) * dim];
        for (int d = 0; d < dim / 2; ++d) {
          CHECK(got[d] == Approx(want_c[d]).margin(1e-14));
          CHECK(got[dim / 2 + d] == Approx(want_r[d]).margin(1e-14));
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bad input: std::invalid_argument naming the function, the argument and the expected value.
// ---------------------------------------------------------------------------------------------

TEST_CASE("Building blocks reject bad input with a precise message", "[kernels][errors]") {
  Exec exec;
  const int B = 2, C = 4, p = 2, H = 4, W = 6, D = 8, L = (H / p) * (W / p);

  SECTION("Segments::split with k > n") {
    require_invalid([] { Segments::split(3, 5); },
                    {"dchag::Segments::split", "k is 5", "expected 1 <= k <= n = 3"});
    require_invalid([] { Segments::split(3, 0); }, {"dchag::Segments::split", "k is 0"});
  }

  SECTION("Tokenizer") {
    require_invalid(
        [&] {
          dchag::Tokenizer<Exec, float>(exec, C, p, D, {0, 2, 0}, 1);
        },
        {"dchag::Tokenizer", "owned channel 0", "listed twice", "expected"});
    require_invalid(
        [&] {
          dchag::Tokenizer<Exec, float>(exec, C, p, D, {0, 4}, 1);
        },
        {"dchag::Tokenizer", "owned channel 4", "expected 0 <= channel < 4"});
    require_invalid([&] { dchag::Tokenizer<Exec, float>(exec, C, p, D, {}, 1); },
                    {"dchag::Tokenizer", "owned channel list is empty", "expected at least one"});
    dchag::Tokenizer<Exec, float> tok(exec, C, p, D, {0, 1, 3}, 1);
    V4<float> images("images", B, 3, H, W), tokens("tokens", B, 3, L, D);
    require_invalid([&] { tok.backward(exec, tokens); },
                    {"dchag::Tokenizer::backward", "before forward"});
    {
      V4<float> bad("bad", B, 3, H + 1, W), t("t", B, 3, ((H + 1) / p) * (W / p), D);
      require_invalid(
          [&] {
            tok.forward(exec, bad, ChannelSelection::own({0, 1, 3}), t);
          },
          {"dchag::Tokenizer::forward", "images.extent(2) is H = 5",
           "expected a positive multiple of patch = 2"});
    }
    {
      V4<float> bad("bad", B, 3, H, W + 3), t("t", B, 3, L, D);
      require_invalid(
          [&] {
            tok.forward(exec, bad, ChannelSelection::own({0, 1, 3}), t);
          },
          {"dchag::Tokenizer::forward", "images.extent(3) is W = 9",
           "expected a positive multiple of patch = 2"});
    }
    require_invalid(
        [&] {
          tok.forward(exec, images, ChannelSelection::own({0, 1, 0}), tokens);
        },
        {"dchag::Tokenizer::forward", "channel id 0", "selected twice", "expected unique"});
    require_invalid(
        [&] {
          tok.forward(exec, images, ChannelSelection::own({0, 1, 2}), tokens);
        },
        {"dchag::Tokenizer::forward", "channel id 2", "not held", "expected"});
    require_invalid(
        [&] {
          tok.forward(exec, images, ChannelSelection::own({0, 1, 5}), tokens);
        },
        {"dchag::Tokenizer::forward", "channel id 5", "expected 0 <= id < C = 4"});
    require_invalid(
        [&] {
          tok.forward(exec, images, ChannelSelection{{0, 1, 3}, {0, 1, 3}}, tokens);
        },
        {"dchag::Tokenizer::forward", "image index 3", "expected < images.extent(1) = 3"});
    require_invalid(
        [&] {
          tok.forward(exec, images, ChannelSelection::from_full_image({0, 1, 3}), tokens);
        },
        {"dchag::Tokenizer::forward", "images.extent(1) is 3", "expected C = 4"});
    {
      V4<float> t("t", B, 0, L, D);
      require_invalid(
          [&] { tok.forward(exec, images, ChannelSelection::own({}), t); },
          {"dchag::Tokenizer::forward", "selection is empty", "expected at least one channel"});
    }
    {
      V4<float> t("t", B, 3, L, D + 1);
      require_invalid(
          [&] {
            tok.forward(exec, images, ChannelSelection::own({0, 1, 3}), t);
          },
          {"dchag::Tokenizer::forward", "tokens is [2, 3, 6, 9]",
           "expected [B, J, L, D] = [2, 3, 6, 8]"});
    }
    tok.forward(exec, images, ChannelSelection::own({0, 1, 3}), tokens);
    {
      V4<float> dt("dt", B, 2, L, D);
      require_invalid([&] { tok.backward(exec, dt); },
                      {"dchag::Tokenizer::backward", "d_tokens is [2, 2, 6, 8]",
                       "expected [B, J, L, D] = [2, 3, 6, 8]"});
    }
    // Patches per chunk (the recompute policy): a chunk wider than prepared, a token view of
    // neither shape, and a backward of a chunk whose patches are not held are refused.
    tok.prepare(exec, images, ChannelSelection::own({0, 1, 3}), 2);
    {
      V4<float> wide("wide", B, 3, L, D), odd("odd", B, 2, L, D), chunk("chunk", B, 2, L, D);
      require_invalid([&] { tok.project(exec, 0, 3, wide); },
                      {"dchag::Tokenizer::project", "chunk [0, 3) holds 3 channels",
                       "expected at most the prepared patch chunk 2"});
      require_invalid(
          [&] { tok.project(exec, 0, 1, odd); },
          {"dchag::Tokenizer::project", "tokens is [2, 2, 6, 8]", "or the chunk's [2, 1, 6, 8]"});
      tok.project(exec, 0, 2, chunk);
      V4<float> dt("dt", B, 1, L, D);
      require_invalid([&] { tok.backward(exec, dt, 2, 3); },
                      {"dchag::Tokenizer::backward", "patches of channels [2, 3) are not held",
                       "held: [0, 2)", "project this chunk again first"});
      require_invalid(
          [&] {
            tok.prepare(exec, images, ChannelSelection::own({0, 1, 3}), -1);
          },
          {"dchag::Tokenizer::prepare", "patch_chunk is -1", "expected >= 0"});
    }
  }

  SECTION("CrossAttention") {
    require_invalid(
        [&] {
          dchag::CrossAttention<Exec, float>(exec, {D, 3, Convention::climax, Strategy::pooled});
        },
        {"dchag::CrossAttention", "heads is 3", "expected a divisor of dim = 8"});
    for (const auto strat : kStrategies) {
      dchag::CrossAttention<Exec, float> att(exec, {D, 2, Convention::climax, strat});
      const int N = 5;
      V4<float> x("x", B, N, L, D), dx("dx", B, N, L, D);
      V3<float> out("out", B, L, D);
      require_invalid([&] { att.backward(exec, x, out, dx); },
                      {"dchag::CrossAttention::backward", "saved state is empty",
                       "expected the state of a forward"});
      {
        V4<float> x7("x7", B, N, L, D - 1);
        V3<float> o7("o7", B, L, D - 1);
        require_invalid([&] { att.forward(exec, x7, o7); },
                        {"dchag::CrossAttention::forward", "x.extent(3) is 7", "expected D = 8"});
      }
      {
        V3<float> o("o", B, L + 1, D);
        require_invalid([&] { att.forward(exec, x, o); },
                        {"dchag::CrossAttention::forward", "out is [2, 1, 7, 8]",
                         "expected [B, k, L, D] = [2, 1, 6, 8]"});
      }
      {
        typename dchag::CrossAttention<Exec, float>::Saved saved;
        V4<float> o("o", B, 1, L, D);
        require_invalid([&] { att.forward(exec, x, Segments::split(N, 2), o, saved); },
                        {"dchag::CrossAttention::forward", "out is [2, 1, 6, 8]",
                         "expected [B, k, L, D] = [2, 2, 6, 8]"});
        require_invalid([&] { att.forward(exec, x, Segments::whole(N + 1), o, saved); },
                        {"dchag::CrossAttention::forward", "segments cover 6 inputs",
                         "expected x.extent(1) = 5"});
      }
      att.forward(exec, x, out);
      {
        V3<float> g("g", B + 1, L, D);
        require_invalid([&] { att.backward(exec, x, g, dx); },
                        {"dchag::CrossAttention::backward", "d_out is [3, 1, 6, 8]",
                         "expected [B, k, L, D] = [2, 1, 6, 8]"});
      }
      {
        V4<float> bad_dx("bad_dx", B, N - 1, L, D);
        require_invalid(
            [&] { att.backward(exec, x, out, bad_dx); },
            {"dchag::CrossAttention::backward", "dx is [2, 4, 6, 8]", "expected the shape of x"});
      }
      if (strat == Strategy::materialized) {
        typename dchag::CrossAttention<Exec, float>::Saved saved;
        require_invalid(
            [&] { att.stream_begin(exec, x, saved); },
            {"dchag::CrossAttention::stream_begin", "strategy is materialized", "expected pooled"});
      } else {
        typename dchag::CrossAttention<Exec, float>::Saved saved;
        att.stream_begin(exec, x, saved);
        require_invalid(
            [&] { att.stream_chunk(exec, x, 1, 3, saved); },
            {"dchag::CrossAttention::stream_chunk", "chunk [1, 3)", "continue the stream at 0"});
        {
          V4<float> xc("xc", B, 2, L, D);
          require_invalid(
              [&] { att.stream_chunk(exec, xc, 0, 3, saved); },
              {"dchag::CrossAttention::stream_chunk", "x is [2, 2, 6, 8]",
               "expected all inputs [B, N, L, D] = [2, 5, 6, 8]", "or the chunk's [2, 3, 6, 8]"});
        }
        att.stream_chunk(exec, x, 0, 3, saved);
        V4<float> o("o", B, 1, L, D);
        require_invalid(
            [&] { att.stream_end(exec, saved, o); },
            {"dchag::CrossAttention::stream_end", "covered 3 of N = 5", "expected all"});
        typename dchag::CrossAttention<Exec, float>::Saved grouped;
        require_invalid(
            [&] {
              att.stream_begin(exec, grouped, B, 5, L, Segments::split(5, 2),
                               dchag::MemoryPolicy::keep, true);
            },
            {"dchag::CrossAttention::stream_begin", "a group stream needs one segment, got 2"});
      }
    }
  }

  SECTION("LinearAggregation") {
    dchag::LinearAggregation<Exec, float> lin(exec, 3);
    V4<float> x("x", B, 6, L, D), y("y", B, 2, L, D), dx("dx", B, 6, L, D);
    require_invalid(
        [&] {
          lin.forward(exec, x, Segments{{0, 2, 6}}, y);
        },
        {"dchag::LinearAggregation::forward", "segment 0 holds 2 inputs", "expected n = 3"});
    {
      V4<float> y1("y1", B, 1, L, D);
      require_invalid([&] { lin.forward(exec, x, Segments::split(6, 2), y1); },
                      {"dchag::LinearAggregation::forward", "y is [2, 1, 6, 8]",
                       "expected [B, k, L, D] = [2, 2, 6, 8]"});
      require_invalid([&] { lin.backward(exec, x, Segments::split(6, 2), y1, dx); },
                      {"dchag::LinearAggregation::backward", "dy is [2, 1, 6, 8]",
                       "expected [B, k, L, D] = [2, 2, 6, 8]"});
    }
    {
      V4<float> xc("xc", B, 3, L, D);
      require_invalid([&] { lin.stream_chunk(exec, xc, 0, 2, y); },
                      {"dchag::LinearAggregation::stream_chunk", "x is [2, 3, 6, 8]",
                       "expected [B, k * n, L, D] = [2, 6, 6, 8]", "or the chunk's [2, 2, 6, 8]"});
      require_invalid([&] { lin.stream_chunk(exec, xc, 4, 7, y); },
                      {"dchag::LinearAggregation::stream_chunk", "chunk [4, 7)",
                       "inside the k * n = 6 inputs"});
    }
    {
      V4<float> bad("bad", B, 6, L, D + 1);
      require_invalid(
          [&] { lin.backward(exec, x, Segments::split(6, 2), y, bad); },
          {"dchag::LinearAggregation::backward", "dx is [2, 6, 6, 9]", "expected the shape of x"});
    }
  }

  SECTION("PartialAggregator") {
    const AttentionConfig cfg{D, 2, Convention::climax, Strategy::pooled};
    require_invalid(
        [&] { dchag::PartialAggregator<Exec, float>(exec, PartialKind::linear, 5, 2, cfg); },
        {"dchag::PartialAggregator", "linear tree over 5 channels with tree = 2",
         "expected tree to divide the channel count"});
    require_invalid(
        [&] {
          dchag::PartialAggregator<Exec, float>(exec, PartialKind::cross_attention, 3, 4, cfg);
        },
        {"dchag::PartialAggregator", "tree is 4", "expected 1 <= tree <= inputs = 3"});
    for (const auto kind : {PartialKind::linear, PartialKind::cross_attention}) {
      INFO(dchag::to_string(kind));
      dchag::PartialAggregator<Exec, float> part(exec, kind, 4, 2, cfg);
      V4<float> tokens("tokens", B, 4, L, D), out("out", B, 1, L, D), dt("dt", B, 4, L, D);
      require_invalid([&] { part.backward(exec, tokens, out, dt); },
                      {"dchag::PartialAggregator::backward", "before forward"});
      V4<float> t3("t3", B, 3, L, D);
      require_invalid(
          [&] { part.forward(exec, t3, out); },
          {"dchag::PartialAggregator::forward", "tokens.extent(1) is 3", "expected C_r = 4"});
    }
  }

  SECTION("PositionalEmbedding") {
    dchag::PositionalEmbedding<Exec, float> pos(exec, 2, 3, D);
    V3<float> bad("bad", B, 5, D);
    require_invalid([&] { pos.forward(exec, bad); },
                    {"dchag::PositionalEmbedding::forward", "tensor is [B, 5, 8]",
                     "expected [B, L, D] = [B, 6, 8]"});
    require_invalid([&] { pos.backward(exec, bad); },
                    {"dchag::PositionalEmbedding::backward", "tensor is [B, 5, 8]",
                     "expected [B, L, D] = [B, 6, 8]"});
  }
}

// ---------------------------------------------------------------------------------------------
// Sizes the kernels cannot index, and estimates that validate what they are given.
// ---------------------------------------------------------------------------------------------

TEST_CASE("Building blocks refuse sizes the kernels cannot index", "[kernels][errors][sizes]") {
  Exec exec;
  SECTION("Tokenizer") {
    // p = 65536: p * p = 2^32 wrapped to 0 in int, and the weights were sized from that.
    require_invalid(
        [&] {
          dchag::Tokenizer<Exec, float>(exec, 2, 65536, 8, {0, 1});
        },
        {"dchag::Tokenizer", "patch pixels p * p = 65536 * 65536", "is 4294967296",
         "expected <= INT_MAX = 2147483647"});
    // p * p = 46340^2 fits an int; with D = 2^23 one channel's weights are 1.8e16 > 2^53.
    require_invalid([&] { dchag::Tokenizer<Exec, float>(exec, 1, 46340, 1 << 23, {0}); },
                    {"dchag::Tokenizer", "weights of the owned channels n * p * p * D",
                     "= 1 * 46340 * 46340 * 8388608", "expected <= 2^53"});
  }
  SECTION("PositionalEmbedding") {
    require_invalid([&] { dchag::PositionalEmbedding<Exec, float>(exec, 65536, 65536, 8); },
                    {"dchag::PositionalEmbedding", "patches L = grid_h * grid_w = 65536 * 65536",
                     "is 4294967296", "expected <= INT_MAX"});
    require_invalid([&] { dchag::PositionalEmbedding<Exec, float>(exec, 0, 3, 8); },
                    {"dchag::PositionalEmbedding", "grid_h is 0", "expected >= 1"});
  }
  SECTION("Tokenizer::forward: images of a selection") {
    const int B = 2, H = 4, W = 6, p = 2, D = 8, L = 6;
    dchag::Tokenizer<Exec, float> tok(exec, 5, p, D, {0, 1, 3});
    V4<float> four("four", B, 4, H, W), five("five", B, 5, H, W), tokens("tokens", B, 3, L, D);
    // own(): exactly the selected channels; a fourth image channel would be silently ignored.
    require_invalid(
        [&] {
          tok.forward(exec, four, ChannelSelection::own({0, 1, 3}), tokens);
        },
        {"dchag::Tokenizer::forward", "images.extent(1) is 4", "expected J = 3"});
    // from_full_image(): every model channel.
    require_invalid(
        [&] {
          tok.forward(exec, four, ChannelSelection::from_full_image({0, 1, 3}), tokens);
        },
        {"dchag::Tokenizer::forward", "images.extent(1) is 4", "expected C = 5"});
    tok.forward(exec, five, ChannelSelection::from_full_image({0, 1, 3}), tokens);
  }
}

TEST_CASE("Building-block estimates validate their arguments", "[kernels][errors][memory]") {
  using Tok = dchag::Tokenizer<Exec, float>;
  using Pos = dchag::PositionalEmbedding<Exec, float>;
  using Lin = dchag::LinearAggregation<Exec, float>;
  using Part = dchag::PartialAggregator<Exec, float>;
  const AttentionConfig att{8, 2, Convention::climax, Strategy::pooled};

  CHECK(Tok::estimate(3, 2, 8, 2, 3, 6).total() > 0);
  require_invalid([] { Tok::estimate(3, 2, 8, 0, 3, 6); },
                  {"dchag::Tokenizer::estimate", "B is 0", "expected >= 1"});
  require_invalid([] { Tok::estimate(3, 2, 8, 2, 4, 6); },
                  {"dchag::Tokenizer::estimate", "J is 4", "expected 1 <= J <= owned = 3"});
  require_invalid([] { Tok::estimate(0, 2, 8, 2, 1, 6); },
                  {"dchag::Tokenizer::estimate", "owned is 0", "expected >= 1"});
  require_invalid([] { Tok::estimate(3, 0, 8, 2, 3, 6); },
                  {"dchag::Tokenizer::estimate", "patch is 0", "expected >= 1"});
  require_invalid([] { Tok::estimate(3, 65536, 8, 1, 1, 1); },
                  {"dchag::Tokenizer::estimate", "patch pixels p * p", "expected <= INT_MAX"});
  require_invalid([] { Tok::estimate(3, 2, 8, 2, 3, std::int64_t(1) << 31); },
                  {"dchag::Tokenizer::estimate", "token rows B * J * L", "expected <= INT_MAX"});

  CHECK(Pos::estimate(6, 8).total() > 0);
  require_invalid([] { Pos::estimate(0, 8); },
                  {"dchag::PositionalEmbedding::estimate", "patches is 0", "expected >= 1"});
  require_invalid(
      [] { Pos::estimate(std::int64_t(1) << 32, 8); },
      {"dchag::PositionalEmbedding::estimate", "patches L is 4294967296", "expected <= INT_MAX"});

  CHECK(Lin::estimate(3).total() > 0);
  require_invalid([] { Lin::estimate(0); },
                  {"dchag::LinearAggregation::estimate", "inputs is 0", "expected >= 1"});

  CHECK(Part::estimate(PartialKind::cross_attention, 4, 2, att, 2, 6).total() > 0);
  require_invalid([&] { Part::estimate(PartialKind::linear, 5, 2, att, 2, 6); },
                  {"dchag::PartialAggregator::estimate", "linear tree over 5 channels"});
  require_invalid([&] { Part::estimate(PartialKind::cross_attention, 3, 4, att, 2, 6); },
                  {"dchag::PartialAggregator::estimate", "tree is 4"});
  require_invalid([&] { Part::estimate(PartialKind::cross_attention, 4, 1, att, 0, 6); },
                  {"dchag::PartialAggregator::estimate", "B is 0", "expected >= 1"});
  require_invalid(
      [&] {
        Part::estimate(PartialKind::cross_attention, 4, 1,
                       {8, 3, Convention::climax, Strategy::pooled}, 2, 6);
      },
      {"dchag::PartialAggregator::estimate", "attention.heads is 3", "expected a divisor"});
}
