// dchag_sweep: memory per rank and step time of every front end mode, C swept, on the ranks it is
// started on (DESIGN 8: TP-only vs D-CHAG-L vs D-CHAG-C vs exact flat). P = number of ranks.
//
//   mpiexec -n P dchag_sweep --preset paper            # the study of bench/README.md
//   mpiexec -n P dchag_sweep --mode dchag_xattn --strategy pooled --C 256 --reps 3
//
// One JSON line per run on stdout (rank 0), one progress line per run on stderr (rank 0).
// Per run: the inputs (full image on every rank, out, d_out) are allocated first, then a
// dchag::MemoryTracker starts, then the front end is built and runs one warm-up step and `reps`
// timed steps of zero_gradients + forward + backward. The execution space is fenced and the ranks
// meet at a barrier before the clock starts; it is fenced before each reading. Times are the
// maximum over ranks of each step, then the median over steps; memory is the maximum over ranks of
// the tracker's high-water mark (everything Kokkos allocated from the front end's construction to
// the end of the last step: parameters, gradients, saved activations, workspace, receive buffers).
// Bad options print an error on every rank and exit with status 2.
#include <dchag/device.hpp>
#include <dchag/distributed.hpp>
#include <dchag/memory.hpp>

#include <mpi.h>
#include <Kokkos_Core.hpp>
#include <Kokkos_Random.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;

/// Bad command line: every rank detects it (all parse the same argv) and exits with status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* const kUsage =
    R"(dchag_sweep: memory per rank and step time of the front end modes (DESIGN 8)

  mpiexec -n P dchag_sweep [options]

  --mode LIST       tp_only, dchag_linear, dchag_xattn, exact_flat, flat (comma-separated;
                    default: all). flat is FlatFrontEnd on one process: P = 1 only.
  --strategy LIST   pooled, materialized (default: both). tp_only is materialized only and
                    exact_flat pooled only; such pairs are skipped unless both were named.
  --C LIST          channels (default 500; --preset paper: 64,128,256,512,1024)
  --B --H --W --p --D --heads N   batch, image height and width, patch, width, heads
                    (default 1, 64, 64, 8, 256, 8: the flagship configuration)
  --reps N          timed steps after one warm-up step (default 5; --preset paper: 7)
  --memory LIST     keep, recompute, inference: what a forward keeps for its backward
                    (default keep; not keep needs pooled; inference times forwards only)
  --tree K          local tree of the D-CHAG modes (default 1: none)
  --map M           blocks or round_robin channel placement (default blocks)
  --scalar S        float or double (default float): parameters, gradients, arithmetic
  --storage S       float, bf16 or fp16 with --scalar float (default float): images and tokens
                    (DESIGN 3.12)
  --preset paper    C = 64..1024, every mode and valid strategy, at the preset's configuration;
                    options given explicitly override it
  --help            this text

Output: one JSON line per run on stdout, a progress line per run on stderr (rank 0).
)";

enum class Kind { tp_only, dchag_linear, dchag_xattn, exact_flat, flat };
constexpr Kind kKinds[] = {Kind::tp_only, Kind::dchag_linear, Kind::dchag_xattn, Kind::exact_flat,
                           Kind::flat};

const char* name_of(Kind k) {
  switch (k) {
    case Kind::tp_only:
      return "tp_only";
    case Kind::dchag_linear:
      return "dchag_linear";
    case Kind::dchag_xattn:
      return "dchag_xattn";
    case Kind::exact_flat:
      return "exact_flat";
    case Kind::flat:
      return "flat";
  }
  return "?";
}

dchag::Mode mode_of(Kind k) {
  switch (k) {
    case Kind::tp_only:
      return dchag::Mode::tp_only;
    case Kind::dchag_linear:
      return dchag::Mode::dchag_linear;
    case Kind::dchag_xattn:
      return dchag::Mode::dchag_xattn;
    default:
      return dchag::Mode::exact_flat;
  }
}

bool is_dchag(Kind k) { return k == Kind::dchag_linear || k == Kind::dchag_xattn; }

