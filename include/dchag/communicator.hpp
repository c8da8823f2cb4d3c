#pragma once
/// The channel group's communicator and the collectives the distributed engine runs over it.
///
/// dchag never calls MPI_Init. A Communicator duplicates the caller's MPI_Comm (so dchag traffic
/// cannot match the caller's messages), sets MPI_ERRORS_RETURN on the duplicate and turns MPI
/// error codes into dchag::error. Copies share the duplicate; the last copy frees it, unless MPI
/// has already been finalized.
///
/// Every call here is collective over the communicator: all ranks must make the same calls in the
/// same order with matching sizes. Entry points check that with agree() / check_collectively()
/// before their first data collective, so a mismatch becomes an exception on every rank, not a
/// hang.
///
/// View collectives take the execution space first, fence it before MPI touches the data, and
/// require contiguous views of float, double, int or std::int64_t. Views MPI cannot read directly
/// are staged through host buffers unless DCHAG_ENABLE_GPU_AWARE_MPI is defined.
#include <mpi.h>

#include <Kokkos_Core.hpp>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "dchag/detail/mpi.hpp"
#include "dchag/error.hpp"

namespace dchag {

class Communicator {
 public:
  /// A named integer that must be equal on all ranks, for agree().
  struct Field {
    std::string_view name;
    std::int64_t value;
  };

  /// Collective over `comm`: duplicates it. Throws dchag::error when MPI is not initialized (or
  /// already finalized), std::invalid_argument when comm is MPI_COMM_NULL.
  explicit Communicator(MPI_Comm comm) {
    constexpr const char* where = "dchag::Communicator";
    int initialized = 0;
    int finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized) {
      throw error(detail::concat(where, ": MPI is ",
                                 finalized ? "already finalized" : "not initialized",
                                 "; initialize MPI (MPI_Init or MPI_Init_thread) before creating a "
                                 "dchag::Communicator and destroy it before MPI_Finalize"));
    }
    DCHAG_THROW_IF(comm == MPI_COMM_NULL, where,
                   "comm is MPI_COMM_NULL, expected a valid communicator");
    // MPI_Comm_dup runs under the caller's error handler: we must not change theirs.
    auto owned = std::unique_ptr<MPI_Comm>(new MPI_Comm(MPI_COMM_NULL));
    DCHAG_MPI_CHECK(where, MPI_Comm_dup, comm, owned.get());
    comm_ = std::shared_ptr<MPI_Comm>(owned.release(), FreeComm{});
    staging_ = std::make_shared<detail::StagingArena>();
    DCHAG_MPI_CHECK(where, MPI_Comm_set_errhandler, *comm_, MPI_ERRORS_RETURN);
    DCHAG_MPI_CHECK(where, MPI_Comm_rank, *comm_, &rank_);
    DCHAG_MPI_CHECK(where, MPI_Comm_size, *comm_, &size_);
  }

  // Copies share the duplicate. No move operations on purpose: a moved-from Communicator would
  // hold no communicator, so moving copies instead.
  Communicator(const Communicator&) = default;
  Communicator& operator=(const Communicator&) = default;
  ~Communicator() = default;

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  /// The duplicate (not the communicator passed in); valid while any copy of *this lives.
  MPI_Comm comm() const noexcept { return *comm_; }

  /// Host memory the collectives stage device Views through when MPI cannot read device memory
  /// (no DCHAG_ENABLE_GPU_AWARE_MPI); shared by the copies of this Communicator and kept across
  /// calls. Local, not collective.
  detail::StagingArena* staging() const noexcept { return staging_.get(); }
  /// Grows the staging memory to at least `bytes` now, so that later collectives allocate nothing.
  void reserve_staging(std::size_t bytes) const { staging_->reserve(bytes); }

  /// Collective: throws dchag::error on every rank unless every field has the same value on all
  /// ranks. One MPI_Allreduce of 2·fields.size() integers. All ranks must pass the same names in
  /// the same order. Message: "where: ranks disagree on D (rank values range 96..128, this rank
  /// has 96)".
  void agree(std::string_view where, std::initializer_list<Field> fields) const {
    agree(where, std::span<const Field>(fields.begin(), fields.size()));
  }
  void agree(std::string_view where, std::span<const Field> fields) const;

