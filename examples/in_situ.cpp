// In situ: a small simulation on Kokkos hands its own device arrays to dchag every N steps, with
// no copy. The simulation is the heat equation with one source per field (each field is a
// "channel": a tracer, a temperature of a layer) on a periodic 2-D grid, explicit Euler. The
// world is split into channel groups of `--group` ranks; each rank owns and steps only its own
// fields, and a D-CHAG front end over the group folds them into tokens (inference: nothing kept
// for a backward). Several groups run side by side in data parallel, each its own simulation
// (another diffusivity). Prints the time per dchag call and the fraction of the run spent in it,
// and checks that no call allocated memory the size of the fields (MemoryTracker): the fields
// go in as unmanaged views of the simulation's memory.
//
//   mpiexec -n 4 build/examples/dchag_in_situ --group 2 --fields 16 --grid 64 --steps 200
#include <dchag/distributed.hpp>
#include <dchag/memory.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;

struct Options {
  int group = 2;   // ranks per channel group
  int fields = 8;  // channels of the model (fields of the simulation)
  int grid = 32;   // H = W
  int steps = 40;  // simulation steps
  int every = 10;  // dchag call every N steps
  int dim = 64;    // token width D
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (k == "--group")
      o.group = v;
    else if (k == "--fields")
      o.fields = v;
    else if (k == "--grid")
      o.grid = v;
    else if (k == "--steps")
      o.steps = v;
    else if (k == "--every")
      o.every = v;
    else if (k == "--dim")
      o.dim = v;
    else {
      std::fprintf(stderr, "dchag_in_situ: unknown option %s\n", k.c_str());
      std::exit(2);
    }
  }
  return o;
}

// The simulation's state: this rank's fields [1, C_r, H, W], the layout dchag reads, a second
// buffer for the explicit update, and each field's source.
struct Heat {
  dchag::View4<float, Mem> u, next;
  dchag::View3<float, Mem> source;
  float kappa = 0;
};

// Field c (global id) has a Gaussian source centred at x = c / C.
dchag::View3<float, Mem> sources(const std::vector<int>& ids, int C, int N) {
  dchag::View3<float, Mem> s("in_situ::source", ids.size(), N, N);
  auto h = Kokkos::create_mirror_view(s);
  for (std::size_t j = 0; j < ids.size(); ++j)
    for (int y = 0; y < N; ++y)
      for (int x = 0; x < N; ++x) {
        const double dx = double(x) / N - double(ids[j]) / C, dy = double(y) / N - 0.5;
        h(j, y, x) = float(std::exp(-(dx * dx + dy * dy) * 50.0));
      }
  Kokkos::deep_copy(s, h);
  return s;
}

