#pragma once
/// D-CHAG on one process (DchagEmulation): the channels split into P groups as if on P ranks,
/// each group tokenized and folded to a partial token, a final cross-attention over the P partial
/// tokens, then the positional embedding. The reference for the distributed engine.
#include <dchag/channel_map.hpp>
#include <dchag/config.hpp>
#include <dchag/cross_attention.hpp>
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

/// How D-CHAG folds each rank's channels.
struct DchagOptions {
  PartialKind partial = PartialKind::linear;  ///< D-CHAG-L or D-CHAG-C
  int tree = 1;                               ///< k groups of the local tree (1: none)
};

/// D-CHAG on one process: `groups[r]` lists the global channels of emulated rank r. Scalar and
/// Storage as for FlatFrontEnd; the partial tokens are Scalar.
template <class ExecSpace, class Scalar = float, class Storage = Scalar>
class DchagEmulation {
  static_assert(is_storage_type_v<Storage>, "dchag::DchagEmulation: Storage is not a storage type");

 public:
  using execution_space = ExecSpace;
  using memory_space = typename ExecSpace::memory_space;
  using scalar_type = Scalar;
  using storage_type = Storage;
  using V4 = View4<Scalar, memory_space>;
  using Inputs = PerSample<Scalar, memory_space>;

  /// The groups of `map`, as the ranks of a DistributedFrontEnd with that map would hold them
  /// (the map's channel count must be cfg.channels).
  DchagEmulation(const ExecSpace& exec, const FrontEndConfig& cfg, DchagOptions options,
                 const ChannelMap& map)
      : DchagEmulation(exec, cfg, options, checked_groups(cfg, map)) {}

  DchagEmulation(const ExecSpace& exec, const FrontEndConfig& cfg, DchagOptions options,
                 const std::vector<std::vector<int>>& groups)
      : cfg_(validated(cfg, groups)),
        options_(options),
        final_(exec, cfg.attention(), cfg.seed, "final."),
        pos_(exec, cfg.grid_h(), cfg.grid_w(), cfg.dim),
        lead_(exec, cfg.lead_time, cfg.dim, cfg.seed) {
    // The groups share one copy of the parameters every channel shares (a shared tokenizer
    // weight, the coordinate map): one process, one model.
    for (std::size_t r = 0; r < groups.size(); ++r) {
      stages_.push_back(std::make_unique<detail::ChannelStage<ExecSpace, Scalar, Storage>>(
          exec, cfg, groups[r], options.partial, options.tree, "partial." + std::to_string(r) + ".",
          r == 0 ? nullptr : stages_.front().get()));
    }
  }

  int groups() const { return static_cast<int>(stages_.size()); }

