#pragma once
/// The streamed forward of the pooled cross-attention (DESIGN 3.8): the N inputs arrive in
/// consecutive chunks [n0, n1); per output position and head an online softmax keeps a running
/// max, a running denominator and the pooled sum z, rescaled whenever the max grows. Each chunk's
/// tokens are read once, while they are in cache. A chunk may cut through any of the k segments.
///
/// Rows: the chunk's tokens come as a view of all N inputs or of the chunk alone (`InputRows`
/// says which); the scores go to the saved weights `a`, which hold every input's (keep) or only
/// the current chunk's (recompute, inference), also described by an InputRows.
#include <dchag/detail/attention_common.hpp>

#include <cstdint>

namespace dchag::detail {

// Online softmax over the chunk [n0, n1), host shape: one thread per output position; scores,
// then the numerators, then z in blocks held in registers across the chunk.
template <class ExecSpace, class Scalar, class MemSpace>
void stream_pool_host(const ExecSpace& exec, const AttentionConfig& cfg,
                      const Unmanaged2<const Scalar, MemSpace>& x2, InputRows xr, InputRows ar,
                      const AttentionSaved<Scalar, MemSpace>& s,
                      const AttentionWork<Scalar, MemSpace>& work, int n0, int n1) {
  const int L = s.L, k = s.k, D = cfg.dim, nh = score_columns(cfg);  // nh: score columns
  auto u = work.u;
  auto a = s.a;
  auto z = s.z;
  auto off = s.offsets;
  auto run_max = s.run_max;
  auto run_sum = s.run_sum;
  auto valid = s.valid;
  auto e_chunk = work.e_chunk;
  Kokkos::parallel_for(
      "dchag::attention::stream_pool",
      Kokkos::RangePolicy<ExecSpace>(exec, 0, std::int64_t(s.B) * k * L),
      KOKKOS_LAMBDA(const std::int64_t pos) {
        const int l = static_cast<int>(pos % L), j = static_cast<int>((pos / L) % k);
        const int b = static_cast<int>(pos / (std::int64_t(L) * k));
        const int lo = n0 > off(j) ? n0 : off(j), hi = n1 < off(j + 1) ? n1 : off(j + 1);
        if (lo >= hi) return;             // the chunk holds no input of this segment
        const bool first = lo == off(j);  // the segment starts in this chunk
        for (int n = lo; n < hi; ++n) {
          const Scalar* xn = &x2(xr(b, n, l), 0);
          const bool missing = is_missing(valid, b, n);
          for (int h = 0; h < nh; ++h)
            a(ar(b, n, l), h) = missing ? -infinity<Scalar>() : lane_dot(xn, &u(h, 0), D);
        }
        // The segments of one (b, l) take disjoint inputs of the chunk: one numerator row each.
        Scalar* e = &e_chunk(std::int64_t(b) * L + l, 0, 0);
        for (int h = 0; h < nh; ++h) {
          Scalar mx = first ? a(ar(b, lo, l), h) : run_max(pos, h);
          for (int n = lo; n < hi; ++n) mx = detail::max(mx, a(ar(b, n, l), h));
          const Scalar rescale = first ? Scalar(0) : softmax_numerator(run_max(pos, h), mx);
          Scalar sum = first ? Scalar(0) : run_sum(pos, h) * rescale;
          for (int n = lo; n < hi; ++n) {
            e[(n - n0) * nh + h] = softmax_numerator(a(ar(b, n, l), h), mx);
            sum += e[(n - n0) * nh + h];
          }
          Scalar* zh = &z(h, pos, 0);
          constexpr int block = 32;
          int d0 = 0;
          for (; d0 + block <= D; d0 += block) {
            Scalar acc[block];
            for (int v = 0; v < block; ++v) acc[v] = first ? Scalar(0) : zh[d0 + v] * rescale;
            for (int n = lo; n < hi; ++n) {
              const Scalar wt = e[(n - n0) * nh + h];
              const Scalar* xn = &x2(xr(b, n, l), d0);
              for (int v = 0; v < block; ++v) acc[v] += wt * xn[v];
            }
            for (int v = 0; v < block; ++v) zh[d0 + v] = acc[v];
          }
          for (int d = d0; d < D; ++d) {
            Scalar acc = first ? Scalar(0) : zh[d] * rescale;
            for (int n = lo; n < hi; ++n) acc += e[(n - n0) * nh + h] * x2(xr(b, n, l), d);
            zh[d] = acc;
          }
          run_max(pos, h) = mx;
          run_sum(pos, h) = sum;
        }
      });
}

// The same, device shape: one team per output position, the D values of every token over its
// lanes.
template <class ExecSpace, class Scalar, class MemSpace>
void stream_pool_team(const ExecSpace& exec, const AttentionConfig& cfg,
                      const Unmanaged2<const Scalar, MemSpace>& x2, InputRows xr, InputRows ar,
                      const AttentionSaved<Scalar, MemSpace>& s,
                      const AttentionWork<Scalar, MemSpace>& work, int n0, int n1) {
  using Member = typename Kokkos::TeamPolicy<ExecSpace>::member_type;
  const int L = s.L, k = s.k, D = cfg.dim, nh = score_columns(cfg);  // nh: score columns
  auto u = work.u;
  auto a = s.a;
  auto z = s.z;
  auto off = s.offsets;
  auto run_max = s.run_max;
  auto run_sum = s.run_sum;
  auto valid = s.valid;
  Kokkos::parallel_for(
      "dchag::attention::stream_pool", row_teams(exec, std::int64_t(s.B) * k * L),
      KOKKOS_LAMBDA(const Member& team) {
        const int pos = team.league_rank();
        const int l = pos % L, j = (pos / L) % k, b = pos / (L * k);
        const int lo = n0 > off(j) ? n0 : off(j), hi = n1 < off(j + 1) ? n1 : off(j + 1);
        if (lo >= hi) return;  // the whole team: the chunk holds no input of this segment
        const bool first = lo == off(j);
        for (int n = lo; n < hi; ++n) {
          const Scalar* xn = &x2(xr(b, n, l), 0);
          const bool missing = is_missing(valid, b, n);
          for (int h = 0; h < nh; ++h) {
            const Scalar sc = missing ? -infinity<Scalar>() : team_dot(team, xn, &u(h, 0), D);
            Kokkos::single(Kokkos::PerTeam(team), [&]() { a(ar(b, n, l), h) = sc; });
          }
        }
        team.team_barrier();
        for (int h = 0; h < nh; ++h) {
          Scalar mx = first ? a(ar(b, lo, l), h) : run_max(pos, h);
          for (int n = lo; n < hi; ++n) mx = detail::max(mx, a(ar(b, n, l), h));
          const Scalar rescale = first ? Scalar(0) : softmax_numerator(run_max(pos, h), mx);
          Scalar sum = first ? Scalar(0) : run_sum(pos, h) * rescale;
          Scalar* zh = &z(h, pos, 0);
          Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D),
                               [&](const int d) { zh[d] = first ? Scalar(0) : zh[d] * rescale; });
          for (int n = lo; n < hi; ++n) {
            const Scalar e = softmax_numerator(a(ar(b, n, l), h), mx);
            sum += e;
            const Scalar* xn = &x2(xr(b, n, l), 0);
            Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D),
                                 [&](const int d) { zh[d] += e * xn[d]; });
          }
          team.team_barrier();  // every lane has read run_sum / run_max before they change
          Kokkos::single(Kokkos::PerTeam(team), [&]() {
            run_max(pos, h) = mx;
            run_sum(pos, h) = sum;
          });
        }
      });
}

