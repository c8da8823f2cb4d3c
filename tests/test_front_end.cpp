// Front ends: every gradient of the flat (ClimaX) front end and of the D-CHAG emulation against
// central differences (double), the emulation with one group against the same modules composed by
// hand, initialisation shared across ranks, and bad input.
#include <catch2/catch.hpp>

#include <dchag/aggregate.hpp>
#include <dchag/check.hpp>

#include <cstdint>
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
using dchag::PartialKind;
using dchag::Segments;
using dchag::Strategy;

namespace {

using Groups = std::vector<std::vector<int>>;

// Random parameters for gradient tests (see test_kernels.cpp): N(0, sd^2), sd = 0.3 for D <= 8;
// wider models get sd = 0.3 sqrt(8 / D) so that scores stay O(1) and the softmax does not saturate.
double param_sd(int D) { return D <= 8 ? 0.3 : 0.3 * std::sqrt(8.0 / D); }

// Counts launches of the fused streaming kernel, to show that the pooled flat front end ran it.
// Kokkos 3.4 has no getter for the callback, so a Kokkos Tools library loaded into this test
// loses its parallel_for begin callback after the first counted forward.
int g_stream_launches = 0;
void count_launch(const char* name, std::uint32_t, std::uint64_t* id) {
  *id = 0;
  if (std::string(name) == "dchag::attention::stream_pool") ++g_stream_launches;
}

struct LaunchCounter {
  LaunchCounter() {
    g_stream_launches = 0;
    Kokkos::Tools::Experimental::set_begin_parallel_for_callback(count_launch);
  }
  ~LaunchCounter() { Kokkos::Tools::Experimental::set_begin_parallel_for_callback(nullptr); }
  LaunchCounter(const LaunchCounter&) = delete;
  LaunchCounter& operator=(const LaunchCounter&) = delete;
};

// Finite differences over every parameter of a flat front end. `sel` empty: all channels.
void fd_flat(const FrontEndConfig& cfg, int B, const std::vector<int>& sel_ids, bool from_full,
             int expect_chunks) {
  INFO("flat: C " << cfg.channels << ", D " << cfg.dim << ", heads " << cfg.heads << ", strategy "
                  << dchag::to_string(cfg.strategy) << ", convention "
                  << dchag::to_string(cfg.convention) << ", selection " << sel_ids.size()
                  << (from_full ? " from the full image" : " own"));
  Exec exec;
  dchag::FlatFrontEnd<Exec, double> flat(exec, cfg);
  if (expect_chunks > 1)
    flat.set_chunk_channels((cfg.channels + expect_chunks - 1) / expect_chunks);
  fill_normal(flat.parameters(), cfg.seed + 1, param_sd(cfg.dim));
  const int Cimg = sel_ids.empty() || from_full ? cfg.channels : int(sel_ids.size());
  V4<double> images("images", B, Cimg, cfg.height, cfg.width);
  V3<double> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
  fill_normal(images, cfg.seed + 2);
  fill_normal(g, cfg.seed + 3);
  const ChannelSelection sel =
      from_full ? ChannelSelection::from_full_image(sel_ids) : ChannelSelection::own(sel_ids);
  auto loss = [&] {
    if (sel_ids.empty()) {
      flat.forward(exec, images, out);
    } else {
      flat.forward(exec, images, sel, out);
    }
    exec.fence();
    return dot(out, g);
  };
  flat.zero_gradients(exec);
  {
    LaunchCounter counter;
    loss();
    if (cfg.strategy == Strategy::pooled) {
      // The fused path ran, in chunks where the execution space runs on the host.
      INFO("stream_pool launches " << g_stream_launches);
      CHECK(g_stream_launches >= 1);
      if (dchag::detail::runs_on_host<Exec>) CHECK(g_stream_launches == expect_chunks);
    } else {
      CHECK(g_stream_launches == 0);
    }
  }
  flat.backward(exec, g);
  exec.fence();
  const auto rs = fd_check(flat.parameters(), flat.gradients(), loss);
  for (const auto& r : rs) {
    // Channels not in the selection get no gradient; every other tensor must.
    bool selected = sel_ids.empty() || r.name.rfind("token_embeds.", 0) != 0;
    for (int c : sel_ids)
      selected = selected || r.name.rfind("token_embeds." + std::to_string(c) + ".", 0) == 0;
    if (selected) require_live(rs, r.name);
  }
}

}  // namespace

TEST_CASE("FlatFrontEnd backward matches finite differences", "[front_end][fd][flat]") {
  SECTION("small, every convention and strategy") {
    std::uint64_t seed = 1000;
    for (const auto conv : kConventions) {
      for (const auto strat : kStrategies) {
        const FrontEndConfig cfg{4, 4, 6, 2, 8, 2, strat, conv, seed += 10};
        fd_flat(cfg, 2, {}, false, 1);
      }
    }
  }
  SECTION("selections: a permuted subset, own images and picked from the full image") {
    for (const auto strat : kStrategies) {
      const FrontEndConfig cfg{6, 4, 4, 2, 8, 4, strat, Convention::climax, 1100};
      fd_flat(cfg, 2, {5, 1, 3}, false, 1);
      fd_flat(cfg, 1, {4, 0, 2, 5}, true, 1);
    }
  }
  SECTION("the pooled path streams 9 channels in chunks of 3") {
    for (const auto strat : kStrategies) {
      const FrontEndConfig cfg{9, 16, 16, 2, 64, 4, strat, Convention::climax, 1200};
      fd_flat(cfg, 2, {}, false, 3);
    }
  }
}