/// Whether `k` runs with strategy `s` (the library's rule, DistributedFrontEnd's constructor).
bool valid_pair(Kind k, dchag::Strategy s) {
  if (k == Kind::tp_only) return s == dchag::Strategy::materialized;
  if (k == Kind::exact_flat) return s == dchag::Strategy::pooled;
  return true;
}

struct Options {
  std::vector<Kind> modes{std::begin(kKinds), std::end(kKinds)};
  std::vector<dchag::Strategy> strategies{dchag::Strategy::pooled, dchag::Strategy::materialized};
  std::vector<int> channels{500};
  std::vector<dchag::MemoryPolicy> memories{dchag::MemoryPolicy::keep};
  int B = 1, H = 64, W = 64, p = 8, D = 256, heads = 8, reps = 5, tree = 1;
  bool round_robin = false;
  bool is_double = false;
  std::string storage;  // empty: the scalar
  bool named_mode = false, named_strategy = false;
  bool preset = false;
};

/// The configuration of --preset paper, chosen so that the whole preset at P = 1, 2 and 4 (4 ranks
/// oversubscribed on 2 cores) runs in about 15 minutes on a 2-core machine; bench/README.md
/// records the measured time.
void apply_paper_preset(Options& o) {
  o.channels = {64, 128, 256, 512, 1024};
  o.B = 1;
  o.H = o.W = 64;
  o.p = 8;
  o.D = 256;
  o.heads = 8;
  o.reps = 7;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t b = 0;
  for (;;) {
    const std::size_t e = s.find(',', b);
    out.push_back(s.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) return out;
    b = e + 1;
  }
}

int positive(const std::string& opt, const std::string& v) {
  int x = 0;
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || end != v.data() + v.size() || x < 1) {
    throw UsageError(opt + " is '" + v + "', expected a positive integer");
  }
  return x;
}

Options parse(int argc, char** argv) {
  // Pass 1: collect --key value / --key=value; pass 2: defaults, then the preset, then the keys.
  std::vector<std::pair<std::string, std::string>> given;
  const std::vector<std::string> known = {
      "--mode",  "--strategy", "--C",    "--B",   "--H",      "--W",      "--p",      "--D",
      "--heads", "--reps",     "--tree", "--map", "--scalar", "--preset", "--memory", "--storage"};
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], v;
    if (const auto eq = a.find('='); a.rfind("--", 0) == 0 && eq != std::string::npos) {
      v = a.substr(eq + 1);
      a = a.substr(0, eq);
    } else if (std::find(known.begin(), known.end(), a) != known.end()) {
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      v = argv[++i];
    }
    if (std::find(known.begin(), known.end(), a) == known.end()) {
      throw UsageError("unknown option '" + std::string(argv[i]) + "' (see --help)");
    }
    if (std::any_of(given.begin(), given.end(), [&](const auto& kv) { return kv.first == a; })) {
      throw UsageError(a + " given twice");
    }
    given.emplace_back(a, v);
  }
  for (const auto& [k, v] : given) {
    if (k != "--preset") continue;
    if (v != "paper") throw UsageError("--preset is '" + v + "', expected paper");
    o.preset = true;
    apply_paper_preset(o);
  }
  const std::map<std::string, int*> ints = {
      {"--B", &o.B}, {"--H", &o.H},         {"--W", &o.W},       {"--p", &o.p},
      {"--D", &o.D}, {"--heads", &o.heads}, {"--reps", &o.reps}, {"--tree", &o.tree}};
  for (const auto& [k, v] : given) {
    if (auto it = ints.find(k); it != ints.end()) {
      *it->second = positive(k, v);
    } else if (k == "--C") {
      o.channels.clear();
      for (const auto& c : split(v)) o.channels.push_back(positive(k, c));
    } else if (k == "--mode") {
      o.modes.clear();
      o.named_mode = true;
      for (const auto& m : split(v)) {
        const auto it = std::find_if(std::begin(kKinds), std::end(kKinds),
                                     [&](Kind kind) { return m == name_of(kind); });
        if (it == std::end(kKinds)) {
          throw UsageError("--mode is '" + m +
                           "', expected tp_only, dchag_linear, dchag_xattn, exact_flat or flat");
        }
        o.modes.push_back(*it);
      }
    } else if (k == "--strategy") {
      o.strategies.clear();
      o.named_strategy = true;
      for (const auto& s : split(v)) {
        if (s == "pooled") {
          o.strategies.push_back(dchag::Strategy::pooled);
        } else if (s == "materialized") {
          o.strategies.push_back(dchag::Strategy::materialized);
        } else {
          throw UsageError("--strategy is '" + s + "', expected pooled or materialized");
        }
      }
    } else if (k == "--memory") {
      o.memories.clear();
      for (const auto& m : split(v)) {
        if (m == "keep") {
          o.memories.push_back(dchag::MemoryPolicy::keep);
        } else if (m == "recompute") {
          o.memories.push_back(dchag::MemoryPolicy::recompute);
        } else if (m == "inference") {
          o.memories.push_back(dchag::MemoryPolicy::inference);
        } else {
          throw UsageError("--memory is '" + m + "', expected keep, recompute or inference");
        }
      }
    } else if (k == "--map") {
      if (v != "blocks" && v != "round_robin")
        throw UsageError("--map is '" + v + "', expected blocks or round_robin");
      o.round_robin = v == "round_robin";
    } else if (k == "--scalar") {
      if (v != "float" && v != "double")
        throw UsageError("--scalar is '" + v + "', expected float or double");
      o.is_double = v == "double";
    } else if (k == "--storage") {
      if (v != "float" && v != "bf16" && v != "fp16")
        throw UsageError("--storage is '" + v + "', expected float, bf16 or fp16");
      o.storage = v;
    }
  }
  if (o.is_double && !o.storage.empty()) {
    throw UsageError("--storage " + o.storage + " needs --scalar float (double stores in double)");
  }
  if (o.H % o.p != 0 || o.W % o.p != 0) {
    throw UsageError("--H " + std::to_string(o.H) + " and --W " + std::to_string(o.W) +
                     " must be multiples of --p " + std::to_string(o.p));
  }
  if (o.D % o.heads != 0) {
    throw UsageError("--D " + std::to_string(o.D) + " must be a multiple of --heads " +
                     std::to_string(o.heads));
  }
  return o;
}

