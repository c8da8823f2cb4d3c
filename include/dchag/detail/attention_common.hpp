#pragma once
/// Kernels of the single-query cross-attention that both strategies share: the query vectors,
/// the segment softmax, the output projection and the query's backward. Free functions over the
/// module's parameters (AttentionParams) and per-call buffers (AttentionWork), so that every
/// device lambda sits in a public, named function (what nvcc's extended lambdas require).
#include <dchag/attention_state.hpp>
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/detail/loops.hpp>
#include <dchag/detail/workspace.hpp>

#include <cstdint>

namespace dchag::detail {

/// The weights of one cross-attention, or their gradients (the same shapes).
template <class Scalar, class MemSpace>
struct AttentionParams {
  View1<Scalar, MemSpace> query;  // qv [queries * D]: query j at [j * D, (j + 1) * D)
  View3<Scalar, MemSpace> w_in;   // [3, D, D]: Wq, Wk, Wv (ClimaX in_proj_weight layout)
  View2<Scalar, MemSpace> b_in;   // [3, D]: bq, bk, bv (zero and not a parameter: artifact)
  View2<Scalar, MemSpace> w_out;  // [D, D]
  View1<Scalar, MemSpace> b_out;  // [D]
};

/// Per-call vectors and workspace of one module, reused across calls of the same shape.
/// S = queries * heads score columns, column s = j * heads + h (query j, head h); P output
/// positions, each with `queries` output rows (row pos * queries + j).
template <class Scalar, class MemSpace>
struct AttentionWork {
  View1<Scalar, MemSpace> q, dq;       // [queries * D]
  View2<Scalar, MemSpace> u;           // [S, D]: u_s = Wk_h^T q_jh / sqrt(hd)
  View1<Scalar, MemSpace> merge;       // grouped forward: [P * (queries * D + S)]
  View1<Scalar, MemSpace> shared;      // [S * D] du, then (grouped) this rank's dWv [D * D]
  View2<Scalar, MemSpace> go;          // [P * queries, D] gradient at the heads' outputs
  View2<Scalar, MemSpace> c, c_group;  // [P, S] gz_s . z_s here and over the group
  View2<Scalar, MemSpace> ds;          // device pooled backward: [B*chunk*L, S] score gradients
  View2<Scalar, MemSpace> dk, dv;      // materialized: [B*N*L, D of the head share]
  View3<Scalar, MemSpace> oh;          // [S, P, hd] projected pooled tokens / their gradients
  View3<Scalar, MemSpace> gz;          // [S, P, D] gradient at the pooled tokens
  View3<Scalar, MemSpace> e_chunk;     // streaming: [B*L, chunk, S] softmax numerators
  View2<Scalar, MemSpace> du_blocks;   // host pooled backward: [blocks, S * (D + 2)]
  int streamed = 0, back_streamed = 0;
  bool group_backward = false;
};

/// Which inputs a view of token rows holds: inputs [first, first + count) of the N, as
/// [B, count, L] rows. All N inputs (first 0, count N), or one chunk of them.
struct InputRows {
  int first = 0, count = 0, L = 0;
  static InputRows all(int N, int L) { return {0, N, L}; }
  static InputRows chunk(int n0, int n1, int L) { return {n0, n1 - n0, L}; }
  /// The row of input n of sample b at patch position l.
  KOKKOS_INLINE_FUNCTION std::int64_t operator()(int b, int n, int l) const {
    return (std::int64_t(b) * count + (n - first)) * L + l;
  }
};

/// Whether input n of sample b is missing under `valid` (an empty mask: none is).
template <class MemSpace>
KOKKOS_INLINE_FUNCTION bool is_missing(const InputMask<MemSpace>& valid, int b, int n) {
  return valid.data() != nullptr && valid(b, n) == 0;
}

/// The softmax numerator exp(s - m) of score s under the running max m. A missing input's score
/// is -Inf and its numerator 0, also where every input of a segment is missing (m = -Inf too,
/// where exp(s - m) would be NaN).
template <class Scalar>
KOKKOS_INLINE_FUNCTION Scalar softmax_numerator(Scalar s, Scalar m) {
  return s == -infinity<Scalar>() ? Scalar(0) : detail::exp(s - m);
}

/// v / sum for a softmax denominator `sum`; 0 where the segment held no valid input (sum = 0).
template <class Scalar>
KOKKOS_INLINE_FUNCTION Scalar over_sum(Scalar v, Scalar sum) {
  return sum > Scalar(0) ? v / sum : Scalar(0);
}

template <class T, class MemSpace>
Unmanaged2<T, MemSpace> matrix(T* p, std::size_t rows, std::size_t cols) {
  return Unmanaged2<T, MemSpace>(p, rows, cols);
}

// q_j = Wq qv_j + bq; u_s = Wk_h^T q_jh / sqrt(hd) for column s = j * heads + h.
template <class ExecSpace, class Scalar, class MemSpace>
void compute_query(const ExecSpace& exec, const AttentionConfig& cfg,
                   const AttentionParams<Scalar, MemSpace>& w,
                   const AttentionWork<Scalar, MemSpace>& work) {
  using Policy = Kokkos::RangePolicy<ExecSpace>;
  const int D = cfg.dim, hd = D / cfg.heads, nh = cfg.heads, S = score_columns(cfg);
  const Scalar scale = Scalar(1) / detail::sqrt(Scalar(hd));
  auto w_in = w.w_in;
  auto b_in = w.b_in;
  auto qv = w.query;
  auto q = work.q;
  auto u = work.u;
  Kokkos::parallel_for(
      "dchag::attention::query", Policy(exec, 0, cfg.queries * D), KOKKOS_LAMBDA(const int i) {
        const int j = i / D, r = i % D;
        Scalar acc = b_in(0, r);
        for (int d = 0; d < D; ++d) acc += w_in(0, r, d) * qv(j * D + d);
        q(i) = acc;
      });
  Kokkos::parallel_for(
      "dchag::attention::u", Policy(exec, 0, S * D), KOKKOS_LAMBDA(const int i) {
        const int s = i / D, d = i % D, j = s / nh, h = s % nh;
        Scalar acc = 0;
        for (int r = h * hd; r < (h + 1) * hd; ++r) acc += w_in(1, r, d) * q(j * D + r);
        u(s, d) = acc * scale;
      });
}

// Per output position and score column [h0, h1): run_max = max over the segment of the scores.
template <class ExecSpace, class Scalar, class MemSpace>
void segment_max(const ExecSpace& exec, const AttentionSaved<Scalar, MemSpace>& s, int h0, int h1) {
  const int N = s.N, L = s.L, k = s.k;
  auto a = s.a;
  auto off = s.offsets;
  auto run_max = s.run_max;
  for_each_row(
      exec, "dchag::attention::segment_max", std::int64_t(s.B) * k * L, h1 - h0,
      KOKKOS_LAMBDA(const std::int64_t pos, const int hh) {
        const int h = h0 + hh;
        const int l = static_cast<int>(pos % L), j = static_cast<int>((pos / L) % k);
        const std::int64_t row0 = (pos / (std::int64_t(L) * k)) * N * L + l;
        Scalar m = a(row0 + std::int64_t(off(j)) * L, h);
        for (int n = off(j) + 1; n < off(j + 1); ++n)
          m = detail::max(m, a(row0 + std::int64_t(n) * L, h));
        run_max(pos, h) = m;
      });
}

// In place on a: e = exp(score - run_max) (0 for a missing input); run_sum = sum of e over the
// segment; heads [h0, h1).
template <class ExecSpace, class Scalar, class MemSpace>
void exponentiate(const ExecSpace& exec, const AttentionSaved<Scalar, MemSpace>& s, int h0,
                  int h1) {
  const int N = s.N, L = s.L, k = s.k;
  auto a = s.a;
  auto off = s.offsets;
  auto run_max = s.run_max;
  auto run_sum = s.run_sum;
  for_each_row(
      exec, "dchag::attention::exponentiate", std::int64_t(s.B) * k * L, h1 - h0,
      KOKKOS_LAMBDA(const std::int64_t pos, const int hh) {
        const int h = h0 + hh;
        const int l = static_cast<int>(pos % L), j = static_cast<int>((pos / L) % k);
        const std::int64_t row0 = (pos / (std::int64_t(L) * k)) * N * L + l;
        Scalar sum = 0;
        for (int n = off(j); n < off(j + 1); ++n) {
          Scalar& v = a(row0 + std::int64_t(n) * L, h);
          v = softmax_numerator(v, run_max(pos, h));
          sum += v;
        }
        run_sum(pos, h) = sum;
      });
}

// Softmax weights from the numerators: a[row, h] /= run_sum[pos(row), h], heads [h0, h1).
template <class ExecSpace, class Scalar, class MemSpace>
void normalize_weights(const ExecSpace& exec, const AttentionSaved<Scalar, MemSpace>& s, int h0,
                       int h1) {
  const int N = s.N, L = s.L, k = s.k;
  auto a = s.a;
  auto run_sum = s.run_sum;
  auto seg = s.segment;
  for_each_row(
      exec, "dchag::attention::normalize_weights", std::int64_t(s.B) * N * L, h1 - h0,
      KOKKOS_LAMBDA(const std::int64_t row, const int hh) {
        const std::int64_t bn = row / L;
        const std::int64_t pos = ((bn / N) * k + seg(bn % N)) * L + row % L;
        a(row, h0 + hh) = over_sum(a(row, h0 + hh), run_sum(pos, h0 + hh));
      });
}

// The scores a [B*N*L, heads] of missing inputs (s.valid) become -Inf: no softmax weight.
template <class ExecSpace, class Scalar, class MemSpace>
void mask_scores(const ExecSpace& exec, const AttentionSaved<Scalar, MemSpace>& s) {
  if (s.valid.data() == nullptr) return;
  const int N = s.N, L = s.L;
  auto a = s.a;
  auto valid = s.valid;
  for_each_row(
      exec, "dchag::attention::mask_scores", std::int64_t(s.B) * N * L,
      static_cast<int>(a.extent(1)), KOKKOS_LAMBDA(const std::int64_t row, const int h) {
        const std::int64_t bn = row / L;
        if (valid(bn / N, bn % N) == 0) a(row, h) = -infinity<Scalar>();
      });
}

// out = ocat Wo^T + bo (bo only where this module owns it).
template <class ExecSpace, class Scalar, class MemSpace>
void project_out(const ExecSpace& exec, const AttentionSaved<Scalar, MemSpace>& s,
                 const AttentionParams<Scalar, MemSpace>& w, bool with_bias,
                 const View4<Scalar, MemSpace>& out) {
  const int D = static_cast<int>(w.b_out.extent(0));
  const std::size_t P = s.ocat.extent(0);
  auto out2 = matrix<Scalar, MemSpace>(out.data(), P, D);
  auto bo = w.b_out;
  for_each_row(
      exec, "dchag::attention::out_bias", P, D, KOKKOS_LAMBDA(const std::int64_t pos, const int d) {
        out2(pos, d) = with_bias ? bo(d) : Scalar(0);
      });
  gemm(exec, "N", "T", Scalar(1), s.ocat, w.w_out, Scalar(1), out2);
}

// dst(c) += sum over rows of m(row, c).
template <class ExecSpace, class M, class Dst>
void column_sums(const ExecSpace& exec, const M& m, const Dst& dst) {
  using Scalar = typename Dst::non_const_value_type;
  const std::int64_t rows = m.extent(0);
  Kokkos::parallel_for(
      "dchag::attention::column_sums", Kokkos::RangePolicy<ExecSpace>(exec, 0, m.extent(1)),
      KOKKOS_LAMBDA(const int c) {
        Scalar acc = 0;
        for (std::int64_t r = 0; r < rows; ++r) acc += m(r, c);
        dst(c) += acc;
      });
}

// dbo, dWo, and go = g Wo (into work.go).
template <class ExecSpace, class Scalar, class MemSpace>
void back_project_out(const ExecSpace& exec, const AttentionSaved<Scalar, MemSpace>& s,
                      const AttentionParams<Scalar, MemSpace>& w,
                      const AttentionParams<Scalar, MemSpace>& grad, bool with_bias,
                      const View4<const Scalar, MemSpace>& d_out,
                      AttentionWork<Scalar, MemSpace>& work) {
  const int D = static_cast<int>(w.b_out.extent(0));
  const std::size_t P = s.ocat.extent(0);
  auto g2 = matrix<const Scalar, MemSpace>(d_out.data(), P, D);
  if (with_bias) column_sums(exec, g2, grad.b_out);
  gemm(exec, "T", "N", Scalar(1), g2, s.ocat, Scalar(1), grad.w_out);
  ensure_view(work.go, "dchag::attention::go", P, std::size_t(D));
  gemm(exec, "N", "N", Scalar(1), g2, w.w_out, Scalar(0), work.go);
}

// From dq: dqv_j = Wq^T dq_j, dWq += sum_j dq_j (x) qv_j, dbq += sum_j dq_j.
template <class ExecSpace, class Scalar, class MemSpace>
void back_query(const ExecSpace& exec, const AttentionParams<Scalar, MemSpace>& w,
                const AttentionParams<Scalar, MemSpace>& grad,
                const AttentionWork<Scalar, MemSpace>& work) {
  using Policy = Kokkos::RangePolicy<ExecSpace>;
  const int D = static_cast<int>(w.w_out.extent(0));
  const int queries = static_cast<int>(w.query.extent(0)) / D;
  auto dq = work.dq;
  auto w_in = w.w_in;
  auto qv = w.query;
  auto dw = grad.w_in;
  auto db = grad.b_in;
  auto dqv = grad.query;
  Kokkos::parallel_for(
      "dchag::attention::query_vector_grad", Policy(exec, 0, queries * D),
      KOKKOS_LAMBDA(const int i) {
        const int j = i / D, d = i % D;
        Scalar acc = 0;
        for (int r = 0; r < D; ++r) acc += w_in(0, r, d) * dq(j * D + r);
        dqv(i) += acc;
      });
  Kokkos::parallel_for(
      "dchag::attention::query_weight_grad", Policy(exec, 0, D), KOKKOS_LAMBDA(const int r) {
        for (int d = 0; d < D; ++d) {
          Scalar acc = 0;
          for (int j = 0; j < queries; ++j) acc += dq(j * D + r) * qv(j * D + d);
          dw(0, r, d) += acc;
        }
        Scalar acc = 0;
        for (int j = 0; j < queries; ++j) acc += dq(j * D + r);
        db(0, r) += acc;
      });
}

}  // namespace dchag::detail
