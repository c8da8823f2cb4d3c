#pragma once
/// The configuration of a front end (FlatFrontEnd, DchagEmulation, DistributedFrontEnd) and the
/// checks every front end's forward applies to its images and tokens.
#include <dchag/attention_state.hpp>
#include <dchag/config.hpp>
#include <dchag/detail/sizes.hpp>
#include <dchag/error.hpp>
#include <dchag/tokenizer.hpp>
#include <dchag/tokenizer_policy.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <optional>
#include <vector>

namespace dchag {

/// The problem a front end is built for. Batch size is free per call.
struct FrontEndConfig {
  int channels = 0;  ///< C, channels of the model
  int height = 0;    ///< H
  int width = 0;     ///< W
  int patch = 0;     ///< p; H and W must be multiples of it
  int dim = 0;       ///< D
  int heads = 1;     ///< cross-attention heads; must divide D
  Strategy strategy = Strategy::pooled;
  /// Of the flat cross-attention, or of D-CHAG's final one.
  Convention convention = Convention::climax;
  std::uint64_t seed = 0;  ///< initialisation seed
  /// What a forward keeps for its backward (keep, recompute; inference: no backward). Not keep
  /// needs the pooled strategy.
  MemoryPolicy memory = MemoryPolicy::keep;
  /// Of D-CHAG's partial cross-attentions (D-CHAG-C); unset: `convention`.
  std::optional<Convention> partial_convention = std::nullopt;
  /// ClimaX's lead-time embedding after the positional one (lead_time_embedding.hpp): forward
  /// then takes the lead times of the samples.
  bool lead_time = false;
  /// The tokenizer's weight and channel-embedding policies (tokenizer_policy.hpp): per-channel
  /// weights and the var_embed table by default; shared weights (ChannelViT) and/or an embedding
  /// computed from each channel's coordinate (`tokenizer.coordinates`, one per channel).
  TokenizerPolicy tokenizer = {};
  /// N_q learned queries of the flat or final cross-attention (DESIGN 3.9; ClimaX's
  /// `aggregated_variables`): the output is [B, L, N_q * D], N_q tokens per patch (the bytes of
  /// [B, L, N_q, D]), each with its patch's positional embedding. D-CHAG's partial
  /// cross-attentions keep one query.
  int queries = 1;

  int grid_h() const { return height / patch; }
  int grid_w() const { return width / patch; }
  /// L = (H / p) * (W / p), in 64 bits: it can exceed INT_MAX, which validate() refuses.
  std::int64_t patches() const { return std::int64_t(grid_h()) * grid_w(); }
  AttentionConfig attention() const { return {dim, heads, convention, strategy, queries}; }
  /// The partial cross-attentions' configuration: attention() in partial_convention.
  AttentionConfig partial_attention() const {
    return {dim, heads, partial_convention.value_or(convention), strategy, 1};
  }

  /// Refuses a configuration that is inconsistent or whose sizes for one image of every channel
  /// the kernels cannot index (detail/sizes.hpp: int league sizes, 2^53 elements per tensor).
  void validate(const char* where) const {
    DCHAG_EXPECT(channels >= 1, where, "config.channels is ", channels, ", expected >= 1");
    DCHAG_EXPECT(patch >= 1, where, "config.patch is ", patch, ", expected >= 1");
    DCHAG_EXPECT(height >= patch && height % patch == 0, where, "config.height is ", height,
                 ", expected a positive multiple of patch = ", patch);
    DCHAG_EXPECT(width >= patch && width % patch == 0, where, "config.width is ", width,
                 ", expected a positive multiple of patch = ", patch);
    DCHAG_EXPECT(dim >= 1, where, "config.dim is ", dim, ", expected >= 1");
    DCHAG_EXPECT(queries >= 1, where, "config.queries is ", queries, ", expected >= 1");
    DCHAG_EXPECT(heads >= 1 && dim % heads == 0, where, "config.heads is ", heads,
                 ", expected a divisor of dim = ", dim);
    DCHAG_EXPECT(memory == MemoryPolicy::keep || strategy == Strategy::pooled, where,
                 "config.memory is ", to_string(memory),
                 ", which needs the pooled strategy; config.strategy is ", to_string(strategy));
    check_sizes(where, 0, channels);
    tokenizer.validate(where, channels);
    if (tokenizer.coordinate())
      detail::expect_elements(where, "coordinate map D * F",
                              {std::int64_t(dim), std::int64_t(tokenizer.fourier.count)});
  }

  /// Refuses a call on `batch` images with `channels` channels tokenized by one module (after
  /// validate()) whose sizes the kernels cannot index. Forwards and estimates call it.
  void validate_batch(const char* where, std::int64_t batch, std::int64_t channels_used) const {
    DCHAG_EXPECT(batch >= 1, where, "B is ", batch, ", expected >= 1");
    DCHAG_EXPECT(channels_used >= 1, where, "channels is ", channels_used, ", expected >= 1");
    check_sizes(where, batch, channels_used);
  }

