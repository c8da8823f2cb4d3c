// Per-sample channel masks (DESIGN 3.10), beside the PyTorch goldens with key_padding_mask
// (test_goldens.cpp): a missing channel is the same as a channel left out (a second strategy,
// sample by sample), missing pixels do not matter (bit for bit), every memory policy agrees with
// keep, the masked backward against central differences, and bad masks refused by name.
#include <catch2/catch.hpp>

#include <dchag/aggregate.hpp>

#include <cstdint>
#include <limits>
#include <string>
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

using Groups = std::vector<std::vector<int>>;
using Mask = std::vector<std::vector<int>>;  // [B][C], 1 valid

double param_sd(int D) { return D <= 8 ? 0.3 : 0.3 * std::sqrt(8.0 / D); }

dchag::View2<std::uint8_t, Mem> device_mask(const Mask& m) {
  dchag::View2<std::uint8_t, Mem> v("mask", m.size(), m.front().size());
  auto h = Kokkos::create_mirror_view(v);
  for (std::size_t b = 0; b < m.size(); ++b)
    for (std::size_t c = 0; c < m[b].size(); ++c) h(b, c) = static_cast<std::uint8_t>(m[b][c]);
  Kokkos::deep_copy(v, h);
  return v;
}

template <class FrontEnd>
typename FrontEnd::Inputs with_mask(const FrontEnd&, const Mask& m) {
  typename FrontEnd::Inputs in;
  in.mask = device_mask(m);
  return in;
}

// Sample b of images [B, C, H, W] as [1, C, H, W].
V4<double> sample(const V4<double>& images, int b) {
  V4<double> one("sample", 1, images.extent(1), images.extent(2), images.extent(3));
  Kokkos::deep_copy(one, Kokkos::subview(images, std::make_pair(b, b + 1), Kokkos::ALL, Kokkos::ALL,
                                         Kokkos::ALL));
  return one;
}

// The pixels of every missing channel replaced by large finite values.
V4<double> garbage_where_missing(const V4<double>& images, const Mask& m) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), images);
  for (std::size_t b = 0; b < m.size(); ++b)
    for (std::size_t c = 0; c < m[b].size(); ++c)
      if (!m[b][c])
        for (std::size_t y = 0; y < h.extent(2); ++y)
          for (std::size_t x = 0; x < h.extent(3); ++x) h(b, c, y, x) = 1e3 * double(1 + x + y);
  V4<double> out("garbage", images.extent(0), images.extent(1), images.extent(2), images.extent(3));
  Kokkos::deep_copy(out, h);
  return out;
}

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

void require_close(const Step& a, const Step& ref, const List<double>& names, double ulps) {
  const double tol = ulps * std::numeric_limits<double>::epsilon();
  CHECK(max_abs_diff(a.out, ref.out) <= tol * std::max(1.0, max_abs(ref.out)));
  for (std::size_t t = 0; t < a.grads.size(); ++t) {
    INFO(names[t].name);
    CHECK(max_abs_diff(a.grads[t], ref.grads[t]) <= tol * std::max(1.0, max_abs(ref.grads[t])));
  }
}

const Mask kFlatMask = {{1, 0, 1, 1, 0}, {0, 1, 1, 0, 1}, {0, 0, 0, 1, 0}};

}  // namespace

