#pragma once
/// One D-CHAG rank's local work (DchagEmulation, DistributedFrontEnd): its tokenizer and partial
/// aggregator, run through the fused loop of detail/fused.hpp.
#include <dchag/detail/fused.hpp>
#include <dchag/front_end_config.hpp>
#include <dchag/partial_aggregator.hpp>
#include <dchag/tokenizer.hpp>

#include <string>
#include <vector>

namespace dchag::detail {

/// One D-CHAG rank's local work: tokenize its channels and fold them to one partial token, a
/// chunk of channels at a time (detail/fused.hpp), keeping what cfg.memory says.
template <class ExecSpace, class Scalar, class Storage = Scalar>
class ChannelStage {
 public:
  using memory_space = typename ExecSpace::memory_space;
  using V4 = View4<Scalar, memory_space>;
  using Tokens = FusedTokens<Scalar, Storage, memory_space>;

  /// With `share`, the tokenizer parameters every channel shares are those of `share`'s.
  ChannelStage(const ExecSpace& exec, const FrontEndConfig& cfg, std::vector<int> channels,
               PartialKind kind, int tree, const std::string& name,
               const ChannelStage* share = nullptr)
      : tokenizer_(exec, cfg.channels, cfg.patch, cfg.dim, channels, cfg.seed, cfg.tokenizer,
                   share ? &share->tokenizer_ : nullptr),
        partial_(exec, kind, static_cast<int>(channels.size()), tree, cfg.partial_attention(),
                 cfg.seed, name),
        channels_(std::move(channels)) {}

  const std::vector<int>& channels() const { return channels_; }

  /// Allocates what a forward and backward of B images with L patches of width D need.
  void reserve(std::size_t B, std::size_t L, std::size_t D, MemoryPolicy memory) {
    const int J = static_cast<int>(channels_.size());
    if (!partial_.streams()) {  // the materialized reference: every token and its gradient
      fused_ = Tokens();
      ensure_view(tokens_, "dchag::stage::tokens", B, std::size_t(J), L, D);
      ensure_view(d_chunk_, "dchag::stage::d_tokens", B * J * L * D);
      tokenizer_.reserve(int(B), J, int(L));
      partial_.reserve(int(B), int(L), int(D));
      return;
    }
    tokens_ = V4();
    const int chunk = reserve_fused(tokenizer_, fused_, d_chunk_, B, std::size_t(J), L, D, memory);
    partial_.reserve(int(B), int(L), int(D), chunk, memory);
  }

  /// partial [B, 1, L, D] from images holding the channels `sel` names; `valid` [B, C_r]: which
  /// of them each sample holds (empty: all), unchanged until the backward.
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const ChannelSelection& sel, const V4& partial, MemoryPolicy memory,
               const InputMask<memory_space>& valid = {}) {
    memory_ = memory;
    streamed_ = partial_.streams();
    if (streamed_) {
      fused_forward(exec, tokenizer_, partial_, images, sel, fused_, partial, 0, memory, valid);
      return;
    }
    DCHAG_EXPECT(memory == MemoryPolicy::keep, "dchag::ChannelStage::forward", "memory is ",
                 to_string(memory), ", which needs the pooled strategy");
    ensure_view(tokens_, "dchag::stage::tokens", images.extent(0), channels_.size(),
                partial.extent(2), partial.extent(3));
    tokenizer_.forward(exec, images, sel, tokens_);
    round_all_tokens<Storage>(exec, tokens_);
    partial_.forward(exec, tokens_, partial, valid);
  }

  void backward(const ExecSpace& exec, const View4<const Scalar, memory_space>& d_partial) {
    if (streamed_) {
      fused_backward(exec, tokenizer_, partial_, fused_, static_cast<int>(channels_.size()),
                     d_partial, d_chunk_, 0, memory_);
      return;
    }
    ensure_view(d_chunk_, "dchag::stage::d_tokens", tokens_.span());
    const V4 d_tokens(d_chunk_.data(), tokens_.extent(0), tokens_.extent(1), tokens_.extent(2),
                      tokens_.extent(3));
    partial_.backward(exec, tokens_, d_partial, d_tokens);
    tokenizer_.backward(exec, d_tokens);
  }

  void set_strategy(Strategy s) { partial_.set_strategy(s); }
  void zero_gradients(const ExecSpace& exec) {
    tokenizer_.zero_gradients(exec);
    partial_.zero_gradients(exec);
  }
  TensorList<Scalar, memory_space> parameters() const {
    auto list = tokenizer_.parameters();
    append(list, partial_.parameters());
    return list;
  }
  TensorList<Scalar, memory_space> gradients() const {
    auto list = tokenizer_.gradients();
    append(list, partial_.gradients());
    return list;
  }
  /// The tokenizer's parameters shared over channels (replicated under D-CHAG), and their
  /// gradients as one block.
  TensorList<Scalar, memory_space> replicated_parameters() const {
    return tokenizer_.replicated_parameters();
  }
  const View1<Scalar, memory_space>& replicated_gradient_block() const {
    return tokenizer_.replicated_gradient_block();
  }
  /// Tokenizer, partial aggregator and the fused buffers for `channels` channels. The callers
  /// validate `cfg` and the batch; the modules validate the rest.
  static MemoryEstimate estimate(const FrontEndConfig& cfg, int channels, PartialKind kind,
                                 int tree, std::int64_t B) {
    const std::int64_t L = cfg.patches(), D = cfg.dim;
    const MemoryPolicy memory = cfg.memory;
    if (kind == PartialKind::cross_attention && cfg.strategy == Strategy::materialized) {
      MemoryEstimate e = Tokenizer<ExecSpace, Scalar, Storage>::estimate(
          cfg.tokenizer, channels, cfg.patch, cfg.dim, B, channels, L, 0, cfg.channels);
      e += PartialAggregator<ExecSpace, Scalar>::estimate(kind, channels, tree,
                                                          cfg.partial_attention(), B, L);
      const std::int64_t tokens = std::int64_t(sizeof(Scalar)) * B * channels * L * D;
      e.activations += tokens;  // tokens
      e.workspace += tokens;    // d_tokens
      return e;
    }
    const int chunk =
        fused_chunk_channels<ExecSpace, Scalar, Storage>(B, L, D, channels, 0, memory);
    MemoryEstimate e = Tokenizer<ExecSpace, Scalar, Storage>::estimate(
        cfg.tokenizer, channels, cfg.patch, cfg.dim, B, channels, L,
        Tokens::all_patches(memory) ? 0 : chunk, cfg.channels);
    e += PartialAggregator<ExecSpace, Scalar>::estimate(
        kind, channels, tree, cfg.partial_attention(), B, L, chunk, memory);
    e += fused_buffers_estimate<ExecSpace, Scalar, Storage>(B, L, D, channels, 0, memory);
    return e;
  }

 private:
  Tokenizer<ExecSpace, Scalar, Storage> tokenizer_;
  PartialAggregator<ExecSpace, Scalar> partial_;
  std::vector<int> channels_;
  Tokens fused_;  // the streamed path's
  V4 tokens_;     // the materialized reference's: every token, rounded to Storage
  View1<Scalar, memory_space> d_chunk_;
  MemoryPolicy memory_ = MemoryPolicy::keep;
  bool streamed_ = true;
};

}  // namespace dchag::detail
