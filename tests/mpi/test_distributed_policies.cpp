// The tokenizer policies (DESIGN 3.11) on P ranks: a shared tokenizer weight and the coordinate
// map are replicated parameters whose gradients each rank sees only its channels' share of;
// backward sums them over the channel group, so that every rank holds the whole gradient. Checked
// against the single-process references with the same weights (dchag_* against DchagEmulation,
// exact_flat against FlatFrontEnd, tp_only against the materialized FlatFrontEnd), and a policy
// that differs on one rank is an error on every rank. Run under mpiexec at 1..4 ranks.
#include <catch2/catch.hpp>
#include <dchag/distributed.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;
using Scalar = double;
using List = dchag::TensorList<Scalar, Mem>;

// Element i of file tensor `name`: the same on every rank and in every model holding it.
double value_at(const std::string& name, std::int64_t i, double scale) {
  using dchag::detail::splitmix64;
  const std::uint64_t h =
      splitmix64(dchag::detail::hash_name(name) ^ splitmix64(static_cast<std::uint64_t>(i)));
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

// Every piece of `got` equals the reference at the same file offsets, to 1e-10 of the tensor's
// largest magnitude: the same double arithmetic up to the order of the sums over ranks and
// channels (as test_distributed.cpp).
void require_matches(const List& got, const List& want) {
  for (const auto& t : got) {
    const auto* ref = find(want, t.name);
    INFO("tensor " << t.name);
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

dchag::TokenizerPolicy policy(dchag::TokenizerWeights w, dchag::ChannelEmbedding e, int C) {
  dchag::TokenizerPolicy p{w, e};
  if (e == dchag::ChannelEmbedding::coordinate) {
    for (int c = 0; c < C; ++c) p.coordinates.push_back(400.0 + 55.5 * c);  // wavelengths, nm
    p.fourier = {8, 10.0, 1.0e4};
  }
  return p;
}

std::vector<dchag::TokenizerPolicy> policies(int C) {
  using W = dchag::TokenizerWeights;
  using E = dchag::ChannelEmbedding;
  return {policy(W::shared, E::table, C), policy(W::per_channel, E::coordinate, C),
          policy(W::shared, E::coordinate, C)};
}

dchag::FrontEndConfig config(int C, const dchag::TokenizerPolicy& pol) {
  dchag::FrontEndConfig cfg{C, 8, 12, 4, 16, 4};
  cfg.seed = 7;
  cfg.tokenizer = pol;
  return cfg;
}

// `mode` on the world communicator against `ref` on this process, same weights, B = 2; the
// replicated parameters' gradients must then be bit-identical on every rank. Twice in a row
// without zeroing, so that the group sum adds only its own backward's share.
template <class Ref>
void compare(dchag::Mode mode, const dchag::FrontEndConfig& cfg, const dchag::ChannelMap& map,
             Ref& ref, dchag::ImageInput input) {
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  dchag::DistributedFrontEnd<Exec, Scalar> dist(exec, comm, cfg, mode, map);
  randomize(dist.parameters());
  randomize(ref.parameters());
  const int B = 2, C = cfg.channels, L = cfg.patches(), D = cfg.dim;
  dchag::View4<Scalar, Mem> images("images", B, C, cfg.height, cfg.width);
  fill(images, 1);
  dchag::View4<Scalar, Mem> own("own", B, dist.channels().size(), cfg.height, cfg.width);
  for (std::size_t j = 0; j < dist.channels().size(); ++j)
    Kokkos::deep_copy(
        Kokkos::subview(own, Kokkos::ALL, j, Kokkos::ALL, Kokkos::ALL),
        Kokkos::subview(images, Kokkos::ALL, dist.channels()[j], Kokkos::ALL, Kokkos::ALL));
  dchag::View3<Scalar, Mem> out("out", B, L, D), ref_out("ref_out", B, L, D), g("g", B, L, D);
  fill(g, 2);
  dist.zero_gradients(exec);
  ref.zero_gradients(exec);
  for (int step = 0; step < 2; ++step) {
    dist.forward(exec, input == dchag::ImageInput::full_image ? images : own, out, input);
    ref.forward(exec, images, ref_out);
    const auto o = host(out), r = host(ref_out);
    double scale = 0;
    for (double x : r) scale = std::max(scale, std::abs(x));
    for (std::size_t i = 0; i < o.size(); ++i) REQUIRE(std::abs(o[i] - r[i]) <= 1e-10 * scale);
    dist.backward(exec, g);
    ref.backward(exec, g);
  }
  auto grads = dist.gradients();
  if (mode == dchag::Mode::tp_only) {
    // Head shares of the cross-attention weights: summed over ranks they are the full gradient.
    for (const auto& t : grads)
      if (t.name.rfind("var_agg.", 0) == 0)
        for (const auto& p : t.pieces) dchag::allreduce_sum(exec, comm, p.values);
  }
  require_matches(grads, ref.gradients());
  // The shared tokenizer parameters are replicated, and so are their gradients.
  const auto replicated = dist.replicated_parameters();
  if (cfg.tokenizer.shared()) REQUIRE(find(replicated, "token_embed.proj.weight") != nullptr);
  if (cfg.tokenizer.coordinate()) REQUIRE(find(replicated, "channel_embed.proj.weight") != nullptr);
  List replicated_grads;
  for (const auto& t : dist.gradients())
    if (find(replicated, t.name) && t.name.rfind("var_agg.", 0) != 0) replicated_grads.push_back(t);
  comm.agree("replicated gradients",
             {{"checksum", static_cast<std::int64_t>(dchag::detail::checksum(replicated_grads))}});
}

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

}  // namespace

TEST_CASE("tokenizer policies: D-CHAG on P ranks equals the emulation", "[mpi][policies]") {
  const int P = world_size(), C = 2 * P + 1;
  Exec exec;
  for (const auto& pol : policies(C)) {
    for (const auto& map :
         {dchag::ChannelMap::blocks(C, P), dchag::ChannelMap::round_robin(C, P)}) {
      std::vector<std::vector<int>> groups;
      for (int r = 0; r < P; ++r) groups.push_back(map.channels_of(r));
      for (const auto strategy : {dchag::Strategy::pooled, dchag::Strategy::materialized}) {
        auto cfg = config(C, pol);
        cfg.strategy = strategy;
        for (const auto mode : {dchag::Mode::dchag_linear, dchag::Mode::dchag_xattn}) {
          INFO(dchag::to_string(pol.weights)
               << " weights, " << dchag::to_string(pol.embedding) << " embedding, map "
               << map.kind() << ", " << dchag::to_string(mode) << ", "
               << dchag::to_string(strategy));
          const auto kind = mode == dchag::Mode::dchag_linear ? dchag::PartialKind::linear
                                                              : dchag::PartialKind::cross_attention;
          dchag::DchagEmulation<Exec, Scalar> ref(exec, cfg, {kind, 1}, groups);
          compare(mode, cfg, map, ref, dchag::ImageInput::own_channels);
          compare(mode, cfg, map, ref, dchag::ImageInput::full_image);
        }
      }
    }
  }
}

TEST_CASE("tokenizer policies: exact_flat and tp_only on P ranks equal the flat front end",
          "[mpi][policies]") {
  const int P = world_size(), C = 2 * P + 2;
  Exec exec;
  for (const auto& pol : policies(C)) {
    INFO(dchag::to_string(pol.weights) << " weights, " << dchag::to_string(pol.embedding));
    auto cfg = config(C, pol);
    for (const auto memory : {dchag::MemoryPolicy::keep, dchag::MemoryPolicy::recompute}) {
      cfg.memory = memory;
      dchag::FlatFrontEnd<Exec, Scalar> ref(exec, cfg);
      compare(dchag::Mode::exact_flat, cfg, dchag::ChannelMap::round_robin(C, P), ref,
              dchag::ImageInput::own_channels);
    }
    cfg.memory = dchag::MemoryPolicy::keep;
    cfg.strategy = dchag::Strategy::materialized;
    dchag::FlatFrontEnd<Exec, Scalar> ref(exec, cfg);
    compare(dchag::Mode::tp_only, cfg, dchag::ChannelMap::blocks(C, P), ref,
            dchag::ImageInput::full_image);
  }
}

TEST_CASE("tokenizer policies: a policy that differs on one rank throws on every rank",
          "[mpi][policies][errors]") {
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size(), C = 2 * P;
  const auto map = dchag::ChannelMap::blocks(C, P);
  const auto good = config(C, policies(C)[2]);
  using FrontEnd = dchag::DistributedFrontEnd<Exec, Scalar>;
  const auto build = [&](const dchag::FrontEndConfig& cfg) {
    FrontEnd fe(exec, comm, cfg, dchag::Mode::dchag_linear, map);
  };
  build(good);
  if (P > 1) {
    const bool last = comm.rank() == P - 1;
    auto cfg = good;
    if (last) cfg.tokenizer.weights = dchag::TokenizerWeights::per_channel;
    REQUIRE_THROWS_WITH(build(cfg), Catch::Contains("ranks disagree on tokenizer weights"));
    cfg = last ? config(C, policies(C)[0]) : good;  // table embedding on one rank
    REQUIRE_THROWS_WITH(build(cfg), Catch::Contains("ranks disagree on channel embedding"));
    cfg = good;
    if (last) cfg.tokenizer.fourier.count = 6;
    REQUIRE_THROWS_WITH(build(cfg), Catch::Contains("ranks disagree on Fourier features"));
    cfg = good;
    if (last) cfg.tokenizer.coordinates[0] += 1;
    REQUIRE_THROWS_WITH(build(cfg),
                        Catch::Contains("ranks disagree on channel coordinates and wavelengths"));
    cfg = good;
    if (last) cfg.tokenizer.fourier.max_wavelength *= 2;
    REQUIRE_THROWS_WITH(build(cfg),
                        Catch::Contains("ranks disagree on channel coordinates and wavelengths"));
  }
  // Coordinates missing on one rank: its local validation fails, and every rank throws.
  auto cfg = good;
  if (comm.rank() == 0) cfg.tokenizer.coordinates.pop_back();
  REQUIRE_THROWS_WITH(build(cfg), Catch::Contains("coordinates"));
}
