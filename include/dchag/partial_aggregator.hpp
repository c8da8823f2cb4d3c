#pragma once
/// Per-rank partial aggregation (DESIGN 3.3): folds a rank's C_r channel tokens [B, C_r, L, D]
/// into one partial token [B, 1, L, D], either by a learned linear sum (D-CHAG-L) or by a
/// single-query cross-attention (D-CHAG-C), optionally as a local tree of k contiguous groups.
/// The tree shares one cross-attention across groups and levels; the linear tree has one group
/// weight vector shared by the groups plus a k-vector on top (names `top_weight`, `top_bias`).
/// With a mask (DESIGN 3.10) a missing channel drops out of its group, and a group with no valid
/// channel in a sample drops out of the second level; a rank with none gives a token that the
/// final fold must mask.
#include <dchag/config.hpp>
#include <dchag/cross_attention.hpp>
#include <dchag/detail/masks.hpp>
#include <dchag/detail/sizes.hpp>
#include <dchag/linear_aggregation.hpp>

#include <optional>
#include <string>

namespace dchag {

template <class ExecSpace, class Scalar = float>
class PartialAggregator {
 public:
  using execution_space = ExecSpace;
  using memory_space = typename ExecSpace::memory_space;
  using V4 = View4<Scalar, memory_space>;
  using C4 = View4<const Scalar, memory_space>;
  using Mask = InputMask<memory_space>;

  /// `inputs` channels folded by `kind` with a k = `tree` group local tree (1: no tree).
  /// `name` is the prefix of the parameter names and keys their seed streams.
  PartialAggregator(const ExecSpace& exec, PartialKind kind, int inputs, int tree,
                    AttentionConfig attention, std::uint64_t seed = 0,
                    std::string name = "partial.")
      : kind_(kind), inputs_(inputs), tree_(tree), name_(std::move(name)) {
    check_module("dchag::PartialAggregator", kind, inputs, tree);
    if (kind == PartialKind::linear) {
      group_.emplace(exec, inputs / tree, seed, name_ + "weight");
      if (tree > 1) top_.emplace(exec, tree, seed, name_ + "top_weight");
    } else {
      attention_.emplace(exec, attention, seed, name_);
    }
  }

  PartialKind kind() const { return kind_; }
  /// One partial token per patch position (the fused loop's fold protocol).
  int queries() const { return 1; }
  int inputs() const { return inputs_; }
  int tree() const { return tree_; }

  /// Allocates what a forward and backward over B x L positions need (see Tokenizer::reserve);
  /// `stream_chunk` and `memory` as for CrossAttention::reserve.
  void reserve(int B, int L, int D, int stream_chunk = 0,
               MemoryPolicy memory = MemoryPolicy::keep) {
    if (tree_ > 1) ensure_mid(B, L, D, memory != MemoryPolicy::inference);
    if (!attention_) return;
    attention_->reserve(saved_[0], B, inputs_, L, group_segments(), false, stream_chunk, memory);
    if (tree_ > 1)
      attention_->reserve(saved_[1], B, tree_, L, Segments::whole(tree_), false, 0,
                          memory == MemoryPolicy::inference ? memory : MemoryPolicy::keep);
  }

  /// out [B, 1, L, D] from tokens [B, C_r, L, D]; keeps what backward needs. `valid` [B, C_r]
  /// (empty: all valid) must stay unchanged until the backward.
  void forward(const ExecSpace& exec, const C4& tokens, const V4& out, const Mask& valid = {}) {
    detail::ScopedRegion region("dchag::PartialAggregator::forward");
    DCHAG_EXPECT(tokens.extent(1) == std::size_t(inputs_), "dchag::PartialAggregator::forward",
                 "tokens.extent(1) is ", tokens.extent(1), ", expected C_r = ", inputs_);
    const Segments groups = group_segments();
    set_masks(exec, valid);
    if (tree_ == 1) {
      apply_forward(exec, tokens, groups, out, saved_[0], true);
      forwarded_ = true;
      return;
    }
    ensure_mid(tokens.extent(0), tokens.extent(2), tokens.extent(3), true);
    apply_forward(exec, tokens, groups, mid_, saved_[0], true);
    apply_forward(exec, mid_, Segments::whole(tree_), out, saved_[1], false);
    forwarded_ = true;
    memory_ = MemoryPolicy::keep;
  }

