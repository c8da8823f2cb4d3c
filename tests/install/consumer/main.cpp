// Builds against an installed (or add_subdirectory'd) dchag and runs one Kokkos Kernels call.
// The entry header most users include; switch to it once it exists:
// #include <dchag/aggregate.hpp>
#include <dchag/aggregate.hpp>

#include <KokkosBlas1_dot.hpp>
#include <Kokkos_Core.hpp>
#include <cstdio>
#include <stdexcept>
#ifdef DCHAG_ENABLE_MPI
#include <mpi.h>
#endif

int main(int argc, char* argv[]) {
#ifdef DCHAG_ENABLE_MPI
  // Kokkos may run host threads (OpenMP) beside this one; only this thread calls MPI.
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
#endif
  Kokkos::initialize(argc, argv);
  bool ok = true;
  {
    Kokkos::View<double*> x("x", 8);
    Kokkos::deep_copy(x, 0.5);
    const double dot = KokkosBlas::dot(x, x);  // 8 * 0.25
    ok = ok && dot == 2.0;
    try {
      DCHAG_EXPECT(dot < 0.0, "dchag_consumer", "dot is ", dot, ", expected < 0");
      ok = false;
    } catch (const std::invalid_argument& e) {
      std::printf("%s\n", e.what());
    }
    std::printf("dchag consumer: %s (Kokkos %s, dot = %g)\n", ok ? "ok" : "FAILED",
                Kokkos::DefaultExecutionSpace::name(), dot);
  }
  Kokkos::finalize();
#ifdef DCHAG_ENABLE_MPI
  MPI_Finalize();
#endif
  return ok ? 0 : 1;
}
