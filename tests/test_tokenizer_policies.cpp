// The tokenizer policies (DESIGN 3.11, dchag/tokenizer_policy.hpp): shared weights and the
// coordinate channel embedding against central differences (the tokenizer alone, whole and in
// chunks, B = 1 and 2; the flat front end; the D-CHAG emulation, whose groups share the
// parameters), a channel the model was not built with taken by its coordinate, names and a
// weight-file round trip, estimates, and bad input.
#include <catch2/catch.hpp>

#include <dchag/aggregate.hpp>
#include <dchag/weights.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace dchag_test;
using dchag::ChannelEmbedding;
using dchag::ChannelSelection;
using dchag::Convention;
using dchag::FrontEndConfig;
using dchag::PartialKind;
using dchag::Strategy;
using dchag::TokenizerPolicy;
using dchag::TokenizerWeights;

namespace {

constexpr double kParamSd = 0.3;  // as test_kernels.cpp: scores O(1), no saturated softmax

// Pressure levels in hPa, as Aurora's.
std::vector<double> levels(int C) {
  const double all[] = {50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000};
  return std::vector<double>(all, all + C);
}

TokenizerPolicy policy(TokenizerWeights w, ChannelEmbedding e, int C) {
  TokenizerPolicy p{w, e};
  if (e == ChannelEmbedding::coordinate) {
    p.coordinates = levels(C);
    p.fourier = {8, 10.0, 1.0e4};
  }
  return p;
}

const TokenizerPolicy kPolicies[] = {
    policy(TokenizerWeights::shared, ChannelEmbedding::table, 0),
    policy(TokenizerWeights::per_channel, ChannelEmbedding::coordinate, 0),
    policy(TokenizerWeights::shared, ChannelEmbedding::coordinate, 0)};

TokenizerPolicy with_channels(TokenizerPolicy p, int C) {
  if (p.coordinate()) p.coordinates = levels(C);
  return p;
}

std::string describe(const TokenizerPolicy& p) {
  return std::string(dchag::to_string(p.weights)) + " weights, " +
         std::string(dchag::to_string(p.embedding)) + " embedding";
}

// The tokenizer of `owned` of C channels on images [B, Cimg, H, W] read through `sel`; `chunk`
// > 0 runs prepare / project / backward per chunk of that many channels (patches extracted per
// chunk), as the fused front ends do.
void fd_tokenizer(const TokenizerPolicy& pol, int C, const std::vector<int>& owned, int Cimg,
                  const ChannelSelection& sel, int B, int chunk, std::uint64_t seed) {
  INFO(describe(pol) << ", B " << B << ", chunk " << chunk << ", J " << sel.size());
  Exec exec;
  const int p = 2, H = 4, W = 6, D = 6, L = (H / p) * (W / p), J = sel.size();
  dchag::Tokenizer<Exec, double> tok(exec, C, p, D, owned, seed, pol);
  fill_normal(tok.parameters(), seed + 1, kParamSd);
  V4<double> images("images", B, Cimg, H, W), tokens("tokens", B, J, L, D), g("g", B, J, L, D);
  fill_normal(images, seed + 2);
  fill_normal(g, seed + 3);
  auto loss = [&] {
    if (chunk == 0) {
      tok.forward(exec, images, sel, tokens);
    } else {
      tok.prepare(exec, images, sel, chunk);
      for (int j0 = 0; j0 < J; j0 += chunk) tok.project(exec, j0, std::min(J, j0 + chunk), tokens);
    }
    exec.fence();
    return dot(tokens, g);
  };
  tok.zero_gradients(exec);
  loss();
  if (chunk == 0) {
    tok.backward(exec, g);
  } else {
    for (int j0 = 0; j0 < J; j0 += chunk) {
      const int j1 = std::min(J, j0 + chunk);
      V4<double> gc("g_chunk", B, j1 - j0, L, D);
      Kokkos::deep_copy(
          gc, Kokkos::subview(g, Kokkos::ALL, std::make_pair(j0, j1), Kokkos::ALL, Kokkos::ALL));
      tok.load_patches(exec, j0, j1);
      tok.backward(exec, gc, j0, j1);
    }
  }
  exec.fence();
  const auto rs = fd_check(tok.parameters(), tok.gradients(), loss);
  if (pol.shared()) {
    require_live(rs, "token_embed.proj.weight");
    require_live(rs, "token_embed.proj.bias");
  }
  if (pol.coordinate()) {
    require_live(rs, "channel_embed.proj.weight");
    require_live(rs, "channel_embed.proj.bias");
  } else {
    require_live(rs, "var_embed");
  }
}

}  // namespace