  /// Collective: if `local_failure` is set on any rank, throws on every rank. Ranks that failed
  /// rethrow their own exception; the others throw dchag::error("where: rank r failed validation:
  /// <what() of rank r>") where r is the lowest failing rank. Costs one MPI_Allreduce of two ints
  /// when nobody failed, plus two MPI_Bcast when somebody did.
  void all_ok(std::string_view where, const std::exception_ptr& local_failure) const;

  /// Collective: runs validate() (purely local: it must not communicate) and then all_ok(), so
  /// that an exception from validate() on any rank becomes an exception on every rank.
  template <class Validate>
  requires std::invocable<Validate&>
  void check_collectively(std::string_view where, Validate&& validate) const {
    std::exception_ptr failure;
    try {
      std::invoke(validate);
    } catch (...) {
      failure = std::current_exception();
    }
    all_ok(where, failure);
  }

 private:
  struct FreeComm {
    void operator()(MPI_Comm* comm) const noexcept {
      int initialized = 0;
      int finalized = 0;
      MPI_Initialized(&initialized);
      MPI_Finalized(&finalized);
      // After MPI_Finalize the handle is gone with MPI itself; freeing it then is an error.
      if (initialized && !finalized && *comm != MPI_COMM_NULL) MPI_Comm_free(comm);
      delete comm;
    }
  };

  std::shared_ptr<MPI_Comm> comm_;
  std::shared_ptr<detail::StagingArena> staging_;
  int rank_ = 0;
  int size_ = 1;
};

/// Gathers `send` (N contiguous elements on every rank) into `recv` (P·N contiguous elements),
/// rank r's elements at recv.data() + r·N. N must be the same on all ranks.
template <class ExecSpace, detail::KokkosView SendView, detail::KokkosView RecvView>
void allgather(const ExecSpace& exec, const Communicator& comm, const SendView& send,
               const RecvView& recv) {
  detail::MpiProfilingRegion region("dchag::allgather");
  detail::allgather<false>("dchag::allgather", exec, comm.comm(), comm.size(), send, recv,
                           comm.staging());
}

/// In place: every rank's `view` becomes the element-wise sum over ranks.
template <class ExecSpace, detail::KokkosView View>
void allreduce_sum(const ExecSpace& exec, const Communicator& comm, const View& view) {
  detail::MpiProfilingRegion region("dchag::allreduce_sum");
  detail::allreduce<false>("dchag::allreduce_sum", exec, comm.comm(), view, MPI_SUM,
                           comm.staging());
}

/// In place: every rank's `view` becomes the element-wise maximum over ranks.
template <class ExecSpace, detail::KokkosView View>
void allreduce_max(const ExecSpace& exec, const Communicator& comm, const View& view) {
  detail::MpiProfilingRegion region("dchag::allreduce_max");
  detail::allreduce<false>("dchag::allreduce_max", exec, comm.comm(), view, MPI_MAX,
                           comm.staging());
}

/// Copies `view` of rank `root` into `view` of every other rank.
template <class ExecSpace, detail::KokkosView View>
void broadcast(const ExecSpace& exec, const Communicator& comm, const View& view, int root) {
  detail::MpiProfilingRegion region("dchag::broadcast");
  detail::broadcast<false>("dchag::broadcast", exec, comm.comm(), comm.rank(), comm.size(), view,
                           root, comm.staging());
}

enum class GradientReduction { sum, mean };