  /// Accumulates parameter gradients and writes d_tokens from the forward's tokens and d_out.
  void backward(const ExecSpace& exec, const C4& tokens, const C4& d_out, const V4& d_tokens) {
    detail::ScopedRegion region("dchag::PartialAggregator::backward");
    constexpr const char* where = "dchag::PartialAggregator::backward";
    DCHAG_EXPECT(forwarded_, where, "called before forward");
    DCHAG_EXPECT(memory_ == MemoryPolicy::keep, where,
                 "the forward ran with MemoryPolicy::", to_string(memory_),
                 ", expected keep (or the chunked backward_begin)");
    const Segments groups = group_segments();
    if (tree_ == 1) {
      apply_backward(exec, tokens, groups, d_out, d_tokens, saved_[0], true);
      return;
    }
    apply_backward(exec, mid_, Segments::whole(tree_), d_out, d_mid_, saved_[1], false);
    apply_backward(exec, tokens, groups, d_mid_, d_tokens, saved_[0], true);
  }

  /// Streamed forward over consecutive chunks of the C_r inputs (the fused D-CHAG stage, DESIGN
  /// 3.8): stream_begin, then stream_chunk for [n0, n1) in order (x: all inputs [B, C_r, L, D]
  /// or the chunk's [B, n1 - n0, L, D]), then stream_end writes out [B, 1, L, D]. The same
  /// result as forward; `memory` says what the cross-attention keeps (CrossAttention's stream);
  /// `valid` as for forward.
  void stream_begin(const ExecSpace& exec, const V4& out, MemoryPolicy memory,
                    const Mask& valid = {}) {
    constexpr const char* where = "dchag::PartialAggregator::stream_begin";
    DCHAG_EXPECT(out.extent(1) == 1, where, "out.extent(1) is ", out.extent(1), ", expected 1");
    const std::size_t B = out.extent(0), L = out.extent(2), D = out.extent(3);
    if (tree_ > 1) ensure_mid(B, L, D, memory != MemoryPolicy::inference);
    level0_ = tree_ > 1 ? mid_ : out;
    set_masks(exec, valid);
    if (attention_) {
      attention_->stream_begin(exec, saved_[0], int(B), inputs_, int(L), group_segments(), memory,
                               false, valid_);
    } else {
      group_->stream_begin(exec, level0_);
    }
    memory_ = memory;
    forwarded_ = false;
  }
  void stream_chunk(const ExecSpace& exec, const C4& x, int n0, int n1) {
    if (attention_) {
      attention_->stream_chunk(exec, x, n0, n1, saved_[0]);
    } else {
      group_->stream_chunk(exec, x, n0, n1, level0_, valid_);
    }
  }
  void stream_end(const ExecSpace& exec, const V4& out) {
    if (attention_) attention_->stream_end(exec, saved_[0], level0_);
    if (tree_ > 1) apply_forward(exec, mid_, Segments::whole(tree_), out, saved_[1], false);
    forwarded_ = true;
  }