TEST_CASE("a missing channel is the same as a channel left out", "[masks]") {
  // The masked batch against each sample alone, tokenized from only its valid channels: the same
  // output, and gradients that are the sums of the samples' (ChannelSelection drops a channel by
  // another path: no token at all).
  Exec exec;
  const int B = 3, C = 5;
  for (const auto strategy : kStrategies) {
    for (const auto memory : {MemoryPolicy::keep, MemoryPolicy::recompute}) {
      if (strategy == Strategy::materialized && memory != MemoryPolicy::keep) continue;
      for (const int chunk : {0, 1, 2}) {
        INFO(dchag::to_string(strategy) << ", " << dchag::to_string(memory) << ", chunk " << chunk);
        FrontEndConfig cfg{C, 4, 6, 2, 8, 2, strategy, Convention::climax, 3100};
        cfg.memory = memory;
        dchag::FlatFrontEnd<Exec, double> masked(exec, cfg), alone(exec, cfg);
        fill_normal(masked.parameters(), 3101, param_sd(cfg.dim));
        copy_by_name(masked.parameters(), alone.parameters());
        masked.set_chunk_channels(chunk);
        V4<double> images("images", B, C, cfg.height, cfg.width);
        V3<double> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
        fill_normal(images, 3102);
        fill_normal(g, 3103);
        masked.zero_gradients(exec);
        masked.forward(exec, images, out, {.mask = device_mask(kFlatMask)});  // as README
        masked.backward(exec, g);
        const auto got = to_host(out);

        alone.zero_gradients(exec);
        std::vector<double> want;
        for (int b = 0; b < B; ++b) {
          std::vector<int> ids;
          for (int c = 0; c < C; ++c)
            if (kFlatMask[b][c]) ids.push_back(c);
          V3<double> o("o", 1, cfg.patches(), cfg.dim), gb("gb", 1, cfg.patches(), cfg.dim);
          Kokkos::deep_copy(gb,
                            Kokkos::subview(g, std::make_pair(b, b + 1), Kokkos::ALL, Kokkos::ALL));
          alone.forward(exec, sample(images, b), ChannelSelection::from_full_image(ids), o);
          alone.backward(exec, gb);  // accumulates over the samples
          const auto ob = to_host(o);
          want.insert(want.end(), ob.begin(), ob.end());
        }
        exec.fence();
        const double tol = 64 * std::numeric_limits<double>::epsilon();
        CHECK(max_abs_diff(got, want) <= tol * max_abs(want));
        require_same(masked.gradients(), alone.gradients(), [&](const std::string& name) {
          return tol * std::max(1.0, max_abs(values_of(alone.gradients(), name)));
        });
      }
    }
  }
}

TEST_CASE("missing pixels do not change anything", "[masks]") {
  // Whatever finite values a missing channel holds, outputs and gradients are the same bit for
  // bit: a missing token gets weight zero and passes a zero gradient.
  Exec exec;
  const int B = 3;
  auto check = [&](auto& fe, const FrontEndConfig& cfg, const Mask& mask) {
    V4<double> images("images", B, cfg.channels, cfg.height, cfg.width);
    V3<double> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
    fill_normal(images, cfg.seed + 2);
    fill_normal(g, cfg.seed + 3);
    const auto noisy = garbage_where_missing(images, mask);
    const auto in = with_mask(fe, mask);
    const Step clean = run_step(
        fe, [&] { fe.forward(exec, images, out, in); }, out, g, true);
    const Step dirty = run_step(
        fe, [&] { fe.forward(exec, noisy, out, in); }, out, g, true);
    CHECK(dirty.out == clean.out);
    for (std::size_t t = 0; t < clean.grads.size(); ++t) {
      INFO(fe.gradients()[t].name);
      CHECK(dirty.grads[t] == clean.grads[t]);
    }
  };
  for (const auto strategy : kStrategies) {
    for (const auto memory : {MemoryPolicy::keep, MemoryPolicy::recompute}) {
      if (strategy == Strategy::materialized && memory != MemoryPolicy::keep) continue;
      INFO(dchag::to_string(strategy) << ", " << dchag::to_string(memory));
      FrontEndConfig cfg{5, 4, 6, 2, 8, 2, strategy, Convention::climax, 3200};
      cfg.memory = memory;
      dchag::FlatFrontEnd<Exec, double> flat(exec, cfg);
      fill_normal(flat.parameters(), 3201, param_sd(cfg.dim));
      flat.set_chunk_channels(2);
      check(flat, cfg, kFlatMask);
      // Rank 1 ({4, 5, 6, 7}) holds nothing of sample 0; rank 0's first group ({0, 1}) nothing of
      // sample 1.
      const Mask mask = {
          {1, 0, 1, 0, 0, 0, 0, 0}, {0, 0, 1, 1, 0, 1, 0, 1}, {1, 1, 1, 1, 1, 1, 1, 0}};
      cfg.channels = 8;
      for (const auto kind : {PartialKind::linear, PartialKind::cross_attention}) {
        INFO(dchag::to_string(kind));
        dchag::DchagEmulation<Exec, double> emu(exec, cfg, DchagOptions{kind, 2},
                                                Groups{{0, 1, 2, 3}, {4, 5, 6, 7}});
        fill_normal(emu.parameters(), 3202, param_sd(cfg.dim));
        check(emu, cfg, mask);
      }
    }
  }
}