/// Data-parallel helper: all-reduces each gradient view in place over `comm` (sum, or mean =
/// sum/P). Views must hold float or double and be contiguous; all ranks must pass the same number
/// of views with the same sizes, which is checked (one small all-reduce) before any gradient moves.
/// The mean's scaling is enqueued on `exec`.
template <class ExecSpace, detail::KokkosView... Grads>
void sum_gradients(const ExecSpace& exec, const Communicator& comm, GradientReduction how,
                   const Grads&... grads) {
  constexpr const char* where = "dchag::sum_gradients";
  static_assert((std::is_floating_point_v<typename Grads::non_const_value_type> && ...),
                "dchag::sum_gradients: gradient views must hold float or double");
  detail::MpiProfilingRegion region(where);
  (detail::check_mpi_view<ExecSpace>(where, "gradient", grads), ...);
  const auto total = (std::int64_t{0} + ... + static_cast<std::int64_t>(grads.size()));
  comm.agree(where, {{"number of gradient views", static_cast<std::int64_t>(sizeof...(Grads))},
                     {"total gradient elements", total}});
  (detail::allreduce<false>(where, exec, comm.comm(), grads, MPI_SUM, comm.staging()), ...);
  if (how == GradientReduction::mean && comm.size() > 1) {
    (detail::scale_in_place("dchag::sum_gradients::mean", exec, grads,
                            typename Grads::non_const_value_type(1) /
                                static_cast<typename Grads::non_const_value_type>(comm.size())),
     ...);
  }
}

/// sum_gradients(exec, comm, GradientReduction::sum, grads...).
template <class ExecSpace, detail::KokkosView... Grads>
void sum_gradients(const ExecSpace& exec, const Communicator& comm, const Grads&... grads) {
  sum_gradients(exec, comm, GradientReduction::sum, grads...);
}

// ---------------------------------------------------------------------------------------------

inline void Communicator::agree(std::string_view where, std::span<const Field> fields) const {
  const std::size_t n = fields.size();
  if (n == 0) return;
  // [v..., ~v...] under MPI_MAX gives max v and ~min v in one call; ~ cannot overflow, unary minus
  // could (INT64_MIN).
  std::vector<std::int64_t> extremes(2 * n);
  for (std::size_t i = 0; i < n; ++i) {
    extremes[i] = fields[i].value;
    extremes[n + i] = ~fields[i].value;
  }
  DCHAG_MPI_CHECK(where, MPI_Allreduce, MPI_IN_PLACE, extremes.data(), static_cast<int>(2 * n),
                  MPI_INT64_T, MPI_MAX, comm());
  std::string mismatches;
  for (std::size_t i = 0; i < n; ++i) {
    const std::int64_t max = extremes[i];
    const std::int64_t min = ~extremes[n + i];
    if (min == max) continue;
    if (!mismatches.empty()) mismatches += "; ";
    mismatches += detail::concat("ranks disagree on ", fields[i].name, " (rank values range ", min,
                                 "..", max, ", this rank has ", fields[i].value, ")");
  }
  if (!mismatches.empty()) throw error(detail::concat(where, ": ", mismatches));
}

inline void Communicator::all_ok(std::string_view where,
                                 const std::exception_ptr& local_failure) const {
  const bool failed = static_cast<bool>(local_failure);
  // Under MPI_MAX: size - (lowest failing rank), and 1 + (highest failing rank); 0 if none failed.
  int extremes[2] = {failed ? size_ - rank_ : 0, failed ? rank_ + 1 : 0};
  DCHAG_MPI_CHECK(where, MPI_Allreduce, MPI_IN_PLACE, extremes, 2, MPI_INT, MPI_MAX, comm());
  if (extremes[0] == 0) return;
  const int lowest = size_ - extremes[0];
  const int highest = extremes[1] - 1;

  std::string message;
  if (rank_ == lowest) {
    try {
      std::rethrow_exception(local_failure);
    } catch (const std::exception& e) {
      message = e.what();
    } catch (...) {
      message = "an exception not derived from std::exception";
    }
  }
  int length = static_cast<int>(message.size());
  DCHAG_MPI_CHECK(where, MPI_Bcast, &length, 1, MPI_INT, lowest, comm());
  message.resize(static_cast<std::size_t>(length));
  DCHAG_MPI_CHECK(where, MPI_Bcast, message.data(), length, MPI_CHAR, lowest, comm());

  if (failed) std::rethrow_exception(local_failure);
  if (lowest == highest) {
    throw error(detail::concat(where, ": rank ", lowest, " failed validation: ", message));
  }
  throw error(detail::concat(where, ": ranks ", lowest, " to ", highest,
                             " (some or all of them) failed validation; rank ", lowest, ": ",
                             message));
}

}  // namespace dchag
