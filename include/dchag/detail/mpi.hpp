#pragma once
/// MPI plumbing behind dchag/communicator.hpp: error codes to exceptions, value types to MPI
/// datatypes, and the buffer that hands a View's memory to MPI (directly, or through a host copy
/// when MPI cannot read the View's memory space).
#include <mpi.h>

#include <Kokkos_Core.hpp>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

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

namespace dchag::detail {

/// Kokkos Tools region around one collective, popped on every exit path (Kokkos::Profiling::
/// ScopedRegion only exists from Kokkos 4.1).
class MpiProfilingRegion {
 public:
  explicit MpiProfilingRegion(const std::string& name) { Kokkos::Profiling::pushRegion(name); }
  ~MpiProfilingRegion() { Kokkos::Profiling::popRegion(); }
  MpiProfilingRegion(const MpiProfilingRegion&) = delete;
  MpiProfilingRegion& operator=(const MpiProfilingRegion&) = delete;
};

// ---------------------------------------------------------------------------------------------
// Value types

template <class T>
inline constexpr bool is_mpi_scalar_v = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                        std::is_same_v<T, int> || std::is_same_v<T, std::int64_t>;

template <class T>
MPI_Datatype mpi_datatype() {
  static_assert(is_mpi_scalar_v<T>,
                "dchag MPI collectives move views of float, double, int or std::int64_t only");
  if constexpr (std::is_same_v<T, float>) {
    return MPI_FLOAT;
  } else if constexpr (std::is_same_v<T, double>) {
    return MPI_DOUBLE;
  } else if constexpr (std::is_same_v<T, int>) {
    return MPI_INT;
  } else {
    return MPI_INT64_T;
  }
}

template <class View>
concept KokkosView = Kokkos::is_view<View>::value;

// ---------------------------------------------------------------------------------------------
// Views handed to MPI

/// Whether MPI needs a host copy of memory in MemSpace. GPU-aware MPI is a build-time promise
/// (DCHAG_ENABLE_GPU_AWARE_MPI) because it cannot be detected portably.
template <class MemSpace>
inline constexpr bool mpi_needs_host_staging =
#ifdef DCHAG_ENABLE_GPU_AWARE_MPI
    false;
#else
    !Kokkos::SpaceAccessibility<Kokkos::HostSpace, MemSpace>::accessible;
#endif

/// Argument checks shared by all view collectives. `name` is the argument's name in messages.
template <class Exec, KokkosView View>
void check_mpi_view(std::string_view where, std::string_view name, const View& view) {
  static_assert(Kokkos::is_execution_space<Exec>::value,
                "dchag MPI collectives take a Kokkos execution space instance first");
  static_assert(Kokkos::SpaceAccessibility<Exec, typename View::memory_space>::accessible,
                "dchag MPI collectives: the execution space cannot access the view's memory space");
  static_assert(is_mpi_scalar_v<typename View::non_const_value_type>,
                "dchag MPI collectives move views of float, double, int or std::int64_t only");
  DCHAG_EXPECT(view.span_is_contiguous(), where, name,
               " is not contiguous, expected a view whose elements are contiguous in memory "
               "(e.g. LayoutRight or LayoutLeft without padding or strides)");
  DCHAG_EXPECT(view.size() <= static_cast<std::size_t>(INT_MAX), where, name, ".size() is ",
               view.size(), ", expected at most ", INT_MAX, " elements per MPI call");
}

/// Host memory for staging Views through, kept across calls: it grows when a call needs more and
/// is otherwise reused, so steady-state collectives allocate nothing. A Kokkos View, so Kokkos
/// Tools (MemoryTracker) see it. Shared by the copies of a Communicator.
class StagingArena {
 public:
  /// At least `bytes` of host memory, aligned for any scalar type, valid until the next reserve.
  void* reserve(std::size_t bytes) {
    const std::size_t words = (bytes + sizeof(double) - 1) / sizeof(double);
    if (words > memory_.extent(0)) {
      memory_ = Kokkos::View<double*, Kokkos::HostSpace>();
      memory_ = Kokkos::View<double*, Kokkos::HostSpace>(
          Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("dchag::mpi_host_staging")),
          words);
    }
    return memory_.data();
  }
  std::size_t bytes() const { return memory_.extent(0) * sizeof(double); }

 private:
  Kokkos::View<double*, Kokkos::HostSpace> memory_;
};

