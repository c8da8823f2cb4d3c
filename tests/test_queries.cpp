// Several learned queries (DESIGN 3.9), beside the PyTorch goldens (test_goldens.cpp): query j of
// an N_q module is the single-query module with query j (a second strategy, forward and every
// gradient), central differences for both strategies, conventions, segments and masks, the
// streamed forward and chunked backward against one-shot, the front ends under every memory
// policy, and bad input.
#include <catch2/catch.hpp>

#include <dchag/aggregate.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace dchag_test;
using dchag::Convention;
using dchag::MemoryPolicy;
using dchag::Segments;
using dchag::Strategy;

namespace {

constexpr double kParamSd = 0.3;

dchag::View2<std::uint8_t, Mem> device_mask(const std::vector<std::vector<int>>& m) {
  dchag::View2<std::uint8_t, Mem> v("mask", m.size(), m.front().size());
  auto h = Kokkos::create_mirror_view(v);
  for (std::size_t b = 0; b < m.size(); ++b)
    for (std::size_t c = 0; c < m[b].size(); ++c) h(b, c) = static_cast<std::uint8_t>(m[b][c]);
  Kokkos::deep_copy(v, h);
  return v;
}

// Output [B, k, L * Q, D] row (b, j, l, q) of query q.
std::int64_t out_row(int b, int j, int l, int q, int k, int L, int Q) {
  return ((std::int64_t(b) * k + j) * L + l) * Q + q;
}

}  // namespace

TEST_CASE("query j of several is the single-query module with query j", "[queries]") {
  Exec exec;
  const int B = 2, N = 5, L = 3, D = 8, heads = 2, Q = 3;
  const Segments seg{{0, 2, 5}};
  const int k = seg.count();
  const auto valid = device_mask({{1, 1, 0, 1, 1}, {0, 1, 1, 0, 1}});
  for (const auto conv : kConventions) {
    for (const auto strat : kStrategies) {
      INFO(dchag::to_string(conv) << ", " << dchag::to_string(strat));
      dchag::CrossAttention<Exec, double> multi(exec, {D, heads, conv, strat, Q}, 800);
      fill_normal(multi.parameters(), 801, kParamSd);
      V4<double> x("x", B, N, L, D), out("out", B, k, L * Q, D), g("g", B, k, L * Q, D);
      V4<double> dx("dx", B, N, L, D);
      fill_normal(x, 802);
      fill_normal(g, 803);
      typename dchag::CrossAttention<Exec, double>::Saved saved;
      multi.zero_gradients(exec);
      multi.forward(exec, x, seg, out, saved, nullptr, valid);
      multi.backward(exec, x, saved, g, dx);
      exec.fence();
      const auto got = to_host(out), got_dx = to_host(dx);
      const auto params = multi.parameters();
      const auto query_name = conv == Convention::climax ? "var_query" : "query";
      const auto all_queries = values_of(params, query_name);

      // The reference: one single-query module per query, the same other weights; gradients
      // accumulate over the queries except the query's own.
      dchag::CrossAttention<Exec, double> one(exec, {D, heads, conv, strat}, 900);
      one.zero_gradients(exec);
      std::vector<double> want(got.size()), want_dx(got_dx.size(), 0.0), want_dq;
      for (int q = 0; q < Q; ++q) {
        for (const auto& t : one.parameters()) {
          if (t.name == query_name) {
            from_host(t.pieces.front().values,
                      std::vector<double>(all_queries.begin() + q * D,
                                          all_queries.begin() + (q + 1) * D));
          } else {
            from_host(t.pieces.front().values, values_of(params, t.name));
          }
        }
        V4<double> o("o", B, k, L, D), gq("gq", B, k, L, D), dxq("dxq", B, N, L, D);
        const auto hg = to_host(g);
        std::vector<double> gslice(std::size_t(B) * k * L * D);
        for (int b = 0; b < B; ++b)
          for (int j = 0; j < k; ++j)
            for (int l = 0; l < L; ++l)
              for (int d = 0; d < D; ++d)
                gslice[((std::size_t(b) * k + j) * L + l) * D + d] =
                    hg[out_row(b, j, l, q, k, L, Q) * D + d];
        from_host(gq, gslice);
        const auto dq_before = values_of(one.gradients(), query_name);
        typename dchag::CrossAttention<Exec, double>::Saved s1;
        one.forward(exec, x, seg, o, s1, nullptr, valid);
        one.backward(exec, x, s1, gq, dxq);
        exec.fence();
        const auto ho = to_host(o), hdx = to_host(dxq);
        for (int b = 0; b < B; ++b)
          for (int j = 0; j < k; ++j)
            for (int l = 0; l < L; ++l)
              for (int d = 0; d < D; ++d)
                want[out_row(b, j, l, q, k, L, Q) * D + d] =
                    ho[((std::size_t(b) * k + j) * L + l) * D + d];
        for (std::size_t i = 0; i < hdx.size(); ++i) want_dx[i] += hdx[i];
        const auto dq_after = values_of(one.gradients(), query_name);
        for (int d = 0; d < D; ++d) want_dq.push_back(dq_after[d] - dq_before[d]);
      }
      const double tol = 1e-13;
      CHECK(max_abs_diff(got, want) <= tol * max_abs(want));
      CHECK(max_abs_diff(got_dx, want_dx) <= tol * max_abs(want_dx));
      for (const auto& t : multi.gradients()) {
        INFO(t.name);
        const auto ref = t.name == query_name ? want_dq : values_of(one.gradients(), t.name);
        CHECK(max_abs_diff(held_values(t), ref) <= tol * std::max(1.0, max_abs(ref)));
      }
      CHECK(max_abs(got_dx) > 0);
    }
  }
}