namespace {

void fd_dchag(PartialKind kind, int tree, Convention conv, Strategy strat, const Groups& groups,
              std::uint64_t seed) {
  int C = 0;
  for (const auto& g : groups) C += int(g.size());
  INFO("dchag: partial " << dchag::to_string(kind) << ", tree " << tree << ", convention "
                         << dchag::to_string(conv) << ", strategy " << dchag::to_string(strat)
                         << ", groups " << groups.size() << ", C " << C);
  Exec exec;
  const int B = 2, D = 8;
  const FrontEndConfig cfg{C, 4, 6, 2, D, 2, strat, conv, seed};
  dchag::DchagEmulation<Exec, double> emu(exec, cfg, {kind, tree}, groups);
  fill_normal(emu.parameters(), seed + 1, param_sd(D));
  V4<double> images("images", B, C, cfg.height, cfg.width);
  V3<double> out("out", B, cfg.patches(), D), g("g", B, cfg.patches(), D);
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
  const auto rs = fd_check(emu.parameters(), emu.gradients(), loss);
  for (int c = 0; c < C; ++c)
    require_live(rs, "token_embeds." + std::to_string(c) + ".proj.weight");
  require_live(rs, "var_embed");
  require_live(rs, "pos_embed");
  for (std::size_t r = 0; r < groups.size(); ++r) {
    const std::string prefix = "partial." + std::to_string(r) + ".";
    std::size_t seen = 0;
    for (const auto& res : rs) seen += res.name.rfind(prefix, 0) == 0;
    CHECK(seen >= 2);
  }
}

}  // namespace

