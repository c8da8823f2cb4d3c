// One weight file for a channel group (dchag/distributed_weights.hpp): a distributed save equals,
// tensor by tensor and bit for bit, the single-process save of the equivalent model with the same
// parameters (DchagEmulation with the same groups, FlatFrontEnd for exact_flat and tp_only);
// loading gives every rank its own pieces back; a missing or mis-shaped tensor for one rank, and
// a missing, truncated or unwritable file, are exceptions on every rank. Run under mpiexec at 1..4
// ranks. The parameters are float, as the files are F32, so a round trip is exact.
#include <catch2/catch.hpp>
#include <dchag/distributed_weights.hpp>
#include <dchag/optimizer.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;
using Scalar = float;
using List = dchag::TensorList<Scalar, Mem>;
using Dist = dchag::DistributedFrontEnd<Exec, Scalar>;
namespace st = dchag::safetensors;
using Catch::Matchers::Contains;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

// Element i of the file tensor `name`, the same on every rank and in every model holding it.
double value_at(const std::string& name, std::int64_t i) {
  const std::uint64_t h = dchag::detail::splitmix64(
      dchag::detail::hash_name(name) ^ dchag::detail::splitmix64(static_cast<std::uint64_t>(i)));
  return static_cast<double>(h >> 11) * 0x1.0p-53 - 0.5;
}

void randomize(const List& list) {
  for (const auto& t : list) {
    for (const auto& p : t.pieces) {
      auto h = Kokkos::create_mirror_view(p.values);
      for (std::size_t i = 0; i < h.extent(0); ++i)
        h(i) = static_cast<Scalar>(value_at(t.name, p.offset + std::int64_t(i)));
      Kokkos::deep_copy(p.values, h);
    }
  }
}

// Every piece's values, on the host, in list order.
std::vector<std::vector<Scalar>> snapshot(const List& list) {
  std::vector<std::vector<Scalar>> out;
  for (const auto& t : list) {
    for (const auto& p : t.pieces) {
      auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), p.values);
      out.emplace_back(h.data(), h.data() + h.extent(0));
    }
  }
  return out;
}

bool bitwise_equal(const std::vector<std::vector<Scalar>>& a,
                   const std::vector<std::vector<Scalar>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].size() != b[i].size() ||
        std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(Scalar)) != 0)
      return false;
  }
  return true;
}

// A directory every rank sees (rank 0 names it), removed by finish().
struct SharedDir {
  std::filesystem::path dir;
  SharedDir() {
    char name[256] = {};
    if (world_rank() == 0) {
      const auto p = std::filesystem::temp_directory_path() /
                     ("dchag_dweights_" + std::to_string(std::random_device{}()));
      std::filesystem::create_directories(p);
      std::strncpy(name, p.c_str(), sizeof(name) - 1);
    }
    MPI_Bcast(name, sizeof(name), MPI_CHAR, 0, MPI_COMM_WORLD);
    dir = name;
  }
  std::string operator()(const std::string& file) const { return (dir / file).string(); }
  void finish() const {
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0) std::filesystem::remove_all(dir);
  }
};

// The two files hold the same tensors (names, dtypes, shapes, bytes) and the same metadata; only
// the order of the tensors may differ.
void require_same_files(const std::string& got_path, const std::string& want_path) {
  const auto got = st::File::read(got_path), want = st::File::read(want_path);
  REQUIRE(got.metadata() == want.metadata());
  REQUIRE(got.tensors().size() == want.tensors().size());
  for (const auto& t : want.tensors()) {
    INFO("tensor " << t.name);
    REQUIRE(got.contains(t.name));
    const auto& g = got.info(t.name);
    REQUIRE(g.dtype == t.dtype);
    REQUIRE(g.shape == t.shape);
    const auto a = got.values<float>(t.name), b = want.values<float>(t.name);
    REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  }
}

dchag::FrontEndConfig small_config(int channels) {
  dchag::FrontEndConfig cfg;
  cfg.channels = channels;
  cfg.height = 8;
  cfg.width = 12;
  cfg.patch = 4;
  cfg.dim = 16;
  cfg.heads = 4;
  cfg.seed = 7;
  return cfg;
}

