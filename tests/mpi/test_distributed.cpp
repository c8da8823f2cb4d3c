// The distributed front end on P ranks against its single-process references, with the same
// weights: dchag_linear / dchag_xattn against DchagEmulation (the same channel groups),
// exact_flat against FlatFrontEnd (pooled) and tp_only against FlatFrontEnd (materialized).
// Run under mpiexec at 1..4 ranks; every rank builds the reference itself.
#include <catch2/catch.hpp>
#include <dchag/distributed.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;
using Scalar = double;
using List = dchag::TensorList<Scalar, Mem>;

std::uint64_t mix(std::uint64_t x) { return dchag::detail::splitmix64(x); }

// Value of element i of the file tensor `name`: the same on every rank and in every model that
// holds that element, so distributed and reference models get identical weights.
double value_at(const std::string& name, std::int64_t i, double scale) {
  const std::uint64_t h = mix(dchag::detail::hash_name(name) ^ mix(static_cast<std::uint64_t>(i)));
  return scale * (static_cast<double>(h >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

void randomize(const List& list) {
  for (const auto& t : list) {
    for (const auto& p : t.pieces) {
      auto h = Kokkos::create_mirror_view(p.values);
      for (std::size_t i = 0; i < h.extent(0); ++i) h(i) = value_at(t.name, p.offset + i, 0.5);
      Kokkos::deep_copy(p.values, h);
    }
  }
}

template <class V>
void fill(const V& v, std::uint64_t seed) {
  auto h = Kokkos::create_mirror_view(v);
  for (std::size_t i = 0; i < h.span(); ++i)
    h.data()[i] = value_at("data", std::int64_t(seed * 1000003 + i), 1.0);
  Kokkos::deep_copy(v, h);
}

template <class V>
std::vector<double> host(const V& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<double>(h.data(), h.data() + h.span());
}

const dchag::NamedTensor<Scalar, Mem>* find(const List& list, const std::string& name) {
  for (const auto& t : list)
    if (t.name == name) return &t;
  return nullptr;
}

// Every piece of `got` equals the reference elements at the same file offsets. Both sides run the
// same arithmetic in double up to summation order over ranks and channels: 1e-10 relative to the
// tensor's largest magnitude covers that reordering with margin.
void require_matches(const List& got, const List& want, const std::string& what) {
  for (const auto& t : got) {
    const auto* ref = find(want, t.name);
    INFO(what << ": tensor " << t.name);
    REQUIRE(ref != nullptr);
    std::vector<double> full(static_cast<std::size_t>(ref->numel()), 0.0);
    for (const auto& p : ref->pieces) {
      const auto v = host(p.values);
      for (std::size_t i = 0; i < v.size(); ++i) full[p.offset + i] = v[i];
    }
    double scale = 1e-30;
    for (double x : full) scale = std::max(scale, std::abs(x));
    for (const auto& p : t.pieces) {
      const auto v = host(p.values);
      for (std::size_t i = 0; i < v.size(); ++i) {
        INFO("element " << p.offset + i);
        REQUIRE(std::abs(v[i] - full[p.offset + i]) <= 1e-10 * scale);
      }
    }
  }
}

struct Problem {
  dchag::FrontEndConfig cfg;
  int B;
  std::vector<std::uint8_t> mask = {};  // [B, C] channel validity; empty: none given
  std::vector<int> ids = {};            // the channels the images hold; empty: all
};

Problem small_problem(int channels) {
  dchag::FrontEndConfig cfg;
  cfg.channels = channels;
  cfg.height = 8;
  cfg.width = 12;
  cfg.patch = 4;
  cfg.dim = 16;
  cfg.heads = 4;
  cfg.seed = 7;
  return {cfg, 2};
}

template <class T>
dchag::View4<T, Mem> own_channels(const dchag::View4<T, Mem>& full, const std::vector<int>& ids) {
  dchag::View4<T, Mem> own("own", full.extent(0), ids.size(), full.extent(2), full.extent(3));
  for (std::size_t j = 0; j < ids.size(); ++j)
    Kokkos::deep_copy(Kokkos::subview(own, Kokkos::ALL, j, Kokkos::ALL, Kokkos::ALL),
                      Kokkos::subview(full, Kokkos::ALL, ids[j], Kokkos::ALL, Kokkos::ALL));
  return own;
}

// `v` in the storage type T (rounded once per element, on the host).
template <class T>
dchag::View4<T, Mem> stored(const dchag::View4<Scalar, Mem>& v) {
  if constexpr (std::is_same_v<T, Scalar>) {
    return v;
  } else {
    dchag::View4<T, Mem> out("stored", v.extent(0), v.extent(1), v.extent(2), v.extent(3));
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
    auto ho = Kokkos::create_mirror_view(out);
    for (std::size_t i = 0; i < h.span(); ++i)
      ho.data()[i] = dchag::detail::convert<T>(h.data()[i]);
    Kokkos::deep_copy(out, ho);
    return out;
  }
}

// Runs `mode` on the world communicator and the reference `ref` (of the same Storage) on this
// process, same weights.
template <class Storage = Scalar, class Ref>
void compare(dchag::Mode mode, const Problem& pb, const dchag::ChannelMap& map, Ref& ref,
             dchag::ImageInput input, int tree = 1) {
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  dchag::DistributedFrontEnd<Exec, Scalar, Storage> dist(exec, comm, pb.cfg, mode, map, tree);
  randomize(dist.parameters());
  randomize(ref.parameters());
  const int C = pb.cfg.channels, L = pb.cfg.patches(), D = pb.cfg.dim;
  dchag::View4<Scalar, Mem> filled("images", pb.B, C, pb.cfg.height, pb.cfg.width);
  fill(filled, 1);
  const auto images = stored<Storage>(filled);
  const int W = pb.cfg.queries * D;  // N_q tokens per patch
  dchag::View3<Scalar, Mem> out("out", pb.B, L, W), ref_out("ref_out", pb.B, L, W),
      g("g", pb.B, L, W);
  fill(g, 2);
  // With a selection the images hold its channels only: all of them in selection order (full
  // image, and the reference's), or this rank's in map order.
  const auto given = pb.ids.empty() ? images : own_channels(images, pb.ids);
  std::vector<int> own_ids;
  for (int c : dist.channels())
    if (pb.ids.empty() || std::find(pb.ids.begin(), pb.ids.end(), c) != pb.ids.end())
      own_ids.push_back(c);
  const auto mine = input == dchag::ImageInput::full_image ? given : own_channels(images, own_ids);
  dchag::PerSample<Scalar, Mem> per_sample;  // the same on every rank
  if (pb.cfg.lead_time) {                    // ClimaX's lead-time stage
    dchag::View1<Scalar, Mem> lead_times("lead_times", pb.B);
    fill(lead_times, 3);
    per_sample.lead_times = lead_times;
  }
  if (!pb.mask.empty()) {
    REQUIRE(pb.mask.size() == std::size_t(pb.B) * C);
    dchag::View2<std::uint8_t, Mem> mask("mask", pb.B, C);
    auto h = Kokkos::create_mirror_view(mask);
    std::copy(pb.mask.begin(), pb.mask.end(), h.data());
    Kokkos::deep_copy(mask, h);
    per_sample.mask = mask;
  }
  if (pb.ids.empty()) {
    dist.forward(exec, mine, out, per_sample, input);
    ref.forward(exec, images, ref_out, per_sample);
  } else {
    dist.forward(exec, mine, pb.ids, out, per_sample, input);
    ref.forward(exec, given, dchag::ChannelSelection::own(pb.ids), ref_out, per_sample);
  }
  const auto o = host(out), r = host(ref_out);
  double scale = 0;
  for (double x : r) scale = std::max(scale, std::abs(x));
  for (std::size_t i = 0; i < o.size(); ++i) REQUIRE(std::abs(o[i] - r[i]) <= 1e-10 * scale);

  dist.zero_gradients(exec);
  ref.zero_gradients(exec);
  dist.backward(exec, g);
  ref.backward(exec, g);
  auto grads = dist.gradients();
  if (mode == dchag::Mode::tp_only) {
    // Head shares of the cross-attention weights: summed over ranks they are the full gradient.
    for (const auto& t : grads)
      if (t.name.rfind("var_agg.", 0) == 0)
        for (const auto& p : t.pieces) dchag::allreduce_sum(exec, comm, p.values);
  }
  require_matches(grads, ref.gradients(), std::string(dchag::to_string(mode)));
}

std::vector<dchag::ChannelMap> maps(int channels, int ranks) {
  std::vector<dchag::ChannelMap> m{dchag::ChannelMap::blocks(channels, ranks),
                                   dchag::ChannelMap::round_robin(channels, ranks)};
  // Uneven explicit lists: rank r gets r + 1 channels from the back, the rest go to rank 0.
  std::vector<std::vector<int>> lists(ranks);
  int next = channels - 1;
  for (int r = ranks - 1; r >= 1; --r)
    for (int i = 0; i <= r && next > 0; ++i) lists[r].push_back(next--);
  for (int c = 0; c <= next; ++c) lists[0].push_back(c);
  bool ok = true;
  for (const auto& l : lists) ok = ok && !l.empty();
  if (ok) m.push_back(dchag::ChannelMap::from_lists(channels, lists));
  return m;
}

bool dchag_test_has(const List& list, const std::string& name) {
  for (const auto& t : list)
    if (t.name == name) return true;
  return false;
}

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

}  // namespace

TEST_CASE("D-CHAG on P ranks equals the single-process emulation", "[mpi][distributed]") {
  const int P = world_size();
  Exec exec;
  for (const int channels : {7, 2 * P + 2}) {
    auto pb = small_problem(channels);
    pb.cfg.convention = dchag::Convention::artifact;
    bool first_map = true;
    for (const auto& map : maps(channels, P)) {
      const bool recompute_too = std::exchange(first_map, false);
      std::vector<std::vector<int>> groups;
      for (int r = 0; r < P; ++r) groups.push_back(map.channels_of(r));
      for (const auto mode : {dchag::Mode::dchag_linear, dchag::Mode::dchag_xattn}) {
        for (const int tree : {1, 2}) {
          bool fits = true;
          for (const auto& g : groups)
            fits = fits && int(g.size()) >= tree &&
                   (mode != dchag::Mode::dchag_linear || g.size() % tree == 0);
          if (!fits) continue;
          for (const auto strategy : {dchag::Strategy::pooled, dchag::Strategy::materialized}) {
            pb.cfg.strategy = strategy;
            pb.cfg.memory = dchag::MemoryPolicy::keep;
            INFO("C = " << channels << ", map " << map.kind() << ", " << dchag::to_string(mode)
                        << ", tree " << tree << ", " << dchag::to_string(strategy));
            const auto kind = mode == dchag::Mode::dchag_linear
                                  ? dchag::PartialKind::linear
                                  : dchag::PartialKind::cross_attention;
            dchag::DchagEmulation<Exec, Scalar> ref(exec, pb.cfg, {kind, tree}, groups);
            compare(mode, pb, map, ref, dchag::ImageInput::own_channels, tree);
            compare(mode, pb, map, ref, dchag::ImageInput::full_image, tree);
            if (strategy == dchag::Strategy::pooled && recompute_too) {
              INFO("recompute on the ranks, keep in the reference");
              pb.cfg.memory = dchag::MemoryPolicy::recompute;
              compare(mode, pb, map, ref, dchag::ImageInput::own_channels, tree);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("exact_flat on P ranks equals the flat front end", "[mpi][distributed]") {
  const int P = world_size();
  Exec exec;
  for (const int channels : {7, 3 * P}) {
    auto pb = small_problem(channels);
    pb.cfg.strategy = dchag::Strategy::pooled;
    for (const auto& map : maps(channels, P)) {
      INFO("C = " << channels << ", map " << map.kind());
      pb.cfg.memory = dchag::MemoryPolicy::keep;
      dchag::FlatFrontEnd<Exec, Scalar> ref(exec, pb.cfg);
      compare(dchag::Mode::exact_flat, pb, map, ref, dchag::ImageInput::own_channels);
      compare(dchag::Mode::exact_flat, pb, map, ref, dchag::ImageInput::full_image);
      INFO("recompute on the ranks, keep in the reference");
      pb.cfg.memory = dchag::MemoryPolicy::recompute;
      compare(dchag::Mode::exact_flat, pb, map, ref, dchag::ImageInput::own_channels);
    }
  }
}

TEST_CASE("tp_only on P ranks equals the materialized flat front end", "[mpi][distributed]") {
  const int P = world_size();
  Exec exec;
  auto pb = small_problem(6);
  pb.cfg.strategy = dchag::Strategy::materialized;
  for (const int heads : {4, 8}) {
    pb.cfg.heads = heads;
    INFO("heads = " << heads);
    dchag::FlatFrontEnd<Exec, Scalar> ref(exec, pb.cfg);
    compare(dchag::Mode::tp_only, pb, dchag::ChannelMap::blocks(6, P), ref,
            dchag::ImageInput::full_image);
  }
}

TEST_CASE("the lead-time stage on P ranks equals the single-process front ends",
          "[mpi][distributed][lead_time]") {
  const int P = world_size();
  Exec exec;
  auto pb = small_problem(2 * P + 1);
  pb.cfg.lead_time = true;
  const auto map = dchag::ChannelMap::round_robin(pb.cfg.channels, P);
  std::vector<std::vector<int>> groups;
  for (int r = 0; r < P; ++r) groups.push_back(map.channels_of(r));
  dchag::DchagEmulation<Exec, Scalar> emu(exec, pb.cfg, {dchag::PartialKind::cross_attention, 1},
                                          groups);
  compare(dchag::Mode::dchag_xattn, pb, map, emu, dchag::ImageInput::own_channels);
  dchag::FlatFrontEnd<Exec, Scalar> flat(exec, pb.cfg);
  compare(dchag::Mode::exact_flat, pb, map, flat, dchag::ImageInput::full_image);
  REQUIRE(dchag_test_has(flat.parameters(), "lead_time_embed.weight"));
}

TEST_CASE("masks on P ranks equal the single-process front ends", "[mpi][distributed][mask]") {
  // Sample 0 holds channel 0 only, so every other rank has no valid channel in it; sample 1 misses
  // every odd channel.
  const int P = world_size();
  Exec exec;
  for (const int channels : {7, 2 * P + 2}) {
    auto pb = small_problem(channels);
    pb.mask.assign(std::size_t(pb.B) * channels, 1);
    for (int c = 0; c < channels; ++c) {
      pb.mask[c] = c == 0 ? 1 : 0;
      pb.mask[channels + c] = c % 2 == 0 ? 1 : 0;
    }
    for (const auto& map : maps(channels, P)) {
      std::vector<std::vector<int>> groups;
      for (int r = 0; r < P; ++r) groups.push_back(map.channels_of(r));
      for (const auto strategy : {dchag::Strategy::pooled, dchag::Strategy::materialized}) {
        pb.cfg.strategy = strategy;
        for (const auto memory : {dchag::MemoryPolicy::keep, dchag::MemoryPolicy::recompute}) {
          if (memory != dchag::MemoryPolicy::keep && strategy != dchag::Strategy::pooled) continue;
          pb.cfg.memory = memory;
          INFO("C = " << channels << ", map " << map.kind() << ", " << dchag::to_string(strategy)
                      << ", " << dchag::to_string(memory));
          for (const auto kind :
               {dchag::PartialKind::linear, dchag::PartialKind::cross_attention}) {
            const int tree = kind == dchag::PartialKind::linear ? 1 : 2;
            bool fits = true;
            for (const auto& g : groups) fits = fits && int(g.size()) >= tree;
            if (!fits) continue;
            auto ref_cfg = pb.cfg;
            ref_cfg.memory = dchag::MemoryPolicy::keep;
            dchag::DchagEmulation<Exec, Scalar> emu(exec, ref_cfg, {kind, tree}, groups);
            compare(kind == dchag::PartialKind::linear ? dchag::Mode::dchag_linear
                                                       : dchag::Mode::dchag_xattn,
                    pb, map, emu, dchag::ImageInput::own_channels, tree);
          }
          if (strategy == dchag::Strategy::pooled) {
            dchag::FlatFrontEnd<Exec, Scalar> flat(exec, pb.cfg);
            compare(dchag::Mode::exact_flat, pb, map, flat, dchag::ImageInput::own_channels);
          } else {
            dchag::FlatFrontEnd<Exec, Scalar> flat(exec, pb.cfg);
            compare(dchag::Mode::tp_only, pb, map, flat, dchag::ImageInput::full_image);
          }
        }
      }
    }
  }
}

TEST_CASE("channel selections on P ranks equal the single-process front ends",
          "[mpi][distributed][selection]") {
  // The last and the first channel only (with blocks, the middle ranks are given none), and a
  // permutation of every channel; with and without a mask.
  const int P = world_size();
  Exec exec;
  const int channels = 2 * P + 2;
  auto pb = small_problem(channels);
  std::vector<int> everything;  // every channel, in reverse
  for (int c = channels - 1; c >= 0; --c) everything.push_back(c);
  for (const auto& ids : {std::vector<int>{channels - 1, 0}, everything}) {
    for (const bool masked : {false, true}) {
      pb.ids = ids;
      pb.mask.clear();
      if (masked) {  // sample 1 misses channel 0
        pb.mask.assign(std::size_t(pb.B) * channels, 1);
        pb.mask[channels] = 0;
      }
      for (const auto& map : maps(channels, P)) {
        INFO("selection of " << ids.size() << ", masked " << masked << ", map " << map.kind());
        std::vector<std::vector<int>> groups;
        for (int r = 0; r < P; ++r) groups.push_back(map.channels_of(r));
        for (const auto input : {dchag::ImageInput::own_channels, dchag::ImageInput::full_image}) {
          pb.cfg.strategy = dchag::Strategy::pooled;
          dchag::DchagEmulation<Exec, Scalar> emu(exec, pb.cfg,
                                                  {dchag::PartialKind::cross_attention, 1}, groups);
          compare(dchag::Mode::dchag_xattn, pb, map, emu, input);
          dchag::DchagEmulation<Exec, Scalar> lin(exec, pb.cfg, {dchag::PartialKind::linear, 1},
                                                  groups);
          compare(dchag::Mode::dchag_linear, pb, map, lin, input);
          dchag::FlatFrontEnd<Exec, Scalar> flat(exec, pb.cfg);
          compare(dchag::Mode::exact_flat, pb, map, flat, input);
        }
        pb.cfg.strategy = dchag::Strategy::materialized;
        dchag::FlatFrontEnd<Exec, Scalar> flat(exec, pb.cfg);
        compare(dchag::Mode::tp_only, pb, map, flat, dchag::ImageInput::full_image);
      }
    }
  }
}

TEST_CASE("several queries on P ranks equal the single-process front ends",
          "[mpi][distributed][queries]") {
  // N_q = 3 in the flat (exact_flat, tp_only) and final (D-CHAG) cross-attentions, with a mask
  // that leaves a rank without a valid channel in sample 0.
  const int P = world_size();
  Exec exec;
  auto pb = small_problem(2 * P + 1);
  pb.cfg.queries = 3;
  const int C = pb.cfg.channels;
  pb.mask.assign(std::size_t(pb.B) * C, 1);
  for (int c = 1; c < C; ++c) pb.mask[c] = 0;
  for (const auto& map : maps(C, P)) {
    INFO("map " << map.kind());
    std::vector<std::vector<int>> groups;
    for (int r = 0; r < P; ++r) groups.push_back(map.channels_of(r));
    pb.cfg.strategy = dchag::Strategy::pooled;
    for (const auto kind : {dchag::PartialKind::linear, dchag::PartialKind::cross_attention}) {
      dchag::DchagEmulation<Exec, Scalar> emu(exec, pb.cfg, {kind, 1}, groups);
      compare(
          kind == dchag::PartialKind::linear ? dchag::Mode::dchag_linear : dchag::Mode::dchag_xattn,
          pb, map, emu, dchag::ImageInput::own_channels);
    }
    for (const auto memory : {dchag::MemoryPolicy::keep, dchag::MemoryPolicy::recompute}) {
      pb.cfg.memory = memory;
      dchag::FlatFrontEnd<Exec, Scalar> flat(exec, pb.cfg);
      compare(dchag::Mode::exact_flat, pb, map, flat, dchag::ImageInput::own_channels);
    }
    pb.cfg.memory = dchag::MemoryPolicy::keep;
    pb.cfg.strategy = dchag::Strategy::materialized;
    dchag::FlatFrontEnd<Exec, Scalar> flat(exec, pb.cfg);
    compare(dchag::Mode::tp_only, pb, map, flat, dchag::ImageInput::full_image);
  }
}

TEST_CASE("16-bit storage on P ranks equals the single-process front ends",
          "[mpi][distributed][precision]") {
  // Every token is formed in double and rounded once in both, so they agree as double does.
  const int P = world_size();
  Exec exec;
  auto pb = small_problem(2 * P + 2);
  const auto map = dchag::ChannelMap::blocks(pb.cfg.channels, P);
  std::vector<std::vector<int>> groups;
  for (int r = 0; r < P; ++r) groups.push_back(map.channels_of(r));
  for (const auto memory : {dchag::MemoryPolicy::keep, dchag::MemoryPolicy::recompute}) {
    pb.cfg.memory = memory;
    pb.cfg.strategy = dchag::Strategy::pooled;
    INFO(dchag::to_string(memory));
    dchag::DchagEmulation<Exec, Scalar, dchag::bf16> linear(
        exec, pb.cfg, {dchag::PartialKind::linear, 1}, groups);
    compare<dchag::bf16>(dchag::Mode::dchag_linear, pb, map, linear,
                         dchag::ImageInput::own_channels);
    {
      auto mixed = pb;  // and partials in another convention than the final cross-attention
      mixed.cfg.partial_convention = dchag::Convention::artifact;
      dchag::DchagEmulation<Exec, Scalar, dchag::fp16> xattn(
          exec, mixed.cfg, {dchag::PartialKind::cross_attention, 2}, groups);
      compare<dchag::fp16>(dchag::Mode::dchag_xattn, mixed, map, xattn,
                           dchag::ImageInput::full_image, 2);
    }
    dchag::FlatFrontEnd<Exec, Scalar, dchag::bf16> flat(exec, pb.cfg);
    compare<dchag::bf16>(dchag::Mode::exact_flat, pb, map, flat, dchag::ImageInput::own_channels);
  }
  pb.cfg.memory = dchag::MemoryPolicy::keep;
  pb.cfg.strategy = dchag::Strategy::materialized;
  dchag::FlatFrontEnd<Exec, Scalar, dchag::bf16> flat(exec, pb.cfg);
  compare<dchag::bf16>(dchag::Mode::tp_only, pb, map, flat, dchag::ImageInput::full_image);
}

TEST_CASE("an inference forward equals keep's and refuses a backward on every rank",
          "[mpi][distributed][recompute]") {
  const int P = world_size();
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  const auto pb = small_problem(2 * P + 1);
  const auto map = dchag::ChannelMap::round_robin(pb.cfg.channels, P);
  for (const auto mode :
       {dchag::Mode::exact_flat, dchag::Mode::dchag_linear, dchag::Mode::dchag_xattn}) {
    INFO(dchag::to_string(mode));
    dchag::DistributedFrontEnd<Exec, Scalar> dist(exec, comm, pb.cfg, mode, map);
    randomize(dist.parameters());
    dchag::View4<Scalar, Mem> images("images", pb.B, pb.cfg.channels, pb.cfg.height, pb.cfg.width);
    fill(images, 3);
    dchag::View3<Scalar, Mem> out("out", pb.B, pb.cfg.patches(), pb.cfg.dim);
    dist.forward(exec, images, out, dchag::ImageInput::full_image);
    const auto kept = host(out);
    dist.set_memory_policy(dchag::MemoryPolicy::inference);
    Kokkos::deep_copy(out, 0.0);
    dist.forward(exec, images, out, dchag::ImageInput::full_image);
    const auto inferred = host(out);
    double scale = 1e-30;
    for (double x : kept) scale = std::max(scale, std::abs(x));
    for (std::size_t i = 0; i < kept.size(); ++i)
      REQUIRE(std::abs(inferred[i] - kept[i]) <= 1e-12 * scale);
    REQUIRE_THROWS_WITH(dist.backward(exec, out), Catch::Contains("MemoryPolicy::inference"));
  }
}

TEST_CASE("a rank that disagrees makes every rank throw", "[mpi][distributed]") {
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size();
  auto pb = small_problem(8);
  auto bad = pb.cfg;
  if (comm.rank() == P - 1) bad.dim = 20;  // one rank configured differently
  using FrontEnd = dchag::DistributedFrontEnd<Exec, Scalar>;
  const auto build = [&](const dchag::FrontEndConfig& cfg, dchag::Mode mode) {
    FrontEnd fe(exec, comm, cfg, mode, dchag::ChannelMap::blocks(8, P));
  };
  if (P > 1) {
    REQUIRE_THROWS_WITH(build(bad, dchag::Mode::dchag_linear),
                        Catch::Contains("ranks disagree on D"));
  }
  // A local validation failure on one rank (heads not dividing D there) reaches every rank.
  auto broken = pb.cfg;
  if (comm.rank() == 0) broken.heads = 3;
  REQUIRE_THROWS_WITH(build(broken, dchag::Mode::exact_flat), Catch::Contains("heads"));
  // A batch size that differs on one rank is refused before any data moves.
  dchag::DistributedFrontEnd<Exec, Scalar> fe(exec, comm, pb.cfg, dchag::Mode::dchag_xattn,
                                              dchag::ChannelMap::blocks(8, P));
  const int B = (P > 1 && comm.rank() == 1) ? 3 : 2;
  dchag::View4<Scalar, Mem> images("images", B, fe.channels().size(), 8, 12);
  dchag::View3<Scalar, Mem> out("out", B, pb.cfg.patches(), pb.cfg.dim);
  if (P > 1) {
    REQUIRE_THROWS_WITH(fe.forward(exec, images, out), Catch::Contains("ranks disagree on B"));
  }
  // Wrong image channel count on one rank: every rank throws, the others name that rank.
  dchag::View4<Scalar, Mem> wrong("wrong", 2, fe.channels().size() + (comm.rank() == 0 ? 1 : 0), 8,
                                  12);
  dchag::View3<Scalar, Mem> out2("out2", 2, pb.cfg.patches(), pb.cfg.dim);
  REQUIRE_THROWS_WITH(fe.forward(exec, wrong, out2), Catch::Contains("images.extent(1)"));
  // Backward before a successful forward.
  REQUIRE_THROWS_WITH(fe.backward(exec, out2), Catch::Contains("before forward"));
}

TEST_CASE("the distributed forward checks every extent of its images", "[mpi][distributed]") {
  using Catch::Matchers::Contains;
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size();
  auto pb = small_problem(8);  // 8 x 12 images, p = 4: L = 6, as for 12 x 8 ones
  for (const auto mode : {dchag::Mode::dchag_linear, dchag::Mode::exact_flat}) {
    dchag::DistributedFrontEnd<Exec, Scalar> fe(exec, comm, pb.cfg, mode,
                                                dchag::ChannelMap::blocks(8, P));
    const std::size_t Cr = fe.channels().size();
    dchag::View3<Scalar, Mem> out("out", 2, pb.cfg.patches(), pb.cfg.dim);
    dchag::View4<Scalar, Mem> transposed("transposed", 2, Cr, 12, 8), narrow("narrow", 2, Cr, 8, 8),
        empty("empty", 0, Cr, 8, 12), good("good", 2, Cr, 8, 12);
    REQUIRE_THROWS_WITH(fe.forward(exec, transposed, out),
                        Contains("dchag::DistributedFrontEnd::forward") &&
                            Contains("images.extent(2) is 12, expected H = 8"));
    REQUIRE_THROWS_WITH(fe.forward(exec, narrow, out),
                        Contains("images.extent(3) is 8, expected W = 12"));
    dchag::View3<Scalar, Mem> out0("out0", 0, pb.cfg.patches(), pb.cfg.dim);
    REQUIRE_THROWS_WITH(fe.forward(exec, empty, out0),
                        Contains("images.extent(0) is 0, expected B >= 1"));
    dchag::View4<Scalar, Mem> full("full", 2, 7, 8, 12);
    REQUIRE_THROWS_WITH(fe.forward(exec, full, out, dchag::ImageInput::full_image),
                        Contains("images.extent(1) is 7, expected C = 8"));
    dchag::View3<Scalar, Mem> wide("wide", 2, pb.cfg.patches(), pb.cfg.dim + 1);
    REQUIRE_THROWS_WITH(fe.forward(exec, good, wide),
                        Contains("out is [2, 6, 17], expected [B, L, D] = [2, 6, 16]"));
    fe.forward(exec, good, out);
    REQUIRE_THROWS_WITH(fe.backward(exec, wide),
                        Contains("dchag::DistributedFrontEnd::backward") &&
                            Contains("d_out is [2, 6, 17], expected [B, L, D] = [2, 6, 16]"));
    fe.backward(exec, out);
  }
}

TEST_CASE("replicated parameters are verified and can be broadcast", "[mpi][distributed]") {
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size();
  auto pb = small_problem(8);
  dchag::DistributedFrontEnd<Exec, Scalar> fe(exec, comm, pb.cfg, dchag::Mode::dchag_xattn,
                                              dchag::ChannelMap::round_robin(8, P));
  fe.verify_replicated(exec);
  auto pos = find(fe.parameters(), "pos_embed")->pieces.front().values;
  if (comm.rank() == P - 1) Kokkos::deep_copy(Kokkos::subview(pos, 0), 123.0);
  if (P > 1) {
    REQUIRE_THROWS_WITH(fe.verify_replicated(exec),
                        Catch::Contains("checksum of the replicated parameters"));
  }
  fe.broadcast_replicated(exec, 0);
  fe.verify_replicated(exec);
  // Tokenizer weights live only on the rank that owns the channel.
  for (const auto& t : fe.parameters()) {
    if (t.name.rfind("token_embeds.", 0) != 0) continue;
    const int c = std::stoi(t.name.substr(13));
    REQUIRE(c % P == comm.rank());
  }
}

TEST_CASE("an allocation that fails on one rank is an exception on every rank",
          "[mpi][distributed][fault]") {
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size();
  const auto pb = small_problem(8);
  for (const auto mode : {dchag::Mode::dchag_linear, dchag::Mode::dchag_xattn,
                          dchag::Mode::exact_flat, dchag::Mode::tp_only}) {
    INFO("mode " << dchag::to_string(mode));
    auto cfg = pb.cfg;
    if (mode == dchag::Mode::tp_only) cfg.strategy = dchag::Strategy::materialized;
    dchag::DistributedFrontEnd<Exec, Scalar> fe(exec, comm, cfg, mode,
                                                dchag::ChannelMap::blocks(8, P));
    dchag::View4<Scalar, Mem> images("images", pb.B, cfg.channels, cfg.height, cfg.width);
    dchag::View3<Scalar, Mem> out("out", pb.B, cfg.patches(), cfg.dim);
    fill(images, 3);
    // The last rank runs out of memory for the gradient at the heads' outputs, which every mode
    // and both strategies allocate on every execution space.
    if (comm.rank() == P - 1) dchag::detail::failing_allocation_label() = "dchag::attention::go";
    bool thrown = false;
    try {
      fe.forward(exec, images, out, dchag::ImageInput::full_image);
    } catch (const dchag::error& e) {
      thrown = true;
      const std::string what = e.what();
      INFO(what);
      CHECK_THAT(what, Catch::Contains("dchag::attention::go"));
      if (comm.rank() != P - 1) CHECK_THAT(what, Catch::Contains("rank " + std::to_string(P - 1)));
    }
    dchag::detail::failing_allocation_label().clear();
    CHECK(thrown);
    // Nobody is left inside a collective: the next step runs on every rank.
    fe.forward(exec, images, out, dchag::ImageInput::full_image);
    fe.backward(exec, out);
  }
}

TEST_CASE("replica checks catch a diverged d_out or replicated parameter on one rank",
          "[mpi][distributed][replicas]") {
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size();
  const auto pb = small_problem(8);
  dchag::DistributedFrontEnd<Exec, Scalar> fe(exec, comm, pb.cfg, dchag::Mode::dchag_xattn,
                                              dchag::ChannelMap::blocks(8, P));
  fe.set_replica_checks(true);
  dchag::View4<Scalar, Mem> images("images", pb.B, fe.channels().size(), 8, 12);
  dchag::View3<Scalar, Mem> out("out", pb.B, pb.cfg.patches(), pb.cfg.dim),
      g("g", pb.B, pb.cfg.patches(), pb.cfg.dim);
  fill(images, 4);
  fill(g, 5);
  fe.forward(exec, images, out);
  fe.backward(exec, g);  // identical d_out everywhere: passes
  if (P == 1) return;
  fe.forward(exec, images, out);
  if (comm.rank() == P - 1) Kokkos::deep_copy(Kokkos::subview(g, 0, 0, 0), 42.0);
  REQUIRE_THROWS_WITH(fe.backward(exec, g), Catch::Contains("checksum of d_out"));
  auto pos = find(fe.parameters(), "pos_embed")->pieces.front().values;
  if (comm.rank() == 0) Kokkos::deep_copy(Kokkos::subview(pos, 1), -7.0);
  REQUIRE_THROWS_WITH(fe.forward(exec, images, out),
                      Catch::Contains("checksum of the replicated parameters"));
  // Off: the divergence goes unnoticed (and is the caller's responsibility).
  fe.set_replica_checks(false);
  REQUIRE_NOTHROW(fe.forward(exec, images, out));
}

TEST_CASE("a non-finite value on one rank is reported on every rank",
          "[mpi][distributed][finite]") {
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size();
  const auto pb = small_problem(8);
  dchag::DistributedFrontEnd<Exec, Scalar> fe(exec, comm, pb.cfg, dchag::Mode::exact_flat,
                                              dchag::ChannelMap::blocks(8, P));
  dchag::View4<Scalar, Mem> images("images", pb.B, fe.channels().size(), 8, 12);
  fill(images, 6);
  REQUIRE_NOTHROW(fe.check_finite(exec, images));
  if (comm.rank() == P - 1) Kokkos::deep_copy(Kokkos::subview(images, 1, 0, 2, 3), std::nan(""));
  bool thrown = false;
  try {
    fe.check_finite(exec, images);
  } catch (const dchag::error& e) {
    thrown = true;
    const std::string what = e.what();
    INFO(what);
    CHECK_THAT(what, Catch::Contains("images"));
    if (comm.rank() != P - 1) CHECK_THAT(what, Catch::Contains("rank " + std::to_string(P - 1)));
  }
  CHECK(thrown);
}