struct Run {
  Kind kind;
  dchag::Strategy strategy;
  int C;
  dchag::MemoryPolicy memory;
};

dchag::ChannelMap channel_map(const Options& o, int C, int P) {
  return o.round_robin ? dchag::ChannelMap::round_robin(C, P) : dchag::ChannelMap::blocks(C, P);
}

/// Every run the options ask for, in order (C, then mode, then strategy). Pairs that cannot run
/// are skipped, or are an error when the user named both the mode and the strategy (or named
/// flat with P > 1); configurations the library would refuse are errors before anything runs.
std::vector<Run> plan(const Options& o, int P) {
  std::vector<Run> runs;
  for (int C : o.channels) {
    if (C < P) {
      throw UsageError("--C " + std::to_string(C) + " is fewer channels than the " +
                       std::to_string(P) + " ranks; every rank must hold at least one channel");
    }
    const auto map = channel_map(o, C, P);
    for (Kind k : o.modes) {
      if (k == Kind::flat && P > 1) {
        if (o.named_mode) {
          throw UsageError("--mode flat is FlatFrontEnd on one process, but " + std::to_string(P) +
                           " ranks run; start it with mpiexec -n 1 (or leave --mode out)");
        }
        continue;
      }
      if (k == Kind::tp_only && o.heads < P) {
        throw UsageError("tp_only splits --heads " + std::to_string(o.heads) + " over " +
                         std::to_string(P) + " ranks, expected heads >= ranks");
      }
      if (is_dchag(k)) {
        for (int r = 0; r < P; ++r) {
          const int held = static_cast<int>(map.channels_of(r).size());
          if (o.tree > held || (k == Kind::dchag_linear && held % o.tree != 0)) {
            throw UsageError("--tree " + std::to_string(o.tree) + " does not fit rank " +
                             std::to_string(r) + "'s " + std::to_string(held) +
                             " channels at C = " + std::to_string(C) +
                             (k == Kind::dchag_linear ? " (dchag_linear needs a divisor)"
                                                      : " (needs tree <= channels)"));
          }
        }
      }
      for (dchag::Strategy s : o.strategies) {
        if (!valid_pair(k, s)) {
          if (o.named_mode && o.named_strategy) {
            throw UsageError(std::string("--mode ") + name_of(k) + " runs only with --strategy " +
                             (k == Kind::tp_only ? "materialized" : "pooled") + ", not " +
                             std::string(dchag::to_string(s)));
          }
          continue;
        }
        for (const auto m : o.memories) {
          // Not keep needs the pooled strategy (FrontEndConfig::validate).
          if (m == dchag::MemoryPolicy::keep || s == dchag::Strategy::pooled)
            runs.push_back({k, s, C, m});
        }
      }
    }
  }
  if (runs.empty()) throw UsageError("no valid (mode, strategy) pair to run");
  return runs;
}

