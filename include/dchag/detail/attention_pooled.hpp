#pragma once
/// The pooled strategy of the cross-attention (DESIGN 3.2, 3.7, 3.8): scores against
/// u_h = Wk_h^T q_h / sqrt(hd), softmax numerators, pooled sums z_h = sum_n e_nh x_n, one
/// projection per head, normalization after pooling (so a channel group can merge its ranks'
/// partial sums exactly, and a stream of channel chunks can run an online softmax).
///
/// Backward forms ds_nh = a_nh gz_h . (x_n - z_h) from the very z the forward normalized: under a
/// saturated softmax x_n == z_h for the winning input, and the difference is then exactly zero.
#include <dchag/detail/attention_common.hpp>
#include <dchag/detail/batched_gemm.hpp>
#include <dchag/detail/lane_tiles.hpp>

#include <algorithm>
#include <cstdint>

namespace dchag::detail {

// z[h, pos] = sum_n e[row(n), h] x[row(n)] over the segment of pos, then finish_pooled.
template <class ExecSpace, class Scalar, class MemSpace>
void pool_tokens(const ExecSpace& exec, const AttentionConfig& cfg,
                 const Unmanaged2<const Scalar, MemSpace>& x2,
                 const AttentionSaved<Scalar, MemSpace>& s) {
  using Member = typename Kokkos::TeamPolicy<ExecSpace>::member_type;
  const int N = s.N, L = s.L, k = s.k, D = cfg.dim, nh = score_columns(cfg);
  const std::int64_t P = std::int64_t(s.B) * k * L;
  auto a = s.a;
  auto z = s.z;
  auto off = s.offsets;
  Kokkos::parallel_for(
      "dchag::attention::pool", row_teams(exec, P), KOKKOS_LAMBDA(const Member& team) {
        const int pos = team.league_rank();
        const int l = pos % L, j = (pos / L) % k, b = pos / (L * k);
        for (int h = 0; h < nh; ++h) {
          Scalar* zh = &z(h, pos, 0);
          Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D), [&](const int d) { zh[d] = 0; });
        }
        for (int n = off(j); n < off(j + 1); ++n) {
          const std::int64_t row = (std::int64_t(b) * N + n) * L + l;
          const Scalar* xr = &x2(row, 0);
          for (int h = 0; h < nh; ++h) {
            const Scalar c = a(row, h);
            Scalar* zh = &z(h, pos, 0);
            Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D),
                                 [&](const int d) { zh[d] += c * xr[d]; });
          }
        }
      });
}