TEST_CASE("every memory policy gives keep's results under a mask", "[masks][recompute]") {
  Exec exec;
  const int B = 3;
  FrontEndConfig cfg{5, 4, 6, 2, 8, 2, Strategy::pooled, Convention::climax, 3300};
  dchag::FlatFrontEnd<Exec, double> flat(exec, cfg);
  fill_normal(flat.parameters(), 3301, param_sd(cfg.dim));
  V4<double> images("images", B, cfg.channels, cfg.height, cfg.width);
  V3<double> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
  fill_normal(images, 3302);
  fill_normal(g, 3303);
  const auto in = with_mask(flat, kFlatMask);
  auto forward = [&] { flat.forward(exec, images, out, in); };
  for (const int chunk : {0, 1, 3}) {
    INFO("chunk " << chunk);
    flat.set_chunk_channels(chunk);
    flat.set_memory_policy(MemoryPolicy::keep);
    const Step keep = run_step(flat, forward, out, g, true);
    flat.set_memory_policy(MemoryPolicy::recompute);
    require_close(run_step(flat, forward, out, g, true), keep, flat.gradients(), 8);
    flat.set_memory_policy(MemoryPolicy::inference);
    require_close(run_step(flat, forward, out, g, false), keep, flat.gradients(), 8);
  }
  flat.set_memory_policy(MemoryPolicy::keep);
  flat.set_chunk_channels(0);
  const Step pooled = run_step(flat, forward, out, g, true);
  flat.set_strategy(Strategy::materialized);
  require_close(run_step(flat, forward, out, g, true), pooled, flat.gradients(), 256);
}

TEST_CASE("the masked backward matches finite differences", "[masks][fd]") {
  Exec exec;
  const int B = 2;
  auto fd = [&](auto& fe, const FrontEndConfig& cfg, const Mask& mask) {
    V4<double> images("images", B, cfg.channels, cfg.height, cfg.width);
    V3<double> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
    fill_normal(images, cfg.seed + 2);
    fill_normal(g, cfg.seed + 3);
    const auto in = with_mask(fe, mask);
    auto loss = [&] {
      fe.forward(exec, images, out, in);
      exec.fence();
      return dot(out, g);
    };
    fe.zero_gradients(exec);
    loss();
    fe.backward(exec, g);
    exec.fence();
    return fd_check(fe.parameters(), fe.gradients(), loss);
  };
  std::uint64_t seed = 3400;
  for (const auto strategy : kStrategies) {
    for (const auto memory : {MemoryPolicy::keep, MemoryPolicy::recompute}) {
      if (strategy == Strategy::materialized && memory != MemoryPolicy::keep) continue;
      INFO(dchag::to_string(strategy) << ", " << dchag::to_string(memory));
      FrontEndConfig cfg{4, 4, 4, 2, 8, 2, strategy, Convention::climax, seed += 10};
      cfg.memory = memory;
      dchag::FlatFrontEnd<Exec, double> flat(exec, cfg);
      fill_normal(flat.parameters(), seed + 1, param_sd(cfg.dim));
      flat.set_chunk_channels(2);
      const auto rs = fd(flat, cfg, {{1, 0, 1, 1}, {0, 0, 1, 0}});
      require_live(rs, "var_query");
      require_live(rs, "token_embeds.0.proj.weight");  // valid in sample 0 only
      // Channel 1 is missing in every sample: no gradient reaches its tokenizer.
      CHECK(result_of(rs, "token_embeds.1.proj.weight").max_grad == 0);

      // An empty group (sample 0: {3}) and an empty rank (sample 1: {3, 4}).
      cfg.channels = 5;
      for (const auto kind : {PartialKind::linear, PartialKind::cross_attention}) {
        const int tree = kind == PartialKind::linear ? 1 : 2;
        INFO(dchag::to_string(kind) << ", tree " << tree);
        dchag::DchagEmulation<Exec, double> emu(exec, cfg, DchagOptions{kind, tree},
                                                Groups{{0, 1, 2}, {3, 4}});
        fill_normal(emu.parameters(), seed + 2, param_sd(cfg.dim));
        const auto re = fd(emu, cfg, {{1, 1, 0, 0, 1}, {1, 0, 1, 0, 0}});
        require_live(re, "final.var_query");
        require_live(re, "token_embeds.4.proj.weight");
      }
    }
  }
}

