#pragma once
/// A batch of small GEMMs in one launch: the per-channel tokenizer projections and their weight
/// gradients (DESIGN 4: a few large launches, never one per channel and sample). Every GEMM of
/// the batch has the same shape and its own operands:
///
///   C_t[m, n] += sum_{kb < KB} sum_{k < K} A_t(kb, m, k) * B_t(kb, k, n)
///
/// with A_t(kb, m, k) = a[kb * a_kb + m * a_m + k * a_k] (so A may be transposed),
/// B_t(kb, k, n) = b[kb * b_kb + k * ldb + n] and C_t row-major with leading dimension ldc. The
/// outer kb sum lets a gradient accumulate over samples whose rows are not contiguous.
///
/// Host execution spaces run one task per (t, block of 4 rows of C) with the block held in
/// registers across the k loop; devices run one team per row of C, its n over the lanes.
#include <dchag/detail/loops.hpp>

#include <Kokkos_Core.hpp>
#include <cstdint>
#include <type_traits>

namespace dchag::detail {

template <class Scalar>
struct GemmOperands {
  using value_type = Scalar;
  const Scalar* a;
  std::int64_t a_kb, a_m, a_k;
  const Scalar* b;
  std::int64_t b_kb, ldb;
  Scalar* c;
  std::int64_t ldc;
};

struct BatchShape {
  int batch, M, N, K, KB;
};

/// Rows MR (compile time) of C from row m0, columns [n0, n0 + NB) held in registers, NB a
/// compile-time width or, with NB = 0, the runtime tail width `nw`.
template <int MR, int NB, class Scalar>
KOKKOS_INLINE_FUNCTION void gemm_block(const GemmOperands<Scalar>& g, const BatchShape& s, int m0,
                                       int n0, int nw) {
  constexpr int W = NB > 0 ? NB : 1;
  if constexpr (NB > 0) {
    Scalar acc[MR][W];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < W; ++v) acc[r][v] = g.c[(m0 + r) * g.ldc + n0 + v];
    for (int kb = 0; kb < s.KB; ++kb) {
      const Scalar* a = g.a + kb * g.a_kb + m0 * g.a_m;
      const Scalar* b = g.b + kb * g.b_kb + n0;
      for (int k = 0; k < s.K; ++k) {
        const Scalar* brow = b + k * g.ldb;
        for (int r = 0; r < MR; ++r) {
          const Scalar ar = a[r * g.a_m + k * g.a_k];
          for (int v = 0; v < W; ++v) acc[r][v] += ar * brow[v];
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < W; ++v) g.c[(m0 + r) * g.ldc + n0 + v] = acc[r][v];
  } else {
    for (int r = 0; r < MR; ++r) {
      for (int n = n0; n < n0 + nw; ++n) {
        Scalar acc = g.c[(m0 + r) * g.ldc + n];
        for (int kb = 0; kb < s.KB; ++kb) {
          const Scalar* a = g.a + kb * g.a_kb + (m0 + r) * g.a_m;
          const Scalar* b = g.b + kb * g.b_kb + n;
          for (int k = 0; k < s.K; ++k) acc += a[k * g.a_k] * b[k * g.ldb];
        }
        g.c[(m0 + r) * g.ldc + n] = acc;
      }
    }
  }
}

/// Columns [n0, n0 + nw) of C (nw = NB, or a tail with NB = 0), every row: the B panel of these
/// columns stays in the L1 cache while the row blocks stream past it.
template <int NB, class Scalar>
KOKKOS_INLINE_FUNCTION void gemm_columns(const GemmOperands<Scalar>& g, const BatchShape& s, int n0,
                                         int nw) {
  constexpr int MR = 4;
  int m0 = 0;
  for (; m0 + MR <= s.M; m0 += MR) gemm_block<MR, NB>(g, s, m0, n0, nw);
  for (; m0 < s.M; ++m0) gemm_block<1, NB>(g, s, m0, n0, nw);
}

/// Runs the batch; `operands(t)` gives the operands of GEMM t (callable on the device).
template <class ExecSpace, class Operands>
void batched_gemm(const ExecSpace& exec, const char* label, const BatchShape& s,
                  const Operands& operands) {
  if (s.batch == 0 || s.M == 0 || s.N == 0) return;
  if constexpr (runs_on_host<ExecSpace>) {
    // One task per (GEMM, panel of NB columns): 64 floats or 32 doubles, MR x 4 registers of
    // 512 bits per row block.
    using G = std::invoke_result_t<const Operands&, int>;
    constexpr int NB = 256 / int(sizeof(typename G::value_type));
    const int panels = (s.N + NB - 1) / NB;
    Kokkos::parallel_for(
        label, Kokkos::RangePolicy<ExecSpace>(exec, 0, std::int64_t(s.batch) * panels),
        KOKKOS_LAMBDA(const std::int64_t i) {
          const auto g = operands(static_cast<int>(i / panels));
          const int n0 = static_cast<int>(i % panels) * NB;
          if (n0 + NB <= s.N) {
            gemm_columns<NB>(g, s, n0, NB);
          } else {
            gemm_columns<0>(g, s, n0, s.N - n0);
          }
        });
  } else {
    using Member = typename Kokkos::TeamPolicy<ExecSpace>::member_type;
    Kokkos::parallel_for(
        label, row_teams(exec, std::int64_t(s.batch) * s.M), KOKKOS_LAMBDA(const Member& team) {
          const int t = team.league_rank() / s.M, m = team.league_rank() % s.M;
          const auto g = operands(t);
          Kokkos::parallel_for(Kokkos::TeamVectorRange(team, s.N), [&](const int n) {
            auto acc = g.c[m * g.ldc + n];
            for (int kb = 0; kb < s.KB; ++kb) {
              const auto* a = g.a + kb * g.a_kb + m * g.a_m;
              const auto* b = g.b + kb * g.b_kb + n;
              for (int k = 0; k < s.K; ++k) acc += a[k * g.a_k] * b[k * g.ldb];
            }
            g.c[m * g.ldc + n] = acc;
          });
        });
  }
}

}  // namespace dchag::detail
