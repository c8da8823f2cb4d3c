// Microbenchmarks of the dchag front end: tokenizer, cross-attention (pooled and materialized),
// the flat ClimaX front end, and D-CHAG emulated on one process.
//
// Every benchmark uses manual time: the execution space is fenced before the clock starts and
// before it stops, and under MPI the time of an iteration is the maximum over ranks. Counters:
// flop/s (formulas in flops.hpp), bytes_per_second and items_per_second of the [B, C, L, D] token
// tensor (one tensor, B*C*L tokens, per iteration). See bench/README.md.
//
// Extra flags, read before Google Benchmark's own:
//   --dchag_config=B:1,C:500,H:64,W:64,p:8,D:256,heads:8   replaces the default C sweep; may be
//       repeated; keys left out keep the values shown (the flagship configuration)
//   --dchag_groups=4   channel groups of the D-CHAG emulation
//   --dchag_profile=20 instead of benchmarks: time per kernel and GEMM of the flat pooled front
//       end's forward and forward+backward over 20 calls (host execution spaces only)
//   --dchag_profile_memory=recompute   the memory policy of the profiled front end (default keep;
//       inference profiles the forward only)
#include "flops.hpp"
#include "kernel_profile.hpp"

#include <dchag/aggregate.hpp>

#include <benchmark/benchmark.h>
#include <Kokkos_Core.hpp>
#include <Kokkos_Random.hpp>

#ifdef DCHAG_ENABLE_MPI
#include <mpi.h>
#include <dchag/device.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifndef DCHAG_BENCH_VERSION
#define DCHAG_BENCH_VERSION "unknown"
#endif

namespace {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;
using Scalar = float;
using dchag_bench::Shape;

const std::vector<std::string> kArgNames = {"B", "C", "H", "W", "p", "D", "heads"};

Shape shape_of(const benchmark::State& state) {
  Shape s;
  s.B = state.range(0);
  s.C = state.range(1);
  s.H = state.range(2);
  s.W = state.range(3);
  s.p = state.range(4);
  s.D = state.range(5);
  s.heads = state.range(6);
  return s;
}

std::vector<std::int64_t> args_of(const Shape& s) {
  return {s.B, s.C, s.H, s.W, s.p, s.D, s.heads};
}

std::vector<int> iota(std::int64_t n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<int>(i);
  return v;
}

template <class V>
void fill(const V& v, std::uint64_t seed) {
  Kokkos::Random_XorShift64_Pool<Exec> pool(seed);
  Kokkos::fill_random(v, pool, Scalar(-1), Scalar(1));
}

dchag::FrontEndConfig front_end_config(const Shape& s, dchag::Strategy strategy) {
  dchag::FrontEndConfig cfg;
  cfg.channels = static_cast<int>(s.C);
  cfg.height = static_cast<int>(s.H);
  cfg.width = static_cast<int>(s.W);
  cfg.patch = static_cast<int>(s.p);
  cfg.dim = static_cast<int>(s.D);
  cfg.heads = static_cast<int>(s.heads);
  cfg.strategy = strategy;
  cfg.seed = 1;
  return cfg;
}

/// High-water mark of Kokkos allocations (all memory spaces), from Kokkos Tools callbacks.
struct AllocationTracker {
  static inline std::int64_t current = 0;
  static inline std::int64_t peak = 0;

