#pragma once
/// Loop shapes shared by the kernels. Work is laid out as rows of contiguous elements: one team
/// per row, the row's elements over the team's vector lanes. On host execution spaces a team is
/// one thread and the inner loop is a plain contiguous loop the compiler vectorizes; on devices a
/// team is several warps' worth of lanes.
///
/// Kernels choose their host or device shape by the execution space (`runs_on_host`), never by
/// whether the memory is host-accessible: a GPU with host-accessible memory takes the device shape.
#include <dchag/detail/sizes.hpp>
#include <dchag/error.hpp>

#include <Kokkos_Core.hpp>
#include <climits>
#include <cstdint>
#include <string>

namespace dchag::detail {

/// Whether ExecSpace runs its kernels on host threads (Serial, OpenMP, Threads, HPX).
template <class ExecSpace>
inline constexpr bool runs_on_host =
    Kokkos::SpaceAccessibility<typename ExecSpace::execution_space, Kokkos::HostSpace>::accessible;

/// Vector lanes per team on devices: a warp on CUDA, half a wavefront on HIP; both are valid
/// Kokkos vector lengths there.
inline constexpr int device_vector_length = 32;

/// One team per row (league `rows`): a one-thread team on host spaces, AUTO threads of
/// `device_vector_length` lanes on devices. Throws when `rows` does not fit a league size (int).
template <class ExecSpace>
Kokkos::TeamPolicy<ExecSpace> row_teams(const ExecSpace& exec, std::int64_t rows) {
  DCHAG_EXPECT(rows >= 0 && rows <= INT_MAX, "dchag::detail::row_teams", "rows is ", rows,
               ", expected at most INT_MAX = ", INT_MAX, " (a Kokkos league size is an int)");
  if constexpr (runs_on_host<ExecSpace>) {
    return Kokkos::TeamPolicy<ExecSpace>(exec, static_cast<int>(rows), 1, 1);
  } else {
    return Kokkos::TeamPolicy<ExecSpace>(exec, static_cast<int>(rows), Kokkos::AUTO,
                                         device_vector_length);
  }
}

/// f(row, col) for every row < rows and col < cols; each (row, col) is written by one lane.
/// The rows are a league, so at most INT_MAX of them: entry points refuse larger problems before
/// any kernel runs, and this is the last guard against a silently truncated launch.
template <class ExecSpace, class F>
void for_each_row(const ExecSpace& exec, const std::string& label, std::int64_t rows, int cols,
                  const F& f) {
  using Member = typename Kokkos::TeamPolicy<ExecSpace>::member_type;
  Kokkos::parallel_for(
      label, row_teams(exec, rows), KOKKOS_LAMBDA(const Member& team) {
        const std::int64_t row = team.league_rank();
        Kokkos::parallel_for(Kokkos::TeamVectorRange(team, cols),
                             [&](const int col) { f(row, col); });
      });
}

/// Sum over i < n of a[i] * b[i] by the whole team (device shape: lane i reads element i, so
/// the loads coalesce); every lane gets the result.
template <class Member, class Scalar>
KOKKOS_INLINE_FUNCTION Scalar team_dot(const Member& team, const Scalar* a, const Scalar* b,
                                       int n) {
  Scalar sum = 0;
  Kokkos::parallel_reduce(
      Kokkos::TeamVectorRange(team, n), [&](const int i, Scalar& acc) { acc += a[i] * b[i]; }, sum);
  return sum;
}

/// Sum over i < n of a[i] * (b[i] - s * c[i]) by the whole team. The difference is formed
/// before the product, so b == s * c gives exactly zero (DESIGN 3.8).
template <class Member, class Scalar>
KOKKOS_INLINE_FUNCTION Scalar team_dot_residual(const Member& team, const Scalar* a,
                                                const Scalar* b, const Scalar* c, Scalar s, int n) {
  Scalar sum = 0;
  Kokkos::parallel_reduce(
      Kokkos::TeamVectorRange(team, n),
      [&](const int i, Scalar& acc) { acc += a[i] * (b[i] - s * c[i]); }, sum);
  return sum;
}

/// Sum over i < n of a[i] * b[i] by one lane, with 32 independent partial sums so that host
/// compilers keep them in vector registers (no loop-carried latency chain).
template <class Scalar>
KOKKOS_INLINE_FUNCTION Scalar lane_dot(const Scalar* a, const Scalar* b, int n) {
  constexpr int width = 32;
  Scalar part[width] = {};
  int i = 0;
  for (; i + width <= n; i += width) {
    for (int u = 0; u < width; ++u) part[u] += a[i + u] * b[i + u];
  }
  for (; i < n; ++i) part[i % width] += a[i] * b[i];
  for (int half = width / 2; half >= 1; half /= 2) {  // tree, vectorizable
    for (int u = 0; u < half; ++u) part[u] += part[u + half];
  }
  return part[0];
}

/// Sum over i < n of a[i] * (b[i] - s * c[i]) by one lane, blocked like lane_dot. The difference
/// is formed before the product, so b == s * c gives exactly zero (DESIGN 3.8).
template <class Scalar>
KOKKOS_INLINE_FUNCTION Scalar lane_dot_residual(const Scalar* a, const Scalar* b, const Scalar* c,
                                                Scalar s, int n) {
  constexpr int width = 32;
  Scalar part[width] = {};
  int i = 0;
  for (; i + width <= n; i += width) {
    for (int u = 0; u < width; ++u) part[u] += a[i + u] * (b[i + u] - s * c[i + u]);
  }
  for (; i < n; ++i) part[i % width] += a[i] * (b[i] - s * c[i]);
  for (int half = width / 2; half >= 1; half /= 2) {
    for (int u = 0; u < half; ++u) part[u] += part[u + half];
  }
  return part[0];
}

/// Both of lane_dot(x, u, n) and lane_dot_residual(g, x, z, s, n) in one pass over x, with the
/// same partial sums in the same order, so each result is bit for bit the one of its own function.
template <class Scalar>
KOKKOS_INLINE_FUNCTION void lane_dot_and_residual(const Scalar* x, const Scalar* u, const Scalar* g,
                                                  const Scalar* z, Scalar s, int n, Scalar& xu,
                                                  Scalar& residual) {
  constexpr int width = 32;
  Scalar pu[width] = {}, pr[width] = {};
  int i = 0;
  for (; i + width <= n; i += width) {
    for (int v = 0; v < width; ++v) {
      pu[v] += x[i + v] * u[i + v];
      pr[v] += g[i + v] * (x[i + v] - s * z[i + v]);
    }
  }
  for (; i < n; ++i) {
    pu[i % width] += x[i] * u[i];
    pr[i % width] += g[i] * (x[i] - s * z[i]);
  }
  for (int half = width / 2; half >= 1; half /= 2) {
    for (int v = 0; v < half; ++v) {
      pu[v] += pu[v + half];
      pr[v] += pr[v + half];
    }
  }
  xu = pu[0];
  residual = pr[0];
}

}  // namespace dchag::detail