TEST_CASE("Tokenizer policies: backward matches finite differences", "[policies][fd]") {
  std::uint64_t seed = 5000;
  for (const auto& base : kPolicies) {
    const auto pol = with_channels(base, 8);
    for (int B : {1, 2}) {
      fd_tokenizer(pol, 8, {1, 3, 4, 6}, 3, ChannelSelection::own({6, 1, 4}), B, 0, seed += 10);
      fd_tokenizer(pol, 8, {1, 3, 4, 6}, 8, ChannelSelection::from_full_image({4, 1, 6, 3}), B, 3,
                   seed += 10);
    }
  }
  SECTION("channels the model was not built with, by coordinate") {
    const auto pol = with_channels(kPolicies[2], 4);
    auto sel = ChannelSelection::at_coordinates({120.0, 500.0, 975.0});
    fd_tokenizer(pol, 4, {0, 1, 2, 3}, 3, sel, 2, 0, 5500);
    sel = ChannelSelection::own({2, -1, 0});
    sel.coordinates = {150.0, 333.0, 50.0};  // model channels keep their own coordinates
    fd_tokenizer(pol, 4, {0, 1, 2, 3}, 3, sel, 2, 2, 5510);
  }
}

TEST_CASE("Tokenizer policies: the Fourier features follow the documented formula", "[policies]") {
  // phi_k(x) = sin(x 2 pi / lambda_k), phi_{n+k} = cos(...), lambda_k = 10^(a + k (b - a) / (n -
  // 1)): with lambda from 1 to 100 and n = 3, lambda = 1, 10, 100.
  const dchag::FourierFeatures f{6, 1.0, 100.0};
  double phi[6];
  const double x = 0.3, pi = 3.14159265358979323846;
  f.evaluate(x, phi);
  const double lambda[] = {1.0, 10.0, 100.0};
  for (int k = 0; k < 3; ++k) {
    CHECK(phi[k] == Approx(std::sin(x * 2 * pi / lambda[k])).epsilon(1e-14));
    CHECK(phi[3 + k] == Approx(std::cos(x * 2 * pi / lambda[k])).epsilon(1e-14));
  }
  const dchag::FourierFeatures one{2, 4.0, 4.0};  // n = 1: lambda_0 = lambda_min
  one.evaluate(1.0, phi);
  CHECK(phi[0] == Approx(1.0).margin(1e-15));
  CHECK(phi[1] == Approx(0.0).margin(1e-15));
}

namespace {

double param_sd(int D) { return D <= 8 ? 0.3 : 0.3 * std::sqrt(8.0 / D); }

FrontEndConfig config(int C, Strategy strat, const TokenizerPolicy& pol, std::uint64_t seed) {
  FrontEndConfig cfg{C, 4, 6, 2, 8, 2, strat, Convention::climax, seed};
  cfg.tokenizer = with_channels(pol, C);
  return cfg;
}

}  // namespace

