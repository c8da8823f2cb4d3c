#pragma once
/// Patch tokenizer with channel embedding (DESIGN 3.1, 3.11):
///   token[b, j, l, :] = Wt_c . patch(b, j, l) + bt_c + E_c,   c = the global id of input channel
///   j.
/// Equivalent to ClimaX's `Conv2d(1, D, p, stride=p)` per channel followed by
/// `flatten(2).transpose(1, 2)` and `+ var_embed[c]`. A tokenizer holds the weights of the channels
/// it owns only (all of them on one rank, its own under D-CHAG). The policies of
/// dchag/tokenizer_policy.hpp replace Wt_c, bt_c by one shared Wt, bt (ChannelViT) and E_c by a
/// learned map of the Fourier features of the channel's coordinate.
#include <dchag/channel_selection.hpp>
#include <dchag/detail/batched_gemm.hpp>
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/detail/loops.hpp>
#include <dchag/detail/sizes.hpp>
#include <dchag/detail/tokenizer_kernels.hpp>
#include <dchag/detail/tokenizer_support.hpp>
#include <dchag/detail/workspace.hpp>
#include <dchag/error.hpp>
#include <dchag/init.hpp>
#include <dchag/precision.hpp>
#include <dchag/tensor.hpp>
#include <dchag/tokenizer_policy.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace dchag {

/// `Scalar`: the weights, their gradients and the arithmetic; `Storage`: the images' type
/// (precision.hpp). Tokens and patches are Scalar.
template <class ExecSpace, class Scalar = float, class Storage = Scalar>
class Tokenizer {
  static_assert(is_storage_type_v<Storage>, "dchag::Tokenizer: Storage is not a storage type");

 public:
  using execution_space = ExecSpace;
  using memory_space = typename ExecSpace::memory_space;
  using scalar_type = Scalar;
  using storage_type = Storage;

  /// Allocates and initialises (ClimaX: trunc-normal 0.02 weights, zero biases, sin-cos channel
  /// embedding) the weights of `owned` channels among `model_channels`, per channel and table.
  Tokenizer(const ExecSpace& exec, int model_channels, int patch, int dim, std::vector<int> owned,
            std::uint64_t seed = 0)
      : Tokenizer(exec, model_channels, patch, dim, std::move(owned), seed, TokenizerPolicy{}) {}