// As test_distributed.cpp: blocks, round robin, and uneven explicit lists.
std::vector<dchag::ChannelMap> maps(int channels, int ranks) {
  std::vector<dchag::ChannelMap> m{dchag::ChannelMap::blocks(channels, ranks),
                                   dchag::ChannelMap::round_robin(channels, ranks)};
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

std::vector<std::vector<int>> groups_of(const dchag::ChannelMap& map) {
  std::vector<std::vector<int>> groups;
  for (int r = 0; r < map.ranks(); ++r) groups.push_back(map.channels_of(r));
  return groups;
}

std::vector<std::string> names(int channels) {
  std::vector<std::string> n;
  for (int c = 0; c < channels; ++c) n.push_back("ch" + std::to_string(c));
  return n;
}

// Sets the largest message of values for its lifetime.
struct MessageElements {
  std::int64_t saved = dchag::detail::weights_message_elements();
  explicit MessageElements(std::int64_t n) { dchag::detail::weights_message_elements() = n; }
  ~MessageElements() { dchag::detail::weights_message_elements() = saved; }
};

// One distributed model and its single-process equivalent.
struct Case {
  dchag::Mode mode;
  int tree;
};

dchag::FrontEndConfig config_for(dchag::Mode mode, int channels) {
  auto cfg = small_config(channels);
  cfg.strategy =
      mode == dchag::Mode::tp_only ? dchag::Strategy::materialized : dchag::Strategy::pooled;
  return cfg;
}

// Rank 0 saves the single-process equivalent of (mode, map, tree) with randomize()d parameters.
void save_reference(const std::string& path, const dchag::FrontEndConfig& cfg, dchag::Mode mode,
                    const dchag::ChannelMap& map, int tree,
                    const std::vector<std::string>& channel_names) {
  if (world_rank() != 0) return;
  Exec exec;
  if (dchag::detail::is_dchag(mode)) {
    const auto kind = mode == dchag::Mode::dchag_linear ? dchag::PartialKind::linear
                                                        : dchag::PartialKind::cross_attention;
    dchag::DchagEmulation<Exec, Scalar> ref(exec, cfg, {kind, tree}, groups_of(map));
    randomize(ref.parameters());
    dchag::save_weights(path, ref.parameters(), channel_names);
  } else {
    dchag::FlatFrontEnd<Exec, Scalar> ref(exec, cfg);
    randomize(ref.parameters());
    dchag::save_weights(path, ref.parameters(), channel_names);
  }
}

std::vector<Case> cases_for(const dchag::ChannelMap& map) {
  std::vector<Case> cases;
  for (const auto mode : {dchag::Mode::dchag_linear, dchag::Mode::dchag_xattn}) {
    for (const int tree : {1, 2}) {
      bool fits = true;
      for (const auto& g : groups_of(map))
        fits = fits && int(g.size()) >= tree &&
               (mode != dchag::Mode::dchag_linear || g.size() % std::size_t(tree) == 0);
      if (fits) cases.push_back({mode, tree});
    }
  }
  cases.push_back({dchag::Mode::exact_flat, 1});
  cases.push_back({dchag::Mode::tp_only, 1});
  return cases;
}

}  // namespace

TEST_CASE("a distributed save equals the single-process save of the same model", "[mpi][weights]") {
  const int P = world_size();
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  SharedDir files;
  int variant = 0;
  for (const int channels : {7, 2 * P + 2}) {
    for (const auto& map : maps(channels, P)) {
      for (const auto& c : cases_for(map)) {
        const bool named = variant % 2 == 0, small_messages = variant % 3 == 1;
        ++variant;
        INFO("C = " << channels << ", map " << map.kind() << ", " << dchag::to_string(c.mode)
                    << ", tree " << c.tree << (named ? ", channel names" : "")
                    << (small_messages ? ", messages of 3 values" : ""));
        const auto cfg = config_for(c.mode, channels);
        const auto channel_names = named ? names(channels) : std::vector<std::string>{};
        // Files of their own: rank 0 must not overwrite a file another rank still reads.
        const auto reference = files("reference" + std::to_string(variant) + ".safetensors");
        const auto distributed = files("distributed" + std::to_string(variant) + ".safetensors");
        save_reference(reference, cfg, c.mode, map, c.tree, channel_names);
        Dist dist(exec, comm, cfg, c.mode, map, c.tree);
        randomize(dist.parameters());
        {
          MessageElements guard(small_messages ? 3 : dchag::detail::weights_message_elements());
          dchag::save_weights(distributed, dist, channel_names);
        }
        require_same_files(distributed, reference);
      }
    }
  }
  files.finish();
}