TEST_CASE("Tokenizer policies: front ends' backward matches finite differences",
          "[policies][fd][front_end]") {
  std::uint64_t seed = 6000;
  Exec exec;
  const int B = 2;
  for (const auto& pol : kPolicies) {
    for (const auto strat : kStrategies) {
      INFO(describe(pol) << ", " << dchag::to_string(strat));
      {
        const auto cfg = config(6, strat, pol, seed += 10);
        dchag::FlatFrontEnd<Exec, double> flat(exec, cfg);
        flat.set_chunk_channels(2);  // the pooled path streams 3 chunks
        fill_normal(flat.parameters(), seed + 1, param_sd(cfg.dim));
        V4<double> images("images", B, 4, cfg.height, cfg.width);
        V3<double> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
        fill_normal(images, seed + 2);
        fill_normal(g, seed + 3);
        const auto sel = ChannelSelection::own({5, 1, 3, 0});
        auto loss = [&] {
          flat.forward(exec, images, sel, out);
          exec.fence();
          return dot(out, g);
        };
        flat.zero_gradients(exec);
        loss();
        flat.backward(exec, g);
        exec.fence();
        const auto rs = fd_check(flat.parameters(), flat.gradients(), loss);
        if (pol.shared()) require_live(rs, "token_embed.proj.weight");
        if (pol.coordinate()) require_live(rs, "channel_embed.proj.weight");
      }
      {
        const auto cfg = config(7, strat, pol, seed += 10);
        for (const auto kind : {PartialKind::linear, PartialKind::cross_attention}) {
          INFO("dchag " << dchag::to_string(kind));
          dchag::DchagEmulation<Exec, double> emu(exec, cfg, {kind, 1},
                                                  {{0, 4}, {1, 2, 6}, {3, 5}});
          fill_normal(emu.parameters(), seed + 1, param_sd(cfg.dim));
          V4<double> images("images", B, cfg.channels, cfg.height, cfg.width);
          V3<double> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
          fill_normal(images, seed + 2);
          fill_normal(g, seed + 3);
          auto loss = [&] {
            emu.forward(exec, images, out);
            exec.fence();
            return dot(out, g);
          };
          emu.zero_gradients(exec);
          loss();
          emu.backward(exec, g);
          exec.fence();
          // The groups share one copy: its gradient sums every group's channels.
          const auto params = emu.parameters();
          for (const char* name : {"token_embed.proj.weight", "channel_embed.proj.weight"}) {
            if (const auto* t = find(params, name)) CHECK(t->pieces.size() == 1);
          }
          const auto rs = fd_check(params, emu.gradients(), loss);
          if (pol.shared()) require_live(rs, "token_embed.proj.weight");
          if (pol.coordinate()) require_live(rs, "channel_embed.proj.weight");
        }
      }
    }
  }
}

TEST_CASE("Tokenizer policies: a model takes a channel it never saw by its coordinate",
          "[policies][front_end]") {
  // Model A is built with levels 0..4; model B with the same levels but 250 hPa (channel 3 of A)
  // and holds A's weights (copied by name: nothing in them is per channel). B takes 250 hPa by
  // its coordinate; its output is A's, bit for bit: both form the same tokens with the same
  // kernels and fold them in the same order.
  Exec exec;
  const int B = 2;
  for (const auto strat : kStrategies) {
    INFO(dchag::to_string(strat));
    auto cfg_a = config(5, strat, kPolicies[2], 6500);
    auto cfg_b = cfg_a;
    cfg_b.channels = 4;
    cfg_b.tokenizer.coordinates = {50, 100, 150, 300};
    cfg_a.tokenizer.coordinates = {50, 100, 150, 250, 300};
    dchag::FlatFrontEnd<Exec, double> a(exec, cfg_a), b(exec, cfg_b);
    fill_normal(a.parameters(), 6501, param_sd(cfg_a.dim));
    copy_by_name(a.parameters(), b.parameters());
    V4<double> images("images", B, 5, cfg_a.height, cfg_a.width);
    fill_normal(images, 6502);
    V3<double> out_a("out_a", B, cfg_a.patches(), cfg_a.dim),
        out_b("out_b", B, cfg_a.patches(), cfg_a.dim);
    a.forward(exec, images, out_a);
    b.forward(exec, images, ChannelSelection::at_coordinates({50, 100, 150, 250, 300}), out_b);
    CHECK(max_abs_diff(out_a, out_b) == 0.0);
    // The same channels as ids where B has them, the new one by id -1 and its coordinate.
    ChannelSelection mixed = ChannelSelection::own({0, 1, 2, -1, 3});
    mixed.coordinates = {50, 100, 150, 250, 300};
    b.forward(exec, images, mixed, out_b);
    CHECK(max_abs_diff(out_a, out_b) == 0.0);
    // And the gradients of the shared parameters agree.
    V3<double> g("g", B, cfg_a.patches(), cfg_a.dim);
    fill_normal(g, 6503);
    a.forward(exec, images, out_a);
    a.zero_gradients(exec);
    a.backward(exec, g);
    b.zero_gradients(exec);
    b.backward(exec, g);
    const auto ga = a.gradients(), gb = b.gradients();
    for (const auto& t : gb) {
      INFO(t.name);
      CHECK(max_abs_diff(held_values(*find(ga, t.name)), held_values(t)) <= 1e-13);
    }
  }
}