// From the softmax numerators e (in a, when `normalize_a`), their sums and the pooled
// z = sum e x: projects y_h = Wv_h z_h, merges (y, sums) over the group, then normalizes a and z
// and writes ocat[pos, h-block] = y_h / sum_h + bv_h. Grouped: inv_share = group sum / this
// rank's sum.
template <class ExecSpace, class Scalar, class MemSpace>
void finish_pooled(const ExecSpace& exec, const AttentionConfig& cfg,
                   const AttentionParams<Scalar, MemSpace>& w,
                   const AttentionSaved<Scalar, MemSpace>& s, AttentionWork<Scalar, MemSpace>& work,
                   const GroupReduce<Scalar, MemSpace>* group, bool normalize_a) {
  const int D = cfg.dim, nh = cfg.heads, hd = D / nh, S = score_columns(cfg);
  const std::size_t P = std::size_t(s.B) * s.k * s.L;
  ensure_view(work.oh, "dchag::attention::oh", std::size_t(S), P, std::size_t(hd));
  auto oh = work.oh;
  for (int c = 0; c < S; ++c) {  // column c = j * heads + h: oh_c = z_c Wv_h^T
    const int h = c % nh;
    auto zc = Kokkos::subview(s.z, c, Kokkos::ALL, Kokkos::ALL);
    auto wv = Kokkos::subview(w.w_in, 2, Kokkos::make_pair(h * hd, (h + 1) * hd), Kokkos::ALL);
    gemm(exec, "N", "T", Scalar(1), zc, wv, Scalar(0),
         Kokkos::subview(oh, c, Kokkos::ALL, Kokkos::ALL));
  }
  auto run_sum = s.run_sum;
  if (group) {
    auto inv_share = s.inv_share;
    Kokkos::deep_copy(exec, inv_share, run_sum);
    // One message: [P, S * hd] projected sums then [P, S] softmax denominators.
    const int W = S * hd + S;
    ensure_view(work.merge, "dchag::attention::merge", P * W);
    auto merged = work.merge;
    for_each_row(
        exec, "dchag::attention::pack", P, W, KOKKOS_LAMBDA(const std::int64_t pos, const int c) {
          merged(pos * W + c) = c < S * hd ? oh(c / hd, pos, c % hd) : run_sum(pos, c - S * hd);
        });
    group->sum(Unmanaged1<Scalar, MemSpace>(merged.data(), merged.span()));
    for_each_row(
        exec, "dchag::attention::unpack", P, W, KOKKOS_LAMBDA(const std::int64_t pos, const int c) {
          if (c < S * hd) {
            oh(c / hd, pos, c % hd) = merged(pos * W + c);
          } else {
            const int col = c - S * hd;
            const Scalar total = merged(pos * W + c), mine = inv_share(pos, col);
            run_sum(pos, col) = total;
            // A rank whose numerators all underflowed holds none of the softmax mass.
            inv_share(pos, col) = mine > Scalar(0) ? total / mine : Scalar(0);
          }
        });
  }
  auto z = s.z;
  auto ocat = s.ocat;
  auto b_in = w.b_in;
  const int queries = cfg.queries;
  if (normalize_a) normalize_weights(exec, s, 0, S);
  for_each_row(
      exec, "dchag::attention::normalize_pool", std::int64_t(S) * P, D,
      KOKKOS_LAMBDA(const std::int64_t r, const int d) {
        const std::int64_t pos = r % std::int64_t(P);
        const std::int64_t h = r / std::int64_t(P);
        z(h, pos, d) = over_sum(z(h, pos, d), run_sum(pos, h));
      });
  // ocat row pos * queries + j: query j's heads.
  for_each_row(
      exec, "dchag::attention::concat", std::int64_t(P) * queries, D,
      KOKKOS_LAMBDA(const std::int64_t row, const int r) {
        const std::int64_t pos = row / queries;
        const int c = int(row % queries) * nh + r / hd;
        // A segment with no valid input has no softmax: its heads give 0 (as materialized's).
        const Scalar sum = run_sum(pos, c);
        ocat(row, r) = sum > Scalar(0) ? oh(c, pos, r % hd) / sum + b_in(2, r) : Scalar(0);
      });
}

// Host pooled backward: values per block share, du [heads, D] then the scratch ds and a,
// padded to a multiple of 1024 values (whole 4 KiB pages), so that every block's share starts
// at the same page offset as block 0's. Unpadded, block 1's share began 64 bytes past a page
// boundary and its thread ran the token gradient 1.6x slower than block 0's (bench/README.md,
// "Threads").
inline std::size_t pooled_grad_block_width(int heads, int dim) {
  constexpr std::size_t page_values = 1024;
  const std::size_t used = std::size_t(heads) * (std::size_t(dim) + 2);
  return (used + page_values - 1) / page_values * page_values;
}

// Host pooled backward: how many blocks of patch positions (one per thread) share the work.
// Zero on devices, which take the team shape and need no blocks.
template <class ExecSpace>
std::int64_t pooled_grad_blocks(std::int64_t positions) {
  if constexpr (runs_on_host<ExecSpace>) {
    const std::int64_t threads = Kokkos::is_initialized() ? ExecSpace().concurrency() : 1;
    return std::max<std::int64_t>(1, std::min(positions, threads));
  } else {
    return 0;
  }
}

