#pragma once
/// Composed front ends on one process:
/// - FlatFrontEnd (here): tokenize every channel, add channel embeddings, fold all C channels with
///   one cross-attention, add the positional embedding (the ClimaX front end).
/// - DchagEmulation (dchag_emulation.hpp, included here): D-CHAG on one process.
#include <dchag/channel_map.hpp>
#include <dchag/config.hpp>
#include <dchag/cross_attention.hpp>
#include <dchag/dchag_emulation.hpp>
#include <dchag/detail/channel_stage.hpp>
#include <dchag/detail/fused.hpp>
#include <dchag/detail/masks.hpp>
#include <dchag/detail/selection.hpp>
#include <dchag/detail/sizes.hpp>
#include <dchag/error.hpp>
#include <dchag/front_end_config.hpp>
#include <dchag/lead_time_embedding.hpp>
#include <dchag/partial_aggregator.hpp>
#include <dchag/per_sample.hpp>
#include <dchag/positional_embedding.hpp>
#include <dchag/precision.hpp>
#include <dchag/tokenizer.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

namespace dchag {

/// The ClimaX front end on one process. `Scalar`: parameters, gradients, arithmetic and the
/// output; `Storage`: the images and the tokens (precision.hpp).
template <class ExecSpace, class Scalar = float, class Storage = Scalar>
class FlatFrontEnd {
  static_assert(is_storage_type_v<Storage>, "dchag::FlatFrontEnd: Storage is not a storage type");

 public:
  using execution_space = ExecSpace;
  using memory_space = typename ExecSpace::memory_space;
  using scalar_type = Scalar;
  using storage_type = Storage;
  using Inputs = PerSample<Scalar, memory_space>;

  FlatFrontEnd(const ExecSpace& exec, const FrontEndConfig& cfg)
      : cfg_(validated(cfg)),
        tokenizer_(exec, cfg.channels, cfg.patch, cfg.dim, detail::iota_ids(cfg.channels), cfg.seed,
                   cfg.tokenizer),
        attention_(exec, cfg.attention(), cfg.seed, "var_agg"),
        pos_(exec, cfg.grid_h(), cfg.grid_w(), cfg.dim),
        lead_(exec, cfg.lead_time, cfg.dim, cfg.seed) {}

  const FrontEndConfig& config() const { return cfg_; }