TEST_CASE("Tokenizer policies: names, shapes and a weight-file round trip", "[policies][weights]") {
  Exec exec;
  auto cfg = config(5, Strategy::pooled, kPolicies[2], 7000);
  dchag::FlatFrontEnd<Exec, float> model(exec, cfg);
  const auto params = model.parameters();
  const auto* w = find(params, "token_embed.proj.weight");
  const auto* e = find(params, "channel_embed.proj.weight");
  REQUIRE(w != nullptr);
  REQUIRE(e != nullptr);
  CHECK(w->shape == std::vector<std::int64_t>{8, 1, 2, 2});
  CHECK(w->transposed_rows == 8);
  CHECK(e->shape == std::vector<std::int64_t>{8, 8});
  CHECK(find(params, "token_embed.proj.bias")->shape == std::vector<std::int64_t>{8});
  CHECK(find(params, "channel_embed.proj.bias")->shape == std::vector<std::int64_t>{8});
  CHECK(find(params, "var_embed") == nullptr);
  CHECK(find(params, "token_embeds.0.proj.weight") == nullptr);
  // ClimaX initialisation: trunc-normal 0.02 weights (not zero: 32 draws, none beyond 10 sd),
  // zero biases.
  CHECK(max_abs(held_values(*w)) > 0);
  CHECK(max_abs(held_values(*w)) <= 0.2);
  CHECK(max_abs(held_values(*e)) > 0);
  CHECK(max_abs(values_of(params, "channel_embed.proj.bias")) == 0);

  fill_normal(params, 7001, 0.3);
  const std::string path = "test_tokenizer_policies_roundtrip.safetensors";
  dchag::save_weights(path, params);
  cfg.seed = 7002;
  dchag::FlatFrontEnd<Exec, float> loaded(exec, cfg);
  dchag::load_weights(path, loaded.parameters());
  std::remove(path.c_str());
  V4<float> images("images", 2, 5, cfg.height, cfg.width);
  fill_normal(images, 7003);
  V3<float> o1("o1", 2, cfg.patches(), cfg.dim), o2("o2", 2, cfg.patches(), cfg.dim);
  model.forward(exec, images, o1);
  loaded.forward(exec, images, o2);
  CHECK(max_abs_diff(o1, o2) == 0.0);
}

