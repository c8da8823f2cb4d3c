// Tests of dchag::Communicator and the view collectives. They run at any number of ranks.
//
// Every rank executes every collective: a test may branch on the rank only around local checks,
// never around a call that communicates, so one rank failing a check cannot leave the others
// waiting in a collective.
#include <mpi.h>

#include <Kokkos_Core.hpp>
#include <catch2/catch.hpp>
#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

#include "dchag/communicator.hpp"
#include "dchag/device.hpp"
#include "dchag/memory.hpp"

using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;
using dchag::Communicator;

namespace {

using Exec = Kokkos::DefaultExecutionSpace;

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

/// A device view of n elements with value f(i), built on the host.
template <class T, class F>
Kokkos::View<T*> make_view(const std::string& label, std::size_t n, F f) {
  Kokkos::View<T*> view(label, n);
  auto host = Kokkos::create_mirror_view(view);
  for (std::size_t i = 0; i < n; ++i) host(i) = f(i);
  Kokkos::deep_copy(view, host);
  return view;
}

template <class View>
auto on_host(const View& view) {
  return Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), view);
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

TEMPLATE_TEST_CASE("allgather puts each rank's block in rank order", "[mpi]", float, double, int,
                   std::int64_t) {
  const Communicator comm(MPI_COMM_WORLD);
  const int p = comm.size();
  const std::size_t n = 3;
  const auto value = [](int rank, std::size_t i) { return TestType(10 * rank + int(i)); };
  auto send = make_view<TestType>("send", n, [&](std::size_t i) { return value(comm.rank(), i); });

  SECTION("into a [P, N] view") {
    Kokkos::View<TestType**> recv("recv", p, n);
    dchag::allgather(Exec(), comm, send, recv);
    const auto host = on_host(recv);
    for (int r = 0; r < p; ++r) {
      for (std::size_t i = 0; i < n; ++i) CHECK(host(r, i) == value(r, i));
    }
  }
  SECTION("from a view of const, through host staging") {
    Kokkos::View<const TestType*> const_send = send;
    Kokkos::View<TestType*> recv("recv", p * n);
    dchag::detail::allgather</*ForceStaging=*/true>("dchag::allgather", Exec(), comm.comm(), p,
                                                    const_send, recv);
    const auto host = on_host(recv);
    for (int r = 0; r < p; ++r) {
      for (std::size_t i = 0; i < n; ++i) CHECK(host(r * n + i) == value(r, i));
    }
  }
}

TEST_CASE("allgather of multi-dimensional blocks", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  const int p = comm.size();
  // Whole blocks in rank order: recv(r, ...) is rank r's send(...), whatever the block's rank.
  Kokkos::View<float***> send("send", 2, 3, 4);
  auto host_send = Kokkos::create_mirror_view(send);
  for (int b = 0; b < 2; ++b)
    for (int l = 0; l < 3; ++l)
      for (int d = 0; d < 4; ++d)
        host_send(b, l, d) = float(1000 * comm.rank() + 100 * b + 10 * l + d);
  Kokkos::deep_copy(send, host_send);
  Kokkos::View<float****> recv("recv", p, 2, 3, 4);
  dchag::allgather(Exec(), comm, send, recv);
  const auto host = on_host(recv);
  for (int r = 0; r < p; ++r)
    for (int b = 0; b < 2; ++b)
      for (int l = 0; l < 3; ++l)
        for (int d = 0; d < 4; ++d)
          CHECK(host(r, b, l, d) == float(1000 * r + 100 * b + 10 * l + d));
}

TEST_CASE("allgather checks sizes and aliasing before communicating", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  const int p = comm.size();
  Kokkos::View<double*> send("send", 4);
  Kokkos::View<double*> short_recv("recv", 4 * p - 1);
  CHECK_THROWS_AS(dchag::allgather(Exec(), comm, send, short_recv), std::invalid_argument);
  CHECK_THROWS_WITH(dchag::allgather(Exec(), comm, send, short_recv),
                    "dchag::allgather: recv.size() is " + std::to_string(4 * p - 1) +
                        ", expected communicator size * send.size() = " + std::to_string(p) +
                        " * 4 = " + std::to_string(4 * p));

  Kokkos::View<double*> recv("recv", 4 * p);
  auto inside = Kokkos::subview(recv, Kokkos::make_pair(0, 4));
  CHECK_THROWS_WITH(dchag::allgather(Exec(), comm, inside, recv),
                    "dchag::allgather: send and recv overlap in memory, expected separate buffers");
}

