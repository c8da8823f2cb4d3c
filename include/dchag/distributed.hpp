#pragma once
/// The front end distributed over the ranks of a channel group (DESIGN 3.3-3.7, 4):
/// - dchag_linear / dchag_xattn (D-CHAG-L / D-CHAG-C): each rank tokenizes its channels, folds
///   them into one partial token, the partial tokens are all-gathered in rank order and a final
///   cross-attention folds them; then the positional embedding.
/// - exact_flat: the ClimaX aggregation over all C channels, distributed exactly: local softmax
///   statistics and projected partial sums merged by one MAX and one SUM all-reduce.
/// - tp_only: the paper's baseline: every rank tokenizes all C channels, the cross-attention's
///   heads are split over the ranks, outputs all-reduced.
///
/// Construction and every forward/backward are collective over the channel group. Configuration
/// that must agree across ranks is checked first, so a mismatch throws on every rank.
#include <dchag/channel_map.hpp>
#include <dchag/check.hpp>
#include <dchag/communicator.hpp>
#include <dchag/detail/distributed_support.hpp>
#include <dchag/detail/selection.hpp>
#include <dchag/distributed_memory.hpp>
#include <dchag/front_end.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace dchag {

/// What a rank passes to forward: only its own channels (in the order the map lists them), or
/// the full image with every channel, from which it reads its own.
enum class ImageInput { own_channels, full_image };

/// Scalar: parameters, gradients, arithmetic, the partial tokens and the output; Storage: the
/// images and the tokens (precision.hpp).
template <class ExecSpace, class Scalar = float, class Storage = Scalar>
class DistributedFrontEnd {
  static_assert(is_storage_type_v<Storage>,
                "dchag::DistributedFrontEnd: Storage is not a storage type");

 public:
  using execution_space = ExecSpace;
  using memory_space = typename ExecSpace::memory_space;
  using scalar_type = Scalar;
  using storage_type = Storage;
  using V3 = View3<Scalar, memory_space>;
  using V4 = View4<Scalar, memory_space>;
  using Inputs = PerSample<Scalar, memory_space>;

  /// Collective over `comm`. `map` places the C channels on the comm.size() ranks. `tree` is the
  /// local tree of the D-CHAG modes (1: none). exact_flat needs the pooled strategy and tp_only
  /// the materialized one (it is the paper's baseline, K and V formed for the rank's heads).
  DistributedFrontEnd(const ExecSpace& exec, const Communicator& comm, const FrontEndConfig& cfg,
                      Mode mode, const ChannelMap& map, int tree = 1)
      : comm_(comm), cfg_(cfg), mode_(mode), map_(map), tree_(tree), reduce_(exec, comm) {
    constexpr const char* where = "dchag::DistributedFrontEnd";
    comm_.check_collectively(where, [&] { validate_local(); });
    comm_.agree(where,
                {{"C", cfg.channels},
                 {"H", cfg.height},
                 {"W", cfg.width},
                 {"p", cfg.patch},
                 {"D", cfg.dim},
                 {"heads", cfg.heads},
                 {"mode", static_cast<std::int64_t>(mode)},
                 {"strategy", static_cast<std::int64_t>(cfg.strategy)},
                 {"convention", static_cast<std::int64_t>(cfg.convention)},
                 {"partial convention",
                  static_cast<std::int64_t>(cfg.partial_convention.value_or(cfg.convention))},
                 {"tree", tree},
                 {"seed", static_cast<std::int64_t>(cfg.seed)},
                 {"lead time", cfg.lead_time ? 1 : 0},
                 {"queries", cfg.queries},
                 {"tokenizer weights", static_cast<std::int64_t>(cfg.tokenizer.weights)},
                 {"channel embedding", static_cast<std::int64_t>(cfg.tokenizer.embedding)},
                 {"Fourier features", cfg.tokenizer.coordinate() ? cfg.tokenizer.fourier.count : 0},
                 {"channel coordinates and wavelengths",
                  static_cast<std::int64_t>(cfg.tokenizer.fingerprint())},
                 {"scalar type", StorageTraits<Scalar>::code},
                 {"storage type", StorageTraits<Storage>::code},
                 {"channel map", static_cast<std::int64_t>(map.fingerprint())}});
    const int rank = comm_.rank();
    channels_ = map.channels_of(rank);
    pos_.emplace(exec, cfg.grid_h(), cfg.grid_w(), cfg.dim);
    lead_.emplace(exec, cfg.lead_time, cfg.dim, cfg.seed);
    if (is_dchag()) {
      const PartialKind kind =
          mode == Mode::dchag_linear ? PartialKind::linear : PartialKind::cross_attention;
      stage_.emplace(exec, cfg, channels_, kind, tree, "partial." + std::to_string(rank) + ".");
      attention_.emplace(exec, cfg.attention(), cfg.seed, "final.");
    } else {
      const std::vector<int> held =
          mode == Mode::tp_only ? detail::iota_ids(cfg.channels) : channels_;
      tokenizer_.emplace(exec, cfg.channels, cfg.patch, cfg.dim, held, cfg.seed, cfg.tokenizer);
      attention_.emplace(exec, cfg.attention(), cfg.seed, "var_agg");
      if (mode == Mode::tp_only) {
        const auto [h0, h1] = detail::head_share(cfg.heads, comm_.size(), rank);
        attention_->set_head_range(h0, h1, rank == 0);
      }
    }
    verify_replicated(exec);
  }

