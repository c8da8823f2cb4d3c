// Tests of dchag::Communicator and the view collectives. They run at any number of ranks.
//
// Every rank executes every collective: a test may branch on the rank only around local checks,
// never around a call that communicates, so one rank failing a check cannot leave the others
// waiting in a collective.
#include <mpi.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

#include "dchag/communicator.hpp"

using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;
using dchag::Communicator;

namespace {

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

/// Runs `call` and returns what it threw (nullptr if nothing), so that every rank makes the call
/// and the checks on the outcome, which may differ by rank, come afterwards.
template <class F>
std::exception_ptr outcome(F&& call) {
  try {
    call();
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

template <class E>
std::string message_if(const std::exception_ptr& thrown) {
  try {
    if (thrown) std::rethrow_exception(thrown);
  } catch (const E& e) {
    return e.what();
  } catch (...) {
    return "<exception of another type>";
  }
  return "<nothing thrown>";
}

}  // namespace

TEST_CASE("Communicator duplicates the caller's communicator", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  CHECK(comm.comm() != MPI_COMM_WORLD);
  int relation = MPI_UNEQUAL;
  MPI_Comm_compare(comm.comm(), MPI_COMM_WORLD, &relation);
  CHECK(relation == MPI_CONGRUENT);
  CHECK(comm.rank() == world_rank());
  CHECK(comm.size() == world_size());

  MPI_Errhandler handler;
  MPI_Comm_get_errhandler(comm.comm(), &handler);
  CHECK(handler == MPI_ERRORS_RETURN);
  MPI_Errhandler_free(&handler);

  // Copies share the duplicate rather than duplicating again.
  const Communicator copy = comm;
  CHECK(copy.comm() == comm.comm());
  Communicator moved_from = comm;
  const Communicator moved = std::move(moved_from);
  CHECK(moved.comm() == comm.comm());
  CHECK(moved_from.comm() == comm.comm());  // "moving" copies: no empty state

  // Two Communicators from the same MPI_Comm are separate duplicates.
  const Communicator other(MPI_COMM_WORLD);
  CHECK(other.comm() != comm.comm());
}

TEST_CASE("Communicator rejects MPI_COMM_NULL", "[mpi]") {
  CHECK_THROWS_AS(Communicator(MPI_COMM_NULL), std::invalid_argument);
  CHECK_THROWS_WITH(Communicator(MPI_COMM_NULL),
                    "dchag::Communicator: comm is MPI_COMM_NULL, expected a valid communicator");
}

TEST_CASE("Communicator outlives the communicator it was made from", "[mpi]") {
  std::optional<Communicator> comm;
  {
    MPI_Comm callers = MPI_COMM_NULL;
    MPI_Comm_dup(MPI_COMM_WORLD, &callers);
    comm.emplace(callers);
    MPI_Comm_free(&callers);
  }
  // Still communicates: a sum over ranks through the duplicate.
  int ones = 1;
  DCHAG_MPI_CHECK("dchag::test", MPI_Allreduce, MPI_IN_PLACE, &ones, 1, MPI_INT, MPI_SUM,
                  comm->comm());
  CHECK(ones == world_size());
  comm.reset();  // frees the duplicate; the caller's handle is long gone
  SUCCEED("destroyed after the caller's communicator was freed");
}

TEST_CASE("Communicator released after MPI_Finalize does not call MPI", "[mpi]") {
  // Destroyed during static destruction, after the test main has finalized MPI: the deleter must
  // notice MPI_Finalized and skip MPI_Comm_free (calling it would abort the process at exit).
  static std::optional<Communicator> survivor;
  survivor.emplace(MPI_COMM_WORLD);
  CHECK(survivor->size() == world_size());
}

TEST_CASE("agree passes when all ranks pass the same values", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  CHECK_NOTHROW(comm.agree("dchag::test", {{"D", 128}, {"heads", 8}, {"C", 500}}));
  CHECK_NOTHROW(comm.agree("dchag::test", {}));
  const std::int64_t big = std::numeric_limits<std::int64_t>::max();
  const std::int64_t small = std::numeric_limits<std::int64_t>::min();
  CHECK_NOTHROW(comm.agree("dchag::test", {{"max", big}, {"min", small}}));
}

TEST_CASE("agree throws on every rank when one rank differs", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  const bool odd_one = comm.rank() == comm.size() - 1;
  const auto thrown = outcome([&] {
    comm.agree("dchag::DistributedFrontEnd::forward",
               {{"heads", 8}, {"D", odd_one ? 96 : 128}, {"patch", 4}});
  });
  if (comm.size() == 1) {
    CHECK_FALSE(thrown);  // a single rank always agrees with itself
  } else {
    CHECK(message_if<dchag::error>(thrown) ==
          "dchag::DistributedFrontEnd::forward: ranks disagree on D (rank values range 96..128, "
          "this rank has " +
              std::to_string(odd_one ? 96 : 128) + ")");
  }
}

TEST_CASE("agree reports every field that differs, at the int64 extremes too", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  const std::int64_t big = std::numeric_limits<std::int64_t>::max();
  const std::int64_t small = std::numeric_limits<std::int64_t>::min();
  const bool first = comm.rank() == 0;
  const auto thrown = outcome([&] {
    comm.agree("dchag::test", {{"a", first ? small : big}, {"b", 1}, {"c", comm.rank()}});
  });
  if (comm.size() == 1) {
    CHECK_FALSE(thrown);
  } else {
    const auto message = message_if<dchag::error>(thrown);
    CHECK_THAT(message, StartsWith("dchag::test: ranks disagree on a (rank values range " +
                                   std::to_string(small) + ".." + std::to_string(big)));
    CHECK_THAT(message, Contains("; ranks disagree on c (rank values range 0.." +
                                 std::to_string(comm.size() - 1) + ", this rank has " +
                                 std::to_string(comm.rank()) + ")"));
    CHECK_THAT(message, !Contains("on b"));
  }
}

TEST_CASE("check_collectively passes when every rank validates", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  int calls = 0;
  CHECK_NOTHROW(comm.check_collectively("dchag::test", [&] { ++calls; }));
  CHECK(calls == 1);
  CHECK_NOTHROW(comm.all_ok("dchag::test", nullptr));
}

TEST_CASE("check_collectively throws everywhere with the failing rank's message", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  const int failing = comm.size() - 1;
  const std::string local = "dchag::Aggregator::forward: tokens.extent(3) is 96, expected D = 128";
  const auto thrown = outcome([&] {
    comm.check_collectively("dchag::Aggregator::forward", [&] {
      if (comm.rank() == failing) throw std::invalid_argument(local);
    });
  });
  if (comm.rank() == failing) {
    // The failing rank sees its own exception, type and all.
    CHECK(message_if<std::invalid_argument>(thrown) == local);
  } else {
    CHECK(message_if<dchag::error>(thrown) == "dchag::Aggregator::forward: rank " +
                                                  std::to_string(failing) +
                                                  " failed validation: " + local);
  }
}

TEST_CASE("check_collectively names the lowest failing rank when several fail", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  // Every odd rank fails with a message naming itself; with one rank, rank 0 fails alone.
  const auto fails = [&](int rank) { return comm.size() == 1 || rank % 2 == 1; };
  const auto thrown = outcome([&] {
    comm.check_collectively("dchag::test", [&] {
      if (fails(comm.rank()))
        throw dchag::error("bad input on rank " + std::to_string(comm.rank()));
    });
  });
  const int lowest = comm.size() == 1 ? 0 : 1;
  const int highest = comm.size() == 1 ? 0 : comm.size() - 1 - (comm.size() % 2);
  if (fails(comm.rank())) {
    CHECK(message_if<dchag::error>(thrown) == "bad input on rank " + std::to_string(comm.rank()));
  } else if (lowest == highest) {
    CHECK(message_if<dchag::error>(thrown) ==
          "dchag::test: rank 1 failed validation: bad input on rank 1");
  } else {
    CHECK(message_if<dchag::error>(thrown) ==
          "dchag::test: ranks 1 to " + std::to_string(highest) +
              " (some or all of them) failed validation; rank 1: bad input on rank 1");
  }
}

TEST_CASE("check_collectively carries exceptions not derived from std::exception", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  const auto thrown = outcome([&] {
    comm.check_collectively("dchag::test", [&] {
      if (comm.rank() == 0) throw 42;
    });
  });
  if (comm.rank() == 0) {
    int value = 0;
    try {
      std::rethrow_exception(thrown);
    } catch (int v) {
      value = v;
    } catch (...) {
    }
    CHECK(value == 42);
  } else {
    CHECK(message_if<dchag::error>(thrown) ==
          "dchag::test: rank 0 failed validation: an exception not derived from std::exception");
  }
}

TEST_CASE("MPI errors become dchag::error with the MPI message", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  // A negative count is rejected by MPI's own argument checks; the duplicate's MPI_ERRORS_RETURN
  // turns that into an error code, and DCHAG_MPI_CHECK into an exception, instead of an abort.
  int value = 0;
  const auto thrown = outcome(
      [&] { DCHAG_MPI_CHECK("dchag::test", MPI_Bcast, &value, -1, MPI_INT, 0, comm.comm()); });
  CHECK_THAT(message_if<dchag::error>(thrown), StartsWith("dchag::test: MPI_Bcast failed: "));
  CHECK(message_if<dchag::error>(thrown).size() >
        std::string("dchag::test: MPI_Bcast failed: ").size());
}