  /// The same under `policy` (validated against model_channels). With `share`, the parameters
  /// every channel shares (the shared weight and bias, the coordinate map) are those of `share`,
  /// not a copy (DchagEmulation's groups); `share` must have the same policy, patch and dim.
  Tokenizer(const ExecSpace& exec, int model_channels, int patch, int dim, std::vector<int> owned,
            std::uint64_t seed, TokenizerPolicy policy, const Tokenizer* share = nullptr)
      : channels_(model_channels),
        patch_(patch),
        dim_(dim),
        owned_(std::move(owned)),
        policy_(std::move(policy)) {
    constexpr const char* where = "dchag::Tokenizer";
    check_module(where, model_channels, patch, dim, static_cast<std::int64_t>(owned_.size()));
    policy_.validate(where, model_channels, "policy");
    slot_of_.assign(model_channels, -1);
    for (std::size_t s = 0; s < owned_.size(); ++s) {
      const int c = owned_[s];
      DCHAG_EXPECT(c >= 0 && c < model_channels, where, "owned channel ", c,
                   " is out of range, expected 0 <= channel < ", model_channels);
      DCHAG_EXPECT(slot_of_[c] < 0, where, "owned channel ", c,
                   " is listed twice, expected unique channel ids");
      slot_of_[c] = static_cast<int>(s);
    }
    const int n = static_cast<int>(owned_.size());
    const std::int64_t pp = std::int64_t(patch) * patch;  // <= INT_MAX: checked above
    const std::int64_t F = policy_.fourier.count;
    if (share) {
      DCHAG_EXPECT(share->patch_ == patch && share->dim_ == dim &&
                       share->policy_.weights == policy_.weights &&
                       share->policy_.embedding == policy_.embedding &&
                       share->policy_.fourier.count == policy_.fourier.count,
                   where, "share has another patch, dim or policy (internal error)");
      replicated_ = share->replicated_;
      d_replicated_ = share->d_replicated_;
    } else {
      const std::int64_t R = policy_.replicated_elements(patch, dim);
      replicated_ = View1<Scalar, memory_space>("dchag::tokenizer::replicated", R);
      d_replicated_ = View1<Scalar, memory_space>("dchag::tokenizer::d_replicated", R);
    }
    // Held as Wt_c^T [p*p, D] so the projection is a plain (untransposed) GEMM; a shared weight
    // and bias (one "channel"), then the coordinate map We [D, F] and be [D], are views of
    // replicated_ in this order.
    Scalar* rep = replicated_.data();
    Scalar* d_rep = d_replicated_.data();
    if (policy_.shared()) {
      weight_ = View3<Scalar, memory_space>(rep, 1, pp, dim);
      bias_ = View2<Scalar, memory_space>(rep + pp * dim, 1, dim);
      d_weight_ = View3<Scalar, memory_space>(d_rep, 1, pp, dim);
      d_bias_ = View2<Scalar, memory_space>(d_rep + pp * dim, 1, dim);
      rep += pp * dim + dim;
      d_rep += pp * dim + dim;
    } else {
      weight_ = View3<Scalar, memory_space>("dchag::tokenizer::weight", n, pp, dim);
      bias_ = View2<Scalar, memory_space>("dchag::tokenizer::bias", n, dim);
      d_weight_ = View3<Scalar, memory_space>("dchag::tokenizer::d_weight", n, pp, dim);
      d_bias_ = View2<Scalar, memory_space>("dchag::tokenizer::d_bias", n, dim);
    }
    if (policy_.coordinate()) {
      proj_w_ = View2<Scalar, memory_space>(rep, dim, F);
      proj_b_ = View1<Scalar, memory_space>(rep + dim * F, dim);
      d_proj_w_ = View2<Scalar, memory_space>(d_rep, dim, F);
      d_proj_b_ = View1<Scalar, memory_space>(d_rep + dim * F, dim);
    } else {
      embed_ = View2<Scalar, memory_space>("dchag::tokenizer::channel_embed", n, dim);
      d_embed_ = View2<Scalar, memory_space>("dchag::tokenizer::d_channel_embed", n, dim);
      init_sincos_rows(embed_, owned_);
    }
    if (!policy_.shared()) {
      init_weights(seed, owned_);
    } else if (!share) {
      init_weights(seed, {-1});
    }
    if (policy_.coordinate() && !share)
      init_trunc_normal(proj_w_, 0.02, seed, "channel_embed.proj.weight");
    exec.fence();
  }

  int model_channels() const { return channels_; }
  int patch() const { return patch_; }
  int dim() const { return dim_; }
  const std::vector<int>& owned_channels() const { return owned_; }
  const TokenizerPolicy& policy() const { return policy_; }

  /// Allocates what a forward and backward of B images, J selected channels and L patches need,
  /// so that a collective caller can agree on the allocation before its first collective.
  /// `patch_chunk`: 0 keeps the patches of all J channels; n > 0 holds those of n channels at a
  /// time (see prepare).
  void reserve(int B, int J, int L, int patch_chunk = 0) {
    const int held = patch_chunk > 0 ? std::min(patch_chunk, J) : J;
    detail::ensure_view(patches_, "dchag::tokenizer::patches", held, B, L,
                        std::int64_t(patch_) * patch_);
    detail::ensure_view(slot_, "dchag::tokenizer::slot", J);
    detail::ensure_view(image_index_, "dchag::tokenizer::image_index", J);
    const std::int64_t pp = std::int64_t(patch_) * patch_, D = dim_;
    if (policy_.coordinate()) {
      detail::ensure_view(phi_, "dchag::tokenizer::fourier_features", J, policy_.fourier.count);
      detail::ensure_view(sel_embed_, "dchag::tokenizer::selection_embed", J, D);
    }
    if (needs_sums()) detail::ensure_view(sums_, "dchag::tokenizer::channel_sums", J, D);
    if (policy_.shared() && B > 1)
      detail::ensure_view(weight_scratch_, "dchag::tokenizer::d_weight_samples", B, pp, D);
  }

  /// tokens [B, J, L, D] from images [B, Cimg, H, W] and a selection of J channels. Saves the
  /// patches for backward. H and W must be multiples of the patch size.
  void forward(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const ChannelSelection& sel, const View4<Scalar, memory_space>& tokens) {
    detail::ScopedRegion region("dchag::Tokenizer::forward");
    check_forward(images, sel);
    check_tokens("dchag::Tokenizer::forward", tokens, images.extent(0), sel.size(),
                 (images.extent(2) / patch_) * (images.extent(3) / patch_), dim_);
    record(exec, images, sel, 0);
    project(exec, 0, sel.size(), tokens);
  }