  /// out [B, L, D] from images [B, C, H, W] holding every model channel.
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const View3<Scalar, memory_space>& out) {
    run_forward(exec, images, all_channels(), out, Inputs());
  }
  /// The same with per-sample inputs: lead times (cfg.lead_time) and the channel mask [B, C]. A
  /// group with no valid channel in a sample gets no slot in that sample's final fold.
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const View3<Scalar, memory_space>& out, const Inputs& per_sample) {
    run_forward(exec, images, all_channels(), out, per_sample);
  }
  /// The same with the lead time of every sample, lead_times [B] (cfg.lead_time).
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const View3<Scalar, memory_space>& out,
               const View1<const Scalar, memory_space>& lead_times) {
    run_forward(exec, images, all_channels(), out, Inputs{lead_times, {}});
  }
  /// From images holding the channels `sel` names (a subset or permutation of the model's, by
  /// global id, as for FlatFrontEnd): each group folds the selected channels it holds, and the
  /// channels the images lack are missing in every sample, as a mask would make them (the group
  /// still tokenizes them, then drops them).
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const ChannelSelection& sel, const View3<Scalar, memory_space>& out,
               const Inputs& per_sample = {}) {
    run_forward(exec, images, sel, out, per_sample);
  }

 private:
  ChannelSelection all_channels() const {
    return ChannelSelection::from_full_image(detail::iota_ids(cfg_.channels));
  }
  void run_forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
                   const ChannelSelection& sel, const View3<Scalar, memory_space>& out,
                   const Inputs& in) {
    detail::ScopedRegion region("dchag::DchagEmulation::forward");
    constexpr const char* where = "dchag::DchagEmulation::forward";
    const auto* lead_times = in.lead_times.data() ? &in.lead_times : nullptr;
    lead_.check(where, lead_times, images.extent(0));
    // Every channel is tokenized here; the largest module (a stage or the final fold) takes at
    // most C of them.
    detail::check_images(where, cfg_, images, sel);
    detail::check_selection(where, sel, cfg_.channels, images.extent(1));
    cfg_.validate_batch(where, std::int64_t(images.extent(0)), cfg_.channels);
    detail::check_tokens(where, cfg_, "out", out, images.extent(0));
    const std::size_t B = images.extent(0), P = stages_.size(), L = cfg_.patches(), D = cfg_.dim;
    const bool train = cfg_.memory != MemoryPolicy::inference;
    const auto host = detail::restrict_mask(detail::host_mask(where, in.mask, B, cfg_.channels),
                                            sel, B, cfg_.channels);
    std::vector<std::vector<int>> groups;
    for (const auto& st : stages_) groups.push_back(st->channels());
    stage_masks_.resize(P);
    std::vector<InputMask<memory_space>> stage_valid;
    for (std::size_t r = 0; r < P; ++r) {
      stage_valid.push_back(
          detail::to_device(detail::select_mask(where, host, groups[r], false), stage_masks_[r]));
    }
    const auto final_host = detail::group_mask(host, groups);
    detail::select_mask(where, final_host, detail::iota_ids(int(P)), true);  // a channel each
    const auto final_valid = detail::to_device(final_host, final_mask_);
    detail::ensure_view(gathered_, "dchag::emulation::gathered", B, P, L, D);
    if (train) {
      detail::ensure_view(d_gathered_, "dchag::emulation::d_gathered", B, P, L, D);
    } else {
      d_gathered_ = V4();
    }
    detail::ensure_view(partial_, "dchag::emulation::partial", B, 1, L, D);
    for (std::size_t r = 0; r < P; ++r) {
      stages_[r]->forward(exec, images,
                          detail::module_selection(sel, stages_[r]->channels(), cfg_.channels),
                          partial_, cfg_.memory, stage_valid[r]);
      detail::copy_slot(exec, partial_, gathered_, static_cast<int>(r), true);
    }
    final_.forward(exec, gathered_, Segments::whole(P), V4(out.data(), B, 1, L * cfg_.queries, D),
                   saved_, nullptr, final_valid);
    memory_ = cfg_.memory;
    pos_.forward(exec, out);
    lead_.forward(exec, lead_times, out);
  }

 public:
  void backward(const ExecSpace& exec, const View3<const Scalar, memory_space>& d_out) {
    detail::ScopedRegion region("dchag::DchagEmulation::backward");
    constexpr const char* where = "dchag::DchagEmulation::backward";
    DCHAG_EXPECT(saved_.k == 1, where, "called before forward");
    DCHAG_EXPECT(memory_ != MemoryPolicy::inference, where,
                 "the last forward ran with MemoryPolicy::inference and kept nothing for a "
                 "backward");
    const std::size_t B = gathered_.extent(0), L = cfg_.patches(), D = cfg_.dim;
    detail::check_tokens(where, cfg_, "d_out", d_out, B);
    pos_.backward(exec, d_out);
    lead_.backward(exec, d_out);
    final_.backward(exec, gathered_, saved_,
                    View4<const Scalar, memory_space>(d_out.data(), B, 1, L * cfg_.queries, D),
                    d_gathered_);
    for (std::size_t r = 0; r < stages_.size(); ++r) {
      // partial_ is free again after forward: reuse it for this group's gradient slice.
      detail::copy_slot(exec, partial_, d_gathered_, static_cast<int>(r), false);
      stages_[r]->backward(exec, partial_);
    }
  }

  void set_strategy(Strategy s) {
    DCHAG_EXPECT(s == Strategy::pooled || cfg_.memory == MemoryPolicy::keep,
                 "dchag::DchagEmulation::set_strategy", "strategy ", to_string(s),
                 " needs MemoryPolicy::keep, memory is ", to_string(cfg_.memory));
    cfg_.strategy = s;
    final_.set_strategy(s);
    for (auto& st : stages_) st->set_strategy(s);
  }
  /// What the next forward keeps for its backward; a backward follows its own forward's.
  void set_memory_policy(MemoryPolicy m) {
    DCHAG_EXPECT(m == MemoryPolicy::keep || cfg_.strategy == Strategy::pooled,
                 "dchag::DchagEmulation::set_memory_policy", "memory ", to_string(m),
                 " needs the pooled strategy, strategy is ", to_string(cfg_.strategy));
    cfg_.memory = m;
  }

  /// Bytes held for one forward (and, unless cfg.memory is inference, backward) on B images,
  /// all groups on this process. Validates B as forward does.
  MemoryEstimate memory_estimate(std::int64_t B) const {
    using Attention = CrossAttention<ExecSpace, Scalar>;
    cfg_.validate_batch("dchag::DchagEmulation::memory_estimate", B, cfg_.channels);
    const int P = groups();
    const std::int64_t L = cfg_.patches();
    MemoryEstimate e;
    for (const auto& st : stages_) {
      e += detail::ChannelStage<ExecSpace, Scalar, Storage>::estimate(
          cfg_, int(st->channels().size()), options_.partial, options_.tree, B);
    }
    // Each stage's estimate counts the parameters the groups share; they are held once.
    const std::int64_t shared = std::int64_t(sizeof(Scalar)) * (P - 1) *
                                cfg_.tokenizer.replicated_elements(cfg_.patch, cfg_.dim);
    e.parameters -= shared;
    e.gradients -= shared;
    e += Attention::estimate_module(cfg_.attention());
    // validate_batch bounds B * C * L, so B and L fit the attention estimate's ints.
    const bool train = cfg_.memory != MemoryPolicy::inference;
    e += Attention::estimate_application(cfg_.attention(), B, P, L, 1, cfg_.heads, false, 0,
                                         train ? MemoryPolicy::keep : MemoryPolicy::inference);
    e += PositionalEmbedding<ExecSpace, Scalar>::estimate(L, cfg_.dim);
    e += detail::LeadTimeStage<ExecSpace, Scalar>::estimate(cfg_.lead_time, cfg_.dim, B);
    const std::int64_t token = std::int64_t(sizeof(Scalar)) * B * L * cfg_.dim;
    e.activations += token * (P + 1);     // gathered, partial
    if (train) e.workspace += token * P;  // d_gathered
    return e;
  }
  void zero_gradients(const ExecSpace& exec) {
    for (auto& st : stages_) st->zero_gradients(exec);
    final_.zero_gradients(exec);
    pos_.zero_gradients(exec);
    lead_.zero_gradients(exec);
  }
  TensorList<Scalar, memory_space> parameters() const { return named(false); }
  TensorList<Scalar, memory_space> gradients() const { return named(true); }

 private:
  static const std::vector<std::vector<int>>& checked_groups(const FrontEndConfig& cfg,
                                                             const ChannelMap& map) {
    DCHAG_EXPECT(map.channels() == cfg.channels, "dchag::DchagEmulation", "map.channels() is ",
                 map.channels(), ", expected config.channels = ", cfg.channels);
    return map.groups();
  }
  static const FrontEndConfig& validated(const FrontEndConfig& cfg,
                                         const std::vector<std::vector<int>>& groups) {
    constexpr const char* where = "dchag::DchagEmulation";
    cfg.validate(where);
    DCHAG_EXPECT(!groups.empty(), where, "groups is empty, expected at least one group");
    std::vector<int> seen(cfg.channels, 0);
    for (std::size_t r = 0; r < groups.size(); ++r) {
      DCHAG_EXPECT(!groups[r].empty(), where, "group ", r, " holds no channel, expected >= 1");
      for (int c : groups[r]) {
        DCHAG_EXPECT(c >= 0 && c < cfg.channels, where, "group ", r, " lists channel ", c,
                     ", expected 0 <= channel < C = ", cfg.channels);
        DCHAG_EXPECT(seen[c]++ == 0, where, "channel ", c,
                     " is in two groups, expected exactly one");
      }
    }
    for (int c = 0; c < cfg.channels; ++c) {
      DCHAG_EXPECT(seen[c] == 1, where, "channel ", c, " is in no group, expected exactly one");
    }
    return cfg;
  }

  TensorList<Scalar, memory_space> named(bool grads) const {
    TensorList<Scalar, memory_space> list;
    for (const auto& st : stages_)
      detail::merge_into(list, grads ? st->gradients() : st->parameters());
    detail::append(list, grads ? final_.gradients("final.") : final_.parameters("final."));
    detail::append(list, grads ? pos_.gradients() : pos_.parameters());
    lead_.append_to(list, grads);
    return list;
  }

  FrontEndConfig cfg_;
  DchagOptions options_;
  std::vector<std::unique_ptr<detail::ChannelStage<ExecSpace, Scalar, Storage>>> stages_;
  CrossAttention<ExecSpace, Scalar> final_;
  PositionalEmbedding<ExecSpace, Scalar> pos_;
  detail::LeadTimeStage<ExecSpace, Scalar> lead_;
  typename CrossAttention<ExecSpace, Scalar>::Saved saved_;
  MemoryPolicy memory_ = MemoryPolicy::keep;  // of the last forward
  V4 gathered_, d_gathered_, partial_;
  // The last forward's masks: of every group's channels, and of the groups in the final fold.
  std::vector<View2<std::uint8_t, memory_space>> stage_masks_;
  View2<std::uint8_t, memory_space> final_mask_;
};

}  // namespace dchag