  static void on_allocate(Kokkos_Profiling_SpaceHandle, const char*, const void*,
                          std::uint64_t size) {
    current += static_cast<std::int64_t>(size);
    if (current > peak) peak = current;
  }
  static void on_deallocate(Kokkos_Profiling_SpaceHandle, const char*, const void*,
                            std::uint64_t size) {
    current -= static_cast<std::int64_t>(size);
  }
  static void install() {
    Kokkos::Tools::Experimental::set_allocate_data_callback(&on_allocate);
    Kokkos::Tools::Experimental::set_deallocate_data_callback(&on_deallocate);
  }
};

/// Peak bytes allocated through Kokkos from its construction on (parameters, activations,
/// workspace and the benchmark's own inputs), the maximum over ranks.
class PeakBytes {
 public:
  PeakBytes() : base_(AllocationTracker::current) { AllocationTracker::peak = base_; }
  double bytes() const {
    double peak = double(AllocationTracker::peak - base_);
#ifdef DCHAG_ENABLE_MPI
    MPI_Allreduce(MPI_IN_PLACE, &peak, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
#endif
    return peak;
  }

 private:
  std::int64_t base_;
};

/// Runs the timed loop: `op` once untimed (workspaces are allocated on first use), then once per
/// iteration between two fences; the time of an iteration is the maximum over ranks.
void timed_loop(benchmark::State& state, const Exec& exec, const std::function<void()>& op) {
  op();
  exec.fence();
  for (auto _ : state) {
    exec.fence();
    const auto t0 = std::chrono::steady_clock::now();
    op();
    exec.fence();
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
#ifdef DCHAG_ENABLE_MPI
    MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
#endif
    state.SetIterationTime(seconds);
  }
}

/// flop/s, and bytes/s and items/s of the token tensor, all per iteration; peak bytes.
void set_counters(benchmark::State& state, const Shape& s, double flops, const PeakBytes& peak) {
  state.counters["flop/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_bytes"] =
      benchmark::Counter(peak.bytes(), benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
  state.SetBytesProcessed(state.iterations() * s.token_bytes<Scalar>());
  state.SetItemsProcessed(state.iterations() * s.tokens());
}

// ---- the benchmarks ---------------------------------------------------------------------------

void tokenizer(benchmark::State& state, bool backward) {
  const Shape s = shape_of(state);
  const PeakBytes peak;
  Exec exec;
  dchag::Tokenizer<Exec, Scalar> tok(exec, int(s.C), int(s.p), int(s.D), iota(s.C), 1);
  dchag::View4<Scalar, Mem> images("images", s.B, s.C, s.H, s.W);
  dchag::View4<Scalar, Mem> tokens("tokens", s.B, s.C, s.L(), s.D);
  fill(images, 2);
  const auto sel = dchag::ChannelSelection::own(iota(s.C));
  if (!backward) {
    timed_loop(state, exec, [&] { tok.forward(exec, images, sel, tokens); });
    set_counters(state, s, dchag_bench::tokenizer_forward(s), peak);
  } else {
    tok.forward(exec, images, sel, tokens);
    fill(tokens, 3);  // stands in for d_tokens
    timed_loop(state, exec, [&] { tok.backward(exec, tokens); });
    set_counters(state, s, dchag_bench::tokenizer_backward(s), peak);
  }
}

void cross_attention(benchmark::State& state, dchag::Strategy strategy, bool backward) {
  const Shape s = shape_of(state);
  const PeakBytes peak;
  Exec exec;
  dchag::CrossAttention<Exec, Scalar> att(
      exec, {int(s.D), int(s.heads), dchag::Convention::climax, strategy}, 1, "var_agg");
  dchag::View4<Scalar, Mem> x("x", s.B, s.C, s.L(), s.D);
  dchag::View3<Scalar, Mem> out("out", s.B, s.L(), s.D);
  fill(x, 2);
  const bool pooled = strategy == dchag::Strategy::pooled;
  const auto work = dchag_bench::flat_attention(s);
  if (!backward) {
    timed_loop(state, exec, [&] { att.forward(exec, x, out); });
    set_counters(state, s, dchag_bench::attention_forward(pooled, work), peak);
  } else {
    dchag::View4<Scalar, Mem> dx("dx", s.B, s.C, s.L(), s.D);
    dchag::View3<Scalar, Mem> d_out("d_out", s.B, s.L(), s.D);
    fill(d_out, 3);
    att.forward(exec, x, out);
    timed_loop(state, exec, [&] { att.backward(exec, x, d_out, dx); });
    set_counters(state, s, dchag_bench::attention_backward(pooled, work), peak);
  }
}

/// `images` = `drawn` rounded to Storage.
template <class Storage>
void store_images(const dchag::View4<Scalar, Mem>& drawn,
                  const dchag::View4<Storage, Mem>& images) {
  const Scalar* src = drawn.data();
  Storage* dst = images.data();
  Kokkos::parallel_for(
      "bench::store_images", Kokkos::RangePolicy<Exec>(0, drawn.span()),
      KOKKOS_LAMBDA(const std::size_t i) { dst[i] = dchag::detail::convert<Storage>(src[i]); });
  Kokkos::fence();
}

template <class Storage = Scalar>
void flat_front_end(benchmark::State& state, dchag::Strategy strategy, bool backward,
                    dchag::MemoryPolicy memory = dchag::MemoryPolicy::keep) {
  const Shape s = shape_of(state);
  constexpr bool narrow = !std::is_same_v<Storage, Scalar>;
  // With another storage type the pixels are drawn in Scalar outside the peak, then stored.
  dchag::View4<Scalar, Mem> drawn;
  if constexpr (narrow) {
    drawn = dchag::View4<Scalar, Mem>("drawn", s.B, s.C, s.H, s.W);
    fill(drawn, 2);
  }
  const PeakBytes peak;
  Exec exec;
  auto cfg = front_end_config(s, strategy);
  cfg.memory = memory;
  dchag::FlatFrontEnd<Exec, Scalar, Storage> fe(exec, cfg);
  dchag::View4<Storage, Mem> images("images", s.B, s.C, s.H, s.W);
  if constexpr (narrow) {
    store_images(drawn, images);
  } else {
    fill(images, 2);
  }
  dchag::View3<Scalar, Mem> out("out", s.B, s.L(), s.D);
  const bool pooled = strategy == dchag::Strategy::pooled;
  if (!backward) {
    timed_loop(state, exec, [&] { fe.forward(exec, images, out); });
    set_counters(state, s, dchag_bench::flat_forward(s, pooled), peak);
  } else {
    dchag::View3<Scalar, Mem> d_out("d_out", s.B, s.L(), s.D);
    Kokkos::deep_copy(d_out, Scalar(1));  // the gradient of sum(out), as in the PyTorch script
    fe.zero_gradients(exec);
    timed_loop(state, exec, [&] {
      fe.forward(exec, images, out);
      fe.backward(exec, d_out);
    });
    set_counters(state, s, dchag_bench::flat_forward_backward(s, pooled), peak);
  }
}

void dchag_emulation(benchmark::State& state, dchag::PartialKind kind, int groups) {
  const Shape s = shape_of(state);
  const PeakBytes peak;
  Exec exec;
  // Contiguous channel blocks (the paper's layout); the first C % P groups get one more.
  std::vector<std::vector<int>> lists(static_cast<std::size_t>(groups));
  for (std::int64_t c = 0, r = 0; r < groups; ++r) {
    const std::int64_t n = s.C / groups + (r < s.C % groups ? 1 : 0);
    for (std::int64_t i = 0; i < n; ++i) lists[r].push_back(static_cast<int>(c++));
  }
  const auto cfg = front_end_config(s, dchag::Strategy::pooled);
  dchag::DchagEmulation<Exec, Scalar> em(exec, cfg, {kind, 1}, lists);
  dchag::View4<Scalar, Mem> images("images", s.B, s.C, s.H, s.W);
  dchag::View3<Scalar, Mem> out("out", s.B, s.L(), s.D);
  dchag::View3<Scalar, Mem> d_out("d_out", s.B, s.L(), s.D);
  fill(images, 2);
  Kokkos::deep_copy(d_out, Scalar(1));
  em.zero_gradients(exec);
  timed_loop(state, exec, [&] {
    em.forward(exec, images, out);
    em.backward(exec, d_out);
  });
  set_counters(state, s,
               dchag_bench::dchag_forward_backward(s, groups, kind == dchag::PartialKind::linear,
                                                   cfg.strategy == dchag::Strategy::pooled),
               peak);
  state.counters["groups"] = groups;
}

/// --dchag_profile: the flat pooled front end's forward, then forward+backward, `calls` times
/// each after one untimed call, with the per-kernel profile of each.
void profile_flat(const Shape& s, int calls, dchag::MemoryPolicy memory) {
  Exec exec;
  auto cfg = front_end_config(s, dchag::Strategy::pooled);
  cfg.memory = memory;
  dchag::FlatFrontEnd<Exec, Scalar> fe(exec, cfg);
  dchag::View4<Scalar, Mem> images("images", s.B, s.C, s.H, s.W);
  dchag::View3<Scalar, Mem> out("out", s.B, s.L(), s.D);
  dchag::View3<Scalar, Mem> d_out("d_out", s.B, s.L(), s.D);
  fill(images, 2);
  Kokkos::deep_copy(d_out, Scalar(1));
  const std::string config = "B:" + std::to_string(s.B) + ",C:" + std::to_string(s.C) +
                             ",H:" + std::to_string(s.H) + ",W:" + std::to_string(s.W) +
                             ",p:" + std::to_string(s.p) + ",D:" + std::to_string(s.D) +
                             ",heads:" + std::to_string(s.heads);
  for (const bool backward : {false, true}) {
    if (backward && memory == dchag::MemoryPolicy::inference) break;
    auto op = [&] {
      fe.forward(exec, images, out);
      if (backward) fe.backward(exec, d_out);
    };
    op();
    exec.fence();
    dchag_bench::KernelProfile::install();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) op();
    exec.fence();
    const double total =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    dchag_bench::KernelProfile::uninstall();
    const std::string title = std::string("FlatFrontEnd/") +
                              (backward ? "forward_backward" : "forward") + "/pooled " +
                              std::string(dchag::to_string(memory)) + " " + config + ", " +
                              Exec::name() + " concurrency " + std::to_string(exec.concurrency());
    dchag_bench::KernelProfile::print(title.c_str(), calls, total);
  }
}

// ---- registration and main --------------------------------------------------------------------

void register_all(const std::vector<Shape>& shapes, int groups) {
  using dchag::Strategy;
  std::vector<benchmark::internal::Benchmark*> all;
  auto add = [&](const std::string& name, std::function<void(benchmark::State&)> fn) {
    all.push_back(
        benchmark::RegisterBenchmark(name.c_str(), [fn](benchmark::State& st) { fn(st); }));
  };
  const std::pair<const char*, Strategy> strategies[] = {{"pooled", Strategy::pooled},
                                                         {"materialized", Strategy::materialized}};
  add("Tokenizer/forward", [](auto& st) { tokenizer(st, false); });
  add("Tokenizer/backward", [](auto& st) { tokenizer(st, true); });
  for (const auto& [name, strat] : strategies) {
    add(std::string("CrossAttention/forward/") + name,
        [strat = strat](auto& st) { cross_attention(st, strat, false); });
    add(std::string("CrossAttention/backward/") + name,
        [strat = strat](auto& st) { cross_attention(st, strat, true); });
  }
  for (const auto& [name, strat] : strategies) {
    add(std::string("FlatFrontEnd/forward/") + name,
        [strat = strat](auto& st) { flat_front_end(st, strat, false); });
    add(std::string("FlatFrontEnd/forward_backward/") + name,
        [strat = strat](auto& st) { flat_front_end(st, strat, true); });
  }
  // The pooled path's other memory policies (DESIGN 3.8).
  add("FlatFrontEnd/forward/inference", [](auto& st) {
    flat_front_end(st, Strategy::pooled, false, dchag::MemoryPolicy::inference);
  });
  add("FlatFrontEnd/forward_backward/recompute",
      [](auto& st) { flat_front_end(st, Strategy::pooled, true, dchag::MemoryPolicy::recompute); });
  // bf16 storage of the images and tokens, float arithmetic (DESIGN 3.12).
  add("FlatFrontEnd/forward/bf16",
      [](auto& st) { flat_front_end<dchag::bf16>(st, Strategy::pooled, false); });
  add("FlatFrontEnd/forward_backward/bf16",
      [](auto& st) { flat_front_end<dchag::bf16>(st, Strategy::pooled, true); });
  add("DchagEmulation/forward_backward/linear",
      [groups](auto& st) { dchag_emulation(st, dchag::PartialKind::linear, groups); });
  add("DchagEmulation/forward_backward/cross_attention",
      [groups](auto& st) { dchag_emulation(st, dchag::PartialKind::cross_attention, groups); });
  for (auto* b : all) {
    b->ArgNames(kArgNames)->UseManualTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
    for (const auto& s : shapes) b->Args(args_of(s));
  }
}

/// "B:1,C:500" -> the flagship shape with those fields replaced.
Shape parse_shape(const std::string& text) {
  Shape s;
  std::int64_t* fields[] = {&s.B, &s.C, &s.H, &s.W, &s.p, &s.D, &s.heads};
  std::size_t pos = 0;
  while (pos < text.size()) {
    const std::size_t end = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, end - pos);
    const std::size_t colon = item.find(':');
    bool known = false;
    for (std::size_t i = 0; colon != std::string::npos && i < kArgNames.size(); ++i) {
      if (item.compare(0, colon, kArgNames[i]) == 0) {
        const std::string value = item.substr(colon + 1);
        char* rest = nullptr;
        const long long v = std::strtoll(value.c_str(), &rest, 10);
        if (value.empty() || *rest != '\0' || v < 1) {
          throw std::invalid_argument("--dchag_config: " + item + " is not a positive integer");
        }
        *fields[i] = v;
        known = true;
      }
    }
    if (!known) {
      throw std::invalid_argument("--dchag_config: '" + item +
                                  "' is not key:value with key one of B,C,H,W,p,D,heads");
    }
    pos = end + 1;
  }
  if (s.H % s.p != 0 || s.W % s.p != 0 || s.D % s.heads != 0) {
    throw std::invalid_argument("--dchag_config=" + text +
                                ": expected H and W multiples of p, and D a multiple of heads");
  }
  return s;
}

/// Removes the dchag flags from argv (Google Benchmark rejects flags it does not know).
void take_own_flags(int& argc, char** argv, std::vector<Shape>& shapes, int& groups,
                    int& profile_calls, dchag::MemoryPolicy& profile_memory) {
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--dchag_config=", 0) == 0) {
      shapes.push_back(parse_shape(arg.substr(std::strlen("--dchag_config="))));
    } else if (arg.rfind("--dchag_groups=", 0) == 0) {
      groups = std::atoi(arg.c_str() + std::strlen("--dchag_groups="));
      if (groups < 1) throw std::invalid_argument("--dchag_groups: expected a positive integer");
    } else if (arg.rfind("--dchag_profile_memory=", 0) == 0) {
      const std::string m = arg.substr(std::strlen("--dchag_profile_memory="));
      if (m == "keep") {
        profile_memory = dchag::MemoryPolicy::keep;
      } else if (m == "recompute") {
        profile_memory = dchag::MemoryPolicy::recompute;
      } else if (m == "inference") {
        profile_memory = dchag::MemoryPolicy::inference;
      } else {
        throw std::invalid_argument("--dchag_profile_memory: '" + m +
                                    "', expected keep, recompute or inference");
      }
    } else if (arg.rfind("--dchag_profile=", 0) == 0) {
      profile_calls = std::atoi(arg.c_str() + std::strlen("--dchag_profile="));
      if (profile_calls < 1) {
        throw std::invalid_argument("--dchag_profile: expected a positive number of calls");
      }
      if (!dchag::detail::runs_on_host<Exec>) {
        throw std::invalid_argument("--dchag_profile: needs a host execution space, not " +
                                    std::string(Exec::name()));
      }
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  argv[argc] = nullptr;
}

/// Only rank 0 writes: the others drop --benchmark_out and print nothing.
class SilentReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

std::string kokkos_version() {
  const int v = KOKKOS_VERSION;
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." +
         std::to_string(v % 100);
}

}  // namespace