TEST_CASE("several queries: backward matches finite differences", "[queries][fd]") {
  Exec exec;
  const int B = 2, N = 4, L = 2, D = 6, heads = 3, Q = 2;
  std::uint64_t seed = 820;
  for (const auto conv : kConventions) {
    for (const auto strat : kStrategies) {
      for (const bool masked : {false, true}) {
        INFO(dchag::to_string(conv) << ", " << dchag::to_string(strat) << ", masked " << masked);
        const Segments seg = Segments::split(N, 2);
        dchag::CrossAttention<Exec, double> att(exec, {D, heads, conv, strat, Q}, seed += 10);
        fill_normal(att.parameters(), seed + 1, kParamSd);
        V4<double> x("x", B, N, L, D), out("out", B, 2, L * Q, D), g("g", B, 2, L * Q, D);
        V4<double> dx("dx", B, N, L, D);
        fill_normal(x, seed + 2);
        fill_normal(g, seed + 3);
        // Sample 1 holds nothing of the second segment.
        const auto valid =
            masked ? device_mask({{1, 0, 1, 1}, {1, 1, 0, 0}}) : dchag::View2<std::uint8_t, Mem>();
        typename dchag::CrossAttention<Exec, double>::Saved saved;
        auto loss = [&] {
          att.forward(exec, x, seg, out, saved, nullptr, valid);
          exec.fence();
          return dot(out, g);
        };
        att.zero_gradients(exec);
        loss();
        att.backward(exec, x, saved, g, dx);
        exec.fence();
        const auto rs = fd_check(att.parameters(), att.gradients(), loss);
        fd_check_input("x", x, dx, loss);
        require_live(rs, conv == Convention::climax ? "var_query" : "query");
      }
    }
  }
}

TEST_CASE("several queries: streamed forward and chunked backward equal one-shot",
          "[queries][stream]") {
  Exec exec;
  const int B = 2, N = 6, L = 3, D = 8, heads = 2, Q = 3;
  dchag::CrossAttention<Exec, double> att(exec, {D, heads, Convention::climax, Strategy::pooled, Q},
                                          830);
  fill_normal(att.parameters(), 831, kParamSd);
  V4<double> x("x", B, N, L, D), out("out", B, 1, L * Q, D), g("g", B, 1, L * Q, D);
  V4<double> dx("dx", B, N, L, D);
  fill_normal(x, 832);
  fill_normal(g, 833);
  typename dchag::CrossAttention<Exec, double>::Saved once;
  att.zero_gradients(exec);
  att.forward(exec, x, Segments::whole(N), out, once);
  att.backward(exec, x, once, g, dx);
  exec.fence();
  const auto ref_out = to_host(out), ref_dx = to_host(dx);
  const auto ref_grads = snapshot(att.gradients());
  for (const auto memory : {MemoryPolicy::keep, MemoryPolicy::recompute}) {
    INFO(dchag::to_string(memory));
    typename dchag::CrossAttention<Exec, double>::Saved saved;
    att.stream_begin(exec, saved, B, N, L, Segments::whole(N), memory);
    att.stream_chunk(exec, x, 0, 2, saved);
    att.stream_chunk(exec, x, 2, 6, saved);
    att.stream_end(exec, saved, out);
    att.zero_gradients(exec);
    att.backward_begin(exec, saved, g);
    for (const auto& [n0, n1] : {std::pair{0, 2}, std::pair{2, 6}}) {
      V4<double> dxc("dxc", B, n1 - n0, L, D);
      att.backward_chunk(exec, x, saved, n0, n1, dxc);
      Kokkos::deep_copy(
          Kokkos::subview(dx, Kokkos::ALL, Kokkos::make_pair(n0, n1), Kokkos::ALL, Kokkos::ALL),
          dxc);
    }
    att.backward_end(exec, saved);
    exec.fence();
    const double tol = 1e-13;
    CHECK(max_abs_diff(to_host(out), ref_out) <= tol * max_abs(ref_out));
    CHECK(max_abs_diff(to_host(dx), ref_dx) <= tol * max_abs(ref_dx));
    const auto grads = snapshot(att.gradients());
    for (std::size_t t = 0; t < grads.size(); ++t)
      CHECK(max_abs_diff(grads[t], ref_grads[t]) <= tol * std::max(1.0, max_abs(ref_grads[t])));
  }
}