  /// First half of forward: validates and records the selection. `patch_chunk` = 0 extracts
  /// the patches of every channel now and keeps them for backward; n > 0 extracts them per
  /// call of project (at most n channels each) from `images`, which this tokenizer then holds
  /// (not a copy: the caller keeps them unchanged until the backward's last chunk, DESIGN 3.8).
  void prepare(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
               const ChannelSelection& sel, int patch_chunk = 0) {
    detail::ScopedRegion region("dchag::Tokenizer::prepare");
    check_forward(images, sel);
    DCHAG_EXPECT(patch_chunk >= 0, "dchag::Tokenizer::prepare", "patch_chunk is ", patch_chunk,
                 ", expected >= 0");
    record(exec, images, sel, patch_chunk);
  }

  /// Second half of forward, for channels [j0, j1) of the selection only: their tokens, into
  /// `tokens` [B, J, L, D] (every channel's slots) or [B, j1 - j0, L, D] (this chunk only). With
  /// patches extracted per chunk, first extracts this chunk's. Lets a caller stream chunks.
  void project(const ExecSpace& exec, int j0, int j1, const View4<Scalar, memory_space>& tokens) {
    detail::ScopedRegion region("dchag::Tokenizer::project");
    constexpr const char* where = "dchag::Tokenizer::project";
    const int B = B_, L = L_, D = dim_;
    DCHAG_EXPECT(J_ > 0, where, "called before prepare");
    DCHAG_EXPECT(0 <= j0 && j0 < j1 && j1 <= J_, where, "channel range [", j0, ", ", j1,
                 ") is not a non-empty range inside the prepared selection [0, ", J_, ")");
    const int nj = j1 - j0;
    const bool all = tokens.extent(1) == std::size_t(J_);
    DCHAG_EXPECT(tokens.extent(0) == std::size_t(B) &&
                     (all || tokens.extent(1) == std::size_t(nj)) &&
                     tokens.extent(2) == std::size_t(L) && tokens.extent(3) == std::size_t(D),
                 where, "tokens is [", tokens.extent(0), ", ", tokens.extent(1), ", ",
                 tokens.extent(2), ", ", tokens.extent(3), "], expected [B, J, L, D] = [", B, ", ",
                 J_, ", ", L, ", ", D, "] or the chunk's [", B, ", ", nj, ", ", L, ", ", D, "]");
    extract_chunk(where, exec, j0, j1);
    const int t0 = all ? 0 : j0;  // selection index of tokens' first channel slot
    const int p0 = patches_first_;
    // Start every token at bias + channel embedding, then add the patch projection. A shared
    // weight and bias are row 0 for every channel; a coordinate embedding has a row per
    // selected channel (computed by prepare), a table one per owned channel.
    auto slot = slot_;
    auto bias = bias_;
    const bool shared = policy_.shared(), coordinate = policy_.coordinate();
    auto embed = coordinate ? sel_embed_ : embed_;
    detail::for_each_row(
        exec, "dchag::tokenize::bias", std::int64_t(B) * nj * L, D,
        KOKKOS_LAMBDA(const std::int64_t r, const int d) {
          const int l = static_cast<int>(r % L);
          const int j = j0 + static_cast<int>((r / L) % nj);
          const int b = static_cast<int>(r / (std::int64_t(L) * nj));
          const int s = slot(j);
          (&tokens(b, j - t0, l, 0))[d] =
              (&bias(shared ? 0 : s, 0))[d] + (&embed(coordinate ? j : s, 0))[d];
        });
    // tokens(b, j) += patches(j, b) Wt_slot(j)^T for every (j, b) of the chunk: one batch.
    auto patches = patches_;
    auto weight = weight_;
    const int pp = patch_ * patch_;
    detail::batched_gemm(
        exec, "dchag::tokenize::project", {nj * B, L, D, pp, 1}, KOKKOS_LAMBDA(const int t) {
          const int j = j0 + t / B, b = t % B;
          return detail::GemmOperands<Scalar>{
              &patches(j - p0, b, 0, 0), 0, pp, 1, &weight(shared ? 0 : slot(j), 0, 0), 0, D,
              &tokens(b, j - t0, 0, 0),  D};
        });
  }

