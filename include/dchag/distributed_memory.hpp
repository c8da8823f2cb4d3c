#pragma once
/// What a rank of the distributed front end (distributed.hpp) holds, estimated before anything is
/// allocated: estimate_memory, per mode, memory policy and storage type (DESIGN 5).
#include <dchag/channel_map.hpp>
#include <dchag/detail/distributed_support.hpp>
#include <dchag/front_end.hpp>
#include <dchag/memory.hpp>

#include <cstdint>

namespace dchag {

/// Bytes rank `rank` holds for one training step of `mode` on B images (DESIGN 5), without
/// allocating anything. Measured high-water marks (MemoryTracker) agree within a few percent.
/// Validates its arguments as the constructor and forward do. Scalar and Storage as for
/// DistributedFrontEnd.
template <class Scalar, class ExecSpace = Kokkos::DefaultExecutionSpace, class Storage = Scalar>
MemoryEstimate estimate_memory(const FrontEndConfig& cfg, Mode mode, const ChannelMap& map,
                               int rank, std::int64_t B, int tree = 1) {
  using Attention = CrossAttention<ExecSpace, Scalar>;
  constexpr const char* where = "dchag::estimate_memory";
  detail::validate_rank(where, cfg, mode, map, rank, tree);
  cfg.validate_batch(where, B, detail::channels_folded(mode, map, rank));
  // Within the limits validate_batch checks, B and L fit the attention estimate's ints.
  const int P = map.ranks(), D = cfg.dim, b = static_cast<int>(B);
  const int L = static_cast<int>(cfg.patches());
  const int Cr = static_cast<int>(map.channels_of(rank).size());
  const std::int64_t S = sizeof(Scalar), token = S * B * L * D;
  const MemoryPolicy memory = cfg.memory;
  const bool train = memory != MemoryPolicy::inference;
  MemoryEstimate e = PositionalEmbedding<ExecSpace, Scalar>::estimate(L, D);
  e += detail::LeadTimeStage<ExecSpace, Scalar>::estimate(cfg.lead_time, D, B);
  e += Attention::estimate_module(cfg.attention());
  if (mode == Mode::dchag_linear || mode == Mode::dchag_xattn) {
    const auto kind =
        mode == Mode::dchag_linear ? PartialKind::linear : PartialKind::cross_attention;
    e += detail::ChannelStage<ExecSpace, Scalar, Storage>::estimate(cfg, Cr, kind, tree, B);
    e += Attention::estimate_application(cfg.attention(), b, P, L, 1, cfg.heads, false, 0,
                                         train ? MemoryPolicy::keep : MemoryPolicy::inference);
    e.activations += token * (P + 1);     // gathered, partial
    e.communication += token * P;         // received
    if (train) e.workspace += token * P;  // d_gathered
    if (train) e.workspace += S * cfg.tokenizer.replicated_elements(cfg.patch, D);  // shared_before
    e.communication += detail::staging_bytes<ExecSpace, Scalar>(cfg, mode, P, Cr, B);
    return e;
  }
  const bool tp = mode == Mode::tp_only;
  const int J = tp ? cfg.channels : Cr;
  const auto [h0, h1] = detail::head_share(cfg.heads, P, rank);
  if (tp) {
    e += Tokenizer<ExecSpace, Scalar, Storage>::estimate(cfg.tokenizer, J, cfg.patch, D, B, J, L, 0,
                                                         cfg.channels);
    e += Attention::estimate_application(cfg.attention(), b, J, L, 1, h1 - h0, false);
    e.activations += token * J;                      // tokens
    e.workspace += token * J + S * D * cfg.queries;  // d_tokens, the query gradient before
  } else {
    using Tokens = detail::FusedTokens<Scalar, Storage, typename ExecSpace::memory_space>;
    const int width =
        detail::fused_chunk_channels<ExecSpace, Scalar, Storage>(B, L, D, J, 0, memory);
    e += Tokenizer<ExecSpace, Scalar, Storage>::estimate(cfg.tokenizer, J, cfg.patch, D, B, J, L,
                                                         Tokens::all_patches(memory) ? 0 : width,
                                                         cfg.channels);
    e += Attention::estimate_application(cfg.attention(), b, J, L, 1, cfg.heads, true, width,
                                         memory);
    e += detail::fused_buffers_estimate<ExecSpace, Scalar, Storage>(B, L, D, J, 0, memory);
    if (train) e.workspace += S * cfg.tokenizer.replicated_elements(cfg.patch, D);  // shared_before
  }
  e.communication += detail::staging_bytes<ExecSpace, Scalar>(cfg, mode, P, J, B);
  return e;
}

}  // namespace dchag