TEST_CASE("front ends with several queries: every memory policy and both strategies",
          "[queries][front_end]") {
  Exec exec;
  const int B = 2, Q = 2;
  dchag::FrontEndConfig cfg{5, 4, 6, 2, 8, 2, Strategy::pooled, Convention::climax, 840};
  cfg.queries = Q;
  const int L = int(cfg.patches()), D = cfg.dim;
  V4<double> images("images", B, cfg.channels, cfg.height, cfg.width);
  V3<double> out("out", B, L, Q * D), g("g", B, L, Q * D);
  fill_normal(images, 841);
  fill_normal(g, 842);
  auto run = [&](auto& fe) {
    fe.zero_gradients(exec);
    fe.forward(exec, images, out);
    if (cfg.memory != MemoryPolicy::inference) fe.backward(exec, g);
    exec.fence();
    return std::make_pair(to_host(out), snapshot(fe.gradients()));
  };
  dchag::FlatFrontEnd<Exec, double> flat(exec, cfg);
  fill_normal(flat.parameters(), 843, kParamSd);
  dchag::DchagEmulation<Exec, double> emu(exec, cfg, {dchag::PartialKind::cross_attention, 2},
                                          std::vector<std::vector<int>>{{0, 1, 2}, {3, 4}});
  fill_normal(emu.parameters(), 844, kParamSd);
  const auto flat_keep = run(flat), emu_keep = run(emu);
  CHECK(max_abs(flat_keep.first) > 0);
  for (const auto memory : {MemoryPolicy::recompute, MemoryPolicy::inference}) {
    INFO(dchag::to_string(memory));
    cfg.memory = memory;
    flat.set_memory_policy(memory);
    emu.set_memory_policy(memory);
    const auto f = run(flat);
    CHECK(max_abs_diff(f.first, flat_keep.first) <= 1e-14 * max_abs(flat_keep.first));
    const auto e = run(emu);
    CHECK(max_abs_diff(e.first, emu_keep.first) <= 1e-14 * max_abs(emu_keep.first));
    if (memory == MemoryPolicy::recompute) {
      for (std::size_t t = 0; t < f.second.size(); ++t)
        CHECK(max_abs_diff(f.second[t], flat_keep.second[t]) <=
              1e-13 * std::max(1.0, max_abs(flat_keep.second[t])));
    }
  }
  cfg.memory = MemoryPolicy::keep;
  flat.set_memory_policy(MemoryPolicy::keep);
  flat.set_strategy(Strategy::materialized);
  const auto mat = run(flat);
  CHECK(max_abs_diff(mat.first, flat_keep.first) <= 1e-13 * max_abs(flat_keep.first));
  for (std::size_t t = 0; t < mat.second.size(); ++t)
    CHECK(max_abs_diff(mat.second[t], flat_keep.second[t]) <=
          1e-12 * std::max(1.0, max_abs(flat_keep.second[t])));
  // Finite differences through the flat front end (positional embedding over the queries).
  flat.set_strategy(Strategy::pooled);
  auto loss = [&] {
    flat.forward(exec, images, out);
    exec.fence();
    return dot(out, g);
  };
  flat.zero_gradients(exec);
  loss();
  flat.backward(exec, g);
  exec.fence();
  const auto rs = fd_check(flat.parameters(), flat.gradients(), loss);
  require_live(rs, "var_query");
  require_live(rs, "pos_embed");
}

TEST_CASE("several queries: bad input is refused by name", "[queries][errors]") {
  Exec exec;
  require_invalid(
      [&] {
        dchag::CrossAttention<Exec, double>(exec, {8, 2, Convention::climax, Strategy::pooled, 0});
      },
      {"dchag::CrossAttention", "queries is 0", "expected >= 1"});
  dchag::FrontEndConfig cfg{3, 4, 4, 2, 8, 2};
  cfg.queries = 0;
  require_invalid([&] { dchag::FlatFrontEnd<Exec, double>(exec, cfg); },
                  {"config.queries is 0", "expected >= 1"});
  cfg.queries = 2;
  dchag::FlatFrontEnd<Exec, double> flat(exec, cfg);
  V4<double> images("images", 1, 3, 4, 4);
  V3<double> out("out", 1, cfg.patches(), cfg.dim);
  require_invalid([&] { flat.forward(exec, images, out); },
                  {"out is [1, 4, 8]", "expected [B, L, queries * D] = [1, 4, 16]"});
  const auto names = flat.parameters();
  CHECK(find(names, "var_query")->shape == std::vector<std::int64_t>{1, 2, 8});
  dchag::CrossAttention<Exec, double> art(exec, {8, 2, Convention::artifact, Strategy::pooled, 3});
  CHECK(art.parameters().front().shape == std::vector<std::int64_t>{3, 8});
}