  /// With patches per chunk (prepare's patch_chunk > 0), extracts those of channels [j0, j1) of
  /// the prepared selection from the held images, unless they are held already; else a no-op.
  /// project does it; a backward of chunks it did not just project needs it first.
  void load_patches(const ExecSpace& exec, int j0, int j1) {
    constexpr const char* where = "dchag::Tokenizer::load_patches";
    DCHAG_EXPECT(J_ > 0, where, "called before prepare");
    DCHAG_EXPECT(0 <= j0 && j0 < j1 && j1 <= J_, where, "channel range [", j0, ", ", j1,
                 ") is not a non-empty range inside the prepared selection [0, ", J_, ")");
    extract_chunk(where, exec, j0, j1);
  }

  /// Accumulates the gradients of the weights, biases and channel embeddings of the channels seen
  /// by the last forward, given d_tokens [B, J, L, D].
  void backward(const ExecSpace& exec, const View4<const Scalar, memory_space>& d_tokens) {
    backward(exec, d_tokens, 0, J_);
  }

  /// The same for channels [j0, j1) of the last forward's selection only, given their d_tokens
  /// [B, j1 - j0, L, D]: lets a caller consume token gradients chunk by chunk.
  void backward(const ExecSpace& exec, const View4<const Scalar, memory_space>& d_tokens, int j0,
                int j1) {
    detail::ScopedRegion region("dchag::Tokenizer::backward");
    constexpr const char* where = "dchag::Tokenizer::backward";
    const int B = B_, L = L_, D = dim_, nj = j1 - j0;
    DCHAG_EXPECT(J_ > 0, where, "called before forward");
    DCHAG_EXPECT(0 <= j0 && j0 < j1 && j1 <= J_, where, "channel range [", j0, ", ", j1,
                 ") is not a non-empty range inside the forward's selection [0, ", J_, ")");
    DCHAG_EXPECT(patches_first_ <= j0 && j1 <= patches_first_ + patches_count_, where,
                 "the patches of channels [", j0, ", ", j1, ") are not held (held: [",
                 patches_first_, ", ", patches_first_ + patches_count_,
                 ")): with patches per chunk, project this chunk again first");
    DCHAG_EXPECT(d_tokens.extent(0) == std::size_t(B) && d_tokens.extent(1) == std::size_t(nj) &&
                     d_tokens.extent(2) == std::size_t(L) && d_tokens.extent(3) == std::size_t(D),
                 where, "d_tokens is [", d_tokens.extent(0), ", ", d_tokens.extent(1), ", ",
                 d_tokens.extent(2), ", ", d_tokens.extent(3), "], expected [B, J, L, D] = [", B,
                 ", ", nj, ", ", L, ", ", D, "]");
    // Per channel: its sums over (b, l) into its rows of d_bias and d_embed; where parameters are
    // shared over channels, into sums_ first, then summed over the chunk's channels.
    const bool shared = policy_.shared(), coordinate = policy_.coordinate();
    const View2<Scalar, memory_space> none;
    const View4<const Scalar, memory_space> g = d_tokens;
    detail::token_grad_sums(exec, g, j0, slot_, shared ? none : d_bias_,
                            coordinate ? none : d_embed_, needs_sums() ? sums_ : none);
    if (needs_sums()) {
      const View1<Scalar, memory_space> d_shared_bias =
          shared ? View1<Scalar, memory_space>(d_bias_.data(), dim_)
                 : View1<Scalar, memory_space>();
      detail::replicated_grads(exec, sums_, nj, phi_, j0, d_shared_bias, d_proj_w_, d_proj_b_);
    }
    if (shared) {
      detail::shared_weight_grad(exec, patches_, j0 - patches_first_, g, weight_scratch_,
                                 d_weight_);
      return;
    }
    // dWt_slot(j)^T += sum_b patches(j, b)^T d_tokens(b, j) for every channel: one batch, the
    // sum over samples inside each GEMM (their token rows are not contiguous).
    auto slot = slot_;
    auto patches = patches_;
    auto d_weight = d_weight_;
    const int pp = patch_ * patch_, p0 = patches_first_;
    const std::int64_t sample_stride = std::int64_t(nj) * L * D;
    detail::batched_gemm(
        exec, "dchag::tokenize::weight_grad", {nj, pp, D, L, B}, KOKKOS_LAMBDA(const int jj) {
          return detail::GemmOperands<Scalar>{&patches(j0 + jj - p0, 0, 0, 0),
                                              std::int64_t(L) * pp,
                                              1,
                                              pp,
                                              &d_tokens(0, jj, 0, 0),
                                              sample_stride,
                                              D,
                                              &d_weight(slot(j0 + jj), 0, 0),
                                              D};
        });
  }

