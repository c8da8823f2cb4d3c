#pragma once
/// Bookkeeping of the single-query cross-attention (dchag/cross_attention.hpp): the Saved state
/// of a forward, the names of its parameters by convention, and the bytes one application holds.
#include <dchag/attention_state.hpp>
#include <dchag/detail/attention_pooled.hpp>
#include <dchag/detail/sizes.hpp>
#include <dchag/detail/workspace.hpp>
#include <dchag/memory.hpp>
#include <dchag/tensor.hpp>

#include <cstdint>
#include <string>

namespace dchag::detail {

// The saved state of a forward over B x N x L inputs in `seg` with cfg.strategy (materialized:
// heads [head_begin, head_end) only): the weights of every input (keep) or the scores of one
// chunk of `chunk` inputs (0: grown by the first stream_chunk); `valid`: the inputs present (the
// caller checked its extents).
template <class Scalar, class MemSpace>
void prepare_saved(const AttentionConfig& cfg, int head_begin, int head_end, std::size_t B,
                   std::size_t N, std::size_t L, const Segments& seg, bool grouped,
                   AttentionSaved<Scalar, MemSpace>& s, MemoryPolicy memory, int chunk,
                   const InputMask<MemSpace>& valid = {}) {
  const std::size_t k = seg.count(), D = cfg.dim, nh = score_columns(cfg);  // nh: columns
  const std::size_t M = B * N * L, P = B * k * L;
  if (s.host_offsets != seg.offsets || s.N != int(N)) {
    ensure_view(s.offsets, "dchag::attention::offsets", k + 1);
    ensure_view(s.segment, "dchag::attention::segment", N);
    auto ho = Kokkos::create_mirror_view(s.offsets);
    auto hs = Kokkos::create_mirror_view(s.segment);
    for (std::size_t j = 0; j <= k; ++j) ho(j) = seg.offsets[j];
    for (std::size_t j = 0; j < k; ++j)
      for (int n = seg.offsets[j]; n < seg.offsets[j + 1]; ++n) hs(n) = int(j);
    Kokkos::deep_copy(s.offsets, ho);
    Kokkos::deep_copy(s.segment, hs);
    s.host_offsets = seg.offsets;
  }
  if (memory == MemoryPolicy::keep) {
    ensure_view(s.a, "dchag::attention::a", M, nh);
  } else if (chunk > 0) {
    ensure_view(s.a, "dchag::attention::chunk_scores", B * chunk * L, nh);
  }
  ensure_view(s.ocat, "dchag::attention::ocat", P * std::size_t(cfg.queries), D);
  ensure_view(s.run_max, "dchag::attention::run_max", P, nh);
  ensure_view(s.run_sum, "dchag::attention::run_sum", P, nh);
  if (cfg.strategy == Strategy::pooled) {
    ensure_view(s.z, "dchag::attention::z", nh, P, D);
    if (grouped) ensure_view(s.inv_share, "dchag::attention::inv_share", P, nh);
    s.kmat = View2<Scalar, MemSpace>();
    s.vmat = View2<Scalar, MemSpace>();
  } else {
    const std::size_t Dr = std::size_t(head_end - head_begin) * (D / cfg.heads);
    ensure_view(s.kmat, "dchag::attention::k", M, Dr);
    ensure_view(s.vmat, "dchag::attention::v", M, Dr);
    s.z = View3<Scalar, MemSpace>();
  }
  if (!grouped) s.inv_share = View2<Scalar, MemSpace>();
  s.valid = valid;
  s.B = int(B);
  s.N = int(N);
  s.L = int(L);
  s.k = int(k);
  s.strategy = cfg.strategy;
  s.memory = memory;
  s.head_begin = head_begin;
  s.head_end = head_end;
  s.grouped = grouped;
}

// The parameters (or gradients) of a module as its convention names them: climax
// `{prefix}var_query` [1,1,D], `{prefix}var_agg.in_proj_weight` [3D,D], `.in_proj_bias` [3D],
// `.out_proj.weight`, `.out_proj.bias`; artifact `{prefix}query` [D], `q.weight` [D,D],
// `kv.weight` [2D,D], `proj.weight`, `proj.bias`.
template <class Scalar, class MemSpace>
TensorList<Scalar, MemSpace> attention_tensors(
    const AttentionConfig& cfg, const std::string& prefix, const View1<Scalar, MemSpace>& qv,
    const View3<Scalar, MemSpace>& w_in, const View2<Scalar, MemSpace>& b_in,
    const View2<Scalar, MemSpace>& w_out, const View1<Scalar, MemSpace>& b_out) {
  const std::int64_t D = cfg.dim, Q = cfg.queries;
  TensorList<Scalar, MemSpace> list;
  if (cfg.convention == Convention::climax) {
    list.push_back(whole<Scalar, MemSpace>(prefix + "var_query", {1, Q, D}, qv));
    list.push_back(whole<Scalar, MemSpace>(prefix + "var_agg.in_proj_weight", {3 * D, D}, w_in));
    list.push_back(whole<Scalar, MemSpace>(prefix + "var_agg.in_proj_bias", {3 * D}, b_in));
    list.push_back(whole<Scalar, MemSpace>(prefix + "var_agg.out_proj.weight", {D, D}, w_out));
    list.push_back(whole<Scalar, MemSpace>(prefix + "var_agg.out_proj.bias", {D}, b_out));
  } else {
    auto kv = Unmanaged1<Scalar, MemSpace>(w_in.data() + D * D, 2 * D * D);
    list.push_back(Q == 1 ? whole<Scalar, MemSpace>(prefix + "query", {D}, qv)
                          : whole<Scalar, MemSpace>(prefix + "query", {Q, D}, qv));
    list.push_back(whole<Scalar, MemSpace>(prefix + "q.weight", {D, D},
                                           Kokkos::subview(w_in, 0, Kokkos::ALL, Kokkos::ALL)));
    list.push_back(whole<Scalar, MemSpace>(prefix + "kv.weight", {2 * D, D}, kv));
    list.push_back(whole<Scalar, MemSpace>(prefix + "proj.weight", {D, D}, w_out));
    list.push_back(whole<Scalar, MemSpace>(prefix + "proj.bias", {D}, b_out));
  }
  return list;
}

// Bytes of one application (CrossAttention::estimate_application, which validates the
// arguments first).
template <class ExecSpace, class Scalar>
MemoryEstimate application_bytes(const AttentionConfig& cfg, std::int64_t B, std::int64_t N,
                                 std::int64_t L, std::int64_t k, int heads_held, bool group,
                                 std::int64_t chunk, MemoryPolicy memory) {
  const std::int64_t S = sizeof(Scalar), D = cfg.dim, nh = score_columns(cfg);  // nh: columns
  const std::int64_t Q = cfg.queries;
  const std::int64_t M = std::int64_t(B) * N * L, P = std::int64_t(B) * k * L;
  const std::int64_t Mc = B * (chunk > 0 ? chunk : N) * L;  // rows of one chunk
  const std::int64_t Dr = heads_held * (D / cfg.heads);
  const bool kept = memory == MemoryPolicy::keep, train = memory != MemoryPolicy::inference;
  MemoryEstimate e;
  // offsets, segment; ocat, run_max, run_sum; the weights a (kept) or one chunk's scores.
  e.activations = std::int64_t(sizeof(int)) * (k + 1 + N) + S * (Q * P * D + 2 * P * nh) +
                  S * (kept ? M : Mc) * nh;
  if (cfg.strategy == Strategy::pooled) {
    e.activations += S * (nh * P * D + (group ? P * nh : 0));  // z, inv_share
    // oh, the stream's numerators, c_group (the local maxima of a group stream).
    e.workspace = S * (Q * P * D + (chunk > 0 ? B * L * chunk * nh : 0) + (group ? P * nh : 0));
    if (train) {
      // go, gz, c, the group-summed gradients (du, dWv share); the score gradients of a chunk
      // on devices, one du share (and scratch) per thread block on host spaces.
      e.workspace +=
          S * (Q * P * D + nh * P * D + P * nh + nh * D + (group ? D * D : 0) +
               (runs_on_host<ExecSpace> ? pooled_grad_blocks<ExecSpace>(B * L) *
                                              std::int64_t(pooled_grad_block_width(int(nh), int(D)))
                                        : Mc * nh));
    }
    e.communication = group ? S * P * (Q * D + nh) : 0;  // the merge buffer
  } else {
    e.activations += S * 2 * M * Dr;
    e.workspace = S * (Q * P * D + P * nh + 2 * M * Dr + M * nh);  // go, c, dK, dV, ds
  }
  return e;
}

}  // namespace dchag::detail