TEST_CASE("CrossAttention: a segment with no valid input gives the output bias", "[masks]") {
  Exec exec;
  const int B = 2, N = 4, L = 3, D = 8;
  std::vector<std::vector<double>> db_value;
  for (const auto strategy : kStrategies) {
    INFO(dchag::to_string(strategy));
    dchag::CrossAttention<Exec, double> att(exec, {D, 2, Convention::climax, strategy}, 3500);
    fill_normal(att.parameters(), 3501, param_sd(D));
    V4<double> x("x", B, N, L, D), out("out", B, 2, L, D), dx("dx", B, N, L, D);
    V4<double> g("g", B, 2, L, D);
    fill_normal(x, 3502);
    fill_normal(g, 3503);
    // Segments {0, 1} and {2, 3}; sample 0 holds nothing of the second.
    const auto valid = device_mask({{1, 0, 0, 0}, {1, 1, 0, 1}});
    typename dchag::CrossAttention<Exec, double>::Saved saved;
    att.forward(exec, x, dchag::Segments::split(N, 2), out, saved, nullptr, valid);
    att.zero_gradients(exec);
    att.backward(exec, x, saved, g, dx);
    // The output bias alone, and no gradient into the value bias from there: both strategies
    // give the same value-bias gradient (that of the valid positions).
    const auto bo = values_of(att.parameters(), "var_agg.out_proj.bias");
    const auto o = to_host(out);
    for (int l = 0; l < L; ++l)
      for (int r = 0; r < D; ++r) CHECK(o[((0 * 2 + 1) * L + l) * D + r] == bo[r]);
    db_value.push_back(values_of(att.gradients(), "var_agg.in_proj_bias"));
    // Missing inputs get exactly zero gradient; valid ones do not.
    const auto d = to_host(dx);
    const Mask m = {{1, 0, 0, 0}, {1, 1, 0, 1}};
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n) {
        double mx = 0;
        for (int i = 0; i < L * D; ++i) mx = std::max(mx, std::abs(d[(b * N + n) * L * D + i]));
        INFO("b " << b << ", n " << n);
        if (m[b][n]) {
          CHECK(mx > 0);
        } else {
          CHECK(mx == 0);
        }
      }
  }
  CHECK(max_abs_diff(db_value[0], db_value[1]) <= 1e-13 * max_abs(db_value[1]));
}

TEST_CASE("bad masks are refused with a precise message", "[masks][errors]") {
  Exec exec;
  FrontEndConfig cfg{5, 4, 6, 2, 8, 2, Strategy::pooled, Convention::climax, 3600};
  dchag::FlatFrontEnd<Exec, double> flat(exec, cfg);
  dchag::DchagEmulation<Exec, double> emu(exec, cfg, DchagOptions{PartialKind::cross_attention, 1},
                                          Groups{{0, 1, 2}, {3, 4}});
  V4<double> images("images", 2, 5, 4, 6);
  V3<double> out("out", 2, cfg.patches(), cfg.dim);
  using Inputs = dchag::FlatFrontEnd<Exec, double>::Inputs;
  auto flat_with = [&](const Mask& m, const ChannelSelection& sel) {
    flat.forward(exec, images, sel, out, Inputs{{}, device_mask(m)});
  };
  const auto all = ChannelSelection::from_full_image({0, 1, 2, 3, 4});
  require_invalid(
      [&] {
        flat_with({{1, 1, 1, 1, 1, 1}, {1, 1, 1, 1, 1, 1}}, all);
      },
      {"dchag::FlatFrontEnd::forward", "mask is [2, 6]", "expected [B, C] = [2, 5]"});
  require_invalid(
      [&] {
        flat_with({{1, 1, 1, 1, 1}}, all);
      },
      {"mask is [1, 5]", "expected [B, C] = [2, 5]"});
  require_invalid(
      [&] {
        flat_with({{1, 2, 1, 1, 1}, {1, 1, 1, 1, 1}}, all);
      },
      {"mask(0, 1) is 2", "expected 0 (missing) or 1 (valid)"});
  require_invalid(
      [&] {
        flat_with({{1, 1, 1, 1, 1}, {0, 0, 0, 0, 0}}, all);
      },
      {"dchag::FlatFrontEnd::forward", "sample 1 has no valid channel"});
  // Only the selected channels count: sample 0's valid channels are all outside the selection.
  require_invalid(
      [&] {
        flat_with({{1, 1, 0, 0, 0}, {1, 1, 1, 1, 1}}, ChannelSelection::from_full_image({2, 4}));
      },
      {"sample 0 has no valid channel"});
  require_invalid(
      [&] {
        emu.forward(exec, images, out, with_mask(emu, {{0, 0, 0, 0, 0}, {0, 0, 0, 1, 0}}));
      },
      {"dchag::DchagEmulation::forward", "sample 0 has no valid channel"});
  dchag::CrossAttention<Exec, double> att(exec, {8, 2}, 1);
  V4<double> x("x", 2, 3, 2, 8);
  V3<double> o("o", 2, 2, 8);
  require_invalid(
      [&] {
        att.forward(exec, x, o, device_mask({{1, 1}, {1, 1}}));
      },
      {"dchag::CrossAttention::forward", "valid is [2, 2]", "expected [B, N] = [2, 3]"});
}