int main(int argc, char** argv) {
  int rank = 0, ranks = 1;
#ifdef DCHAG_ENABLE_MPI
  // Kokkos may run host threads (OpenMP) beside this one; only this thread calls MPI.
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
#endif
  int status = 0;
#ifdef DCHAG_ENABLE_MPI
  dchag::initialize_on_local_device(argc, argv);  // one device per rank of a node
#else
  Kokkos::initialize(argc, argv);
#endif
  {
    std::vector<Shape> shapes;
    int groups = 4, profile_calls = 0;
    dchag::MemoryPolicy profile_memory = dchag::MemoryPolicy::keep;
    try {
      take_own_flags(argc, argv, shapes, groups, profile_calls, profile_memory);
    } catch (const std::exception& e) {
      if (rank == 0) std::fprintf(stderr, "dchag_bench: %s\n", e.what());
      status = 2;
    }
    if (status == 0 && profile_calls > 0) {
      if (shapes.empty()) shapes.push_back(Shape{});
      for (const auto& s : shapes) profile_flat(s, profile_calls, profile_memory);
    } else if (status == 0) {
      if (shapes.empty()) {
        for (std::int64_t c : {64, 128, 500}) {
          Shape s;
          s.C = c;
          shapes.push_back(s);
        }
      }
      if (rank > 0) {
        int kept = 1;
        for (int i = 1; i < argc; ++i) {
          if (std::strncmp(argv[i], "--benchmark_out", 15) != 0) argv[kept++] = argv[i];
        }
        argc = kept;
        argv[argc] = nullptr;
      }
      benchmark::Initialize(&argc, argv);
      if (benchmark::ReportUnrecognizedArguments(argc, argv)) {
        status = 1;
      } else {
        benchmark::AddCustomContext("kokkos_version", kokkos_version());
        benchmark::AddCustomContext("kokkos_execution_space", Exec::name());
        benchmark::AddCustomContext("kokkos_concurrency", std::to_string(Exec().concurrency()));
#ifdef KOKKOSKERNELS_ENABLE_TPL_BLAS
        benchmark::AddCustomContext("kokkoskernels_tpl_blas", "yes");
#else
        benchmark::AddCustomContext("kokkoskernels_tpl_blas", "no");
#endif
        const char* blas_threads = std::getenv("OPENBLAS_NUM_THREADS");
        benchmark::AddCustomContext("OPENBLAS_NUM_THREADS", blas_threads ? blas_threads : "unset");
        benchmark::AddCustomContext("dchag_version", DCHAG_BENCH_VERSION);
        benchmark::AddCustomContext("mpi_ranks", std::to_string(ranks));
#ifdef DCHAG_ENABLE_MPI
        {
          char library[MPI_MAX_LIBRARY_VERSION_STRING] = {};
          int length = 0;
          MPI_Get_library_version(library, &length);
          std::string first_line(library, static_cast<std::size_t>(length));
          first_line = first_line.substr(0, first_line.find_first_of("\n,"));
          benchmark::AddCustomContext("mpi_library", first_line);
        }
#endif
        benchmark::AddCustomContext("scalar", "float");
        benchmark::AddCustomContext("dchag_emulation_groups", std::to_string(groups));
        AllocationTracker::install();
        register_all(shapes, groups);
        if (rank == 0) {
          benchmark::RunSpecifiedBenchmarks();
        } else {
          SilentReporter silent;
          benchmark::RunSpecifiedBenchmarks(&silent);
        }
      }
      benchmark::Shutdown();
    }
  }
  Kokkos::finalize();
#ifdef DCHAG_ENABLE_MPI
  MPI_Finalize();
#endif
  return status;
}