  Mode mode() const { return mode_; }
  /// What the next forward keeps for its backward (the same on every rank: forward checks);
  /// a backward follows its own forward's. Not keep needs the pooled strategy.
  void set_memory_policy(MemoryPolicy m) {
    DCHAG_EXPECT(m == MemoryPolicy::keep || cfg_.strategy == Strategy::pooled,
                 "dchag::DistributedFrontEnd::set_memory_policy", "memory ", to_string(m),
                 " needs the pooled strategy, strategy is ", to_string(cfg_.strategy));
    cfg_.memory = m;
  }
  /// Bytes this rank holds for one training step on B images.
  MemoryEstimate memory_estimate(std::int64_t B) const {
    return estimate_memory<Scalar, ExecSpace, Storage>(cfg_, mode_, map_, comm_.rank(), B, tree_);
  }
  const FrontEndConfig& config() const { return cfg_; }
  const Communicator& communicator() const { return comm_; }
  /// This rank's channels, in the order an own-channels image holds them.
  const std::vector<int>& channels() const { return channels_; }

  /// Collective. out [B, L, D], identical on every rank. images [B, C_r, H, W] (own channels) or
  /// [B, C, H, W] (full image); tp_only needs the full image (every rank tokenizes all channels).
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const V3& out, ImageInput input = ImageInput::own_channels) {
    run_forward(exec, images, nullptr, out, input, Inputs());
  }
  /// The same with per-sample inputs, identical on every rank: lead times (cfg.lead_time) and
  /// the channel mask [B, C] over all the model's channels (checked collectively). A rank with
  /// no valid channel in a sample contributes no partial token to it (D-CHAG modes) or no
  /// softmax mass (exact_flat).
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const V3& out, const Inputs& per_sample,
               ImageInput input = ImageInput::own_channels) {
    run_forward(exec, images, nullptr, out, input, per_sample);
  }
  /// From images holding only the channels `channel_ids` names (global ids, a subset or
  /// permutation of the model's, the same on every rank): full_image images are [B, J, H, W] in
  /// that order; own_channels ones [B, J_r, H, W], this rank's selected channels in the order
  /// channels() lists them (J_r may be 0). The channels the images lack are missing in every
  /// sample, as a mask would make them (a rank still tokenizes its lacking channels, then drops
  /// them).
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const std::vector<int>& channel_ids, const V3& out, const Inputs& per_sample = {},
               ImageInput input = ImageInput::own_channels) {
    run_forward(exec, images, &channel_ids, out, input, per_sample);
  }
  /// The same with the lead time of every sample, lead_times [B], identical on every rank
  /// (cfg.lead_time).
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const V3& out, const View1<const Scalar, memory_space>& lead_times,
               ImageInput input = ImageInput::own_channels) {
    run_forward(exec, images, nullptr, out, input, Inputs{lead_times, {}});
  }

 private:
  void run_forward(const ExecSpace& exec, const View4<const Storage, memory_space>& given,
                   const std::vector<int>* channel_ids, const V3& out, ImageInput input,
                   const Inputs& in) {
    detail::ScopedRegion region("dchag::DistributedFrontEnd::forward");
    constexpr const char* where = "dchag::DistributedFrontEnd::forward";
    const auto* lead_times = in.lead_times.data() ? &in.lead_times : nullptr;
    const auto present =
        ChannelSelection::own(channel_ids ? *channel_ids : detail::iota_ids(cfg_.channels));
    detail::HostMask host;
    comm_.check_collectively(where, [&] {
      detail::check_selection(where, present, cfg_.channels, present.channel_id.size());
      check_forward(given, present, out, input);
      lead_->check(where, lead_times, given.extent(0));
      host = detail::restrict_mask(
          detail::host_mask(where, in.mask, given.extent(0), std::size_t(cfg_.channels)), present,
          given.extent(0), cfg_.channels);
    });
    comm_.agree(where, {{"B", static_cast<std::int64_t>(given.extent(0))},
                        {"image input", static_cast<std::int64_t>(input)},
                        {"memory policy", static_cast<std::int64_t>(cfg_.memory)},
                        {"selected channels", present.size()},
                        {"checksum of the selection",
                         static_cast<std::int64_t>(detail::checksum_ids(present.channel_id))},
                        {"mask given", host.data() ? 1 : 0}});
    if (host.data()) {
      // Replicated, as the output is: every rank derives its modules' masks from the same one.
      comm_.agree(where,
                  {{"checksum of mask", static_cast<std::int64_t>(detail::checksum_view(host))}});
    }
    comm_.check_collectively(where, [&] { set_masks(host); });
    const std::size_t B = given.extent(0), P = comm_.size(), L = cfg_.patches(), D = cfg_.dim;
    // Everything this forward and its backward allocate, before the first data collective: an
    // allocation that fails on one rank is then an exception on every rank, not a hang.
    View4<const Storage, memory_space> images;
    ChannelSelection sel;
    comm_.check_collectively(where, [&] {
      reserve(B);
      std::tie(images, sel) = local_images(given, present, input);
    });
    if (check_replicas_) verify_replicated(exec);
    if (check_replicas_ && lead_times) {
      comm_.agree(where, {{"checksum of lead_times",
                           static_cast<std::int64_t>(detail::checksum_view(*lead_times))}});
    }
    const V4 out4(out.data(), B, 1, L * cfg_.queries, D);  // [B, L, N_q * D] as the fold's
    switch (mode_) {
      case Mode::dchag_linear:
      case Mode::dchag_xattn: {
        stage_->forward(exec, images, sel, partial_, cfg_.memory, local_valid_);
        allgather(exec, comm_, partial_, received_);
        detail::rank_major_to_batch_major(exec, received_, gathered_);
        attention_->forward(exec, gathered_, Segments::whole(int(P)), out4, saved_, nullptr,
                            final_valid_);
        break;
      }
      case Mode::exact_flat: {
        detail::AttentionFold<ExecSpace, Scalar> fold{*attention_, saved_, &reduce_, sel.size()};
        detail::fused_forward(exec, *tokenizer_, fold, images, sel, fused_, out4, 0, cfg_.memory,
                              local_valid_);
        break;
      }
      case Mode::tp_only:
        tokenizer_->forward(exec, images, sel, tokens_);
        detail::round_all_tokens<Storage>(exec, tokens_);
        attention_->forward(exec, tokens_, Segments::whole(sel.size()), out4, saved_, nullptr,
                            local_valid_);
        allreduce_sum(exec, comm_, Unmanaged1<Scalar, memory_space>(out.data(), out.span()));
        break;
    }
    pos_->forward(exec, out);
    lead_->forward(exec, lead_times, out);
    forwarded_ = true;
    forwarded_memory_ = cfg_.memory;
  }

 public:
  /// Collective. Accumulates gradients from d_out [B, L, D], which must be identical on every rank
  /// (the output is replicated). Replicated parameters (final or flat cross-attention, positional
  /// embedding) get identical gradients on every rank; each rank's tokenizer and partial
  /// aggregator gradients are its own. tp_only: the cross-attention weight gradients are this
  /// rank's head share (zero outside it, as its shard of the weights), summed over ranks they are
  /// the full gradient; the query gradient is summed here.
  void backward(const ExecSpace& exec, const View3<const Scalar, memory_space>& d_out) {
    detail::ScopedRegion region("dchag::DistributedFrontEnd::backward");
    constexpr const char* where = "dchag::DistributedFrontEnd::backward";
    const std::size_t B = saved_.B, L = cfg_.patches(), D = cfg_.dim;
    comm_.check_collectively(where, [&] {
      DCHAG_EXPECT(forwarded_, where, "called before forward");
      DCHAG_EXPECT(forwarded_memory_ != MemoryPolicy::inference, where,
                   "the last forward ran with MemoryPolicy::inference and kept nothing for a "
                   "backward");
      detail::check_tokens(where, cfg_, "d_out", d_out, B);
    });
    if (check_replicas_) {
      comm_.agree(where,
                  {{"checksum of d_out", static_cast<std::int64_t>(detail::checksum_view(d_out))}});
    }
    const View4<const Scalar, memory_space> d_out4(d_out.data(), B, 1, L * cfg_.queries, D);
    pos_->backward(exec, d_out);
    lead_->backward(exec, d_out);
    switch (mode_) {
      case Mode::dchag_linear:
      case Mode::dchag_xattn: {
        attention_->backward(exec, gathered_, saved_, d_out4, d_gathered_);
        // The gathered gradient is the same on every rank: keep this rank's slice, no collective.
        detail::copy_slot(exec, partial_, d_gathered_, comm_.rank(), false);
        const auto& shared = stage_->replicated_gradient_block();
        if (shared.span() > 0) detail::begin_group_gradient(exec, shared, shared_before_);
        stage_->backward(exec, partial_);
        if (shared.span() > 0) detail::end_group_gradient(exec, comm_, shared, shared_before_);
        break;
      }
      case Mode::exact_flat: {
        // Token gradients are local: one chunk at a time, straight into the tokenizer.
        const int J = static_cast<int>(channels_.size());
        detail::AttentionFold<ExecSpace, Scalar> fold{*attention_, saved_, &reduce_, J};
        const auto& shared = tokenizer_->replicated_gradient_block();
        if (shared.span() > 0) detail::begin_group_gradient(exec, shared, shared_before_);
        detail::fused_backward(exec, *tokenizer_, fold, fused_, J, d_out4, d_chunk_, 0,
                               saved_.memory);
        if (shared.span() > 0) detail::end_group_gradient(exec, comm_, shared, shared_before_);
        break;
      }
      case Mode::tp_only: {
        // The query vector is replicated: sum only this call's share of its gradient.
        auto d_query = attention_->gradients().front().pieces.front().values;
        Kokkos::deep_copy(exec, query_before_, d_query);
        attention_->backward(exec, tokens_, saved_, d_out4, d_tokens_);
        auto before = query_before_;
        Kokkos::parallel_for(
            "dchag::distributed::query_share",
            Kokkos::RangePolicy<ExecSpace>(exec, 0, d_query.extent(0)),
            KOKKOS_LAMBDA(const int i) { d_query(i) -= before(i); });
        allreduce_sum(exec, comm_, d_query);
        Kokkos::parallel_for(
            "dchag::distributed::query_total",
            Kokkos::RangePolicy<ExecSpace>(exec, 0, d_query.extent(0)),
            KOKKOS_LAMBDA(const int i) { d_query(i) += before(i); });
        // Tensor parallelism's input all-reduce: every head share adds to every token's gradient.
        allreduce_sum(exec, comm_,
                      Unmanaged1<Scalar, memory_space>(d_tokens_.data(), d_tokens_.span()));
        tokenizer_->backward(exec, d_tokens_);
        break;
      }
    }
  }

  void zero_gradients(const ExecSpace& exec) {
    if (stage_) stage_->zero_gradients(exec);
    if (tokenizer_) tokenizer_->zero_gradients(exec);
    attention_->zero_gradients(exec);
    pos_->zero_gradients(exec);
    lead_->zero_gradients(exec);
  }

  /// This rank's parameters, by ClimaX / D-CHAG name: token_embeds.{c}.* and its var_embed rows,
  /// partial.{rank}.* (D-CHAG modes), final.* or var_agg.* / var_query, pos_embed.
  TensorList<Scalar, memory_space> parameters() const { return named(false); }
  TensorList<Scalar, memory_space> gradients() const { return named(true); }
  /// The parameters every rank holds the same copy of (with the tokenizer policies, the shared
  /// tokenizer weight and the coordinate map too: their gradients are summed over the group in
  /// backward, so every rank holds the whole gradient).
  TensorList<Scalar, memory_space> replicated_parameters() const {
    TensorList<Scalar, memory_space> list;
    if (mode_ == Mode::tp_only) list = tokenizer_->parameters();
    if (stage_) list = stage_->replicated_parameters();
    if (mode_ == Mode::exact_flat) list = tokenizer_->replicated_parameters();
    detail::append(list, attention_params(false));
    detail::append(list, pos_->parameters());
    lead_->append_to(list, false);
    return list;
  }

  /// Collective consistency checks (DESIGN 7): with them on, every forward first checks that the
  /// replicated parameters are bit-identical on all ranks and every backward that d_out is (one
  /// checksum each, a host copy and one small all-reduce). On by default in debug builds (NDEBUG
  /// not defined), off in release builds unless asked for. Set it to the same value on all ranks.
  void set_replica_checks(bool on) { check_replicas_ = on; }
  bool replica_checks() const { return check_replicas_; }

  /// Collective check of non-finite values (DESIGN 7): dchag::check_finite of this rank's
  /// `images`, parameters and gradients on every rank; a NaN or Inf on any rank is a dchag::error
  /// on every rank naming the rank, the tensor and the index. Off the hot path: call it when
  /// debugging or every N steps.
  void check_finite(const ExecSpace& exec, const View4<const Storage, memory_space>& images) const {
    comm_.check_collectively("dchag::DistributedFrontEnd::check_finite", [&] {
      dchag::check_finite(exec, "images", images);
      dchag::check_finite(exec, parameters());
      dchag::check_finite(exec, gradients());
    });
  }

  /// Collective: copies rank `root`'s replicated parameters to every rank.
  void broadcast_replicated(const ExecSpace& exec, int root = 0) {
    for (const auto& t : replicated_parameters())
      for (const auto& p : t.pieces) broadcast(exec, comm_, p.values, root);
    exec.fence();
  }

  /// Collective: throws dchag::error on every rank unless the replicated parameters are
  /// bit-identical on all ranks.
  void verify_replicated(const ExecSpace& exec) const {
    exec.fence();
    comm_.agree("dchag::DistributedFrontEnd::verify_replicated",
                {{"checksum of the replicated parameters",
                  static_cast<std::int64_t>(detail::checksum(replicated_parameters()))}});
  }

 private:
  bool is_dchag() const { return detail::is_dchag(mode_); }

  // The buffers of one forward and backward of B images (local; run under check_collectively).
  void reserve(std::size_t B) {
    const std::size_t P = comm_.size(), L = cfg_.patches(), D = cfg_.dim;
    using detail::ensure_view;
    const std::size_t J = is_dchag() ? channels_.size() : tokenizer_->owned_channels().size();
    comm_.reserve_staging(std::size_t(detail::staging_bytes<ExecSpace, Scalar>(
        cfg_, mode_, int(P), std::int64_t(J), std::int64_t(B))));
    const MemoryPolicy memory = cfg_.memory;
    const bool train = memory != MemoryPolicy::inference;
    const std::int64_t shared = cfg_.tokenizer.replicated_elements(cfg_.patch, cfg_.dim);
    if (train && mode_ != Mode::tp_only && shared > 0)
      ensure_view(shared_before_, "dchag::distributed::shared_gradient_before",
                  std::size_t(shared));
    if (is_dchag()) {
      ensure_view(partial_, "dchag::distributed::partial", B, std::size_t(1), L, D);
      ensure_view(received_, "dchag::distributed::received", P, B, L, D);
      ensure_view(gathered_, "dchag::distributed::gathered", B, P, L, D);
      if (train) {
        ensure_view(d_gathered_, "dchag::distributed::d_gathered", B, P, L, D);
      } else {
        d_gathered_ = V4();
      }
      stage_->reserve(B, L, D, memory);
      attention_->reserve(saved_, int(B), int(P), int(L), Segments::whole(int(P)), false, 0,
                          train ? MemoryPolicy::keep : MemoryPolicy::inference);
      return;
    }
    if (mode_ == Mode::exact_flat) {
      const int chunk = detail::reserve_fused(*tokenizer_, fused_, d_chunk_, B, J, L, D, memory);
      attention_->reserve(saved_, int(B), int(J), int(L), Segments::whole(int(J)), true, chunk,
                          memory);
      return;
    }
    ensure_view(tokens_, "dchag::distributed::tokens", B, J, L, D);
    ensure_view(d_tokens_, "dchag::distributed::d_tokens", B, J, L, D);
    ensure_view(query_before_, "dchag::distributed::query_before", D * cfg_.queries);
    tokenizer_->reserve(int(B), int(J), int(L));
    attention_->reserve(saved_, int(B), int(J), int(L), Segments::whole(int(J)));
  }

  // The masks of this rank's modules from the group's mask [B, C] (host; empty: all valid): its
  // own channels (every channel under tp_only) and, D-CHAG, one slot per rank for the final fold.
  void set_masks(const detail::HostMask& host) {
    constexpr const char* where = "dchag::DistributedFrontEnd::forward";
    detail::select_mask(where, host, detail::iota_ids(cfg_.channels), true);  // per sample
    const auto& local = mode_ == Mode::tp_only ? tokenizer_->owned_channels() : channels_;
    local_valid_ = detail::to_device(detail::select_mask(where, host, local, false), local_mask_);
    final_valid_ = is_dchag()
                       ? detail::to_device(detail::group_mask(host, map_.groups()), final_mask_)
                       : InputMask<memory_space>();
  }

  void validate_local() const {
    constexpr const char* where = "dchag::DistributedFrontEnd";
    cfg_.validate(where);
    DCHAG_EXPECT(map_.ranks() == comm_.size(), where, "map.ranks() is ", map_.ranks(),
                 ", expected the communicator size ", comm_.size());
    detail::validate_rank(where, cfg_, mode_, map_, comm_.rank(), tree_);
  }

  void check_forward(const View4<const Storage, memory_space>& images,
                     const ChannelSelection& present, const V3& out, ImageInput input) const {
    constexpr const char* where = "dchag::DistributedFrontEnd::forward";
    const bool full = input == ImageInput::full_image;
    DCHAG_EXPECT(mode_ != Mode::tp_only || full || comm_.size() == 1, where,
                 "tp_only tokenizes every channel on every rank: pass ImageInput::full_image");
    const bool all = present.size() == cfg_.channels;
    detail::check_images(
        where, cfg_, images, full ? present.size() : std::int64_t(own_present(present).size()),
        full ? (all ? "C = " : "the selected channel count ")
             : (all ? "this rank's channel count " : "this rank's selected channel count "),
        detail::channels_folded(mode_, map_, comm_.rank()));
    detail::check_tokens(where, cfg_, "out", out, images.extent(0));
  }

  // This rank's channels among `present`, in the order channels() lists them.
  std::vector<int> own_present(const ChannelSelection& present) const {
    std::vector<char> in(std::size_t(cfg_.channels), 0);
    for (int c : present.channel_id) in[std::size_t(c)] = 1;
    std::vector<int> out;
    for (int c : channels_)
      if (in[std::size_t(c)]) out.push_back(c);
    return out;
  }

  // The images this rank's modules read and how: its channels (all of them under tp_only), the
  // ones `present` lacks read from any image channel and masked out (set_masks). A rank whose
  // own-channel images hold none reads a zero image.
  std::pair<View4<const Storage, memory_space>, ChannelSelection> local_images(
      const View4<const Storage, memory_space>& given, const ChannelSelection& present,
      ImageInput input) {
    const std::vector<int>& local =
        mode_ == Mode::tp_only ? tokenizer_->owned_channels() : channels_;
    if (input == ImageInput::full_image)
      return {given, detail::module_selection(present, local, cfg_.channels)};
    const auto own = own_present(present);
    if (!own.empty())
      return {given, detail::module_selection(ChannelSelection::own(own), local, cfg_.channels)};
    // The allocator may hand back the freed address, so the shape says whether it is new.
    const bool fresh = blank_.data() == nullptr || blank_.extent(0) != given.extent(0) ||
                       blank_.extent(2) != given.extent(2) || blank_.extent(3) != given.extent(3);
    detail::ensure_view(blank_, "dchag::distributed::blank_image", given.extent(0), std::size_t(1),
                        given.extent(2), given.extent(3));
    // Zeros once per allocation (workspace comes uninitialised, and nothing writes to it): the
    // lacking channels' pixels must be finite.
    if (fresh) Kokkos::deep_copy(blank_, detail::convert<Storage>(0.0f));
    return {blank_,
            detail::module_selection(ChannelSelection::own({local.front()}), local, cfg_.channels)};
  }

  TensorList<Scalar, memory_space> attention_params(bool grads) const {
    const std::string prefix = is_dchag() ? "final." : "";
    return grads ? attention_->gradients(prefix) : attention_->parameters(prefix);
  }

  TensorList<Scalar, memory_space> named(bool grads) const {
    TensorList<Scalar, memory_space> list;
    if (stage_) list = grads ? stage_->gradients() : stage_->parameters();
    if (tokenizer_) list = grads ? tokenizer_->gradients() : tokenizer_->parameters();
    detail::append(list, attention_params(grads));
    detail::append(list, grads ? pos_->gradients() : pos_->parameters());
    lead_->append_to(list, grads);
    return list;
  }

  Communicator comm_;
  FrontEndConfig cfg_;
  Mode mode_;
  ChannelMap map_;
  int tree_;
  detail::CommunicatorReduce<ExecSpace, Scalar> reduce_;
  std::vector<int> channels_;
  std::optional<detail::ChannelStage<ExecSpace, Scalar, Storage>> stage_;  // D-CHAG modes
  std::optional<Tokenizer<ExecSpace, Scalar, Storage>> tokenizer_;         // exact_flat, tp_only
  std::optional<CrossAttention<ExecSpace, Scalar>> attention_;  // final or flat aggregation
  std::optional<PositionalEmbedding<ExecSpace, Scalar>> pos_;
  std::optional<detail::LeadTimeStage<ExecSpace, Scalar>> lead_;
  typename CrossAttention<ExecSpace, Scalar>::Saved saved_;
  bool forwarded_ = false;
  MemoryPolicy forwarded_memory_ = MemoryPolicy::keep;
#ifdef NDEBUG
  bool check_replicas_ = false;
#else
  bool check_replicas_ = true;
#endif
  V4 partial_, received_, gathered_, d_gathered_, tokens_, d_tokens_;  // tokens_: tp_only's
  detail::FusedTokens<Scalar, Storage, memory_space> fused_;           // exact_flat's tokens
  View1<Scalar, memory_space> query_before_, d_chunk_;
  View1<Scalar, memory_space> shared_before_;  // the tokenizer's shared gradients before backward
  // The last forward's masks (empty: all valid) and their storage.
  InputMask<memory_space> local_valid_, final_valid_;
  View2<std::uint8_t, memory_space> local_mask_, final_mask_;
  View4<Storage, memory_space> blank_;  // the images of a rank given none of its channels
};

}  // namespace dchag
