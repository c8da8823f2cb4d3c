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
/// Devices run the batch as one launch, one team per row of C with its n over the lanes; host
/// spaces call the BLAS once per GEMM (and sample block).
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/detail/loops.hpp>
#include <dchag/tensor.hpp>

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

/// The device shape, one launch: one team per row of C, its columns over the lanes (any
/// execution space; on host spaces the tests check it against the BLAS path).
template <class ExecSpace, class Operands>
void batched_gemm_teams(const ExecSpace& exec, const char* label, const BatchShape& s,
                        const Operands& operands) {
  if (s.batch == 0 || s.M == 0 || s.N == 0) return;
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

/// The host shape: the BLAS behind Kokkos Kernels, one call per GEMM and sample block. Its
/// register-blocked kernels beat a portable loop nest on host CPUs (measured in the commit that
/// introduced this), and a host BLAS call launches no kernel.
template <class ExecSpace, class Operands>
void batched_gemm_blas(const ExecSpace& exec, const char* label, const BatchShape& s,
                       const Operands& operands) {
  using Scalar = typename std::invoke_result_t<const Operands&, int>::value_type;
  using Mem = typename ExecSpace::memory_space;
  for (int t = 0; t < s.batch; ++t) {
    const auto g = operands(t);
    const bool a_rows = g.a_k == 1 && g.a_m == s.K;  // A row-major [M, K]
    DCHAG_EXPECT((a_rows || (g.a_m == 1 && g.a_k == s.M)) && g.ldb == s.N && g.ldc == s.N, label,
                 "a GEMM of the batch is not dense row-major (internal error)");
    const Unmanaged2<Scalar, Mem> c(g.c, s.M, s.N);
    for (int kb = 0; kb < s.KB; ++kb) {
      const Scalar* a = g.a + kb * g.a_kb;
      const Unmanaged2<const Scalar, Mem> b(g.b + kb * g.b_kb, s.K, s.N);
      if (a_rows) {
        gemm(exec, "N", "N", Scalar(1), Unmanaged2<const Scalar, Mem>(a, s.M, s.K), b, Scalar(1),
             c);
      } else {
        gemm(exec, "T", "N", Scalar(1), Unmanaged2<const Scalar, Mem>(a, s.K, s.M), b, Scalar(1),
             c);
      }
    }
  }
}

/// Runs the batch; `operands(t)` gives the operands of GEMM t (callable where ExecSpace runs).
template <class ExecSpace, class Operands>
void batched_gemm(const ExecSpace& exec, const char* label, const BatchShape& s,
                  const Operands& operands) {
  if constexpr (runs_on_host<ExecSpace>) {
    batched_gemm_blas(exec, label, s, operands);
  } else {
    batched_gemm_teams(exec, label, s, operands);
  }
}

}  // namespace dchag::detail