// Grouped stream end: rescale this rank's pooled sums and softmax denominators from its running
// max (saved in `local`) to the group's (now in run_max).
template <class ExecSpace, class Scalar, class MemSpace>
void rescale_to_group_max(const ExecSpace& exec, const AttentionConfig& cfg,
                          const AttentionSaved<Scalar, MemSpace>& s,
                          const View2<Scalar, MemSpace>& local) {
  const std::int64_t P = std::int64_t(s.B) * s.L;
  const int D = cfg.dim;
  auto z = s.z;
  auto run_max = s.run_max;
  auto run_sum = s.run_sum;
  for_each_row(
      exec, "dchag::attention::stream_rescale", std::int64_t(score_columns(cfg)) * P, D + 1,
      KOKKOS_LAMBDA(const std::int64_t r, const int d) {
        const std::int64_t pos = r % P, h = r / P;
        // A rank with no valid input here has local max -Inf and no share of the softmax.
        const Scalar f = softmax_numerator(local(pos, h), run_max(pos, h));
        if (d < D) {
          z(h, pos, d) *= f;
        } else {
          run_sum(pos, h) *= f;
        }
      });
}

// Keep policy, after the stream: the saved scores become the softmax weights
// a = exp(score - run_max) / run_sum, the expression the recomputing backward evaluates.
template <class ExecSpace, class Scalar, class MemSpace>
void stream_weights(const ExecSpace& exec, const AttentionSaved<Scalar, MemSpace>& s) {
  const int N = s.N, L = s.L, k = s.k;
  auto a = s.a;
  auto run_max = s.run_max;
  auto run_sum = s.run_sum;
  auto seg = s.segment;
  for_each_row(
      exec, "dchag::attention::stream_weights", std::int64_t(s.B) * N * L,
      static_cast<int>(s.run_max.extent(1)), KOKKOS_LAMBDA(const std::int64_t row, const int h) {
        const std::int64_t bn = row / L;
        const std::int64_t pos = ((bn / N) * k + seg(bn % N)) * L + row % L;
        a(row, h) = over_sum(softmax_numerator(a(row, h), run_max(pos, h)), run_sum(pos, h));
      });
}

}  // namespace dchag::detail