TEST_CASE("a distributed load gives every rank its own pieces back", "[mpi][weights]") {
  const int P = world_size();
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  SharedDir files;
  const int C = 2 * P + 1;
  for (const auto& map : maps(C, P)) {
    for (const auto& c : cases_for(map)) {
      INFO("map " << map.kind() << ", " << dchag::to_string(c.mode) << ", tree " << c.tree);
      auto cfg = config_for(c.mode, C);
      Dist saved(exec, comm, cfg, c.mode, map, c.tree);
      randomize(saved.parameters());
      const auto want = snapshot(saved.parameters());
      dchag::save_weights(files("model.safetensors"), saved);

      cfg.seed = 11;  // other initial values, so that a load that does nothing fails
      Dist loaded(exec, comm, cfg, c.mode, map, c.tree);
      REQUIRE_FALSE(bitwise_equal(snapshot(loaded.parameters()), want));
      dchag::load_weights(files("model.safetensors"), loaded);
      REQUIRE(bitwise_equal(snapshot(loaded.parameters()), want));

      // A file from a single-process save of the equivalent model loads the same.
      save_reference(files("reference.safetensors"), config_for(c.mode, C), c.mode, map, c.tree,
                     {});
      Dist from_reference(exec, comm, cfg, c.mode, map, c.tree);
      dchag::load_weights(files("reference.safetensors"), from_reference);
      REQUIRE(bitwise_equal(snapshot(from_reference.parameters()), want));
    }
  }
  files.finish();
}

TEST_CASE("a distributed load matches channels by name", "[mpi][weights]") {
  const int P = world_size();
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  SharedDir files;
  const int C = 2 * P + 1;
  const auto map = dchag::ChannelMap::round_robin(C, P);
  const auto file_names = names(C);
  for (const auto mode : {dchag::Mode::exact_flat, dchag::Mode::tp_only}) {
    INFO(dchag::to_string(mode));
    const auto path = files(std::string(dchag::to_string(mode)) + ".safetensors");
    const auto cfg = config_for(mode, C);
    save_reference(path, cfg, mode, map, 1, file_names);
    // The model lists the channels in reverse: its channel c is the file's channel C - 1 - c.
    Dist model(exec, comm, cfg, mode, map);
    dchag::LoadOptions options;
    options.channel_names.assign(file_names.rbegin(), file_names.rend());
    comm.agree("test", {{"barrier", 0}});  // rank 0 has written the file
    dchag::load_weights(path, model, options);
    const auto file = st::File::read(path);
    const std::int64_t D = cfg.dim;
    for (const auto& t : model.parameters()) {
      INFO("tensor " << t.name);
      const auto te = dchag::detail::split_token_embed_name(t.name);
      const std::string file_name =
          te ? dchag::detail::token_embed_name(C - 1 - te->first, te->second) : t.name;
      const auto want = file.values<Scalar>(file_name);
      const auto got = dchag::to_file_layout(t);
      for (const auto& p : t.pieces) {
        for (std::int64_t k = 0; k < std::int64_t(p.values.extent(0)); ++k) {
          const std::int64_t i = t.transposed_rows > 0 ? k : p.offset + k;
          const std::int64_t j = t.name == "var_embed" ? (C - 1 - i / D) * D + i % D : i;
          REQUIRE(std::memcmp(&got[std::size_t(i)], &want[std::size_t(j)], sizeof(Scalar)) == 0);
        }
      }
    }
  }
  files.finish();
}

