#pragma once
/// Per-rank partial aggregation (DESIGN 3.3): folds a rank's C_r channel tokens [B, C_r, L, D]
/// into one partial token [B, 1, L, D], either by a learned linear sum (D-CHAG-L) or by a
/// single-query cross-attention (D-CHAG-C), optionally as a local tree of k contiguous groups.
/// The tree shares one cross-attention across groups and levels; the linear tree has one group
/// weight vector shared by the groups plus a k-vector on top (names `top_weight`, `top_bias`).
#include <dchag/config.hpp>
#include <dchag/cross_attention.hpp>
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
  int inputs() const { return inputs_; }
  int tree() const { return tree_; }

  /// Allocates what a forward and backward over B x L positions need (see Tokenizer::reserve).
  void reserve(int B, int L, int D) {
    if (tree_ > 1) ensure_mid(B, L, D);
    if (!attention_) return;
    attention_->reserve(saved_[0], B, inputs_, L, group_segments());
    if (tree_ > 1) attention_->reserve(saved_[1], B, tree_, L, Segments::whole(tree_));
  }

  /// out [B, 1, L, D] from tokens [B, C_r, L, D]; keeps what backward needs.
  void forward(const ExecSpace& exec, const C4& tokens, const V4& out) {
    detail::ScopedRegion region("dchag::PartialAggregator::forward");
    DCHAG_EXPECT(tokens.extent(1) == std::size_t(inputs_), "dchag::PartialAggregator::forward",
                 "tokens.extent(1) is ", tokens.extent(1), ", expected C_r = ", inputs_);
    const Segments groups = group_segments();
    if (tree_ == 1) {
      apply_forward(exec, tokens, groups, out, saved_[0], true);
      forwarded_ = true;
      return;
    }
    ensure_mid(tokens.extent(0), tokens.extent(2), tokens.extent(3));
    apply_forward(exec, tokens, groups, mid_, saved_[0], true);
    apply_forward(exec, mid_, Segments::whole(tree_), out, saved_[1], false);
    forwarded_ = true;
  }

  /// Accumulates parameter gradients and writes d_tokens from the forward's tokens and d_out.
  void backward(const ExecSpace& exec, const C4& tokens, const C4& d_out, const V4& d_tokens) {
    detail::ScopedRegion region("dchag::PartialAggregator::backward");
    DCHAG_EXPECT(forwarded_, "dchag::PartialAggregator::backward", "called before forward");
    const Segments groups = group_segments();
    if (tree_ == 1) {
      apply_backward(exec, tokens, groups, d_out, d_tokens, saved_[0], true);
      return;
    }
    apply_backward(exec, mid_, Segments::whole(tree_), d_out, d_mid_, saved_[1], false);
    apply_backward(exec, tokens, groups, d_mid_, d_tokens, saved_[0], true);
  }

  void set_strategy(Strategy s) {
    if (attention_) attention_->set_strategy(s);
  }

  void zero_gradients(const ExecSpace& exec) {
    if (group_) group_->zero_gradients(exec);
    if (top_) top_->zero_gradients(exec);
    if (attention_) attention_->zero_gradients(exec);
  }

  TensorList<Scalar, memory_space> parameters() const { return named(false); }
  TensorList<Scalar, memory_space> gradients() const { return named(true); }

  /// Memory for `inputs` channels folded with a k = `tree` local tree, B x L positions.
  /// Validates its arguments as the constructor and forward do.
  static MemoryEstimate estimate(PartialKind kind, int inputs, int tree,
                                 const AttentionConfig& attention, std::int64_t B, std::int64_t L) {
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
      const MemoryEstimate level0 =
          Attention::estimate_application(attention, b, inputs, l, tree, attention.heads, false);
      e.activations += level0.activations;
      e.workspace += level0.workspace;  // the larger level; scratch is reused by the other
      if (tree > 1)
        e.activations +=
            Attention::estimate_application(attention, b, tree, l, 1, attention.heads, false)
                .activations;
    }
    if (tree > 1)
      e.workspace += 2 * std::int64_t(sizeof(Scalar)) * B * tree * L * attention.dim;  // mid, d_mid
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

  void ensure_mid(std::size_t B, std::size_t L, std::size_t D) {
    detail::ensure_view(mid_, "dchag::partial::mid", B, std::size_t(tree_), L, D);
    detail::ensure_view(d_mid_, "dchag::partial::d_mid", B, std::size_t(tree_), L, D);
  }

  void apply_forward(const ExecSpace& exec, const C4& x, const Segments& seg, const V4& out,
                     typename CrossAttention<ExecSpace, Scalar>::Saved& saved, bool level0) {
    if (attention_) {
      attention_->forward(exec, x, seg, out, saved);
    } else {
      (level0 ? *group_ : *top_).forward(exec, x, seg, out);
    }
  }
  void apply_backward(const ExecSpace& exec, const C4& x, const Segments& seg, const C4& dy,
                      const V4& dx, const typename CrossAttention<ExecSpace, Scalar>::Saved& saved,
                      bool level0) {
    if (attention_) {
      attention_->backward(exec, x, saved, dy, dx);
    } else {
      (level0 ? *group_ : *top_).backward(exec, x, seg, dy, dx);
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
  bool forwarded_ = false;
};

}  // namespace dchag
