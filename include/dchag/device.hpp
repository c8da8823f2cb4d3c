#pragma once
/// One device per rank (DESIGN 4). The ranks of a node are numbered by
/// MPI_Comm_split_type(MPI_COMM_TYPE_SHARED); node-local rank r uses visible device r % devices.
/// Use `initialize_on_local_device` instead of Kokkos::initialize(argc, argv), after MPI_Init, or
/// `node_placement` to pick the device yourself. A device named on the command line
/// (--kokkos-device-id, or Kokkos' --kokkos-map-device-id-by) or in the environment
/// (KOKKOS_DEVICE_ID) wins over the helper's choice.
#include <mpi.h>

#include <Kokkos_Core.hpp>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "dchag/detail/kokkos_compat.hpp"
#include "dchag/detail/mpi.hpp"
#include "dchag/error.hpp"

namespace dchag {

/// Where this rank sits on its node and the device it should use.
struct NodePlacement {
  int local_rank = 0;  ///< rank among the ranks of `comm` on this node
  int local_size = 1;  ///< ranks of `comm` on this node
  int devices = 0;     ///< devices visible to this process (0: none, or not known before init)
  int device_id = -1;  ///< local_rank % devices, or -1 without devices
};

/// Collective over `comm`; callable before Kokkos::initialize. `devices` overrides the number of
/// visible devices (Kokkos 4.3 and later count them; earlier versions need it given).
inline NodePlacement node_placement(MPI_Comm comm, int devices = -1) {
  constexpr const char* where = "dchag::node_placement";
  NodePlacement p;
  MPI_Comm node = MPI_COMM_NULL;
  DCHAG_MPI_CHECK(where, MPI_Comm_split_type, comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  const int rank_code = MPI_Comm_rank(node, &p.local_rank);
  const int size_code = MPI_Comm_size(node, &p.local_size);
  MPI_Comm_free(&node);
  detail::check_mpi(rank_code, where, "MPI_Comm_rank");
  detail::check_mpi(size_code, where, "MPI_Comm_size");
  p.devices = devices >= 0 ? devices : detail::visible_devices();
  p.device_id = p.devices > 0 ? p.local_rank % p.devices : -1;
  return p;
}

namespace detail {
inline bool names_device(int argc, char* argv[]) {
  if (std::getenv("KOKKOS_DEVICE_ID") != nullptr) return true;
  // Every spelling Kokkos 3.4 to 4.x reads (--kokkos-device-id, --device-id, --kokkos-device,
  // the device counts of 3.x, the mapping strategy of 4.x).
  constexpr std::string_view flags[] = {"--kokkos-device",      "--device",
                                        "--kokkos-num-devices", "--num-devices",
                                        "--kokkos-ndevices",    "--kokkos-map-device-id-by"};
  for (int i = 1; i < argc; ++i) {
    const std::string_view a(argv[i]);
    for (const auto f : flags)
      if (a.rfind(f, 0) == 0) return true;
  }
  return false;
}
}  // namespace detail

/// Kokkos::initialize(argc, argv) on this rank's node-local device (see node_placement), unless
/// the command line or the environment names a device. Kokkos removes the arguments it reads
/// from argc/argv, as Kokkos::initialize does. Collective over `comm`.
inline NodePlacement initialize_on_local_device(int& argc, char* argv[],
                                                MPI_Comm comm = MPI_COMM_WORLD, int devices = -1) {
  const NodePlacement p = node_placement(comm, devices);
  if (p.device_id < 0 || detail::names_device(argc, argv)) {
    Kokkos::initialize(argc, argv);
    return p;
  }
  // argv with the device flag appended; Kokkos consumes it and what it knows of the rest.
  std::string flag = std::string("--kokkos-device-id=") + std::to_string(p.device_id);
  std::vector<char*> args(argv, argv + argc);
  args.push_back(flag.data());
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  Kokkos::initialize(n, args.data());
  // Hand back what Kokkos left of the caller's arguments (the appended flag is always consumed).
  argc = 0;
  for (int i = 0; i < n; ++i)
    if (args[i] != flag.data()) argv[argc++] = args[i];
  argv[argc] = nullptr;
  return p;
}

}  // namespace dchag
