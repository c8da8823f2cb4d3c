// The one main of every dchag test executable: MPI (when enabled), then Kokkos, then Catch2.
// Linked in from the dchag_test_main library; test files only hold TEST_CASEs.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <Kokkos_Core.hpp>
#ifdef DCHAG_ENABLE_MPI
#include <mpi.h>
#include <dchag/device.hpp>
#endif

int main(int argc, char* argv[]) {
  int rank = 0;
#ifdef DCHAG_ENABLE_MPI
  // Kokkos may run host threads (OpenMP) beside this one, which MPI_THREAD_SINGLE rules out;
  // only this thread calls MPI.
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
#endif
  // Kokkos removes the --kokkos-* arguments it understands, so Catch2 never sees them. Under MPI
  // every rank of a node takes its own device.
#ifdef DCHAG_ENABLE_MPI
  dchag::initialize_on_local_device(argc, argv, MPI_COMM_WORLD);
#else
  Kokkos::initialize(argc, argv);
#endif
  int result = 0;
  {
    Catch::Session session;
    result = session.applyCommandLine(argc, argv);
    if (result == 0) {
      // Every rank runs every test. Rank 0 reports normally; the others, unless a reporter was
      // asked for, print only their failures and one summary line.
      if (rank > 0 && session.configData().reporterName == "console") {
        session.configData().reporterName = "compact";
      }
      result = session.run();
    }
  }
  Kokkos::finalize();
#ifdef DCHAG_ENABLE_MPI
  MPI_Finalize();
#endif
  return result;
}