// Pooled backward, the parts before the tokens: dbv, dWv (this rank's share when grouped),
// gz_c = Wv_h^T go_c per score column c = j * heads + h and, grouped, c_c = gz_c . z_c over the
// group; zeroes du.
template <class ExecSpace, class Scalar, class MemSpace>
void pooled_backward_begin(const ExecSpace& exec, const AttentionConfig& cfg,
                           const AttentionParams<Scalar, MemSpace>& w,
                           const AttentionParams<Scalar, MemSpace>& grad,
                           const AttentionSaved<Scalar, MemSpace>& s,
                           AttentionWork<Scalar, MemSpace>& work,
                           const GroupReduce<Scalar, MemSpace>* group) {
  const int D = cfg.dim, nh = cfg.heads, hd = D / nh, S = score_columns(cfg);
  const int queries = cfg.queries;
  const std::size_t P = std::size_t(s.B) * s.k * s.L;
  auto go = work.go;  // [P * queries, D]
  if (s.valid.data() != nullptr) {
    // Heads of a segment with no valid input gave 0, whatever their weights: no gradient.
    auto run_sum = s.run_sum;
    for_each_row(
        exec, "dchag::attention::empty_segment_grad", std::int64_t(P) * queries, D,
        KOKKOS_LAMBDA(const std::int64_t row, const int r) {
          if (!(run_sum(row / queries, int(row % queries) * nh + r / hd) > Scalar(0)))
            go(row, r) = 0;
        });
  }
  column_sums(exec, go, Kokkos::subview(grad.b_in, 2, Kokkos::ALL));
  // What a group sums at the end: du [S, D] then this rank's dWv share [D, D], one message.
  ensure_view(work.shared, "dchag::attention::group_grads",
              std::size_t(S) * D + (group ? std::size_t(D) * D : 0));
  auto shared = work.shared;
  Kokkos::deep_copy(exec,
                    Kokkos::subview(shared, Kokkos::make_pair(std::size_t(0), std::size_t(S) * D)),
                    Scalar(0));
  auto dwv = group ? Unmanaged2<Scalar, MemSpace>(shared.data() + std::size_t(S) * D, D, D)
                   : Unmanaged2<Scalar, MemSpace>(&grad.w_in(2, 0, 0), D, D);
  work.group_backward = group != nullptr;
  // Per column c = j * heads + h: dWv_h += go_c^T z_c, gz_c = go_c Wv_h.
  ensure_view(work.oh, "dchag::attention::oh", std::size_t(S), P, std::size_t(hd));
  auto goh = work.oh;
  for_each_row(
      exec, "dchag::attention::split_heads", std::int64_t(P) * queries, D,
      KOKKOS_LAMBDA(const std::int64_t row, const int r) {
        goh(int(row % queries) * nh + r / hd, row / queries, r % hd) = go(row, r);
      });
  ensure_view(work.gz, "dchag::attention::gz", std::size_t(S), P, std::size_t(D));
  for (int c = 0; c < S; ++c) {
    const int h = c % nh;
    auto gc = Kokkos::subview(goh, c, Kokkos::ALL, Kokkos::ALL);
    auto zc = Kokkos::subview(s.z, c, Kokkos::ALL, Kokkos::ALL);
    auto rows = Kokkos::make_pair(h * hd, (h + 1) * hd);
    gemm(exec, "T", "N", Scalar(1), gc, zc, group && c < nh ? Scalar(0) : Scalar(1),
         Kokkos::subview(dwv, rows, Kokkos::ALL));
    gemm(exec, "N", "N", Scalar(1), gc, Kokkos::subview(w.w_in, 2, rows, Kokkos::ALL), Scalar(0),
         Kokkos::subview(work.gz, c, Kokkos::ALL, Kokkos::ALL));
  }
  ensure_view(work.c, "dchag::attention::c", P, std::size_t(S));
  if constexpr (runs_on_host<ExecSpace>) {
    ensure_view(work.du_blocks, "dchag::attention::du_blocks",
                std::size_t(pooled_grad_blocks<ExecSpace>(std::int64_t(s.B) * s.L)),
                pooled_grad_block_width(S, D));
    Kokkos::deep_copy(exec, work.du_blocks, Scalar(0));
  }
  if (!group) return;
  // c_h = gz_h . z_h of this rank's share of z, summed over the group: each rank then forms
  // gz_h . (x - z_h) as gz_h . (x - z_h,r) + (c_h,r - c_h), where z_h,r is its own normalized
  // pooled token; for a rank holding all of the softmax mass the correction is exactly zero.
  ensure_view(work.c_group, "dchag::attention::c_group", P, std::size_t(S));
  auto gz = work.gz;
  auto z = s.z;
  auto c = work.c;
  auto c_group = work.c_group;
  for_each_row(
      exec, "dchag::attention::gz_dot_z", P, S, KOKKOS_LAMBDA(const std::int64_t pos, const int h) {
        const Scalar v = lane_dot(&gz(h, pos, 0), &z(h, pos, 0), D);
        c(pos, h) = v;
        c_group(pos, h) = v;
      });
  group->sum(Unmanaged1<Scalar, MemSpace>(c_group.data(), c_group.span()));
  auto inv_share = s.inv_share;
  for_each_row(
      exec, "dchag::attention::share_correction", P, S,
      KOKKOS_LAMBDA(const std::int64_t pos, const int h) {
        c(pos, h) = inv_share(pos, h) * c(pos, h) - c_group(pos, h);
      });
}