  /// Chunked backward of a streamed forward: backward_begin(d_out [B, 1, L, D]), then
  /// backward_chunk for [n0, n1) in order, writing dx [B, n1 - n0, L, D] (x as in stream_chunk:
  /// after a recompute forward, the chunk's tokens again), then backward_end.
  void backward_begin(const ExecSpace& exec, const C4& d_out) {
    constexpr const char* where = "dchag::PartialAggregator::backward_begin";
    DCHAG_EXPECT(forwarded_, where, "called before forward");
    DCHAG_EXPECT(memory_ != MemoryPolicy::inference, where,
                 "the forward ran with MemoryPolicy::inference and kept nothing for a backward");
    C4 dy0 = d_out;
    if (tree_ > 1) {
      apply_backward(exec, mid_, Segments::whole(tree_), d_out, d_mid_, saved_[1], false);
      dy0 = d_mid_;
    }
    level0_grad_ = dy0;
    if (attention_) {
      attention_->backward_begin(exec, saved_[0], dy0);
    } else {
      group_->backward_bias(exec, dy0);
    }
  }
  void backward_chunk(const ExecSpace& exec, const C4& x, int n0, int n1, const V4& dx) {
    if (attention_) {
      attention_->backward_chunk(exec, x, saved_[0], n0, n1, dx);
    } else {
      group_->backward_chunk(exec, x, n0, n1, level0_grad_, dx, valid_);
    }
  }
  void backward_end(const ExecSpace& exec) {
    if (attention_) attention_->backward_end(exec, saved_[0]);
  }

  void set_strategy(Strategy s) {
    if (attention_) attention_->set_strategy(s);
  }
  /// Whether the streamed protocol is available: linear, or the pooled cross-attention.
  bool streams() const { return !attention_ || attention_->config().strategy == Strategy::pooled; }

  void zero_gradients(const ExecSpace& exec) {
    if (group_) group_->zero_gradients(exec);
    if (top_) top_->zero_gradients(exec);
    if (attention_) attention_->zero_gradients(exec);
  }

  TensorList<Scalar, memory_space> parameters() const { return named(false); }
  TensorList<Scalar, memory_space> gradients() const { return named(true); }

  /// Memory for `inputs` channels folded with a k = `tree` local tree, B x L positions; `chunk`
  /// and `memory` of a streamed forward as for CrossAttention::estimate_application.
  /// Validates its arguments as the constructor and forward do.
  static MemoryEstimate estimate(PartialKind kind, int inputs, int tree,
                                 const AttentionConfig& attention, std::int64_t B, std::int64_t L,
                                 std::int64_t chunk = 0, MemoryPolicy memory = MemoryPolicy::keep) {
    using Attention = CrossAttention<ExecSpace, Scalar>;
    constexpr const char* where = "dchag::PartialAggregator::estimate";
    check_module(where, kind, inputs, tree);
    DCHAG_EXPECT(attention.dim >= 1, where, "attention.dim is ", attention.dim, ", expected >= 1");
    DCHAG_EXPECT(attention.heads >= 1 && attention.dim % attention.heads == 0, where,
                 "attention.heads is ", attention.heads,
                 ", expected a divisor of dim = ", attention.dim);
    DCHAG_EXPECT(B >= 1, where, "B is ", B, ", expected >= 1");
    DCHAG_EXPECT(L >= 1, where, "L is ", L, ", expected >= 1");
    // The cross-attention's league is B * inputs * L rows; within INT_MAX, B and L fit its int
    // arguments below.
    detail::expect_int_size(where, "token rows B * inputs * L", {B, inputs, L});
    detail::expect_elements(where, "tokens B * inputs * L * D", {B, inputs, L, attention.dim});
    MemoryEstimate e;
    if (kind == PartialKind::linear) {
      e += LinearAggregation<ExecSpace, Scalar>::estimate(inputs / tree);
      if (tree > 1) e += LinearAggregation<ExecSpace, Scalar>::estimate(tree);
    } else {
      e += Attention::estimate_module(attention);
      const int b = static_cast<int>(B), l = static_cast<int>(L);
      const MemoryEstimate level0 = Attention::estimate_application(
          attention, b, inputs, l, tree, attention.heads, false, chunk, memory);
      e.activations += level0.activations;
      e.workspace += level0.workspace;  // the larger level; scratch is reused by the other
      if (tree > 1)
        e.activations += Attention::estimate_application(
                             attention, b, tree, l, 1, attention.heads, false, 0,
                             memory == MemoryPolicy::inference ? memory : MemoryPolicy::keep)
                             .activations;
    }
    if (tree > 1)  // mid, d_mid
      e.workspace += (memory == MemoryPolicy::inference ? 1 : 2) * std::int64_t(sizeof(Scalar)) *
                     B * tree * L * attention.dim;
    return e;
  }

