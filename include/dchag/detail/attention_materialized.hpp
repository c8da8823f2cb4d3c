#pragma once
/// The materialized strategy of the cross-attention (DESIGN 3.2): K and V formed for the heads
/// [h0, h1) the module computes (all of them, or a tensor-parallel share), as PyTorch does. The
/// reference the pooled strategy is checked against, and the paper's tp_only baseline.
#include <dchag/detail/attention_common.hpp>

#include <cstdint>

namespace dchag::detail {

template <class ExecSpace, class Scalar, class MemSpace>
void forward_materialized(const ExecSpace& exec, const AttentionConfig& cfg,
                          const AttentionParams<Scalar, MemSpace>& w,
                          const AttentionWork<Scalar, MemSpace>& work,
                          const Unmanaged2<const Scalar, MemSpace>& x2,
                          const AttentionSaved<Scalar, MemSpace>& s) {
  const int N = s.N, L = s.L, k = s.k, D = cfg.dim, nh = cfg.heads, hd = D / nh;
  const int queries = cfg.queries;
  const int h0 = s.head_begin, h1 = s.head_end, r0 = h0 * hd, Dr = (h1 - h0) * hd;
  const std::size_t M = std::size_t(s.B) * N * L, P = std::size_t(s.B) * k * L;
  const Scalar scale = Scalar(1) / detail::sqrt(Scalar(hd));
  auto K = s.kmat;
  auto V = s.vmat;
  auto b_in = w.b_in;
  for_each_row(
      exec, "dchag::attention::kv_bias", M, Dr, KOKKOS_LAMBDA(const std::int64_t row, const int c) {
        K(row, c) = b_in(1, r0 + c);
        V(row, c) = b_in(2, r0 + c);
      });
  const auto rows = Kokkos::make_pair(r0, r0 + Dr);
  gemm(exec, "N", "T", Scalar(1), x2, Kokkos::subview(w.w_in, 1, rows, Kokkos::ALL), Scalar(1), K);
  gemm(exec, "N", "T", Scalar(1), x2, Kokkos::subview(w.w_in, 2, rows, Kokkos::ALL), Scalar(1), V);
  auto a = s.a;
  auto q = work.q;
  // Score column j * heads + h for the share's heads h of every query j.
  for_each_row(
      exec, "dchag::attention::scores", M, (h1 - h0) * queries,
      KOKKOS_LAMBDA(const std::int64_t row, const int jh) {
        const int j = jh / (h1 - h0), h = h0 + jh % (h1 - h0);
        Scalar acc = 0;
        for (int c = (h - h0) * hd; c < (h - h0 + 1) * hd; ++c)
          acc += q(j * D + r0 + c) * K(row, c);
        a(row, j * nh + h) = acc * scale;
      });
  mask_scores(exec, s);
  for (int j = 0; j < queries; ++j) {
    segment_max(exec, s, j * nh + h0, j * nh + h1);
    exponentiate(exec, s, j * nh + h0, j * nh + h1);
    normalize_weights(exec, s, j * nh + h0, j * nh + h1);
  }
  auto ocat = s.ocat;
  auto off = s.offsets;
  for_each_row(
      exec, "dchag::attention::weighted_values", std::int64_t(P) * queries, D,
      KOKKOS_LAMBDA(const std::int64_t orow, const int r) {
        if (r < r0 || r >= r0 + Dr) {
          ocat(orow, r) = 0;  // another rank's heads
          return;
        }
        const std::int64_t pos = orow / queries;
        const int col = int(orow % queries) * nh + r / hd;
        const int l = static_cast<int>(pos % L);
        const int j = static_cast<int>((pos / L) % k);
        const std::int64_t b = pos / (std::int64_t(L) * k);
        Scalar acc = 0;
        for (int n = off(j); n < off(j + 1); ++n) {
          const std::int64_t row = (b * N + n) * L + l;
          acc += a(row, col) * V(row, r - r0);
        }
        ocat(orow, r) = acc;
      });
}

// Accumulates the gradients of the head share [h0, h1) and writes dx, from work.go.
template <class ExecSpace, class Scalar, class MemSpace>
void backward_materialized(const ExecSpace& exec, const AttentionConfig& cfg,
                           const AttentionParams<Scalar, MemSpace>& w,
                           const AttentionParams<Scalar, MemSpace>& grad,
                           AttentionWork<Scalar, MemSpace>& work,
                           const Unmanaged2<const Scalar, MemSpace>& x2,
                           const AttentionSaved<Scalar, MemSpace>& s,
                           const Unmanaged2<Scalar, MemSpace>& dx2) {
  using Policy = Kokkos::RangePolicy<ExecSpace>;
  const int N = s.N, L = s.L, k = s.k, D = cfg.dim, nh = cfg.heads, hd = D / nh;
  const int queries = cfg.queries, S = score_columns(cfg);
  const int h0 = s.head_begin, h1 = s.head_end, r0 = h0 * hd, Dr = (h1 - h0) * hd;
  const std::size_t M = std::size_t(s.B) * N * L, P = std::size_t(s.B) * k * L;
  const Scalar scale = Scalar(1) / detail::sqrt(Scalar(hd));
  auto go = work.go;  // [P * queries, D]
  auto ocat = s.ocat;
  // c[pos, j * heads + h] = go_jh . o_jh  (o without the out-projection; bv is inside V).
  ensure_view(work.c, "dchag::attention::c", P, std::size_t(S));
  auto c = work.c;
  for_each_row(
      exec, "dchag::attention::go_dot_o", P, (h1 - h0) * queries,
      KOKKOS_LAMBDA(const std::int64_t pos, const int jh) {
        const int j = jh / (h1 - h0), h = h0 + jh % (h1 - h0);
        const std::int64_t orow = pos * queries + j;
        Scalar acc = 0;
        for (int r = h * hd; r < (h + 1) * hd; ++r) acc += go(orow, r) * ocat(orow, r);
        c(pos, j * nh + h) = acc;
      });
  ensure_view(work.dk, "dchag::attention::dk", M, std::size_t(Dr));
  ensure_view(work.dv, "dchag::attention::dv", M, std::size_t(Dr));
  ensure_view(work.ds, "dchag::attention::ds", M, std::size_t(S));
  auto dK = work.dk;
  auto dV = work.dv;
  auto dsv = work.ds;
  auto K = s.kmat;
  auto V = s.vmat;
  auto a = s.a;
  auto q = work.q;
  auto seg = s.segment;
  // One thread per (token row, head): the head's rows of dK and dV sum over the queries.
  for_each_row(
      exec, "dchag::attention::materialized_token_grad", M, h1 - h0,
      KOKKOS_LAMBDA(const std::int64_t row, const int hh) {
        const int h = h0 + hh;
        const int l = static_cast<int>(row % L);
        const int n = static_cast<int>((row / L) % N);
        const std::int64_t b = row / (std::int64_t(L) * N);
        const std::int64_t pos = (b * k + seg(n)) * L + l;
        for (int r = h * hd; r < (h + 1) * hd; ++r) {
          dV(row, r - r0) = 0;
          dK(row, r - r0) = 0;
        }
        for (int j = 0; j < queries; ++j) {
          const int col = j * nh + h;
          const std::int64_t orow = pos * queries + j;
          Scalar da = 0;
          for (int r = h * hd; r < (h + 1) * hd; ++r) da += go(orow, r) * V(row, r - r0);
          const Scalar ds = a(row, col) * (da - c(pos, col));
          dsv(row, col) = ds;
          for (int r = h * hd; r < (h + 1) * hd; ++r) {
            dV(row, r - r0) += a(row, col) * go(orow, r);
            dK(row, r - r0) += ds * q(j * D + r) * scale;
          }
        }
      });
  // dq[j * D + r] = sum_rows ds[row, j * heads + h] K[row, r] / sqrt(hd); zero outside the share.
  auto dq = work.dq;
  Kokkos::parallel_for(
      "dchag::attention::query_grad", Policy(exec, 0, queries * D), KOKKOS_LAMBDA(const int i) {
        const int j = i / D, r = i % D;
        Scalar acc = 0;
        if (r >= r0 && r < r0 + Dr) {
          for (std::int64_t row = 0; row < std::int64_t(M); ++row)
            acc += dsv(row, j * nh + r / hd) * K(row, r - r0);
        }
        dq(i) = acc * scale;
      });
  const auto rows = Kokkos::make_pair(r0, r0 + Dr);
  gemm(exec, "N", "N", Scalar(1), dK, Kokkos::subview(w.w_in, 1, rows, Kokkos::ALL), Scalar(0),
       dx2);
  gemm(exec, "N", "N", Scalar(1), dV, Kokkos::subview(w.w_in, 2, rows, Kokkos::ALL), Scalar(1),
       dx2);
  gemm(exec, "T", "N", Scalar(1), dK, x2, Scalar(1),
       Kokkos::subview(grad.w_in, 1, rows, Kokkos::ALL));
  gemm(exec, "T", "N", Scalar(1), dV, x2, Scalar(1),
       Kokkos::subview(grad.w_in, 2, rows, Kokkos::ALL));
  column_sums(exec, dK, Kokkos::subview(grad.b_in, 1, rows));
  column_sums(exec, dV, Kokkos::subview(grad.b_in, 2, rows));
}

}  // namespace dchag::detail