// Pooled backward for the tokens of inputs [n0, n1), device shape: one team per token row;
// a_h (read back, or recomputed from the token: exp(x . u_h - run_max) / run_sum),
// ds_h = a_h gz_h . (x - z_h), dx = sum_h a_h gz_h + ds_h u_h (into dx [B, n1 - n0, L, D]), then
// du += ds^T x as one batched GEMM over the chunk. `xr`: the rows x2 holds.
template <class ExecSpace, class Scalar, class MemSpace>
void pooled_token_grad_team(const ExecSpace& exec, const AttentionConfig& cfg,
                            const Unmanaged2<const Scalar, MemSpace>& x2, InputRows xr,
                            const AttentionSaved<Scalar, MemSpace>& s,
                            AttentionWork<Scalar, MemSpace>& work, int n0, int n1,
                            const View4<Scalar, MemSpace>& dx) {
  using Member = typename Kokkos::TeamPolicy<ExecSpace>::member_type;
  const int N = s.N, L = s.L, k = s.k, D = cfg.dim, nh = score_columns(cfg), nc = n1 - n0;
  const bool grouped = s.grouped, kept = s.memory == MemoryPolicy::keep;
  const std::size_t rows = std::size_t(s.B) * nc * L;
  if (work.ds.extent(0) < rows || work.ds.extent(1) != std::size_t(nh))
    ensure_view(work.ds, "dchag::attention::ds", rows, std::size_t(nh));
  auto dx2 = matrix<Scalar, MemSpace>(dx.data(), rows, D);
  auto ds = work.ds;
  auto gz = work.gz;
  auto c = work.c;
  auto a = s.a;
  auto z = s.z;
  auto run_max = s.run_max;
  auto run_sum = s.run_sum;
  auto inv_share = s.inv_share;
  auto u = work.u;
  auto seg = s.segment;
  auto valid = s.valid;
  Kokkos::parallel_for(
      "dchag::attention::pooled_token_grad", row_teams(exec, std::int64_t(rows)),
      KOKKOS_LAMBDA(const Member& team) {
        const std::int64_t crow = team.league_rank();  // row of the chunk
        const int l = static_cast<int>(crow % L);
        const int n = n0 + static_cast<int>((crow / L) % nc);
        const int b = static_cast<int>(crow / (std::int64_t(L) * nc));
        const std::int64_t pos = (std::int64_t(b) * k + seg(n)) * L + l;
        const Scalar* xn = &x2(xr(b, n, l), 0);
        Scalar* dxr = &dx2(crow, 0);
        const bool missing = is_missing(valid, b, n);
        for (int h = 0; h < nh; ++h) {
          const Scalar* gzh = &gz(h, pos, 0);
          const Scalar* uh = &u(h, 0);
          const Scalar share = grouped ? inv_share(pos, h) : Scalar(1);
          const Scalar t = team_dot_residual(team, gzh, xn, &z(h, pos, 0), share, D) +
                           (grouped ? c(pos, h) : Scalar(0));
          const Scalar ah = kept      ? a((std::int64_t(b) * N + n) * L + l, h)
                            : missing ? Scalar(0)
                                      : detail::exp(team_dot(team, xn, uh, D) - run_max(pos, h)) /
                                            run_sum(pos, h);
          const Scalar dsh = ah * t;
          Kokkos::single(Kokkos::PerTeam(team), [&]() { ds(crow, h) = dsh; });
          // Each lane owns its d across heads, so the accumulation needs no barrier.
          Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D), [&](const int d) {
            const Scalar prev = h == 0 ? Scalar(0) : dxr[d];
            dxr[d] = prev + ah * gzh[d] + dsh * uh[d];
          });
        }
      });
  // du += ds^T x over the chunk's rows, one GEMM summing over the samples (the chunk's rows are
  // contiguous within each sample only).
  Scalar* du = work.shared.data();
  const Scalar* x0 = &x2(xr(0, n0, 0), 0);
  batched_gemm(
      exec, "dchag::attention::key_query_grad", {1, nh, D, nc * L, s.B}, KOKKOS_LAMBDA(const int) {
        return GemmOperands<Scalar>{ds.data(), std::int64_t(nc) * L * nh,      1, nh,
                                    x0,        std::int64_t(xr.count) * L * D, D, du,
                                    D};
      });
}