TEST_CASE("a tensor missing or mis-shaped for one rank fails the load on every rank",
          "[mpi][weights][errors]") {
  const int P = world_size();
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  SharedDir files;
  const int C = 2 * P + 1;
  const auto map = dchag::ChannelMap::round_robin(C, P);
  const int owned = map.channels_of(P - 1).front();  // a channel of the last rank
  const std::string bias = "token_embeds." + std::to_string(owned) + ".proj.bias";
  for (const auto mode : {dchag::Mode::dchag_linear, dchag::Mode::exact_flat}) {
    INFO(dchag::to_string(mode));
    const auto cfg = config_for(mode, C);
    for (const bool misshaped : {false, true}) {
      INFO((misshaped ? "mis-shaped" : "missing"));
      const auto path = files("broken.safetensors");
      if (comm.rank() == 0) {
        // The reference file, but `bias` left out or one element longer.
        dchag::FlatFrontEnd<Exec, Scalar> flat(exec, cfg);
        dchag::DchagEmulation<Exec, Scalar> emulation(exec, cfg, {dchag::PartialKind::linear, 1},
                                                      groups_of(map));
        const List all =
            mode == dchag::Mode::exact_flat ? flat.parameters() : emulation.parameters();
        List kept;
        for (const auto& t : all)
          if (t.name != bias) kept.push_back(t);
        st::Writer writer;
        dchag::save_weights(writer, kept);
        if (misshaped) {
          const std::vector<float> longer(std::size_t(cfg.dim + 1), 1.0f);
          writer.add(bias, {cfg.dim + 1}, longer.data());
        }
        writer.write(path);
      }
      comm.agree("test", {{"barrier", 0}});
      Dist model(exec, comm, cfg, mode, map);
      randomize(model.parameters());  // unlike the file's initial values: a copy would show
      const auto before = snapshot(model.parameters());
      bool thrown = false;
      try {
        dchag::load_weights(path, model);
      } catch (const std::exception& e) {
        thrown = true;
        const std::string what = e.what();
        INFO(what);
        CHECK_THAT(what, Contains(bias) && Contains("rank " + std::to_string(P - 1)));
        CHECK_THAT(what, Contains(misshaped ? "has shape [17]" : "is not in"));
      }
      CHECK(thrown);
      // Every rank's parameters are as they were, those of the ranks that could read theirs too.
      CHECK(bitwise_equal(snapshot(model.parameters()), before));
    }
  }
  files.finish();
}

TEST_CASE("a file error on one rank is an exception on every rank", "[mpi][weights][errors]") {
  const int P = world_size();
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  SharedDir files;
  const int C = 2 * P;
  const auto cfg = config_for(dchag::Mode::dchag_xattn, C);
  const auto map = dchag::ChannelMap::blocks(C, P);
  Dist model(exec, comm, cfg, dchag::Mode::dchag_xattn, map);

  // Saving where rank 0 cannot write.
  REQUIRE_THROWS_WITH(dchag::save_weights(files("no/such/dir/model.safetensors"), model),
                      Contains("cannot open") && Contains("no/such/dir"));
  // Loading a file that is not there.
  REQUIRE_THROWS_WITH(dchag::load_weights(files("absent.safetensors"), model),
                      Contains("absent.safetensors") && Contains("does not exist"));
  // Loading a file truncated after it was written.
  const auto path = files("truncated.safetensors");
  dchag::save_weights(path, model);
  if (comm.rank() == 0)
    std::filesystem::resize_file(path, std::filesystem::file_size(path) - 4 * cfg.dim);
  comm.agree("test", {{"barrier", 0}});
  REQUIRE_THROWS_WITH(dchag::load_weights(path, model),
                      Contains("truncated.safetensors") && Contains("beyond the data buffer"));
  // Channel names that differ on one rank.
  auto channel_names = names(C);
  if (comm.rank() == P - 1) channel_names.back() = "other";
  if (P > 1) {
    REQUIRE_THROWS_WITH(dchag::save_weights(path, model, channel_names),
                        Contains("ranks disagree on the channel names"));
  }
  // Bad channel names on one rank are that rank's invalid argument, named on every rank.
  channel_names = names(C);
  if (comm.rank() == P - 1) channel_names.front() = "a,b";
  REQUIRE_THROWS_WITH(dchag::save_weights(path, model, channel_names),
                      Contains("without commas") && Contains("rank " + std::to_string(P - 1)));
  files.finish();
}

TEST_CASE("pieces of the ranks that do not fit together are refused on every rank",
          "[mpi][weights][errors]") {
  const int P = world_size();
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  SharedDir files;
  const int C = 2 * P;
  const auto cfg = config_for(dchag::Mode::exact_flat, C);
  Dist model(exec, comm, cfg, dchag::Mode::exact_flat, dchag::ChannelMap::blocks(C, P));
  std::vector<std::string> replicated;
  for (const auto& t : model.replicated_parameters()) replicated.push_back(t.name);
  const auto path = files("model.safetensors");
  dchag::save_weights(comm, path, model.parameters(), replicated);  // fits

  // pos_embed not declared replicated: with P > 1 every rank holds all of it.
  std::vector<std::string> fewer;
  for (const auto& n : replicated)
    if (n != "pos_embed") fewer.push_back(n);
  if (P > 1) {
    REQUIRE_THROWS_WITH(dchag::save_weights(comm, path, model.parameters(), fewer),
                        Contains("tensor 'pos_embed'") && Contains("held by ranks 0 and 1"));
  }
  // The last rank drops its last var_embed row: nobody holds it.
  auto params = model.parameters();
  for (auto& t : params)
    if (t.name == "var_embed" && comm.rank() == P - 1) t.pieces.pop_back();
  REQUIRE_THROWS_WITH(dchag::save_weights(comm, path, params, replicated),
                      Contains("tensor 'var_embed'") && Contains("held by no rank") &&
                          Contains("elements [" + std::to_string((C - 1) * cfg.dim)));
  // A replicated name that is not a tensor of the list.
  REQUIRE_THROWS_WITH(dchag::save_weights(comm, path, params, {"nothing"}),
                      Contains("'nothing'") && Contains("rank "));
  files.finish();
}

