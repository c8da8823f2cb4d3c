// dchag demo: one multi-channel image batch through every distributed mode on the ranks it is
// started on (scripts/demo.sh: 2 ranks), forward and backward. Rank 0 prints, per mode, the output
// checksum, the step time (median over steps, max over ranks) and the peak memory per rank.
//
//   mpiexec -n 2 dchag_demo [--C 128] [--D 128] [--heads 8] [--steps 3]
#include <dchag/device.hpp>
#include <dchag/distributed.hpp>
#include <dchag/memory.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;
using Scalar = float;

int arg(int argc, char** argv, const char* name, int fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
  return fallback;
}

struct Result {
  double checksum = 0;
  double step_ms = 0;
  double peak_mib = 0;
};

Result run(dchag::Mode mode, dchag::Strategy strategy, const dchag::FrontEndConfig& base,
           const dchag::Communicator& comm, int steps) {
  Exec exec;
  auto cfg = base;
  cfg.strategy = strategy;
  const int B = 1, L = cfg.patches();
  dchag::MemoryTracker memory;
  dchag::DistributedFrontEnd<Exec, Scalar> fe(exec, comm, cfg, mode,
                                              dchag::ChannelMap::blocks(cfg.channels, comm.size()));
  // Every rank holds the full image here (a simulation would hand over its own fields); each rank
  // reads only its channels, except tp_only, which tokenizes all of them everywhere.
  dchag::View4<Scalar, Mem> images("images", B, cfg.channels, cfg.height, cfg.width);
  Kokkos::parallel_for(
      "demo::fill", Kokkos::RangePolicy<Exec>(exec, 0, images.span()),
      KOKKOS_LAMBDA(const std::size_t i) {
        images.data()[i] = Scalar(((i * 2654435761u) % 1000) / 500.0 - 1.0);
      });
  dchag::View3<Scalar, Mem> out("out", B, L, cfg.dim), d_out("d_out", B, L, cfg.dim);
  Kokkos::deep_copy(d_out, Scalar(1) / Scalar(out.span()));
  std::vector<double> times;
  for (int s = 0; s < steps; ++s) {
    exec.fence();
    MPI_Barrier(comm.comm());
    const auto t0 = std::chrono::steady_clock::now();
    fe.zero_gradients(exec);
    fe.forward(exec, images, out, dchag::ImageInput::full_image);
    fe.backward(exec, d_out);
    exec.fence();
    double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    MPI_Allreduce(MPI_IN_PLACE, &ms, 1, MPI_DOUBLE, MPI_MAX, comm.comm());
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  Result r;
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), out);
  for (std::size_t i = 0; i < h.span(); ++i) r.checksum += h.data()[i];
  r.step_ms = times[times.size() / 2];
  double peak = double(memory.peak_bytes()) / (1 << 20);
  MPI_Allreduce(MPI_IN_PLACE, &peak, 1, MPI_DOUBLE, MPI_MAX, comm.comm());
  r.peak_mib = peak;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  // Kokkos may run host threads (OpenMP) beside this one, which MPI_THREAD_SINGLE rules out;
  // only this thread calls MPI.
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  dchag::initialize_on_local_device(argc, argv);  // one device per rank of a node
  int status = 0;
  try {
    dchag::Communicator comm(MPI_COMM_WORLD);
    dchag::FrontEndConfig cfg;
    cfg.channels = arg(argc, argv, "--C", 128);
    cfg.height = cfg.width = 64;
    cfg.patch = 8;
    cfg.dim = arg(argc, argv, "--D", 128);
    cfg.heads = arg(argc, argv, "--heads", 8);
    const int steps = arg(argc, argv, "--steps", 3);
    if (comm.rank() == 0) {
      std::printf("dchag demo: %d ranks, C=%d, %dx%d image, patch %d, D=%d, %d heads, B=1, %s\n",
                  comm.size(), cfg.channels, cfg.height, cfg.width, cfg.patch, cfg.dim, cfg.heads,
                  Exec::name());
      std::printf("%-13s %-13s %16s %14s %16s\n", "mode", "strategy", "output checksum",
                  "fwd+bwd ms", "peak MiB/rank");
    }
    struct Case {
      dchag::Mode mode;
      dchag::Strategy strategy;
    };
    for (const Case c : {Case{dchag::Mode::tp_only, dchag::Strategy::materialized},
                         Case{dchag::Mode::dchag_linear, dchag::Strategy::pooled},
                         Case{dchag::Mode::dchag_xattn, dchag::Strategy::pooled},
                         Case{dchag::Mode::exact_flat, dchag::Strategy::pooled}}) {
      const Result r = run(c.mode, c.strategy, cfg, comm, steps);
      if (comm.rank() == 0) {
        std::printf(
            "%-13s %-13s %16.6f %14.2f %16.1f\n", std::string(dchag::to_string(c.mode)).c_str(),
            std::string(dchag::to_string(c.strategy)).c_str(), r.checksum, r.step_ms, r.peak_mib);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dchag demo: %s\n", e.what());
    status = 1;
  }
  Kokkos::finalize();
  MPI_Finalize();
  return status;
}