TEST_CASE("DchagEmulation backward matches finite differences", "[front_end][fd][dchag]") {
  const Groups uneven = {{0, 1, 2}, {3, 4}, {5, 6}};
  const Groups scattered = {{0, 3}, {1, 2, 4}};
  SECTION("linear, no tree") {
    fd_dchag(PartialKind::linear, 1, Convention::climax, Strategy::pooled, uneven, 2000);
    fd_dchag(PartialKind::linear, 1, Convention::artifact, Strategy::materialized, scattered, 2010);
  }
  SECTION("linear, tree of 2 (groups of even size)") {
    fd_dchag(PartialKind::linear, 2, Convention::climax, Strategy::materialized,
             {{0, 1, 2, 3}, {4, 5}, {6, 7}}, 2020);
    fd_dchag(PartialKind::linear, 2, Convention::artifact, Strategy::pooled, {{0, 3}, {1, 2, 4, 5}},
             2030);
  }
  SECTION("cross-attention, trees of 1 and 2, every convention and strategy") {
    std::uint64_t seed = 2100;
    for (const auto conv : kConventions) {
      for (const auto strat : kStrategies) {
        for (const int tree : {1, 2}) {
          fd_dchag(PartialKind::cross_attention, tree, conv, strat, uneven, seed += 10);
          fd_dchag(PartialKind::cross_attention, tree, conv, strat, scattered, seed += 10);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// D-CHAG with one group is tokenizer -> partial aggregation -> final cross-attention over the one
// partial token -> positional embedding. The emulation runs exactly these kernels in this order
// on the same numbers (the partial aggregation streamed, in one chunk at these sizes, where its
// strategy streams), so outputs and gradients are equal bit for bit (tolerance 0).
// ---------------------------------------------------------------------------------------------

namespace {

void compare_with_composition(PartialKind kind, int tree, Convention conv, Strategy strat,
                              const std::vector<int>& channels, std::uint64_t seed) {
  INFO("partial " << dchag::to_string(kind) << ", tree " << tree << ", convention "
                  << dchag::to_string(conv) << ", strategy " << dchag::to_string(strat)
                  << ", first channel " << channels.front());
  Exec exec;
  const int B = 2, C = int(channels.size()), p = 2, H = 4, W = 6, D = 8, L = (H / p) * (W / p);
  const FrontEndConfig cfg{C, H, W, p, D, 2, strat, conv, seed};
  dchag::DchagEmulation<Exec, double> emu(exec, cfg, {kind, tree}, {channels});
  fill_normal(emu.parameters(), seed + 1, param_sd(D));

  // The same stages by hand, built from another seed so that only the copy makes them agree.
  dchag::Tokenizer<Exec, double> tok(exec, C, p, D, channels, seed + 7);
  dchag::PartialAggregator<Exec, double> part(exec, kind, C, tree, cfg.attention(), seed + 7,
                                              "partial.0.");
  dchag::CrossAttention<Exec, double> fin(exec, cfg.attention(), seed + 7, "final.");
  dchag::PositionalEmbedding<Exec, double> pos(exec, cfg.grid_h(), cfg.grid_w(), D);
  auto hand_list = [&](bool grads) {
    auto list = grads ? tok.gradients() : tok.parameters();
    for (auto more : {grads ? part.gradients() : part.parameters(),
                      grads ? fin.gradients("final.") : fin.parameters("final."),
                      grads ? pos.gradients() : pos.parameters()})
      list.insert(list.end(), more.begin(), more.end());
    return list;
  };
  copy_by_name(emu.parameters(), hand_list(false));
  require_same(emu.parameters(), hand_list(false), [](const std::string&) { return 0.0; });

  V4<double> images("images", B, C, H, W);
  V3<double> g("g", B, L, D), out_emu("out_emu", B, L, D), out_hand("out_hand", B, L, D);
  fill_normal(images, seed + 2);
  fill_normal(g, seed + 3);

  emu.zero_gradients(exec);
  emu.forward(exec, images, out_emu);
  emu.backward(exec, g);

  tok.zero_gradients(exec);
  part.zero_gradients(exec);
  fin.zero_gradients(exec);
  pos.zero_gradients(exec);
  V4<double> tokens("tokens", B, C, L, D), d_tokens("d_tokens", B, C, L, D);
  V4<double> partial("partial", B, 1, L, D), d_partial("d_partial", B, 1, L, D);
  const V4<double> out4(out_hand.data(), B, 1, L, D), g4(g.data(), B, 1, L, D);
  typename dchag::CrossAttention<Exec, double>::Saved saved;
  tok.forward(exec, images, ChannelSelection::from_full_image(channels), tokens);
  if (part.streams()) {
    part.stream_begin(exec, partial, dchag::MemoryPolicy::keep);
    part.stream_chunk(exec, tokens, 0, C);
    part.stream_end(exec, partial);
  } else {
    part.forward(exec, tokens, partial);
  }
  fin.forward(exec, partial, Segments::whole(1), out4, saved);
  pos.forward(exec, out_hand);
  pos.backward(exec, g);
  fin.backward(exec, partial, saved, g4, d_partial);
  if (part.streams()) {
    part.backward_begin(exec, d_partial);
    part.backward_chunk(exec, tokens, 0, C, d_tokens);
    part.backward_end(exec);
  } else {
    part.backward(exec, tokens, d_partial, d_tokens);
  }
  tok.backward(exec, d_tokens);
  exec.fence();

  CHECK(max_abs_diff(out_emu, out_hand) == 0.0);
  CHECK(max_abs(to_host(out_emu)) > 0);
  require_same(emu.gradients(), hand_list(true), [](const std::string&) { return 0.0; });
}

}  // namespace

namespace {

// Output and every gradient of one forward and backward (no backward: inference).
struct Step {
  std::vector<double> out;
  std::vector<std::vector<double>> grads;
};

template <class FrontEnd, class Forward>
Step run_step(FrontEnd& fe, const Forward& forward, const V3<double>& out, const V3<double>& g,
              bool backward) {
  Exec exec;
  fe.zero_gradients(exec);
  forward();
  if (backward) fe.backward(exec, g);
  exec.fence();
  return {to_host(out), backward ? snapshot(fe.gradients()) : std::vector<std::vector<double>>{}};
}

// Recompute runs keep's kernels on tokens tokenized again: a few ulps of the results' scale.
void require_same_step(const Step& a, const Step& ref,
                       const dchag::TensorList<double, Mem>& names) {
  const double ulps = 8 * std::numeric_limits<double>::epsilon();
  CHECK(max_abs_diff(a.out, ref.out) <= ulps * std::max(1.0, max_abs(ref.out)));
  for (std::size_t t = 0; t < a.grads.size(); ++t) {
    INFO(names[t].name);
    CHECK(max_abs_diff(a.grads[t], ref.grads[t]) <= ulps * std::max(1.0, max_abs(ref.grads[t])));
  }
}

}  // namespace

TEST_CASE("Every memory policy gives the forward and gradients of keep", "[front_end][recompute]") {
  using dchag::MemoryPolicy;
  Exec exec;
  SECTION("flat, all channels and a subset, several chunk widths") {
    const FrontEndConfig cfg{7, 4, 6, 2, 8, 2, Strategy::pooled, Convention::climax, 2500};
    dchag::FlatFrontEnd<Exec, double> flat(exec, cfg);
    fill_normal(flat.parameters(), 2501, param_sd(cfg.dim));
    const int B = 2;
    V4<double> images("images", B, cfg.channels, cfg.height, cfg.width);
    V3<double> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
    fill_normal(images, 2502);
    fill_normal(g, 2503);
    for (const bool subset : {false, true}) {
      const auto sel = subset ? ChannelSelection::from_full_image({5, 0, 3, 6})
                              : ChannelSelection::from_full_image({0, 1, 2, 3, 4, 5, 6});
      auto forward = [&] { flat.forward(exec, images, sel, out); };
      for (const int chunk : {0, 1, 3}) {
        INFO("subset " << subset << ", chunk " << chunk);
        flat.set_chunk_channels(chunk);
        flat.set_memory_policy(MemoryPolicy::keep);
        const Step keep = run_step(flat, forward, out, g, true);
        flat.set_memory_policy(MemoryPolicy::recompute);
        require_same_step(run_step(flat, forward, out, g, true), keep, flat.gradients());
        flat.set_memory_policy(MemoryPolicy::inference);
        require_same_step(run_step(flat, forward, out, g, false), keep, flat.gradients());
        require_invalid([&] { flat.backward(exec, g); },
                        {"dchag::FlatFrontEnd::backward", "MemoryPolicy::inference"});
      }
    }
    flat.set_memory_policy(MemoryPolicy::recompute);
    require_invalid([&] { flat.set_strategy(Strategy::materialized); },
                    {"dchag::FlatFrontEnd::set_strategy", "needs MemoryPolicy::keep"});
    FrontEndConfig bad = cfg;
    bad.strategy = Strategy::materialized;
    bad.memory = MemoryPolicy::recompute;
    require_invalid(
        [&] { dchag::FlatFrontEnd<Exec, double>(exec, bad); },
        {"dchag::FlatFrontEnd", "config.memory is recompute", "needs the pooled strategy"});
  }
  SECTION("D-CHAG emulation, both partial kinds, with and without a tree") {
    std::uint64_t seed = 2600;
    for (const auto kind : {PartialKind::linear, PartialKind::cross_attention}) {
      for (const int tree : {1, 2}) {
        INFO("partial " << dchag::to_string(kind) << ", tree " << tree);
        const FrontEndConfig cfg{8,         4, 4, 2, 8, 2, Strategy::pooled, Convention::climax,
                                 seed += 10};
        dchag::DchagEmulation<Exec, double> emu(exec, cfg, DchagOptions{kind, tree},
                                                Groups{{0, 1, 2, 3}, {4, 5, 6, 7}});
        fill_normal(emu.parameters(), seed + 1, param_sd(cfg.dim));
        const int B = 2;
        V4<double> images("images", B, cfg.channels, cfg.height, cfg.width);
        V3<double> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
        fill_normal(images, seed + 2);
        fill_normal(g, seed + 3);
        auto forward = [&] { emu.forward(exec, images, out); };
        const Step keep = run_step(emu, forward, out, g, true);
        emu.set_memory_policy(MemoryPolicy::recompute);
        require_same_step(run_step(emu, forward, out, g, true), keep, emu.gradients());
        emu.set_memory_policy(MemoryPolicy::inference);
        require_same_step(run_step(emu, forward, out, g, false), keep, emu.gradients());
        require_invalid([&] { emu.backward(exec, g); },
                        {"dchag::DchagEmulation::backward", "MemoryPolicy::inference"});
      }
    }
  }
}

TEST_CASE("DchagEmulation with one group equals the stages composed by hand",
          "[front_end][equivalence][dchag]") {
  std::uint64_t seed = 3000;
  for (const auto& channels :
       {std::vector<int>{0, 1, 2, 3, 4, 5}, std::vector<int>{4, 2, 0, 5, 1, 3}}) {
    for (const auto conv : kConventions) {
      for (const auto strat : kStrategies) {
        compare_with_composition(PartialKind::linear, 1, conv, strat, channels, seed += 10);
        compare_with_composition(PartialKind::linear, 2, conv, strat, channels, seed += 10);
        compare_with_composition(PartialKind::cross_attention, 1, conv, strat, channels,
                                 seed += 10);
        compare_with_composition(PartialKind::cross_attention, 4, conv, strat, channels,
                                 seed += 10);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Initialisation across front ends: what a rank holds does not depend on which rank it is.
// ---------------------------------------------------------------------------------------------

TEST_CASE("Front ends built from one seed hold the same values for the same names",
          "[front_end][init]") {
  Exec exec;
  const FrontEndConfig cfg{7, 4, 6, 2, 16, 4, Strategy::pooled, Convention::climax, 77};
  dchag::FlatFrontEnd<Exec, float> a(exec, cfg), b(exec, cfg);
  require_same(a.parameters(), b.parameters(), [](const std::string&) { return 0.0; });

  // Every tokenizer weight, bias and var_embed row of the D-CHAG groups equals the flat one.
  dchag::DchagEmulation<Exec, float> emu(exec, cfg, {PartialKind::cross_attention, 1},
                                         {{0, 3, 6}, {1, 2}, {4, 5}});
  const auto flat_params = a.parameters();
  int compared = 0;
  for (const auto& t : emu.parameters()) {
    const auto* f = find(flat_params, t.name);
    if (t.name.rfind("token_embeds.", 0) != 0 && t.name != "var_embed" && t.name != "pos_embed")
      continue;
    INFO(t.name);
    REQUIRE(f != nullptr);
    if (t.name == "var_embed") {
      CHECK(file_order(t) == file_order(*f));  // pieces in group order here, channel order there
    } else {
      CHECK(held_values(t) == held_values(*f));
    }
    ++compared;
  }
  CHECK(compared == 2 * cfg.channels + 2);
  // A D-CHAG group's pieces of var_embed sit at the rows of its channels.
  const auto emu_params = emu.parameters();
  const auto* e = find(emu_params, "var_embed");
  REQUIRE(e->pieces.size() == std::size_t(cfg.channels));
  const std::vector<int> order = {0, 3, 6, 1, 2, 4, 5};
  for (std::size_t s = 0; s < order.size(); ++s)
    CHECK(e->pieces[s].offset == std::int64_t(order[s]) * cfg.dim);
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

TEST_CASE("Front ends reject bad input with a precise message", "[front_end][errors]") {
  Exec exec;
  const FrontEndConfig good{5, 4, 6, 2, 8, 2, Strategy::pooled, Convention::climax, 1};
  const int B = 2, L = good.patches(), D = good.dim;

  SECTION("configuration") {
    FrontEndConfig cfg = good;
    cfg.height = 5;
    require_invalid(
        [&] { dchag::FlatFrontEnd<Exec, float>(exec, cfg); },
        {"dchag::FlatFrontEnd", "config.height is 5", "expected a positive multiple of patch = 2"});
    cfg = good;
    cfg.width = 7;
    require_invalid(
        [&] {
          dchag::DchagEmulation<Exec, float>(exec, cfg, {}, {{0, 1, 2, 3, 4}});
        },
        {"dchag::DchagEmulation", "config.width is 7",
         "expected a positive multiple of patch = 2"});
    cfg = good;
    cfg.heads = 3;
    require_invalid([&] { dchag::FlatFrontEnd<Exec, float>(exec, cfg); },
                    {"dchag::FlatFrontEnd", "config.heads is 3", "expected a divisor of dim = 8"});
  }

  SECTION("lead times: needed with config.lead_time, refused without, one per sample") {
    V4<float> images("images", B, good.channels, good.height, good.width);
    V3<float> out("out", B, L, D);
    dchag::View1<float, Mem> times("times", B), short_times("short", B - 1);
    FrontEndConfig cfg = good;
    cfg.lead_time = true;
    dchag::FlatFrontEnd<Exec, float> with(exec, cfg);
    dchag::FlatFrontEnd<Exec, float> without(exec, good);
    require_invalid([&] { with.forward(exec, images, out); },
                    {"dchag::FlatFrontEnd::forward", "no lead_times given", "config.lead_time"});
    require_invalid([&] { without.forward(exec, images, out, times); },
                    {"dchag::FlatFrontEnd::forward", "lead_times given, expected none"});
    require_invalid(
        [&] { with.forward(exec, images, out, short_times); },
        {"dchag::FlatFrontEnd::forward", "lead_times.extent(0) is 1", "expected B = 2"});
    dchag::DchagEmulation<Exec, float> emu(exec, cfg, {}, {{0, 1}, {2, 3, 4}});
    require_invalid([&] { emu.forward(exec, images, out); },
                    {"dchag::DchagEmulation::forward", "no lead_times given"});
    with.forward(exec, images, out, times);  // and the parameters carry ClimaX's names
    const auto with_params = with.parameters(), without_params = without.parameters();
    CHECK(find(with_params, "lead_time_embed.weight") != nullptr);
    CHECK(find(with_params, "lead_time_embed.bias") != nullptr);
    CHECK(find(without_params, "lead_time_embed.weight") == nullptr);
  }

  SECTION("FlatFrontEnd") {
    for (const auto strat : kStrategies) {
      FrontEndConfig cfg = good;
      cfg.strategy = strat;
      dchag::FlatFrontEnd<Exec, float> flat(exec, cfg);
      V4<float> images("images", B, good.channels, good.height, good.width);
      V3<float> out("out", B, L, D);
      require_invalid([&] { flat.backward(exec, out); },
                      {"dchag::FlatFrontEnd::backward", "before forward"});
      V3<float> bad("bad", B, L, D + 1);
      require_invalid(
          [&] { flat.forward(exec, images, bad); },
          {"dchag::FlatFrontEnd::forward", "out is [2, 6, 9]", "expected [B, L, D] = [2, 6, 8]"});
      require_invalid([&] { flat.forward(exec, images, ChannelSelection::own({}), out); },
                      {"selection is empty", "expected at least one channel"});
      require_invalid(
          [&] {
            flat.forward(exec, images, ChannelSelection::from_full_image({1, 7}), out);
          },
          {"channel id 7", "expected 0 <= id < C = 5"});
      flat.forward(exec, images, out);
      require_invalid([&] { flat.backward(exec, bad); },
                      {"dchag::FlatFrontEnd::backward", "d_out is [2, 6, 9]",
                       "expected [B, L, D] = [2, 6, 8]"});
    }
  }

  SECTION("DchagEmulation groups") {
    require_invalid(
        [&] {
          dchag::DchagEmulation<Exec, float>(exec, good, {}, {{0, 1}, {1, 2, 3, 4}});
        },
        {"dchag::DchagEmulation", "channel 1 is in two groups", "expected exactly one"});
    require_invalid(
        [&] {
          dchag::DchagEmulation<Exec, float>(exec, good, {}, {{0, 1}, {2, 3}});
        },
        {"dchag::DchagEmulation", "channel 4 is in no group", "expected exactly one"});
    require_invalid(
        [&] {
          dchag::DchagEmulation<Exec, float>(exec, good, {}, {{0, 1}, {}, {2, 3, 4}});
        },
        {"dchag::DchagEmulation", "group 1 holds no channel", "expected >= 1"});
    require_invalid(
        [&] {
          dchag::DchagEmulation<Exec, float>(exec, good, {}, {{0, 1}, {2, 3, 5}});
        },
        {"dchag::DchagEmulation", "group 1 lists channel 5", "expected 0 <= channel < C = 5"});
    require_invalid([&] { dchag::DchagEmulation<Exec, float>(exec, good, {}, {}); },
                    {"dchag::DchagEmulation", "groups is empty", "expected at least one group"});
    require_invalid(
        [&] {
          dchag::DchagEmulation<Exec, float>(exec, good, {PartialKind::linear, 2},
                                             {{0, 1}, {2, 3, 4}});
        },
        {"dchag::PartialAggregator", "linear tree over 3 channels with tree = 2",
         "expected tree to divide the channel count"});
  }

  SECTION("DchagEmulation forward and backward") {
    dchag::DchagEmulation<Exec, float> emu(exec, good, {PartialKind::cross_attention, 1},
                                           {{0, 1}, {2, 3, 4}});
    V4<float> images("images", B, good.channels, good.height, good.width);
    V3<float> out("out", B, L, D);
    require_invalid([&] { emu.backward(exec, out); },
                    {"dchag::DchagEmulation::backward", "before forward"});
    {
      V4<float> four("four", B, 4, good.height, good.width);
      require_invalid(
          [&] { emu.forward(exec, four, out); },
          {"dchag::DchagEmulation::forward", "images.extent(1) is 4", "expected C = 5"});
    }
    {
      V3<float> bad("bad", B, L + 1, D);
      require_invalid(
          [&] { emu.forward(exec, images, bad); },
          {"dchag::DchagEmulation::forward", "out is [2, 7, 8]", "expected [B, L, D] = [2, 6, 8]"});
    }
    emu.forward(exec, images, out);
    for (const auto& bad : {V3<float>("fewer", B - 1, L, D), V3<float>("wider", B, L, D + 1)}) {
      require_invalid(
          [&] { emu.backward(exec, bad); },
          {"dchag::DchagEmulation::backward", "d_out is [", "expected [B, L, D] = [2, 6, 8]"});
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Images against the configuration: every forward checks every extent (B, channels, H, W) with
// one helper, and messages name the caller's argument.
// ---------------------------------------------------------------------------------------------

TEST_CASE("Front ends check every extent of their images against the configuration",
          "[front_end][errors]") {
  Exec exec;
  // 16 x 16 images with p = 4 have L = 16 patches, and so do 8 x 32 ones: only H and W tell them
  // apart, so only a check of H and W catches images on the wrong positional grid.
  const FrontEndConfig cfg{5, 16, 16, 4, 8, 2, Strategy::pooled, Convention::climax, 3};
  const int B = 2, L = 16, D = 8;
  REQUIRE(cfg.patches() == L);
  V3<float> out("out", B, L, D);
  V4<float> wide("wide", B, 5, 8, 32), wider("wider", B, 5, 16, 32), fewer("fewer", B, 4, 16, 16),
      none("none", 0, 5, 16, 16), good("good", B, 5, 16, 16);
  V3<float> out0("out0", 0, L, D);

  SECTION("FlatFrontEnd, every channel") {
    for (const auto strat : kStrategies) {
      FrontEndConfig c = cfg;
      c.strategy = strat;
      dchag::FlatFrontEnd<Exec, float> flat(exec, c);
      require_invalid([&] { flat.forward(exec, wide, out); },
                      {"dchag::FlatFrontEnd::forward", "images.extent(2) is 8", "expected H = 16"});
      require_invalid(
          [&] { flat.forward(exec, wider, out); },
          {"dchag::FlatFrontEnd::forward", "images.extent(3) is 32", "expected W = 16"});
      // One channel short used to be read as a 4-channel selection, dropping the last channel.
      require_invalid([&] { flat.forward(exec, fewer, out); },
                      {"dchag::FlatFrontEnd::forward", "images.extent(1) is 4", "expected C = 5"});
      require_invalid([&] { flat.forward(exec, none, out0); },
                      {"dchag::FlatFrontEnd::forward", "images.extent(0) is 0", "expected B >= 1"});
      flat.forward(exec, good, out);
    }
  }

  SECTION("FlatFrontEnd, a selection") {
    dchag::FlatFrontEnd<Exec, float> flat(exec, cfg);
    V4<float> three("three", B, 3, 16, 16), three_wide("three_wide", B, 3, 8, 32);
    // own(): the images hold exactly the selected channels.
    require_invalid(
        [&] {
          flat.forward(exec, three, ChannelSelection::own({4, 1}), out);
        },
        {"dchag::FlatFrontEnd::forward", "images.extent(1) is 3", "expected J = 2"});
    require_invalid(
        [&] {
          flat.forward(exec, three_wide, ChannelSelection::own({4, 1, 0}), out);
        },
        {"dchag::FlatFrontEnd::forward", "images.extent(2) is 8", "expected H = 16"});
    // from_full_image(): the images hold every model channel.
    require_invalid(
        [&] {
          flat.forward(exec, three, ChannelSelection::from_full_image({2, 0}), out);
        },
        {"dchag::FlatFrontEnd::forward", "images.extent(1) is 3", "expected C = 5"});
    flat.forward(exec, three, ChannelSelection::own({4, 1, 0}), out);
    flat.forward(exec, good, ChannelSelection::from_full_image({2, 0}), out);
  }

  SECTION("DchagEmulation") {
    dchag::DchagEmulation<Exec, float> emu(exec, cfg, {PartialKind::linear, 1},
                                           {{0, 1}, {2, 3, 4}});
    require_invalid([&] { emu.forward(exec, wide, out); },
                    {"dchag::DchagEmulation::forward", "images.extent(2) is 8", "expected H = 16"});
    require_invalid(
        [&] { emu.forward(exec, wider, out); },
        {"dchag::DchagEmulation::forward", "images.extent(3) is 32", "expected W = 16"});
    require_invalid([&] { emu.forward(exec, none, out0); },
                    {"dchag::DchagEmulation::forward", "images.extent(0) is 0", "expected B >= 1"});
    emu.forward(exec, good, out);
  }
}

// ---------------------------------------------------------------------------------------------
// Sizes: 64-bit, and refused where the kernels' int indices (league sizes) cannot hold them.
// ---------------------------------------------------------------------------------------------

TEST_CASE("Configurations whose sizes the kernels cannot index are refused",
          "[front_end][errors][sizes]") {
  Exec exec;
  static_assert(std::is_same_v<decltype(FrontEndConfig{}.patches()), std::int64_t>);
  const FrontEndConfig small{5, 4, 6, 2, 8, 2, Strategy::pooled, Convention::climax, 1};

  SECTION("more than INT_MAX patches") {
    // 131072 x 131072 images, p = 2: L = 65536^2 = 2^32, which an int patches() wrapped to 0.
    FrontEndConfig cfg = small;
    cfg.height = cfg.width = 131072;
    CHECK(cfg.patches() == std::int64_t(1) << 32);
    const std::vector<std::string> msg = {"patches L = (H / p) * (W / p) = 65536 * 65536",
                                          "is 4294967296", "expected <= INT_MAX = 2147483647"};
    std::vector<std::string> flat_msg = msg, emu_msg = msg;
    flat_msg.insert(flat_msg.begin(), "dchag::FlatFrontEnd:");
    emu_msg.insert(emu_msg.begin(), "dchag::DchagEmulation:");
    require_invalid([&] { cfg.validate("dchag::FlatFrontEnd"); }, flat_msg);
    require_invalid([&] { dchag::FlatFrontEnd<Exec, float>(exec, cfg); }, flat_msg);
    require_invalid(
        [&] {
          dchag::DchagEmulation<Exec, float>(exec, cfg, {}, {{0, 1, 2, 3, 4}});
        },
        emu_msg);
  }

  SECTION("more than INT_MAX token rows for one image") {
    // L = 2048^2 = 2^22 fits, but C * L = 1024 * 2^22 = 2^32 rows do not fit a league.
    FrontEndConfig cfg = small;
    cfg.channels = 1024;
    cfg.height = cfg.width = 2048;
    cfg.patch = 1;
    require_invalid([&] { dchag::FlatFrontEnd<Exec, float>(exec, cfg); },
                    {"dchag::FlatFrontEnd", "token rows C * L (B = 1) = 1024 * 4194304",
                     "is 4294967296", "expected <= INT_MAX"});
  }

  SECTION("a batch whose rows overflow a league") {
    // 5 channels, L = 512^2 = 2^18: one image is 1.3 M rows; 2048 images are 2.7 G.
    FrontEndConfig cfg = small;
    cfg.height = cfg.width = 512;
    cfg.patch = 1;
    cfg.validate("test");
    cfg.validate_batch("test", 1, 5);
    require_invalid(
        [&] { cfg.validate_batch("test", 2048, 5); },
        {"test: token rows B * J * L = 2048 * 5 * 262144", "is 2684354560", "expected <= INT_MAX"});
  }

  SECTION("tensors over 2^53 elements") {
    FrontEndConfig cfg = small;
    cfg.dim = 1 << 27;  // attention weights 4 D^2 = 2^56
    cfg.heads = 1;
    require_invalid([&] { dchag::FlatFrontEnd<Exec, float>(exec, cfg); },
                    {"dchag::FlatFrontEnd", "attention weights 4 * D * D", "expected <= 2^53"});
  }

  SECTION("the paper's configuration is accepted, in 64-bit bytes") {
    // C = 1024, 128 x 256 images, p = 4 (L = 2048), D = 2048, 32 heads, B = 2 (DESIGN 5).
    const FrontEndConfig paper{1024, 128, 256, 4, 2048, 32, Strategy::pooled, Convention::climax,
                               0};
    paper.validate("test");
    const auto e = dchag::FlatFrontEnd<Exec, float>::estimate(paper, 2);
    // Tokens kept for backward alone: 4 B * 2 * 1024 * 2048 * 2048 = 32 GiB, past 2^31.
    CHECK(e.activations > std::int64_t(4) * 2 * 1024 * 2048 * 2048);
    CHECK(e.total() > e.activations);
  }
}

// ---------------------------------------------------------------------------------------------
// Estimates validate what they are given, as construction and forward do.
// ---------------------------------------------------------------------------------------------

TEST_CASE("Front-end estimates reject what construction and forward reject",
          "[front_end][errors][memory]") {
  Exec exec;
  using Flat = dchag::FlatFrontEnd<Exec, float>;
  const FrontEndConfig good{5, 4, 6, 2, 8, 2, Strategy::pooled, Convention::climax, 1};
  FrontEndConfig cfg = good;
  cfg.patch = 0;  // divided by zero in patches()
  require_invalid([&] { Flat::estimate(cfg, 2); },
                  {"dchag::FlatFrontEnd::estimate", "config.patch is 0", "expected >= 1"});
  cfg = good;
  cfg.heads = 0;  // returned numbers
  require_invalid([&] { Flat::estimate(cfg, 2); },
                  {"dchag::FlatFrontEnd::estimate", "config.heads is 0", "expected a divisor"});
  for (const std::int64_t B : {std::int64_t(0), std::int64_t(-3)}) {
    require_invalid(
        [&] { Flat::estimate(good, B); },
        {"dchag::FlatFrontEnd::estimate", "B is " + std::to_string(B), "expected >= 1"});
  }
  for (const int J : {0, -2, 6}) {
    require_invalid([&] { Flat::estimate(good, 2, J); },
                    {"dchag::FlatFrontEnd::estimate", "channels_in is " + std::to_string(J),
                     "expected -1 (all) or 1 <= channels_in <= C = 5"});
  }
  require_invalid([&] { Flat::estimate(good, 2, -1, -1); },
                  {"dchag::FlatFrontEnd::estimate", "chunk is -1", "expected >= 0"});
  CHECK(Flat::estimate(good, 2, 3, 2).total() > 0);
  // Sizes the kernels cannot index, as validate() and validate_batch() refuse them.
  cfg = good;
  cfg.height = cfg.width = 131072;
  require_invalid([&] { Flat::estimate(cfg, 1); },
                  {"dchag::FlatFrontEnd::estimate", "patches L = (H / p) * (W / p)",
                   "is 4294967296", "expected <= INT_MAX"});
  cfg = good;
  cfg.height = cfg.width = 512;
  cfg.patch = 1;
  CHECK(Flat::estimate(cfg, 1).total() > 0);
  require_invalid([&] { Flat::estimate(cfg, 2048); },
                  {"dchag::FlatFrontEnd::estimate", "token rows B * J * L = 2048 * 5 * 262144",
                   "is 2684354560", "expected <= INT_MAX"});

  Flat flat(exec, good);
  require_invalid([&] { flat.memory_estimate(0); },
                  {"dchag::FlatFrontEnd::estimate", "B is 0", "expected >= 1"});
  dchag::DchagEmulation<Exec, float> emu(exec, good, {PartialKind::linear, 1}, {{0, 1}, {2, 3, 4}});
  require_invalid([&] { emu.memory_estimate(0); },
                  {"dchag::DchagEmulation::memory_estimate", "B is 0", "expected >= 1"});
  require_invalid([&] { emu.memory_estimate(-1); },
                  {"dchag::DchagEmulation::memory_estimate", "B is -1", "expected >= 1"});
  CHECK(emu.memory_estimate(2).total() > 0);
}

// ---------------------------------------------------------------------------------------------
// dchag::check_finite: the opt-in check that names the first non-finite value.
// ---------------------------------------------------------------------------------------------

namespace {

// The message of the dchag::error that `f` throws, or "<no error>".
template <class F>
std::string finite_error(F&& f) {
  try {
    f();
  } catch (const dchag::error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST_CASE("check_finite names the first non-finite element", "[front_end][check_finite]") {
  Exec exec;
  using Catch::Matchers::Contains;

  SECTION("a view") {
    V4<float> images("images", 2, 3, 4, 6);
    fill_normal(images, 5);
    dchag::check_finite(exec, "images", images);
    auto values = to_host(images);
    values[37] = std::numeric_limits<float>::quiet_NaN();
    values[100] = std::numeric_limits<float>::infinity();  // a later one is not the first
    from_host(images, values);
    // Element 37 of [2, 3, 4, 6] is [0, 1, 2, 1]: 37 = 1 * 24 + 2 * 6 + 1.
    CHECK_THAT(finite_error([&] { dchag::check_finite(exec, "images", images); }),
               Contains("dchag::check_finite: images element 37 ([0, 1, 2, 1] of [2, 3, 4, 6])") &&
                   Contains("is nan") && Contains("expected every element finite"));
    values[37] = 0;
    values[100] = -std::numeric_limits<float>::infinity();
    from_host(images, values);
    const V4<const float> read_only = images;
    CHECK_THAT(finite_error([&] { dchag::check_finite(exec, "x", read_only); }),
               Contains("x element 100") && Contains("is -inf"));
  }

  SECTION("parameters and gradients by ClimaX name") {
    const FrontEndConfig cfg{4, 4, 6, 2, 8, 2, Strategy::pooled, Convention::climax, 9};
    dchag::FlatFrontEnd<Exec, double> flat(exec, cfg);
    V4<double> images("images", 2, 4, 4, 6);
    V3<double> out("out", 2, cfg.patches(), cfg.dim);
    fill_normal(images, 6);
    flat.zero_gradients(exec);
    flat.forward(exec, images, out);
    flat.backward(exec, out);
    // A clean model passes.
    dchag::check_finite(exec, flat.parameters());
    dchag::check_finite(exec, flat.gradients());

    const auto params = flat.parameters();
    const auto* w = find(params, "token_embeds.2.proj.weight");
    REQUIRE(w != nullptr);
    REQUIRE(w->transposed_rows == cfg.dim);
    // Memory [p*p, D] holds the file's [D, 1, p, p]: memory (k = 3, d = 5) is file element
    // 5 * 4 + 3 = 23, [5, 0, 1, 1].
    const Flat<double> values = w->pieces.front().values;
    write_element(values, 3 * cfg.dim + 5, std::numeric_limits<double>::infinity());
    CHECK_THAT(finite_error([&] { dchag::check_finite(exec, flat.parameters()); }),
               Contains("token_embeds.2.proj.weight element 23 ([5, 0, 1, 1] of [8, 1, 2, 2])") &&
                   Contains("is inf"));
    write_element(values, 3 * cfg.dim + 5, 0.5);
    dchag::check_finite(exec, flat.parameters());

    // One NaN pixel poisons the gradients through the shared parameters (CONTRIBUTING, Errors).
    auto pixels = to_host(images);
    pixels[7] = std::numeric_limits<double>::quiet_NaN();
    from_host(images, pixels);
    CHECK_THAT(finite_error([&] { dchag::check_finite(exec, "images", images); }),
               Contains("images element 7"));
    flat.zero_gradients(exec);
    flat.forward(exec, images, out);
    flat.backward(exec, out);
    CHECK_THAT(finite_error([&] { dchag::check_finite(exec, flat.gradients()); }),
               Contains("dchag::check_finite:") && Contains("is nan"));
  }

  SECTION("a tensor in pieces reports the file index") {
    const FrontEndConfig cfg{5, 4, 6, 2, 8, 2, Strategy::pooled, Convention::climax, 1};
    dchag::DchagEmulation<Exec, float> emu(exec, cfg, {PartialKind::linear, 1},
                                           {{3, 1}, {0, 2, 4}});
    dchag::check_finite(exec, emu.parameters());
    const auto params = emu.parameters();
    const auto* e = find(params, "var_embed");
    REQUIRE(e != nullptr);
    // The second piece is channel 1's row: element 6 of it is file element 1 * 8 + 6 = 14.
    REQUIRE(e->pieces[1].offset == 8);
    write_element(Flat<float>(e->pieces[1].values), 6, std::numeric_limits<float>::quiet_NaN());
    CHECK_THAT(finite_error([&] { dchag::check_finite(exec, emu.parameters()); }),
               Contains("var_embed element 14 ([0, 1, 6] of [1, 5, 8])") && Contains("nan"));
  }
}
