#pragma once
/// Configuration vocabulary shared by every dchag module.
#include <string_view>

namespace dchag {

/// Which weights a cross-attention carries.
/// - climax: nn.MultiheadAttention (fused in_proj [3D, D] with biases, out_proj with bias).
/// - artifact: the D-CHAG code (q and kv linears without bias, proj with bias).
enum class Convention { climax, artifact };

/// How a single-query cross-attention is evaluated (DESIGN 3.2). Both give the same result.
/// - pooled: never forms K or V; scores against Wk^T q, pools tokens, projects once (default).
/// - materialized: forms K and V like PyTorch; the reference.
enum class Strategy { pooled, materialized };

/// What folds a rank's channels into one partial token (DESIGN 3.3).
enum class PartialKind { linear, cross_attention };

/// What a forward keeps for its backward (DESIGN 3.8). Every policy gives the same forward and,
/// where a backward may follow, the same gradients.
/// - keep: every channel token (B·C·L·D); the backward reads them back. The fastest backward.
/// - recompute: per patch position the softmax statistics and pooled tokens only; the backward
///   tokenizes each chunk of channels again and consumes it at once. Memory flat in C.
/// - inference: nothing; the forward streams channel chunks and no backward may follow.
/// recompute and inference need the pooled strategy.
enum class MemoryPolicy { keep, recompute, inference };

/// How the distributed front end (dchag/distributed.hpp) splits the work over a channel group.
/// - dchag_linear / dchag_xattn: D-CHAG-L / D-CHAG-C (DESIGN 3.3, 3.4).
/// - exact_flat: the flat aggregation over all channels, distributed exactly (DESIGN 3.7).
/// - tp_only: the paper's tensor-parallel baseline (DESIGN 3.6).
enum class Mode { dchag_linear, dchag_xattn, exact_flat, tp_only };

constexpr std::string_view to_string(Mode m) {
  switch (m) {
    case Mode::dchag_linear:
      return "dchag_linear";
    case Mode::dchag_xattn:
      return "dchag_xattn";
    case Mode::exact_flat:
      return "exact_flat";
    case Mode::tp_only:
      return "tp_only";
  }
  return "?";
}

constexpr std::string_view to_string(Convention c) {
  return c == Convention::climax ? "climax" : "artifact";
}
constexpr std::string_view to_string(Strategy s) {
  return s == Strategy::pooled ? "pooled" : "materialized";
}
constexpr std::string_view to_string(PartialKind k) {
  return k == PartialKind::linear ? "linear" : "cross_attention";
}
constexpr std::string_view to_string(MemoryPolicy m) {
  return m == MemoryPolicy::keep        ? "keep"
         : m == MemoryPolicy::recompute ? "recompute"
                                        : "inference";
}

}  // namespace dchag