struct Result {
  double fwd_ms = 0, fwdbwd_ms = 0, fwd_ms_min = 0, fwdbwd_ms_min = 0;
  std::int64_t peak_max = 0, peak_min = 0, input_bytes = 0;
  std::int64_t state_max = 0;      // peak less the rank's parameters and gradients (largest rank)
  dchag::MemoryEstimate estimate;  // of the rank with the largest total
  int estimate_rank = 0;
  double run_s = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

template <class Scalar, class Storage>
Result run_one(const Run& run, const Options& o, const dchag::Communicator& comm) {
  const auto t_start = std::chrono::steady_clock::now();
  Exec exec;
  MPI_Comm world = comm.comm();
  const int P = comm.size();
  dchag::FrontEndConfig cfg;
  cfg.channels = run.C;
  cfg.height = o.H;
  cfg.width = o.W;
  cfg.patch = o.p;
  cfg.dim = o.D;
  cfg.heads = o.heads;
  cfg.strategy = run.strategy;
  cfg.memory = run.memory;
  cfg.seed = 1;
  const int L = cfg.patches();

  // Inputs, before the tracker starts: a simulation owns them, the front end does not. The same
  // seed on every rank: d_out must be identical on all ranks (the output is replicated).
  dchag::View4<Storage, Mem> images("sweep::images", o.B, run.C, o.H, o.W);
  dchag::View3<Scalar, Mem> out("sweep::out", o.B, L, o.D), d_out("sweep::d_out", o.B, L, o.D);
  {
    Kokkos::Random_XorShift64_Pool<Exec> pool(12345);
    dchag::View1<Scalar, Mem> pixels("sweep::pixels", images.span());
    Kokkos::fill_random(pixels, pool, Scalar(-1), Scalar(1));
    Kokkos::fill_random(d_out, pool, Scalar(-1), Scalar(1));
    Storage* dst = images.data();
    Kokkos::parallel_for(
        "sweep::store_images", Kokkos::RangePolicy<Exec>(exec, 0, pixels.extent(0)),
        KOKKOS_LAMBDA(const std::size_t i) {
          dst[i] = dchag::detail::convert<Storage>(pixels(i));
        });
  }
  exec.fence();

  Result res;
  res.input_bytes = std::int64_t(sizeof(Storage)) * images.span() +
                    std::int64_t(sizeof(Scalar)) * (out.span() + d_out.span());
  std::vector<double> fwd, fwdbwd;
  std::int64_t my_params = 0;  // this rank's parameter and gradient bytes (exact in the estimate)
  dchag::MemoryTracker tracker;
  {
    auto steps = [&](auto& fe, auto forward) {
      for (int s = 0; s <= o.reps; ++s) {
        fe.zero_gradients(exec);
        exec.fence();
        MPI_Barrier(world);
        const auto t0 = std::chrono::steady_clock::now();
        forward();
        exec.fence();
        const auto t1 = std::chrono::steady_clock::now();
        if (run.memory != dchag::MemoryPolicy::inference) fe.backward(exec, d_out);
        exec.fence();
        const auto t2 = std::chrono::steady_clock::now();
        double t[2] = {std::chrono::duration<double, std::milli>(t1 - t0).count(),
                       std::chrono::duration<double, std::milli>(t2 - t0).count()};
        MPI_Allreduce(MPI_IN_PLACE, t, 2, MPI_DOUBLE, MPI_MAX, world);
        if (s == 0) continue;  // warm-up: workspaces are allocated on first use
        fwd.push_back(t[0]);
        fwdbwd.push_back(t[1]);
      }
    };
    dchag::MemoryEstimate e;
    if (run.kind == Kind::flat) {
      dchag::FlatFrontEnd<Exec, Scalar, Storage> fe(exec, cfg);
      e = fe.memory_estimate(o.B);
      steps(fe, [&] { fe.forward(exec, images, out); });
    } else {
      const auto map = channel_map(o, run.C, P);
      dchag::DistributedFrontEnd<Exec, Scalar, Storage> fe(exec, comm, cfg, mode_of(run.kind), map,
                                                           is_dchag(run.kind) ? o.tree : 1);
      e = fe.memory_estimate(o.B);
      steps(fe, [&] { fe.forward(exec, images, out, dchag::ImageInput::full_image); });
    }
    // The estimate of every rank at rank 0; the report keeps the largest.
    my_params = e.parameters + e.gradients;
    std::int64_t mine[5] = {e.parameters, e.gradients, e.activations, e.workspace, e.communication};
    std::vector<std::int64_t> all(std::size_t(5) * P);
    MPI_Gather(mine, 5, MPI_INT64_T, all.data(), 5, MPI_INT64_T, 0, world);
    std::int64_t best = -1;
    for (int r = 0; r < P; ++r) {
      const std::int64_t* f = &all[std::size_t(5) * r];
      const std::int64_t total = f[0] + f[1] + f[2] + f[3] + f[4];
      if (total > best) {
        best = total;
        res.estimate_rank = r;
        res.estimate = dchag::MemoryEstimate{f[0], f[1], f[2], f[3], f[4]};
      }
    }
  }
  const std::int64_t peak = tracker.peak_bytes();
  const std::int64_t state = peak - my_params;
  MPI_Allreduce(&state, &res.state_max, 1, MPI_INT64_T, MPI_MAX, world);
  MPI_Allreduce(&peak, &res.peak_max, 1, MPI_INT64_T, MPI_MAX, world);
  MPI_Allreduce(&peak, &res.peak_min, 1, MPI_INT64_T, MPI_MIN, world);
  res.fwd_ms = median(fwd);
  res.fwdbwd_ms = median(fwdbwd);
  res.fwd_ms_min = *std::min_element(fwd.begin(), fwd.end());
  res.fwdbwd_ms_min = *std::min_element(fwdbwd.begin(), fwdbwd.end());
  double run_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  MPI_Allreduce(&run_s, &res.run_s, 1, MPI_DOUBLE, MPI_MAX, world);
  return res;
}

std::string storage_name(const Options& o) {
  return o.storage.empty() ? (o.is_double ? "double" : "float") : o.storage;
}

Result run_typed(const Run& run, const Options& o, const dchag::Communicator& comm) {
  const std::string s = storage_name(o);
  if (o.is_double) return run_one<double, double>(run, o, comm);  // parse: no other storage
  if (s == "bf16") return run_one<float, dchag::bf16>(run, o, comm);
  if (s == "fp16") return run_one<float, dchag::fp16>(run, o, comm);
  return run_one<float, float>(run, o, comm);
}

void print_json(const Run& run, const Options& o, int P, const Result& r) {
  const auto& e = r.estimate;
  std::printf(
      "{\"mode\":\"%s\",\"strategy\":\"%s\",\"memory\":\"%s\",\"scalar\":\"%s\",\"storage\":\"%s\","
      "\"C\":%d,\"P\":%d,"
      "\"B\":%d,\"H\":%d,"
      "\"W\":%d,"
      "\"p\":%d,\"D\":%d,\"heads\":%d,\"tree\":%d,\"map\":\"%s\",\"reps\":%d,"
      "\"peak_bytes_per_rank\":%lld,\"peak_bytes_min_rank\":%lld,\"state_bytes_per_rank\":%lld,"
      "\"estimate_bytes_per_rank\":%lld,"
      "\"estimate\":{\"rank\":%d,\"parameters\":%lld,\"gradients\":%lld,\"activations\":%lld,"
      "\"workspace\":%lld,\"communication\":%lld},\"input_bytes_per_rank\":%lld,"
      "\"fwd_ms\":%.3f,\"fwdbwd_ms\":%.3f,\"fwd_ms_min\":%.3f,\"fwdbwd_ms_min\":%.3f,"
      "\"exec\":\"%s\",\"kokkos_version\":%d}\n",
      name_of(run.kind), std::string(dchag::to_string(run.strategy)).c_str(),
      std::string(dchag::to_string(run.memory)).c_str(), o.is_double ? "double" : "float",
      storage_name(o).c_str(), run.C, P, o.B, o.H, o.W, o.p, o.D, o.heads,
      is_dchag(run.kind) ? o.tree : 1, o.round_robin ? "round_robin" : "blocks", o.reps,
      static_cast<long long>(r.peak_max), static_cast<long long>(r.peak_min),
      static_cast<long long>(r.state_max), static_cast<long long>(e.total()), r.estimate_rank,
      static_cast<long long>(e.parameters), static_cast<long long>(e.gradients),
      static_cast<long long>(e.activations), static_cast<long long>(e.workspace),
      static_cast<long long>(e.communication), static_cast<long long>(r.input_bytes), r.fwd_ms,
      r.fwdbwd_ms, r.fwd_ms_min, r.fwdbwd_ms_min, Exec::name(), KOKKOS_VERSION);
  std::fflush(stdout);
}

int sweep(int argc, char** argv) {
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  Options o;
  std::vector<Run> runs;
  try {
    o = parse(argc, argv);
    runs = plan(o, P);
  } catch (const std::exception& e) {  // UsageError, or a channel map the library refuses
    std::fprintf(stderr, "dchag_sweep (rank %d): %s\n", rank, e.what());
    return 2;
  }
  const dchag::Communicator comm(MPI_COMM_WORLD);
  if (rank == 0) {
    std::fprintf(
        stderr,
        "dchag_sweep: %d runs on %d rank(s), %s, %s (storage %s), B=%d %dx%d p=%d D=%d heads=%d, "
        "%d reps\n",
        int(runs.size()), P, Exec::name(), o.is_double ? "double" : "float",
        storage_name(o).c_str(), o.B, o.H, o.W, o.p, o.D, o.heads, o.reps);
  }
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const Run& run = runs[i];
    const Result r = run_typed(run, o, comm);
    if (rank == 0) {
      print_json(run, o, P, r);
      std::fprintf(
          stderr,
          "[%zu/%zu] %s %s %s C=%d P=%d: fwd+bwd %.1f ms (fwd %.1f ms), peak %.1f MiB/rank, "
          "%.1f s\n",
          i + 1, runs.size(), name_of(run.kind),
          std::string(dchag::to_string(run.strategy)).c_str(),
          std::string(dchag::to_string(run.memory)).c_str(), run.C, P, r.fwdbwd_ms, r.fwd_ms,
          double(r.peak_max) / (1 << 20), r.run_s);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Kokkos may run host threads (OpenMP) beside this one; only this thread calls MPI.
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  for (int i = 1; i < argc; ++i) {
    // Before Kokkos::initialize, which answers --help with its own options.
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      int rank = 0;
      MPI_Comm_rank(MPI_COMM_WORLD, &rank);
      if (rank == 0) std::fputs(kUsage, stdout);
      MPI_Finalize();
      return 0;
    }
  }
  dchag::initialize_on_local_device(
      argc, argv);  // one device per rank of a node  // removes the --kokkos-* options it knows
  int status = 0;
  try {
    status = sweep(argc, argv);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "dchag_sweep: %s\n", e.what());
    status = 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dchag_sweep: %s\n", e.what());
    status = 1;
  }
  Kokkos::finalize();
  MPI_Finalize();
  return status;
}