  /// out [B, L, D] from images [B, J, H, W] whose channels are those `sel` names (any subset or
  /// permutation of the model's channels). With MemoryPolicy::recompute, or a Storage other
  /// than Scalar, the backward reads the images again: keep them unchanged until it has run.
  /// With shared tokenizer weights and the coordinate embedding, `sel` may also hold channels
  /// the model was not built with, by coordinate (ChannelSelection::at_coordinates).
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const ChannelSelection& sel, const View3<Scalar, memory_space>& out) {
    run_forward(exec, images, sel, out, Inputs());
  }
  /// The same with per-sample inputs: lead times (cfg.lead_time) and the channel mask [B, C]
  /// (indexed by model channel id, so only the selected channels' entries are read).
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const ChannelSelection& sel, const View3<Scalar, memory_space>& out,
               const Inputs& per_sample) {
    run_forward(exec, images, sel, out, per_sample);
  }
  /// The same with the lead time of every sample, lead_times [B] (cfg.lead_time).
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const ChannelSelection& sel, const View3<Scalar, memory_space>& out,
               const View1<const Scalar, memory_space>& lead_times) {
    run_forward(exec, images, sel, out, Inputs{lead_times, {}});
  }
  /// All C channels, in model order: images [B, C, H, W].
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const View3<Scalar, memory_space>& out) {
    run_forward(exec, images, all_channels(), out, Inputs());
  }
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const View3<Scalar, memory_space>& out, const Inputs& per_sample) {
    run_forward(exec, images, all_channels(), out, per_sample);
  }
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const View3<Scalar, memory_space>& out,
               const View1<const Scalar, memory_space>& lead_times) {
    run_forward(exec, images, all_channels(), out, Inputs{lead_times, {}});
  }

 private:
  ChannelSelection all_channels() const {
    return ChannelSelection::from_full_image(detail::iota_ids(cfg_.channels));
  }
  void run_forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
                   const ChannelSelection& sel, const View3<Scalar, memory_space>& out,
                   const Inputs& in) {
    detail::ScopedRegion region("dchag::FlatFrontEnd::forward");
    constexpr const char* where = "dchag::FlatFrontEnd::forward";
    detail::check_images(where, cfg_, images, sel);
    detail::check_tokens(where, cfg_, "out", out, images.extent(0));
    const auto* lead_times = in.lead_times.data() ? &in.lead_times : nullptr;
    lead_.check(where, lead_times, images.extent(0));
    const std::size_t B = images.extent(0), J = sel.size(), L = cfg_.patches(), D = cfg_.dim;
    const auto valid = detail::to_device(
        detail::select_mask(where, detail::host_mask(where, in.mask, B, cfg_.channels),
                            sel.channel_id, true),
        mask_);
    if (cfg_.strategy == Strategy::pooled) {
      detail::AttentionFold<ExecSpace, Scalar> fold{attention_, saved_, nullptr, int(J)};
      tokens_ = View4<Scalar, memory_space>();
      detail::fused_forward(exec, tokenizer_, fold, images, sel, fused_, as4(out), chunk_channels_,
                            cfg_.memory, valid);
    } else {
      fused_ = Tokens();
      detail::ensure_view(tokens_, "dchag::flat::tokens", B, J, L, D);
      tokenizer_.forward(exec, images, sel, tokens_);
      detail::round_all_tokens<Storage>(exec, tokens_);
      attention_.forward(exec, tokens_, Segments::whole(J), as4(out), saved_, nullptr, valid);
    }
    channels_in_ = int(J);
    pos_.forward(exec, out);
    lead_.forward(exec, lead_times, out);
  }

 public:
  /// Accumulates every parameter gradient from d_out [B, L, D] of the last forward.
  void backward(const ExecSpace& exec, const View3<const Scalar, memory_space>& d_out) {
    detail::ScopedRegion region("dchag::FlatFrontEnd::backward");
    constexpr const char* where = "dchag::FlatFrontEnd::backward";
    DCHAG_EXPECT(saved_.k == 1, where, "called before forward");
    DCHAG_EXPECT(saved_.memory != MemoryPolicy::inference, where,
                 "the last forward ran with MemoryPolicy::inference and kept nothing for a "
                 "backward");
    detail::check_tokens(where, cfg_, "d_out", d_out, std::size_t(saved_.B));
    pos_.backward(exec, d_out);
    lead_.backward(exec, d_out);
    if (saved_.strategy == Strategy::pooled) {  // the forward's strategy, not the current one
      detail::AttentionFold<ExecSpace, Scalar> fold{attention_, saved_, nullptr, channels_in_};
      detail::fused_backward(exec, tokenizer_, fold, fused_, channels_in_, as4(d_out), d_chunk_,
                             chunk_channels_, saved_.memory);
      return;
    }
    detail::ensure_view(d_chunk_, "dchag::flat::d_tokens", tokens_.span());
    const View4<Scalar, memory_space> d_tokens(d_chunk_.data(), tokens_.extent(0),
                                               tokens_.extent(1), tokens_.extent(2),
                                               tokens_.extent(3));
    attention_.backward(exec, tokens_, saved_, as4(d_out), d_tokens);
    tokenizer_.backward(exec, d_tokens);
  }

  void set_strategy(Strategy s) {
    DCHAG_EXPECT(s == Strategy::pooled || cfg_.memory == MemoryPolicy::keep,
                 "dchag::FlatFrontEnd::set_strategy", "strategy ", to_string(s),
                 " needs MemoryPolicy::keep, memory is ", to_string(cfg_.memory));
    cfg_.strategy = s;
    attention_.set_strategy(s);
  }
  /// What the next forward keeps for its backward; a backward follows its own forward's.
  void set_memory_policy(MemoryPolicy m) {
    DCHAG_EXPECT(m == MemoryPolicy::keep || cfg_.strategy == Strategy::pooled,
                 "dchag::FlatFrontEnd::set_memory_policy", "memory ", to_string(m),
                 " needs the pooled strategy, strategy is ", to_string(cfg_.strategy));
    cfg_.memory = m;
  }
  /// Channels per chunk of the fused pooled path (0: automatic, about 512 KiB of tokens per
  /// thread on host spaces; on devices all channels, or about 256 MiB of tokens when they are not
  /// kept). A tuning knob; results do not depend on it.
  void set_chunk_channels(int channels) {
    DCHAG_EXPECT(channels >= 0, "dchag::FlatFrontEnd::set_chunk_channels", "channels is ", channels,
                 ", expected >= 0");
    chunk_channels_ = channels;
  }

  /// Bytes held for one forward (and, unless cfg.memory is inference, backward) on B images of
  /// `channels_in` channels (default -1: all C), with `chunk` channels per fused chunk (0:
  /// automatic). The caller's images are not counted. Validates as construction and forward do.
  static MemoryEstimate estimate(const FrontEndConfig& cfg, std::int64_t B, int channels_in = -1,
                                 int chunk = 0) {
    using Attention = CrossAttention<ExecSpace, Scalar>;
    constexpr const char* where = "dchag::FlatFrontEnd::estimate";
    cfg.validate(where);
    DCHAG_EXPECT(channels_in == -1 || (channels_in >= 1 && channels_in <= cfg.channels), where,
                 "channels_in is ", channels_in,
                 ", expected -1 (all) or 1 <= channels_in <= C = ", cfg.channels);
    DCHAG_EXPECT(chunk >= 0, where, "chunk is ", chunk, ", expected >= 0");
    const int J = channels_in < 0 ? cfg.channels : channels_in;
    cfg.validate_batch(where, B, J);
    // Within the limits validate_batch checks, B, J and L fit the attention estimate's ints.
    const std::int64_t L = cfg.patches();
    MemoryEstimate e = Attention::estimate_module(cfg.attention());
    e += PositionalEmbedding<ExecSpace, Scalar>::estimate(L, cfg.dim);
    e += detail::LeadTimeStage<ExecSpace, Scalar>::estimate(cfg.lead_time, cfg.dim, B);
    if (cfg.strategy == Strategy::materialized) {
      e += Tokenizer<ExecSpace, Scalar, Storage>::estimate(cfg.tokenizer, cfg.channels, cfg.patch,
                                                           cfg.dim, B, J, L, 0, cfg.channels);
      e += Attention::estimate_application(cfg.attention(), B, J, L, 1, cfg.heads, false);
      const std::int64_t tokens = std::int64_t(sizeof(Scalar)) * B * J * L * cfg.dim;
      e.activations += tokens;  // tokens
      e.workspace += tokens;    // d_tokens
      return e;
    }
    const int width = detail::fused_chunk_channels<ExecSpace, Scalar, Storage>(B, L, cfg.dim, J,
                                                                               chunk, cfg.memory);
    e += Tokenizer<ExecSpace, Scalar, Storage>::estimate(
        cfg.tokenizer, cfg.channels, cfg.patch, cfg.dim, B, J, L,
        Tokens::all_patches(cfg.memory) ? 0 : width, cfg.channels);
    e += Attention::estimate_application(cfg.attention(), B, J, L, 1, cfg.heads, false, width,
                                         cfg.memory);
    e += detail::fused_buffers_estimate<ExecSpace, Scalar, Storage>(B, L, cfg.dim, J, chunk,
                                                                    cfg.memory);
    return e;
  }
  MemoryEstimate memory_estimate(std::int64_t B, int channels_in = -1) const {
    return estimate(cfg_, B, channels_in, chunk_channels_);
  }
  void zero_gradients(const ExecSpace& exec) {
    tokenizer_.zero_gradients(exec);
    attention_.zero_gradients(exec);
    pos_.zero_gradients(exec);
    lead_.zero_gradients(exec);
  }
  /// ClimaX state-dict names: token_embeds.{c}.proj.*, var_embed, var_query, var_agg.*, pos_embed
  /// (and lead_time_embed.* with cfg.lead_time). Under the tokenizer policies token_embed.proj.*
  /// (shared) replaces token_embeds.{c}.proj.*, channel_embed.proj.* (coordinate) var_embed.
  TensorList<Scalar, memory_space> parameters() const {
    auto list = tokenizer_.parameters();
    detail::append(list, attention_.parameters());
    detail::append(list, pos_.parameters());
    lead_.append_to(list, false);
    return list;
  }
  TensorList<Scalar, memory_space> gradients() const {
    auto list = tokenizer_.gradients();
    detail::append(list, attention_.gradients());
    detail::append(list, pos_.gradients());
    lead_.append_to(list, true);
    return list;
  }

 private:
  static const FrontEndConfig& validated(const FrontEndConfig& cfg) {
    cfg.validate("dchag::FlatFrontEnd");
    return cfg;
  }
  // Tokens [B, L, N_q * D] as the fold's [B, 1, L * N_q, D].
  template <class V>
  auto as4(const V& v) const {
    using T = typename V::value_type;
    return View4<T, memory_space>(v.data(), v.extent(0), 1, v.extent(1) * cfg_.queries,
                                  std::size_t(cfg_.dim));
  }

  using Tokens = detail::FusedTokens<Scalar, Storage, memory_space>;

  FrontEndConfig cfg_;
  Tokenizer<ExecSpace, Scalar, Storage> tokenizer_;
  CrossAttention<ExecSpace, Scalar> attention_;
  PositionalEmbedding<ExecSpace, Scalar> pos_;
  detail::LeadTimeStage<ExecSpace, Scalar> lead_;
  typename CrossAttention<ExecSpace, Scalar>::Saved saved_;
  Tokens fused_;                            // the pooled path's tokens
  View4<Scalar, memory_space> tokens_;      // the materialized path's: every token
  View1<Scalar, memory_space> d_chunk_;     // d_tokens, whole or one fused chunk
  View2<std::uint8_t, memory_space> mask_;  // the last forward's, of its selected channels
  int chunk_channels_ = 0;
  int channels_in_ = 0;  // channels of the last forward
};

}  // namespace dchag