  void zero_gradients(const ExecSpace& exec) {
    Kokkos::deep_copy(exec, d_replicated_, Scalar(0));
    if (!policy_.shared()) {
      Kokkos::deep_copy(exec, d_weight_, Scalar(0));
      Kokkos::deep_copy(exec, d_bias_, Scalar(0));
    }
    if (!policy_.coordinate()) Kokkos::deep_copy(exec, d_embed_, Scalar(0));
  }

  /// ClimaX names: token_embeds.{c}.proj.weight [D,1,p,p], token_embeds.{c}.proj.bias [D], and
  /// this tokenizer's rows of var_embed [1, C, D]; under the policies instead
  /// token_embed.proj.weight [D,1,p,p] and .bias [D] (shared), channel_embed.proj.weight [D, F]
  /// and .bias [D] (coordinate), listed last.
  TensorList<Scalar, memory_space> parameters() const { return named(false); }
  TensorList<Scalar, memory_space> gradients() const { return named(true); }
  /// The shared weight and bias and the coordinate map only: the tensors every channel shares
  /// (replicated on every rank of a D-CHAG group). Empty under per_channel and table.
  TensorList<Scalar, memory_space> replicated_parameters() const { return replicated(false); }
  TensorList<Scalar, memory_space> replicated_gradients() const { return replicated(true); }
  /// Their gradients as one contiguous view (for one all-reduce), in list order.
  const View1<Scalar, memory_space>& replicated_gradient_block() const { return d_replicated_; }

  /// Bytes held for `owned` channels and one forward/backward of B images of J channels with L
  /// patches each (the patches are kept for the weight gradient: of all J channels, or of
  /// `patch_chunk` at a time). Validates its arguments as the constructor and forward do.
  static MemoryEstimate estimate(std::int64_t owned, int patch, int dim, std::int64_t B,
                                 std::int64_t J, std::int64_t L, std::int64_t patch_chunk = 0) {
    return estimate(TokenizerPolicy{}, owned, patch, dim, B, J, L, patch_chunk);
  }
  /// The same under `policy`, validated against `channels` model channels (-1: owned).
  static MemoryEstimate estimate(const TokenizerPolicy& policy, std::int64_t owned, int patch,
                                 int dim, std::int64_t B, std::int64_t J, std::int64_t L,
                                 std::int64_t patch_chunk = 0, std::int64_t channels = -1) {
    constexpr const char* where = "dchag::Tokenizer::estimate";
    DCHAG_EXPECT(owned >= 1, where, "owned is ", owned, ", expected >= 1");
    check_module(where, owned, patch, dim, owned);
    policy.validate(where, channels < 0 ? owned : channels, "policy");
    DCHAG_EXPECT(B >= 1, where, "B is ", B, ", expected >= 1");
    DCHAG_EXPECT(J >= 1 && J <= owned, where, "J is ", J, ", expected 1 <= J <= owned = ", owned);
    DCHAG_EXPECT(L >= 1, where, "L is ", L, ", expected >= 1");
    detail::expect_int_size(where, "token rows B * J * L", {B, J, L});
    detail::expect_elements(where, "patches B * J * L * p * p", {B, J, L, patch, patch});
    const std::int64_t S = sizeof(Scalar), pp = std::int64_t(patch) * patch;
    MemoryEstimate e;
    e.parameters = S * (policy.replicated_elements(patch, dim) +
                        (policy.shared() ? 0 : owned * (pp * dim + dim)) +
                        (policy.coordinate() ? 0 : owned * dim));
    e.gradients = e.parameters;
    DCHAG_EXPECT(patch_chunk >= 0, where, "patch_chunk is ", patch_chunk, ", expected >= 0");
    const std::int64_t held = patch_chunk > 0 ? std::min(patch_chunk, J) : J;
    e.activations = S * held * std::int64_t(B) * L * pp + 2 * std::int64_t(sizeof(int)) * J;
    if (policy.coordinate()) e.activations += S * J * (policy.fourier.count + dim);
    if (policy.shared() || policy.coordinate()) e.workspace += S * J * dim;
    if (policy.shared() && B > 1) e.workspace += S * B * pp * dim;
    return e;
  }