 private:
  // B = 0: the configuration alone, one image of all J = C channels.
  void check_sizes(const char* where, std::int64_t B, std::int64_t J) const {
    using detail::expect_elements;
    using detail::expect_int_size;
    const std::int64_t p = patch, D = dim, H = height, W = width,
                       nh = std::int64_t(heads) * queries;  // score columns
    const std::int64_t L =
        expect_int_size(where, "patches L = (H / p) * (W / p)", {grid_h(), grid_w()});
    expect_int_size(where, "patch pixels p * p", {p, p});
    expect_elements(where, "tokenizer weights C * p * p * D", {channels, p, p, D});
    expect_elements(where, "positional embedding L * D", {L, D});
    expect_elements(where, "attention weights 4 * D * D", {4, D, D});
    if (B == 0) {
      expect_int_size(where, "token rows C * L (B = 1)", {J, L});
      expect_int_size(where, "image rows C * H (B = 1)", {J, H});
      expect_elements(where, "tokens C * L * D (B = 1)", {J, L, D});
      expect_elements(where, "pixels C * H * W (B = 1)", {J, H, W});
      expect_elements(where, "pooled attention state queries * heads * L * D (B = 1)", {nh, L, D});
    } else {
      expect_int_size(where, "token rows B * J * L", {B, J, L});
      expect_int_size(where, "image rows B * J * H", {B, J, H});
      expect_elements(where, "tokens B * J * L * D", {B, J, L, D});
      expect_elements(where, "pixels B * J * H * W", {B, J, H, W});
      expect_elements(where, "pooled attention state queries * heads * B * L * D", {nh, B, L, D});
    }
  }
};

namespace detail {

/// What every front end's forward requires of images [B, Cimg, H, W]: B >= 1, Cimg = `channels`
/// (`channels_are` says what that count is, e.g. "C = "; -1: any), the config's H and W, and
/// sizes the kernels can index with `tokenized` channels folded by one module.
template <class V>
void check_images(const char* where, const FrontEndConfig& cfg, const V& images,
                  std::int64_t channels, const char* channels_are, std::int64_t tokenized) {
  DCHAG_EXPECT(images.extent(0) >= 1, where, "images.extent(0) is ", images.extent(0),
               ", expected B >= 1");
  DCHAG_EXPECT(channels < 0 || images.extent(1) == std::size_t(channels), where,
               "images.extent(1) is ", images.extent(1), ", expected ", channels_are, channels);
  DCHAG_EXPECT(images.extent(2) == std::size_t(cfg.height), where, "images.extent(2) is ",
               images.extent(2), ", expected H = ", cfg.height);
  DCHAG_EXPECT(images.extent(3) == std::size_t(cfg.width), where, "images.extent(3) is ",
               images.extent(3), ", expected W = ", cfg.width);
  cfg.validate_batch(where, std::int64_t(images.extent(0)), tokenized);
}

/// The same for images read through `sel`: own() images hold exactly its channels,
/// from_full_image() ones every model channel; a hand-built selection any count (the tokenizer
/// checks its indices).
template <class V>
void check_images(const char* where, const FrontEndConfig& cfg, const V& images,
                  const ChannelSelection& sel) {
  DCHAG_EXPECT(sel.size() >= 1, where, "selection is empty, expected at least one channel");
  const auto holds = sel.holds;
  check_images(where, cfg, images,
               holds == ChannelSelection::Holds::selected ? sel.size()
               : holds == ChannelSelection::Holds::all    ? cfg.channels
                                                          : -1,
               holds == ChannelSelection::Holds::selected ? "J = " : "C = ", sel.size());
}

/// A front end's tokens [B, L, D]: forward's `out`, backward's `d_out` (`name`).
template <class V>
void check_tokens(const char* where, const FrontEndConfig& cfg, const char* name, const V& out,
                  std::size_t B) {
  const std::int64_t width = std::int64_t(cfg.queries) * cfg.dim;
  DCHAG_EXPECT(out.extent(0) == B && out.extent(1) == std::size_t(cfg.patches()) &&
                   out.extent(2) == std::size_t(width),
               where, name, " is [", out.extent(0), ", ", out.extent(1), ", ", out.extent(2),
               "], expected ", cfg.queries == 1 ? "[B, L, D]" : "[B, L, queries * D]", " = [", B,
               ", ", cfg.patches(), ", ", width, "]");
}

template <class T>
void append(std::vector<T>& to, std::vector<T> from) {
  to.insert(to.end(), std::make_move_iterator(from.begin()), std::make_move_iterator(from.end()));
}

inline std::vector<int> iota_ids(int n) {
  std::vector<int> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

/// dst(b, slot, l, d) = src(b, 0, l, d) (to = true) or the reverse (to = false).
template <class ExecSpace, class A, class Bv>
void copy_slot(const ExecSpace& exec, const A& src, const Bv& dst, int slot, bool to_slot) {
  const int L = src.extent(2), D = src.extent(3);
  for_each_row(
      exec, "dchag::copy_slot", std::int64_t(src.extent(0)) * L, D,
      KOKKOS_LAMBDA(const std::int64_t r, const int d) {
        const int b = static_cast<int>(r / L), l = static_cast<int>(r % L);
        if (to_slot) {
          dst(b, slot, l, d) = src(b, 0, l, d);
        } else {
          src(b, 0, l, d) = dst(b, slot, l, d);
        }
      });
}

}  // namespace detail
}  // namespace dchag