 private:
  static void check_module(const char* where, PartialKind kind, int inputs, int tree) {
    DCHAG_EXPECT(inputs >= 1, where, "inputs is ", inputs, ", expected >= 1");
    DCHAG_EXPECT(tree >= 1 && tree <= inputs, where, "tree is ", tree,
                 ", expected 1 <= tree <= inputs = ", inputs);
    DCHAG_EXPECT(kind != PartialKind::linear || inputs % tree == 0, where, "linear tree over ",
                 inputs, " channels with tree = ", tree,
                 ", expected tree to divide the channel count (groups share one weight vector)");
  }

  Segments group_segments() const { return Segments::split(inputs_, tree_); }

  void ensure_mid(std::size_t B, std::size_t L, std::size_t D, bool with_grad) {
    detail::ensure_view(mid_, "dchag::partial::mid", B, std::size_t(tree_), L, D);
    if (with_grad) {
      detail::ensure_view(d_mid_, "dchag::partial::d_mid", B, std::size_t(tree_), L, D);
    } else {
      d_mid_ = V4();
    }
  }

  // The masks of both levels: the caller's, and one slot per group of the tree.
  void set_masks(const ExecSpace& exec, const Mask& valid) {
    DCHAG_EXPECT(valid.data() == nullptr || valid.extent(1) == std::size_t(inputs_),
                 "dchag::PartialAggregator", "valid.extent(1) is ", valid.extent(1),
                 ", expected C_r = ", inputs_);
    valid_ = valid;
    mid_valid_ = tree_ > 1 ? detail::split_any(exec, valid, tree_, mid_mask_) : Mask();
  }

  void apply_forward(const ExecSpace& exec, const C4& x, const Segments& seg, const V4& out,
                     typename CrossAttention<ExecSpace, Scalar>::Saved& saved, bool level0) {
    const Mask& valid = level0 ? valid_ : mid_valid_;
    if (attention_) {
      attention_->forward(exec, x, seg, out, saved, nullptr, valid);
    } else {
      (level0 ? *group_ : *top_).forward(exec, x, seg, out, valid);
    }
  }
  void apply_backward(const ExecSpace& exec, const C4& x, const Segments& seg, const C4& dy,
                      const V4& dx, const typename CrossAttention<ExecSpace, Scalar>::Saved& saved,
                      bool level0) {
    if (attention_) {
      attention_->backward(exec, x, saved, dy, dx);
    } else {
      (level0 ? *group_ : *top_).backward(exec, x, seg, dy, dx, level0 ? valid_ : mid_valid_);
    }
  }

  TensorList<Scalar, memory_space> named(bool grads) const {
    if (attention_) return grads ? attention_->gradients(name_) : attention_->parameters(name_);
    auto list = grads ? group_->gradients(name_) : group_->parameters(name_);
    if (top_) {
      auto more = grads ? top_->gradients(name_, "top_weight", "top_bias")
                        : top_->parameters(name_, "top_weight", "top_bias");
      list.insert(list.end(), more.begin(), more.end());
    }
    return list;
  }

  PartialKind kind_;
  int inputs_, tree_;
  std::string name_;
  std::optional<LinearAggregation<ExecSpace, Scalar>> group_, top_;
  std::optional<CrossAttention<ExecSpace, Scalar>> attention_;
  typename CrossAttention<ExecSpace, Scalar>::Saved saved_[2];
  V4 mid_, d_mid_;
  V4 level0_;       // streamed forward: the first level's output (mid_, or out without a tree)
  C4 level0_grad_;  // chunked backward: the gradient at level0_
  Mask valid_, mid_valid_;                      // the last forward's masks of both levels
  View2<std::uint8_t, memory_space> mid_mask_;  // mid_valid_'s values
  MemoryPolicy memory_ = MemoryPolicy::keep;
  bool forwarded_ = false;
};

}  // namespace dchag
