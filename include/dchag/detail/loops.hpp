#pragma once
/// Loop shapes shared by the kernels. Work is laid out as rows of contiguous elements: one team
/// per row, the row's elements over the team's vector lanes. On host backends the inner loop is a
/// plain contiguous loop the compiler vectorizes, with no index division per element.
#include <Kokkos_Core.hpp>
#include <dchag/detail/sizes.hpp>

#include <cstdint>
#include <string>

namespace dchag::detail {

/// f(row, col) for every row < rows and col < cols; each (row, col) is written by one lane.
/// The rows are a league, so at most INT_MAX of them: entry points refuse larger problems before
/// any kernel runs, and this is the last guard against a silently truncated launch.
template <class ExecSpace, class F>
void for_each_row(const ExecSpace& exec, const std::string& label, std::int64_t rows, int cols,
                  const F& f) {
  expect_int_size(label.c_str(), "rows", {rows});
  using Team = Kokkos::TeamPolicy<ExecSpace>;
  Kokkos::parallel_for(
      label, Team(exec, static_cast<int>(rows), Kokkos::AUTO),
      KOKKOS_LAMBDA(const typename Team::member_type& team) {
        const std::int64_t row = team.league_rank();
        Kokkos::parallel_for(Kokkos::TeamVectorRange(team, cols),
                             [&](const int col) { f(row, col); });
      });
}

/// Sum over i < n of a[i] * b[i] by the whole team; every lane gets the result. Each lane takes
/// 16 contiguous products at a time so that host compilers vectorize the inner loop.
template <class Member, class Scalar>
KOKKOS_INLINE_FUNCTION Scalar team_dot(const Member& team, const Scalar* a, const Scalar* b,
                                       int n) {
  constexpr int chunk = 16;
  const int full = n / chunk;
  Scalar sum = 0;
  Kokkos::parallel_reduce(
      Kokkos::TeamVectorRange(team, full + 1),
      [&](const int c, Scalar& acc) {
        const int begin = c * chunk;
        Scalar part[chunk] = {};
        if (c < full) {
          for (int u = 0; u < chunk; ++u) part[u] = a[begin + u] * b[begin + u];
        } else {
          for (int i = begin; i < n; ++i) part[i - begin] = a[i] * b[i];
        }
        Scalar s = 0;
        for (int u = 0; u < chunk; ++u) s += part[u];
        acc += s;
      },
      sum);
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

}  // namespace dchag::detail