 private:
  // The constructor's and the estimate's arguments: counts >= 1 and weights the kernels index.
  static void check_module(const char* where, std::int64_t model_channels, int patch, int dim,
                           std::int64_t owned) {
    DCHAG_EXPECT(model_channels >= 1, where, "model_channels is ", model_channels,
                 ", expected >= 1");
    DCHAG_EXPECT(patch >= 1, where, "patch is ", patch, ", expected >= 1");
    DCHAG_EXPECT(dim >= 1, where, "dim is ", dim, ", expected >= 1");
    DCHAG_EXPECT(owned >= 1, where, "owned channel list is empty, expected at least one channel");
    detail::expect_int_size(where, "patch pixels p * p", {patch, patch});
    detail::expect_elements(where, "weights of the owned channels n * p * p * D",
                            {owned, patch, patch, dim});
  }

  bool needs_sums() const { return policy_.shared() || policy_.coordinate(); }

  // Channel c's conv weight; -1: the shared one.
  static std::string weight_name(int c) {
    return c < 0 ? "token_embed.proj.weight" : "token_embeds." + std::to_string(c) + ".proj.weight";
  }

  // Draws the weights of `ids` (one per row of weight_), in file order [D, p*p] so that values do
  // not depend on the layout, and stores them transposed.
  void init_weights(std::uint64_t seed, const std::vector<int>& ids) {
    const std::int64_t pp = std::int64_t(patch_) * patch_;
    View2<Scalar, Kokkos::HostSpace> drawn("dchag::tokenizer::drawn", dim_, pp);
    auto h_weight = Kokkos::create_mirror_view(weight_);
    for (std::size_t s = 0; s < ids.size(); ++s) {
      init_trunc_normal(drawn, 0.02, seed, weight_name(ids[s]));
      for (int d = 0; d < dim_; ++d)
        for (std::int64_t k = 0; k < pp; ++k) h_weight(s, k, d) = drawn(d, k);
    }
    Kokkos::deep_copy(weight_, h_weight);
  }

  TensorList<Scalar, memory_space> named(bool grads) const {
    const auto& w = grads ? d_weight_ : weight_;
    const auto& b = grads ? d_bias_ : bias_;
    const auto& e = grads ? d_embed_ : embed_;
    TensorList<Scalar, memory_space> list;
    const std::int64_t D = dim_, p = patch_;
    NamedTensor<Scalar, memory_space> embed{"var_embed", {1, channels_, D}, {}};
    for (std::size_t s = 0; s < owned_.size(); ++s) {
      const int c = owned_[s];
      if (!policy_.shared()) {
        auto ws = Kokkos::subview(w, s, Kokkos::ALL, Kokkos::ALL);
        auto bs = Kokkos::subview(b, s, Kokkos::ALL);
        list.push_back(detail::whole<Scalar, memory_space>(weight_name(c), {D, 1, p, p}, ws));
        list.back().transposed_rows = D;
        list.push_back(detail::whole<Scalar, memory_space>(
            "token_embeds." + std::to_string(c) + ".proj.bias", {D}, bs));
      }
      if (!policy_.coordinate()) {
        auto es = Kokkos::subview(e, s, Kokkos::ALL);
        embed.pieces.push_back({c * D, Unmanaged1<Scalar, memory_space>(es.data(), D)});
      }
    }
    if (!policy_.coordinate()) list.push_back(std::move(embed));
    auto more = replicated(grads);
    list.insert(list.end(), more.begin(), more.end());
    return list;
  }

  TensorList<Scalar, memory_space> replicated(bool grads) const {
    return detail::replicated_tensors<Scalar, memory_space>(
        policy_, patch_, dim_, (grads ? d_replicated_ : replicated_).data());
  }

  void check_forward(const View4<const Storage, memory_space>& images,
                     const ChannelSelection& sel) const {
    constexpr const char* where = "dchag::Tokenizer::forward";
    detail::check_tokenizer_input(where, images.extent(0), images.extent(1), images.extent(2),
                                  images.extent(3), patch_, sel, slot_of_, owned_.size(), policy_);
  }