TEST_CASE("a D-CHAG selection is the mask of the channels the images lack", "[masks][selection]") {
  // DchagEmulation on images of a subset (in another order) equals it on every channel with the
  // lacking ones masked, bit for bit; a permutation of every channel equals no selection.
  Exec exec;
  const int B = 2;
  for (const auto kind : {PartialKind::linear, PartialKind::cross_attention}) {
    for (const auto memory : {MemoryPolicy::keep, MemoryPolicy::recompute}) {
      INFO(dchag::to_string(kind) << ", " << dchag::to_string(memory));
      FrontEndConfig cfg{6, 4, 6, 2, 8, 2, Strategy::pooled, Convention::climax, 3700};
      cfg.memory = memory;
      dchag::DchagEmulation<Exec, double> emu(exec, cfg, DchagOptions{kind, 1},
                                              Groups{{0, 1, 2}, {3, 4, 5}});
      fill_normal(emu.parameters(), 3701, param_sd(cfg.dim));
      V4<double> images("images", B, 6, cfg.height, cfg.width);
      V3<double> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
      fill_normal(images, 3702);
      fill_normal(g, 3703);
      const std::vector<int> ids = {5, 1, 4};  // group 0 keeps one channel
      V4<double> subset("subset", B, ids.size(), cfg.height, cfg.width);
      for (std::size_t j = 0; j < ids.size(); ++j)
        Kokkos::deep_copy(Kokkos::subview(subset, Kokkos::ALL, j, Kokkos::ALL, Kokkos::ALL),
                          Kokkos::subview(images, Kokkos::ALL, ids[j], Kokkos::ALL, Kokkos::ALL));
      const Mask lacking = {{0, 1, 0, 0, 1, 1}, {0, 1, 0, 0, 1, 1}};
      const auto in = with_mask(emu, lacking);
      const Step masked = run_step(
          emu, [&] { emu.forward(exec, images, out, in); }, out, g, true);
      const Step selected = run_step(
          emu, [&] { emu.forward(exec, subset, ChannelSelection::own(ids), out); }, out, g, true);
      CHECK(selected.out == masked.out);
      for (std::size_t t = 0; t < masked.grads.size(); ++t) {
        INFO(emu.gradients()[t].name);
        CHECK(selected.grads[t] == masked.grads[t]);
      }
      // With a mask as well: both apply.
      const Mask sample1_lacks_5 = {{1, 1, 1, 1, 1, 1}, {1, 1, 1, 1, 1, 0}};
      const Mask both = {{0, 1, 0, 0, 1, 1}, {0, 1, 0, 0, 1, 0}};
      const Step masked2 = run_step(
          emu, [&] { emu.forward(exec, images, out, with_mask(emu, both)); }, out, g, true);
      const Step selected2 = run_step(
          emu,
          [&] {
            emu.forward(exec, subset, ChannelSelection::own(ids), out,
                        with_mask(emu, sample1_lacks_5));
          },
          out, g, true);
      CHECK(selected2.out == masked2.out);
      const Step plain = run_step(
          emu, [&] { emu.forward(exec, images, out); }, out, g, true);
      const Step permuted = run_step(
          emu,
          [&] {
            emu.forward(exec, images, ChannelSelection::from_full_image({5, 4, 3, 2, 1, 0}), out);
          },
          out, g, true);
      CHECK(permuted.out == plain.out);
      require_invalid(
          [&] {
            emu.forward(exec, subset, ChannelSelection::own({5, 1, 5}), out);
          },
          {"dchag::DchagEmulation::forward", "channel 5 is selected twice"});
      require_invalid(
          [&] {
            emu.forward(exec, subset, ChannelSelection::own({5, 1, 9}), out);
          },
          {"selection channel 2 is 9", "expected 0 <= channel < C = 6"});
    }
  }
}