// One explicit Euler step of u_t = kappa * laplacian(u) + source on the periodic unit square.
void step(const Exec& exec, Heat& h) {
  const int Cr = static_cast<int>(h.u.extent(1)), N = static_cast<int>(h.u.extent(2));
  auto u = h.u;
  auto next = h.next;
  auto src = h.source;
  const float dt = 0.2f / float(N * N), k = h.kappa * float(N * N);
  Kokkos::parallel_for(
      "in_situ::heat_step", Kokkos::RangePolicy<Exec>(exec, 0, Cr * N * N),
      KOKKOS_LAMBDA(const int i) {
        const int j = i / (N * N), y = (i / N) % N, x = i % N;
        const float lap = u(0, j, (y + 1) % N, x) + u(0, j, (y + N - 1) % N, x) +
                          u(0, j, y, (x + 1) % N) + u(0, j, y, (x + N - 1) % N) -
                          4.0f * u(0, j, y, x);
        next(0, j, y, x) = u(0, j, y, x) + dt * (k * lap + src(j, y, x));
      });
  std::swap(h.u, h.next);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  Kokkos::initialize(argc, argv);
  int failed = 0;
  {
    const Options o = parse(argc, argv);
    int world_rank = 0, world_size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    if (world_size % o.group != 0) {
      if (world_rank == 0)
        std::fprintf(stderr, "dchag_in_situ: %d ranks do not split into groups of %d\n", world_size,
                     o.group);
      Kokkos::finalize();
      MPI_Finalize();
      return 2;
    }
    // Channel groups of consecutive ranks; replica r of the data-parallel copies is group r.
    const int replica = world_rank / o.group;
    MPI_Comm group_comm;
    MPI_Comm_split(MPI_COMM_WORLD, replica, world_rank, &group_comm);
    Exec exec;
    {
      dchag::Communicator comm(group_comm);
      dchag::FrontEndConfig cfg;
      cfg.channels = o.fields;
      cfg.height = cfg.width = o.grid;
      cfg.patch = 4;
      cfg.dim = o.dim;
      cfg.heads = 4;
      cfg.memory = dchag::MemoryPolicy::inference;  // in situ: a forward, nothing kept
      const auto map = dchag::ChannelMap::blocks(o.fields, o.group);
      dchag::DistributedFrontEnd<Exec, float> fe(exec, comm, cfg, dchag::Mode::dchag_xattn, map);

      Heat h;
      const auto& ids = fe.channels();       // the fields this rank owns and steps
      h.kappa = 0.01f * float(1 + replica);  // each replica simulates another diffusivity
      const std::size_t Cr = ids.size();
      h.source = sources(ids, o.fields, o.grid);
      h.u = dchag::View4<float, Mem>("in_situ::u", 1, Cr, o.grid, o.grid);
      h.next = dchag::View4<float, Mem>("in_situ::next", 1, Cr, o.grid, o.grid);
      dchag::View3<float, Mem> tokens("in_situ::tokens", 1, cfg.patches(), cfg.dim);
      const std::int64_t field_bytes = std::int64_t(sizeof(float)) * Cr * o.grid * o.grid;

      double dchag_seconds = 0, total_seconds = 0;
      int calls = 0;
      std::int64_t largest_allocation = 0;
      std::vector<double> previous;  // the last call's tokens, on the host
      const auto start = std::chrono::steady_clock::now();
      for (int s = 1; s <= o.steps; ++s) {
        step(exec, h);
        if (s % o.every != 0) continue;
        exec.fence();
        // The simulation's own memory, as dchag's images: an unmanaged view, no copy.
        const dchag::Unmanaged4<const float, Mem> images(h.u.data(), 1, Cr, o.grid, o.grid);
        const auto t0 = std::chrono::steady_clock::now();
        std::int64_t allocated = 0;
        {
          dchag::MemoryTracker tracker;
          fe.forward(exec, images, tokens);
          exec.fence();
          allocated = tracker.peak_bytes();
        }
        const double dt =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (calls > 0) largest_allocation = std::max(largest_allocation, allocated);
        dchag_seconds += dt;
        ++calls;
        // How far the tokens moved since the last call: the simulation evolves under them.
        auto ht = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), tokens);
        double moved = 0, norm = 0;
        for (std::size_t i = 0; i < ht.span(); ++i) {
          const double v = ht.data()[i], was = previous.empty() ? 0.0 : previous[i];
          moved = std::max(moved, std::abs(v - was));
          norm = std::max(norm, std::abs(v));
        }
        previous.assign(ht.data(), ht.data() + ht.span());
        if (comm.rank() == 0)
          std::printf("replica %d step %4d: dchag %.3f ms, max |tokens| %.4g, moved %.3g\n",
                      replica, s, 1e3 * dt, norm, calls == 1 ? 0.0 : moved);
      }
      total_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      // After the first call allocated the workspace, a call allocates nothing: in particular
      // nothing of the fields' size (the fields were read in place).
      const bool in_place = calls > 1 && largest_allocation < field_bytes;
      if (comm.rank() == 0) {
        std::printf(
            "replica %d summary: %d ranks x %zu fields of %dx%d, %d steps, %d dchag calls, "
            "%.3f ms per call, %.1f%% of the run in dchag; after the first call a call "
            "allocated at most %lld bytes (fields: %lld bytes): %s\n",
            replica, comm.size(), Cr, o.grid, o.grid, o.steps, calls,
            calls ? 1e3 * dchag_seconds / calls : 0.0,
            total_seconds > 0 ? 100.0 * dchag_seconds / total_seconds : 0.0,
            static_cast<long long>(largest_allocation), static_cast<long long>(field_bytes),
            in_place ? "no copy" : "COPIED");
      }
      failed = in_place ? 0 : 1;
    }
    MPI_Comm_free(&group_comm);
    int any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    failed = any;
  }
  Kokkos::finalize();
  MPI_Finalize();
  return failed;
}