/// Bytes a staged buffer of `n` elements of T takes in an arena, rounded to keep the next aligned.
template <class T>
constexpr std::size_t staged_bytes(std::size_t n) {
  return (n * sizeof(T) + sizeof(double) - 1) / sizeof(double) * sizeof(double);
}

/// The memory MPI reads or writes for one contiguous View.
///
/// Without staging, data() is view.data() after a fence of `exec`. With staging (Stage = true), a
/// host buffer of view.size() elements is filled from the view (when copy_in) and fenced; after the
/// MPI call, copy_out() writes it back and fences so the buffer can be released. Stage is a
/// template parameter so tests can run the staged path on host memory too.
template <class Exec, KokkosView View,
          bool Stage = mpi_needs_host_staging<typename View::memory_space>>
class MpiBuffer {
 public:
  using value_type = typename View::non_const_value_type;

  /// `host`: where to stage (staged_bytes<value_type>(view.size()) bytes), or nullptr to allocate.
  MpiBuffer(const Exec& exec, const View& view, bool copy_in, void* host = nullptr)
      : exec_(exec), view_(view) {
    if constexpr (Stage) {
      // Host memory rather than create_mirror_view: the View is contiguous, so a flat copy of its
      // span is its content whatever its rank and layout, and the buffer is always separate
      // (create_mirror_view would alias host memory when Stage is forced).
      if (host != nullptr) {
        host_ = host_view(static_cast<value_type*>(host), view.size());
      } else {
        host_ = host_view(
            Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("dchag::mpi_host_staging")),
            view.size());
      }
      if (copy_in) Kokkos::deep_copy(exec_, host_, flat());
    } else {
      (void)host;
    }
    exec_.fence();
  }

  MpiBuffer(const MpiBuffer&) = delete;
  MpiBuffer& operator=(const MpiBuffer&) = delete;

  auto* data() const {
    if constexpr (Stage) {
      return host_.data();
    } else {
      return view_.data();
    }
  }
  int count() const { return static_cast<int>(view_.size()); }

  /// Makes what MPI wrote visible in the View.
  void copy_out() {
    if constexpr (Stage) {
      static_assert(!std::is_const_v<typename View::value_type>,
                    "dchag MPI collectives cannot write into a view of const");
      Kokkos::deep_copy(exec_, flat(), host_);
      exec_.fence();
    }
  }

 private:
  using host_view = Kokkos::View<value_type*, Kokkos::HostSpace>;
  using flat_view = Kokkos::View<typename View::value_type*, typename View::memory_space,
                                 Kokkos::MemoryUnmanaged>;

  flat_view flat() const { return flat_view(view_.data(), view_.size()); }

  Exec exec_;
  View view_;
  host_view host_;
};

// ---------------------------------------------------------------------------------------------
// Collectives on a raw communicator. The public wrappers in dchag/communicator.hpp pass
// ForceStaging = false; tests pass true to run the host-staging path without a device.

template <bool ForceStaging, class Exec, KokkosView View>
using mpi_buffer_t =
    MpiBuffer<Exec, View, ForceStaging || mpi_needs_host_staging<typename View::memory_space>>;