  // prepare after validation: records the selection, sizes the workspace and extracts the
  // patches (patch_chunk 0) or holds the images for per-chunk extraction.
  void record(const ExecSpace& exec, const View4<const Storage, memory_space>& images,
              const ChannelSelection& sel, int patch_chunk) {
    const int B = static_cast<int>(images.extent(0));
    const int J = sel.size();
    const int H = static_cast<int>(images.extent(2));
    const int W = static_cast<int>(images.extent(3));
    const int L = (H / patch_) * (W / patch_);
    B_ = B;
    J_ = J;
    L_ = L;
    reserve(B, J, L, patch_chunk);

    // Host-side slot of every selected channel, and its device copy for the kernels.
    auto h_slot = Kokkos::create_mirror_view(slot_);
    auto h_img = Kokkos::create_mirror_view(image_index_);
    for (int j = 0; j < J; ++j) {
      const int c = sel.channel_id[j];
      h_slot(j) = c < 0 ? -1 : slot_of_[c];  // -1: a channel the model was not built with
      h_img(j) = sel.image_index[j];
    }
    Kokkos::deep_copy(exec, slot_, h_slot);
    Kokkos::deep_copy(exec, image_index_, h_img);
    if (policy_.coordinate()) {
      // The Fourier features of the selection's coordinates, in double on the host, then its
      // embedding rows.
      auto h_phi = Kokkos::create_mirror_view(phi_);
      detail::selection_features(policy_, sel, h_phi);
      Kokkos::deep_copy(exec, phi_, h_phi);
      detail::coordinate_embed(exec, phi_, proj_w_, proj_b_, sel_embed_);
    }
    if (patch_chunk == 0) {
      images_ = {};
      patches_first_ = 0;
      patches_count_ = J;
      detail::extract_patches(exec, images, image_index_, patches_, 0, J, patch_);
    } else {
      images_ = images;
      patches_first_ = patches_count_ = 0;  // none extracted yet
    }
  }

  // load_patches after its range checks; `where` names the public entry point.
  void extract_chunk(const char* where, const ExecSpace& exec, int j0, int j1) {
    if (images_.data() == nullptr || (patches_first_ == j0 && patches_count_ == j1 - j0)) return;
    DCHAG_EXPECT(std::size_t(j1 - j0) <= patches_.extent(0), where, "chunk [", j0, ", ", j1,
                 ") holds ", j1 - j0, " channels, expected at most the prepared patch chunk ",
                 patches_.extent(0));
    detail::extract_patches(exec, images_, image_index_, patches_, j0, j1, patch_);
    patches_first_ = j0;
    patches_count_ = j1 - j0;
  }

  static void check_tokens(const char* where, const View4<Scalar, memory_space>& tokens,
                           std::size_t B, std::size_t J, std::size_t L, std::size_t D) {
    DCHAG_EXPECT(tokens.extent(0) == B && tokens.extent(1) == J && tokens.extent(2) == L &&
                     tokens.extent(3) == D,
                 where, "tokens is [", tokens.extent(0), ", ", tokens.extent(1), ", ",
                 tokens.extent(2), ", ", tokens.extent(3), "], expected [B, J, L, D] = [", B, ", ",
                 J, ", ", L, ", ", D, "]");
  }

  int channels_, patch_, dim_;
  std::vector<int> owned_;
  TokenizerPolicy policy_;
  std::vector<int> slot_of_;  // global channel -> row of the weight views, or -1
  // Parameters shared over channels (TokenizerPolicy::replicated_elements), one block each.
  View1<Scalar, memory_space> replicated_, d_replicated_;
  View3<Scalar, memory_space> weight_, d_weight_;                // [n or 1 (shared), p*p, D]
  View2<Scalar, memory_space> bias_, d_bias_, embed_, d_embed_;  // embed: table only
  View2<Scalar, memory_space> proj_w_, d_proj_w_;                // coordinate: [D, F]
  View1<Scalar, memory_space> proj_b_, d_proj_b_;                // coordinate: [D]
  View2<Scalar, memory_space> phi_, sel_embed_, sums_;           // [J, F], [J, D], [J, D]
  View3<Scalar, memory_space> weight_scratch_;                   // shared, B > 1: [B, p*p, D]
  // Saved by forward for backward.
  int B_ = 0, J_ = 0, L_ = 0;
  View4<Scalar, memory_space> patches_;  // [held, B, L, p*p]: of channels [first, first+count)
  int patches_first_ = 0, patches_count_ = 0;
  View4<const Storage, memory_space> images_;  // per-chunk patches: the images prepare was given
  View1<int, memory_space> slot_, image_index_;
};

}  // namespace dchag
