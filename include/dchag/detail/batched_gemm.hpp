#pragma once
/// A batch of small GEMMs in one launch: the per-channel tokenizer projections and their weight
/// gradients (DESIGN 4: a few large launches, never one per channel and sample). Every GEMM of
/// the batch has the same shape and its own operands:
///
///   C_t[m, n] += sum_{kb < KB} sum_{k < K} A_t(kb, m, k) * B_t(kb, k, n)
///
/// with A_t(kb, m, k) = a[kb * a_kb + m * a_m + k * a_k] (so A may be transposed),
/// B_t(kb, k, n) = b[kb * b_kb + k * ldb + n] and C_t row-major with leading dimension ldc. The
/// outer kb sum lets a gradient accumulate over samples whose rows are not contiguous. The GEMMs
/// of a batch run concurrently: no two of them may write the same C.
///
/// Devices run the batch as one launch, one team per row of C with its n over the lanes; host
/// spaces run it as one launch too, each thread calling the BLAS on its share of the GEMMs.
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/detail/loops.hpp>
#include <dchag/tensor.hpp>

#include <KokkosKernels_config.h>
#include <Kokkos_Core.hpp>
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
#include <KokkosBlas_Host_tpl.hpp>
#endif
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

#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
/// The host shape where Kokkos Kernels has a BLAS: the batch's GEMMs spread over the execution
/// space's threads, each a single-threaded BLAS call on its own operands (one launch, however
/// many GEMMs). Register-blocked BLAS kernels beat a portable loop nest on host CPUs, and a batch
/// of many small GEMMs parallelizes across GEMMs where one small GEMM would not. The BLAS must be
/// safe to call from several threads at once: OpenBLAS is, when it runs its own calls on one
/// thread (OPENBLAS_NUM_THREADS=1, or a build without threads), as CONTRIBUTING says.
template <class ExecSpace, class Operands>
void batched_gemm_host_blas(const ExecSpace& exec, const char* label, const BatchShape& s,
                            const Operands& operands) {
  static_assert(runs_on_host<ExecSpace>, "the host BLAS runs on host execution spaces only");
  using Scalar = typename std::invoke_result_t<const Operands&, int>::value_type;
  using Blas = KokkosBlas::Impl::HostBlas<Scalar>;
  Kokkos::parallel_for(label, Kokkos::RangePolicy<ExecSpace>(exec, 0, s.batch), [=](const int t) {
    const auto g = operands(t);
    // Column-major BLAS on row-major operands: C^T = B^T A^T.
    const bool a_rows = g.a_k == 1;  // A row-major [M, K], else stored [K, M]
    for (int kb = 0; kb < s.KB; ++kb) {
      const Scalar* a = g.a + kb * g.a_kb;
      Blas::gemm('N', a_rows ? 'N' : 'T', s.N, s.M, s.K, Scalar(1), g.b + kb * g.b_kb,
                 static_cast<int>(g.ldb), a, static_cast<int>(a_rows ? g.a_m : g.a_k), Scalar(1),
                 g.c, static_cast<int>(g.ldc));
    }
  });
}
#endif

/// The host shape without a BLAS library: Kokkos Kernels' own GEMM, one call per GEMM and
/// sample block.
template <class ExecSpace, class Operands>
void batched_gemm_kokkos_kernels(const ExecSpace& exec, const char* label, const BatchShape& s,
                                 const Operands& operands) {
  using Scalar = typename std::invoke_result_t<const Operands&, int>::value_type;
  using Mem = typename ExecSpace::memory_space;
  ScopedRegion region(label);  // names the GEMMs below for Kokkos Tools
  for (int t = 0; t < s.batch; ++t) {
    const auto g = operands(t);
    const bool a_rows = g.a_k == 1;
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

/// The host shape: the BLAS where there is one, else Kokkos Kernels' GEMM (also what a device
/// execution space gets here: the tests compare it with the device shape). Every GEMM of the
/// batch must be dense row-major (A may be transposed).
template <class ExecSpace, class Operands>
void batched_gemm_blas(const ExecSpace& exec, const char* label, const BatchShape& s,
                       const Operands& operands) {
  using Scalar = typename std::invoke_result_t<const Operands&, int>::value_type;
  if (s.batch == 0 || s.M == 0 || s.N == 0) return;
  {
    // The layout is the same for every GEMM of a batch: check the first.
    const auto g = operands(0);
    const bool a_rows = g.a_k == 1 && g.a_m == s.K;
    DCHAG_EXPECT((a_rows || (g.a_m == 1 && g.a_k == s.M)) && g.ldb == s.N && g.ldc == s.N, label,
                 "a GEMM of the batch is not dense row-major (internal error)");
  }
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
  if constexpr (runs_on_host<ExecSpace> &&
                (std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>)) {
    batched_gemm_host_blas(exec, label, s, operands);
    return;
  }
#endif
  batched_gemm_kokkos_kernels(exec, label, s, operands);
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