// The same, host shape: the chunk's inputs split into one contiguous block per thread, the
// split the tokenizer's weight-gradient batch takes next, so a thread consumes the dx it wrote
// while it is in its own cache. Each position's gz and z stay in cache across the block's
// inputs; du += ds x goes into the block's own share (du_blocks: du, then the ds and the a of
// the current token as scratch), summed by pooled_backward_end in block order: fixed blocks for
// a fixed thread count, so the result is reproducible.
template <class ExecSpace, class Scalar, class MemSpace>
void pooled_token_grad_host(const ExecSpace& exec, const AttentionConfig& cfg,
                            const Unmanaged2<const Scalar, MemSpace>& x2, InputRows xr,
                            const AttentionSaved<Scalar, MemSpace>& s,
                            const AttentionWork<Scalar, MemSpace>& work, int n0, int n1,
                            const View4<Scalar, MemSpace>& dx) {
  const int N = s.N, L = s.L, k = s.k, D = cfg.dim, nh = score_columns(cfg), nc = n1 - n0;
  const std::int64_t positions = std::int64_t(s.B) * L;  // (b, l) pairs
  const int blocks = static_cast<int>(work.du_blocks.extent(0));
  const bool grouped = s.grouped, kept = s.memory == MemoryPolicy::keep;
  auto dx2 = matrix<Scalar, MemSpace>(dx.data(), std::size_t(s.B) * nc * L, D);
  auto gz = work.gz;
  auto c = work.c;
  auto a = s.a;
  auto z = s.z;
  auto run_max = s.run_max;
  auto run_sum = s.run_sum;
  auto inv_share = s.inv_share;
  auto u = work.u;
  auto seg = s.segment;
  auto du_blocks = work.du_blocks;
  auto valid = s.valid;
  const std::int64_t gz_stride = std::int64_t(gz.extent(1)) * D;  // between heads
  const int used = blocks < nc ? blocks : nc;
  Kokkos::parallel_for(
      "dchag::attention::pooled_token_grad", Kokkos::RangePolicy<ExecSpace>(exec, 0, used),
      KOKKOS_LAMBDA(const int blk) {
        Scalar* du = &du_blocks(blk, 0);
        Scalar* dsr = du + std::int64_t(nh) * D;  // scratch: ds, then a, of the current token
        Scalar* ar = dsr + nh;
        const int first = n0 + nc * blk / used, last = n0 + nc * (blk + 1) / used;
        for (std::int64_t bl = 0; bl < positions; ++bl) {
          const int b = static_cast<int>(bl / L), l = static_cast<int>(bl % L);
          for (int n = first; n < last; ++n) {
            const std::int64_t pos = (std::int64_t(b) * k + seg(n)) * L + l;
            const Scalar* xn = &x2(xr(b, n, l), 0);
            Scalar* dxr = &dx2((std::int64_t(b) * nc + (n - n0)) * L + l, 0);
            const Scalar* ah = kept ? &a((std::int64_t(b) * N + n) * L + l, 0) : ar;
            const bool missing = is_missing(valid, b, n);
            // ds_h = a_h (gz_h . (x - share_h z_h) + c_h); not kept, a_h is the forward's
            // expression of the recomputed token's score, formed in the same pass over x.
            for (int h = 0; h < nh; ++h) {
              const Scalar share = grouped ? inv_share(pos, h) : Scalar(1);
              Scalar t;
              if (kept) {
                t = lane_dot_residual(&gz(h, pos, 0), xn, &z(h, pos, 0), share, D);
              } else {
                Scalar score;
                lane_dot_and_residual(xn, &u(h, 0), &gz(h, pos, 0), &z(h, pos, 0), share, D, score,
                                      t);
                ar[h] =
                    missing ? Scalar(0) : detail::exp(score - run_max(pos, h)) / run_sum(pos, h);
              }
              dsr[h] = ah[h] * (t + (grouped ? c(pos, h) : Scalar(0)));
            }
            tiled_token_grad(xn, ah, dsr, &gz(0, pos, 0), gz_stride, &u(0, 0), D, nh, dxr, du);
          }
        }
      });
}