TEST_CASE("AdamW state saves and resumes collectively, bit for bit", "[mpi][weights][optimizer]") {
  // Train a distributed model two steps, save the model and the optimizer state (one file each
  // for the group), train two more; a fresh model and optimizer loaded from the files and trained
  // the same two steps end bit for bit where the first did, and the replicated parameters stay
  // identical on every rank.
  const int P = world_size();
  Exec exec;
  dchag::Communicator comm(MPI_COMM_WORLD);
  SharedDir files;
  const int C = 2 * P + 1;
  const auto map = dchag::ChannelMap::round_robin(C, P);
  for (const auto mode : {dchag::Mode::dchag_xattn, dchag::Mode::exact_flat}) {
    INFO(dchag::to_string(mode));
    auto cfg = config_for(mode, C);
    const int B = 2;
    dchag::View4<Scalar, Mem> images("images", B, C, cfg.height, cfg.width);
    dchag::View3<Scalar, Mem> out("out", B, cfg.patches(), cfg.dim),
        g("g", B, cfg.patches(), cfg.dim);
    {
      auto hi = Kokkos::create_mirror_view(images);
      for (std::size_t i = 0; i < hi.span(); ++i) hi.data()[i] = Scalar(value_at("images", i));
      Kokkos::deep_copy(images, hi);
      auto hg = Kokkos::create_mirror_view(g);
      for (std::size_t i = 0; i < hg.span(); ++i) hg.data()[i] = Scalar(value_at("g", i));
      Kokkos::deep_copy(g, hg);
    }
    const dchag::WarmupCosine schedule{1e-2, 1, 4};
    auto train = [&](Dist& model, dchag::AdamW<Exec, Scalar>& opt, int from, int to) {
      for (int k = from; k < to; ++k) {
        model.zero_gradients(exec);
        model.forward(exec, images, out, dchag::ImageInput::full_image);
        model.backward(exec, g);
        opt.step(exec, schedule(k));
      }
      exec.fence();
    };
    const auto model_file = files(std::string(dchag::to_string(mode)) + "_model.safetensors");
    const auto state_file = files(std::string(dchag::to_string(mode)) + "_adamw.safetensors");
    Dist first(exec, comm, cfg, mode, map);
    randomize(first.parameters());
    dchag::AdamW<Exec, Scalar> opt(exec, first.parameters(), first.gradients());
    train(first, opt, 0, 2);
    dchag::save_weights(model_file, first);
    opt.sync_step_to_state(exec);
    dchag::save_weights(
        comm, state_file, opt.state(),
        dchag::AdamW<Exec, Scalar>::replicated_state_names(first.replicated_parameters()));
    train(first, opt, 2, 4);
    first.verify_replicated(exec);

    cfg.seed = 1234;  // everything must come from the files
    Dist second(exec, comm, cfg, mode, map);
    dchag::AdamW<Exec, Scalar> resumed(exec, second.parameters(), second.gradients());
    dchag::load_weights(model_file, second);
    dchag::load_weights(comm, state_file, resumed.state());
    resumed.sync_step_from_state();
    CHECK(resumed.steps() == 2);
    train(second, resumed, 2, 4);
    // Piece by piece, in list order.
    const auto a = snapshot(first.parameters()), b = snapshot(second.parameters());
    REQUIRE(a.size() == b.size());
    for (std::size_t t = 0; t < a.size(); ++t) {
      INFO("piece " << t);
      REQUIRE(a[t].size() == b[t].size());
      std::size_t differ = 0;
      for (std::size_t i = 0; i < a[t].size(); ++i) differ += a[t][i] != b[t][i];
      CHECK(differ == 0);
    }
  }
  files.finish();
}
