#pragma once
/// MPI plumbing behind dchag/communicator.hpp: error codes to exceptions.
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dchag/error.hpp"

namespace dchag::detail {

// ---------------------------------------------------------------------------------------------
// Errors

inline std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) {
    return concat("unknown MPI error code ", code);
  }
  return std::string(text, static_cast<std::size_t>(length));
}

/// Throws dchag::error("where: call failed: <MPI_Error_string>") unless code is MPI_SUCCESS.
/// Only meaningful on communicators whose error handler is MPI_ERRORS_RETURN (Communicator sets
/// it).
inline void check_mpi(int code, std::string_view where, std::string_view call) {
  if (code != MPI_SUCCESS) {
    throw error(concat(where, ": ", call, " failed: ", mpi_error_string(code)));
  }
}

}  // namespace dchag::detail

/// DCHAG_MPI_CHECK(where, MPI_Allreduce, args...) calls MPI_Allreduce(args...) and turns a failure
/// into dchag::error("where: MPI_Allreduce failed: <MPI error text>").
#define DCHAG_MPI_CHECK(where, mpi_function, ...) \
  ::dchag::detail::check_mpi(mpi_function(__VA_ARGS__), where, #mpi_function)