TEMPLATE_TEST_CASE("allreduce_sum and allreduce_max combine all ranks in place", "[mpi]", float,
                   double, int, std::int64_t) {
  const Communicator comm(MPI_COMM_WORLD);
  const int p = comm.size();
  const int r = comm.rank();
  const std::size_t n = 5;
  // Rank r holds r + 1 + i: the sum is P(P+1)/2 + P·i. For the max, rank r holds (r + i) % P,
  // whose maximum over ranks is P - 1 for every i.
  const auto sum_input = [&](std::size_t i) { return TestType(r + 1 + int(i)); };
  const auto max_input = [&](std::size_t i) { return TestType((r + int(i)) % p); };

  const bool staged = GENERATE(false, true);
  CAPTURE(staged);
  auto sums = make_view<TestType>("sums", n, sum_input);
  auto maxima = make_view<TestType>("maxima", n, max_input);
  if (staged) {
    dchag::detail::allreduce<true>("dchag::allreduce_sum", Exec(), comm.comm(), sums, MPI_SUM);
    dchag::detail::allreduce<true>("dchag::allreduce_max", Exec(), comm.comm(), maxima, MPI_MAX);
  } else {
    dchag::allreduce_sum(Exec(), comm, sums);
    dchag::allreduce_max(Exec(), comm, maxima);
  }
  const auto host_sums = on_host(sums);
  const auto host_maxima = on_host(maxima);
  for (std::size_t i = 0; i < n; ++i) {
    CHECK(host_sums(i) == TestType(p * (p + 1) / 2 + p * int(i)));
    CHECK(host_maxima(i) == TestType(p - 1));
  }
}

TEST_CASE("allreduce works on a contiguous multi-dimensional view", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  Kokkos::View<double**, Kokkos::LayoutLeft> view("view", 3, 2);
  Kokkos::deep_copy(view, 0.5);
  dchag::allreduce_sum(Exec(), comm, view);
  const auto host = on_host(view);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 2; ++j) CHECK(host(i, j) == 0.5 * comm.size());
}

TEST_CASE("broadcast copies the root's view to every rank", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  const int root = comm.size() - 1;
  const bool staged = GENERATE(false, true);
  CAPTURE(staged);
  const auto fill = [&](std::size_t i) { return comm.rank() == root ? 3.0 * double(i) + 1 : -1.0; };
  auto view = make_view<double>("view", 6, fill);
  if (staged) {
    dchag::detail::broadcast<true>("dchag::broadcast", Exec(), comm.comm(), comm.rank(),
                                   comm.size(), view, root);
  } else {
    dchag::broadcast(Exec(), comm, view, root);
  }
  const auto host = on_host(view);
  for (std::size_t i = 0; i < 6; ++i) CHECK(host(i) == 3.0 * double(i) + 1);

  CHECK_THROWS_WITH(dchag::broadcast(Exec(), comm, view, comm.size()),
                    "dchag::broadcast: root is " + std::to_string(comm.size()) +
                        ", expected 0 <= root < " + std::to_string(comm.size()));
  CHECK_THROWS_AS(dchag::broadcast(Exec(), comm, view, -1), std::invalid_argument);
}

TEST_CASE("view collectives reject non-contiguous views", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  Kokkos::View<float**> matrix("matrix", 4, 3);
  auto column = Kokkos::subview(matrix, Kokkos::ALL, 1);  // stride 3
  REQUIRE_FALSE(column.span_is_contiguous());
  const std::string rest =
      " is not contiguous, expected a view whose elements are contiguous in memory (e.g. "
      "LayoutRight or LayoutLeft without padding or strides)";

  CHECK_THROWS_AS(dchag::allreduce_sum(Exec(), comm, column), std::invalid_argument);
  CHECK_THROWS_WITH(dchag::allreduce_sum(Exec(), comm, column),
                    "dchag::allreduce_sum: view" + rest);
  CHECK_THROWS_WITH(dchag::allreduce_max(Exec(), comm, column),
                    "dchag::allreduce_max: view" + rest);
  CHECK_THROWS_WITH(dchag::broadcast(Exec(), comm, column, 0), "dchag::broadcast: view" + rest);

  Kokkos::View<float*> flat("flat", 4);
  Kokkos::View<float*> gathered("gathered", 4 * comm.size());
  Kokkos::View<float**> wide("wide", 4 * comm.size(), 2);
  auto strided_recv = Kokkos::subview(wide, Kokkos::ALL, 0);
  CHECK_THROWS_WITH(dchag::allgather(Exec(), comm, column, gathered),
                    "dchag::allgather: send" + rest);
  CHECK_THROWS_WITH(dchag::allgather(Exec(), comm, flat, strided_recv),
                    "dchag::allgather: recv" + rest);
  CHECK_THROWS_WITH(dchag::sum_gradients(Exec(), comm, flat, column),
                    "dchag::sum_gradients: gradient" + rest);
}