TEST_CASE("Tokenizer policies: bad input is refused with a precise message", "[policies][errors]") {
  Exec exec;
  const auto good = config(5, Strategy::pooled, kPolicies[2], 8000);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  using Flat = dchag::FlatFrontEnd<Exec, double>;

  SECTION("the configuration's coordinates and Fourier features") {
    auto cfg = good;
    cfg.tokenizer.coordinates.clear();
    require_invalid([&] { Flat(exec, cfg); },
                    {"dchag::FlatFrontEnd", "config.tokenizer.coordinates has 0 values",
                     "expected one per model channel, C = 5"});
    cfg.tokenizer.coordinates = {1, 2, 3};
    require_invalid([&] { Flat(exec, cfg); },
                    {"config.tokenizer.coordinates has 3 values", "C = 5"});
    cfg.tokenizer.coordinates = {1, 2, nan, 4, 5};
    require_invalid([&] { Flat(exec, cfg); },
                    {"config.tokenizer.coordinates[2] is nan", "expected a finite value"});
    require_invalid([&] { Flat::estimate(cfg, 1); },
                    {"dchag::FlatFrontEnd::estimate", "config.tokenizer.coordinates[2] is nan"});
    cfg = good;
    cfg.tokenizer.embedding = ChannelEmbedding::table;
    require_invalid([&] { Flat(exec, cfg); },
                    {"config.tokenizer.coordinates has 5 values",
                     "expected none: config.tokenizer.embedding is table"});
    cfg = good;
    cfg.tokenizer.fourier.count = 3;
    require_invalid([&] { Flat(exec, cfg); },
                    {"config.tokenizer.fourier.count is 3", "expected an even number >= 2"});
    cfg = good;
    cfg.tokenizer.fourier.min_wavelength = 0;
    require_invalid([&] { Flat(exec, cfg); }, {"config.tokenizer.fourier.min_wavelength is 0",
                                               "expected a finite value > 0"});
    cfg = good;
    cfg.tokenizer.fourier.max_wavelength = 1;
    require_invalid([&] { Flat(exec, cfg); }, {"config.tokenizer.fourier.max_wavelength is 1",
                                               "expected a finite value >= min_wavelength = 10"});
    cfg = good;
    cfg.tokenizer.coordinates.push_back(7);
    require_invalid(
        [&] {
          dchag::DchagEmulation<Exec, double>(exec, cfg, {}, {{0, 1}, {2, 3}, {4}});
        },
        {"dchag::DchagEmulation", "config.tokenizer.coordinates has 6 values", "C = 5"});
  }

  SECTION("selections by coordinate") {
    V4<double> images("images", 1, 3, good.height, good.width);
    V3<double> out("out", 1, good.patches(), good.dim);
    Flat model(exec, good);
    auto sel = ChannelSelection::at_coordinates({1, 2});
    require_invalid([&] { model.forward(exec, images, sel, out); },
                    {"dchag::FlatFrontEnd::forward", "images.extent(1) is 3", "expected J = 2"});
    sel = ChannelSelection::own({0, -1, 2});
    require_invalid([&] { model.forward(exec, images, sel, out); },
                    {"channel id -1 at position 1 has no coordinate",
                     "expected selection coordinates (one per channel)"});
    sel.coordinates = {50, 60};
    require_invalid([&] { model.forward(exec, images, sel, out); },
                    {"dchag::Tokenizer::forward", "selection has 2 coordinates",
                     "expected one per selected channel, J = 3"});
    sel.coordinates = {50, inf, 150};
    require_invalid([&] { model.forward(exec, images, sel, out); },
                    {"selection coordinates[1] is inf", "expected a finite value"});
    sel.coordinates = {50, 60, 70};
    require_invalid(
        [&] { model.forward(exec, images, sel, out); },
        {"selection coordinates[2] is 70", "expected the coordinate of model channel 2, 150"});
    // Without shared weights a new channel has no tokenizer; without coordinates, no embedding.
    for (const auto& p : {kPolicies[0], kPolicies[1]}) {
      auto cfg = good;
      cfg.tokenizer = with_channels(p, 5);
      Flat other(exec, cfg);
      sel = ChannelSelection::own({0, -1, 2});
      sel.coordinates = {50, 60, 150};
      if (!p.coordinate()) {
        require_invalid([&] { other.forward(exec, images, sel, out); },
                        {"selection has 3 coordinates",
                         "expected none: the tokenizer's channel embedding is table"});
      } else {
        require_invalid(
            [&] { other.forward(exec, images, sel, out); },
            {"channel id -1 at position 1", "needs shared weights and the coordinate embedding",
             "per_channel weights, coordinate embedding"});
      }
    }
  }
}

TEST_CASE("Tokenizer policies: estimates count what the front ends allocate",
          "[policies][memory]") {
  // Parameters: the shared weight and bias replace C per-channel ones, the map [D, F] + [D] the
  // table [C, D]; the emulation holds the shared ones once, not once per group.
  const int C = 6, p = 2, D = 8, F = 8;
  const std::int64_t S = sizeof(double), pp = p * p;
  for (const auto& pol : kPolicies) {
    INFO(describe(pol));
    const auto cfg = config(C, Strategy::pooled, pol, 1);
    const std::int64_t tokenizer = S * ((pol.shared() ? pp * D + D : C * (pp * D + D)) +
                                        (pol.coordinate() ? D * F + D : C * D));
    const auto base = config(C, Strategy::pooled, TokenizerPolicy{}, 1);
    using Flat = dchag::FlatFrontEnd<Exec, double>;
    const std::int64_t per_channel_tokenizer = S * C * (pp * D + 2 * D);
    CHECK(Flat::estimate(cfg, 2).parameters - Flat::estimate(base, 2).parameters ==
          tokenizer - per_channel_tokenizer);
    Exec exec;
    dchag::DchagEmulation<Exec, double> emu(exec, cfg, {}, {{0, 1}, {2, 3}, {4, 5}});
    dchag::DchagEmulation<Exec, double> emu_base(exec, base, {}, {{0, 1}, {2, 3}, {4, 5}});
    CHECK(emu.memory_estimate(2).parameters - emu_base.memory_estimate(2).parameters ==
          tokenizer - per_channel_tokenizer);
    std::int64_t held = 0;
    for (const auto& t : emu.parameters()) held += t.held();
    std::int64_t held_base = 0;
    for (const auto& t : emu_base.parameters()) held_base += t.held();
    CHECK(S * (held - held_base) == tokenizer - per_channel_tokenizer);
  }
}