// Pooled backward for the tokens of inputs [n0, n1), held in x2 as `xr` says:
// ds_h = a_h gz_h . (x - z_h), dx = sum_h a_h gz_h + ds_h u_h (into dx [B, n1 - n0, L, D]),
// du += ds^T x.
template <class ExecSpace, class Scalar, class MemSpace>
void pooled_token_grad(const ExecSpace& exec, const AttentionConfig& cfg,
                       const Unmanaged2<const Scalar, MemSpace>& x2, InputRows xr,
                       const AttentionSaved<Scalar, MemSpace>& s,
                       AttentionWork<Scalar, MemSpace>& work, int n0, int n1,
                       const View4<Scalar, MemSpace>& dx) {
  if constexpr (runs_on_host<ExecSpace>) {
    pooled_token_grad_host(exec, cfg, x2, xr, s, work, n0, n1, dx);
  } else {
    pooled_token_grad_team(exec, cfg, x2, xr, s, work, n0, n1, dx);
  }
}

// Pooled backward after the tokens: group sums, then dWk_h = sum_j q_jh (x) du_jh / sqrt(hd) and
// dq_jh = Wk_h du_jh / sqrt(hd) (du_c for column c = j * heads + h).
template <class ExecSpace, class Scalar, class MemSpace>
void pooled_backward_end(const ExecSpace& exec, const AttentionConfig& cfg,
                         const AttentionParams<Scalar, MemSpace>& w,
                         const AttentionParams<Scalar, MemSpace>& grad,
                         const AttentionWork<Scalar, MemSpace>& work,
                         const GroupReduce<Scalar, MemSpace>* group) {
  const int D = cfg.dim, nh = cfg.heads, hd = D / nh, S = score_columns(cfg);
  const int queries = cfg.queries;
  auto shared = work.shared;
  auto dw = grad.w_in;
  if constexpr (runs_on_host<ExecSpace>) {
    // du = the sum of the host blocks' shares (pooled_token_grad_host), in block order.
    auto du_blocks = work.du_blocks;
    const int blocks = static_cast<int>(du_blocks.extent(0));
    Kokkos::parallel_for(
        "dchag::attention::sum_du_blocks", Kokkos::RangePolicy<ExecSpace>(exec, 0, S * D),
        KOKKOS_LAMBDA(const int i) {
          Scalar acc = shared(i);
          for (int blk = 0; blk < blocks; ++blk) acc += du_blocks(blk, i);
          shared(i) = acc;
        });
  }
  if (group) {
    group->sum(Unmanaged1<Scalar, MemSpace>(shared.data(), shared.span()));
    const std::size_t off = std::size_t(S) * D;
    for_each_row(
        exec, "dchag::attention::add_value_grad", D, D,
        KOKKOS_LAMBDA(const std::int64_t r, const int d) {
          dw(2, r, d) += shared(off + r * D + d);
        });
  }
  auto du = Unmanaged2<Scalar, MemSpace>(shared.data(), S, D);
  const Scalar scale = Scalar(1) / detail::sqrt(Scalar(hd));
  auto q = work.q;
  auto dq = work.dq;
  auto w_in = w.w_in;
  Kokkos::parallel_for(
      "dchag::attention::key_grad", Kokkos::RangePolicy<ExecSpace>(exec, 0, D),
      KOKKOS_LAMBDA(const int r) {
        const int h = r / hd;
        for (int j = 0; j < queries; ++j) {
          const int c = j * nh + h;
          Scalar acc = 0;
          for (int d = 0; d < D; ++d) {
            acc += w_in(1, r, d) * du(c, d);
            dw(1, r, d) += q(j * D + r) * du(c, d) * scale;
          }
          dq(j * D + r) = acc * scale;
        }
      });
}

}  // namespace dchag::detail