TEST_CASE("sum_gradients sums or averages every gradient view", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  const int p = comm.size();
  const int r = comm.rank();
  auto weights = make_view<float>("dW", 5, [&](std::size_t i) { return float(r + 1) * float(i); });
  Kokkos::View<double**> bias("db", 2, 3);
  Kokkos::deep_copy(bias, double(2 * r + 1));  // sum over ranks of 2r+1 is P²

  SECTION("sum") {
    dchag::sum_gradients(Exec(), comm, weights, bias);
    const auto host_w = on_host(weights);
    for (std::size_t i = 0; i < 5; ++i) CHECK(host_w(i) == float(p * (p + 1) / 2) * float(i));
    const auto host_b = on_host(bias);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 3; ++j) CHECK(host_b(i, j) == double(p * p));
  }
  SECTION("mean") {
    dchag::sum_gradients(Exec(), comm, dchag::GradientReduction::mean, weights, bias);
    Exec().fence();
    const auto host_w = on_host(weights);
    for (std::size_t i = 0; i < 5; ++i) {
      CHECK(host_w(i) == Approx(float(p + 1) / 2 * float(i)));
    }
    const auto host_b = on_host(bias);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 3; ++j) CHECK(host_b(i, j) == Approx(double(p)));
  }
}

TEST_CASE("sum_gradients refuses on every rank when ranks pass different gradients", "[mpi]") {
  const Communicator comm(MPI_COMM_WORLD);
  const bool odd_one = comm.rank() == comm.size() - 1;
  Kokkos::View<float*> grad("grad", odd_one ? 7 : 6);
  const auto thrown = outcome([&] { dchag::sum_gradients(Exec(), comm, grad); });
  if (comm.size() == 1) {
    CHECK_FALSE(thrown);
  } else {
    CHECK(message_if<dchag::error>(thrown) ==
          "dchag::sum_gradients: ranks disagree on total gradient elements (rank values range "
          "6..7, this rank has " +
              std::to_string(odd_one ? 7 : 6) + ")");
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

TEST_CASE("node_placement numbers the ranks of a node and picks one device each", "[mpi][device]") {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  // ctest runs every rank on this one machine: node-local numbering is the world's.
  const auto p = dchag::node_placement(MPI_COMM_WORLD);
  CHECK(p.local_rank == rank);
  CHECK(p.local_size == size);
  if (p.devices == 0) CHECK(p.device_id == -1);
  // With two devices per node, ranks alternate between them.
  const auto two = dchag::node_placement(MPI_COMM_WORLD, 2);
  CHECK(two.devices == 2);
  CHECK(two.device_id == rank % 2);
}

TEST_CASE("staged collectives reuse the communicator's host buffers across calls",
          "[mpi][staging]") {
  using Host = Kokkos::DefaultHostExecutionSpace;
  dchag::Communicator comm(MPI_COMM_WORLD);
  const int p = comm.size();
  Kokkos::View<double*, Kokkos::HostSpace> send("send", 64), recv("recv", 64 * p), v("v", 100);
  Kokkos::deep_copy(send, 1.0);
  Kokkos::deep_copy(v, 2.0);
  // Staging forced on host memory: the path device Views take without GPU-aware MPI.
  const auto step = [&] {
    dchag::detail::allgather<true>("dchag::allgather", Host(), comm.comm(), p, send, recv,
                                   comm.staging());
    dchag::detail::allreduce<true>("dchag::allreduce_sum", Host(), comm.comm(), v, MPI_SUM,
                                   comm.staging());
  };
  comm.reserve_staging(dchag::detail::staged_bytes<double>(64) +
                       dchag::detail::staged_bytes<double>(64 * p));
  const std::size_t reserved = comm.staging()->bytes();
  {
    dchag::MemoryTracker tracker;
    step();
    step();
    CHECK(tracker.peak_bytes() == 0);  // nothing allocated: the reserved arena served both
  }
  CHECK(comm.staging()->bytes() == reserved);
  for (std::size_t i = 0; i < recv.extent(0); ++i) CHECK(recv(i) == 1.0);
  CHECK(v(0) == 2.0 * p * p);
  // Copies of the communicator share the arena.
  const dchag::Communicator copy = comm;
  CHECK(copy.staging() == comm.staging());
}