inline bool overlaps(const void* a, std::size_t a_bytes, const void* b, std::size_t b_bytes) {
  const auto a0 = reinterpret_cast<std::uintptr_t>(a);
  const auto b0 = reinterpret_cast<std::uintptr_t>(b);
  return a_bytes > 0 && b_bytes > 0 && a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

/// Staging memory for views of `n` elements of T each, from `arena` (nullptr: none, allocate).
template <bool Stage, class T>
void* staging_for(StagingArena* arena, std::size_t n0, std::size_t n1, void** second) {
  *second = nullptr;
  if (!Stage || arena == nullptr) return nullptr;
  auto* base =
      static_cast<unsigned char*>(arena->reserve(staged_bytes<T>(n0) + staged_bytes<T>(n1)));
  *second = base + staged_bytes<T>(n0);
  return base;
}

template <bool ForceStaging, class Exec, KokkosView SendView, KokkosView RecvView>
void allgather(std::string_view where, const Exec& exec, MPI_Comm comm, int comm_size,
               const SendView& send, const RecvView& recv, StagingArena* arena = nullptr) {
  using T = typename SendView::non_const_value_type;
  static_assert(std::is_same_v<T, typename RecvView::non_const_value_type>,
                "dchag::allgather: send and recv views must hold the same value type");
  static_assert(!std::is_const_v<typename RecvView::value_type>,
                "dchag::allgather: recv must be a view of non-const");
  check_mpi_view<Exec>(where, "send", send);
  check_mpi_view<Exec>(where, "recv", recv);
  DCHAG_EXPECT(recv.size() == static_cast<std::size_t>(comm_size) * send.size(), where,
               "recv.size() is ", recv.size(),
               ", expected communicator size * send.size() = ", comm_size, " * ", send.size(),
               " = ", static_cast<std::size_t>(comm_size) * send.size());
  DCHAG_EXPECT(
      !overlaps(send.data(), send.size() * sizeof(T), recv.data(), recv.size() * sizeof(T)), where,
      "send and recv overlap in memory, expected separate buffers");

  constexpr bool stage = ForceStaging || mpi_needs_host_staging<typename SendView::memory_space> ||
                         mpi_needs_host_staging<typename RecvView::memory_space>;
  void* recv_host = nullptr;
  void* send_host = staging_for<stage, T>(arena, send.size(), recv.size(), &recv_host);
  mpi_buffer_t<ForceStaging, Exec, SendView> send_buffer(exec, send, /*copy_in=*/true, send_host);
  mpi_buffer_t<ForceStaging, Exec, RecvView> recv_buffer(exec, recv, /*copy_in=*/false, recv_host);
  DCHAG_MPI_CHECK(where, MPI_Allgather, send_buffer.data(), send_buffer.count(), mpi_datatype<T>(),
                  recv_buffer.data(), send_buffer.count(), mpi_datatype<T>(), comm);
  recv_buffer.copy_out();
}

template <bool ForceStaging, class Exec, KokkosView View>
void allreduce(std::string_view where, const Exec& exec, MPI_Comm comm, const View& view, MPI_Op op,
               StagingArena* arena = nullptr) {
  using T = typename View::non_const_value_type;
  static_assert(!std::is_const_v<typename View::value_type>,
                "dchag all-reduce works in place: the view must be of non-const");
  check_mpi_view<Exec>(where, "view", view);
  constexpr bool stage = ForceStaging || mpi_needs_host_staging<typename View::memory_space>;
  void* unused = nullptr;
  mpi_buffer_t<ForceStaging, Exec, View> buffer(
      exec, view, /*copy_in=*/true, staging_for<stage, T>(arena, view.size(), 0, &unused));
  DCHAG_MPI_CHECK(where, MPI_Allreduce, MPI_IN_PLACE, buffer.data(), buffer.count(),
                  mpi_datatype<T>(), op, comm);
  buffer.copy_out();
}

template <bool ForceStaging, class Exec, KokkosView View>
void broadcast(std::string_view where, const Exec& exec, MPI_Comm comm, int comm_rank,
               int comm_size, const View& view, int root, StagingArena* arena = nullptr) {
  using T = typename View::non_const_value_type;
  static_assert(!std::is_const_v<typename View::value_type>,
                "dchag::broadcast: the view is written on non-root ranks, it must be of non-const");
  check_mpi_view<Exec>(where, "view", view);
  DCHAG_EXPECT(root >= 0 && root < comm_size, where, "root is ", root, ", expected 0 <= root < ",
               comm_size);
  constexpr bool stage = ForceStaging || mpi_needs_host_staging<typename View::memory_space>;
  void* unused = nullptr;
  mpi_buffer_t<ForceStaging, Exec, View> buffer(
      exec, view, /*copy_in=*/comm_rank == root,
      staging_for<stage, T>(arena, view.size(), 0, &unused));
  DCHAG_MPI_CHECK(where, MPI_Bcast, buffer.data(), buffer.count(), mpi_datatype<T>(), root, comm);
  if (comm_rank != root) buffer.copy_out();
}

/// view[i] *= factor for every element of a contiguous view, enqueued on exec.
template <class Exec, KokkosView View>
void scale_in_place(const char* label, const Exec& exec, const View& view,
                    typename View::non_const_value_type factor) {
  auto* data = view.data();
  using Policy = Kokkos::RangePolicy<Exec, Kokkos::IndexType<std::size_t>>;
  Kokkos::parallel_for(
      label, Policy(exec, std::size_t{0}, view.size()),
      KOKKOS_LAMBDA(const std::size_t i) { data[i] *= factor; });
}

}  // namespace dchag::detail
