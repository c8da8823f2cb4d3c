#pragma once
/// The tokenizer's weight and channel-embedding policies (DESIGN 3.11), chosen at construction
/// (`FrontEndConfig::tokenizer`). Per channel c, image patch x and channel embedding e_c:
///   token = Wt_c x + bt_c + e_c.
///
/// Weights (`TokenizerWeights`):
/// - per_channel (ClimaX, the paper; default): one Conv2d(1, D, p, stride p) per channel,
///   `token_embeds.{c}.proj.weight` [D, 1, p, p] and `.bias` [D];
/// - shared (ChannelViT): one Conv2d for every channel, `token_embed.proj.weight` [D, 1, p, p]
///   and `token_embed.proj.bias` [D]. A replicated parameter under D-CHAG.
///
/// Channel embedding (`ChannelEmbedding`):
/// - table (ClimaX `var_embed` [1, C, D]; default): row c, initialised with the 1-D sin-cos of c;
/// - coordinate: computed from the channel's physical coordinate x_c (a wavelength in nm, a
///   pressure level in hPa: `TokenizerPolicy::coordinates`, one per model channel) by Fourier
///   features through a learned linear map (nn.Linear(F, D)):
///     e_c = We phi(x_c) + be,  We [D, F] `channel_embed.proj.weight`, be [D]
///     `channel_embed.proj.bias` (trunc-normal 0.02 and zero, as ClimaX initialises a Linear).
///   phi is Aurora's FourierExpansion (`levels_expansion`), with n = F / 2 wavelengths on a
///   geometric ladder from lambda_min to lambda_max (torch.logspace):
///     lambda_k = 10^(a + k (b - a) / (n - 1)),  a = log10(lambda_min), b = log10(lambda_max)
///     (lambda_0 = lambda_min when n = 1),
///     phi_k(x) = sin(x * 2 pi / lambda_k),  phi_{n + k}(x) = cos(x * 2 pi / lambda_k),  k < n.
///   phi is computed in double on the host and rounded once to the model's Scalar. A replicated
///   parameter under D-CHAG.
///
/// A channel the model was never built with: with shared weights and the coordinate embedding
/// nothing in a token depends on the channel's id, so a model takes any channel by its
/// coordinate: `ChannelSelection::at_coordinates({...})` (dchag/tokenizer.hpp) in
/// FlatFrontEnd::forward (or Tokenizer::forward). Its tokens are exactly those a model built
/// with that channel (same weights) gives it.
#include <dchag/error.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <numbers>
#include <string_view>
#include <vector>

namespace dchag {

/// One tokenizer per channel (default) or one shared by every channel.
enum class TokenizerWeights { per_channel, shared };

/// The channel embedding: a learned table row per channel (default) or a learned map of the
/// Fourier features of the channel's coordinate.
enum class ChannelEmbedding { table, coordinate };

constexpr std::string_view to_string(TokenizerWeights w) {
  return w == TokenizerWeights::per_channel ? "per_channel" : "shared";
}
constexpr std::string_view to_string(ChannelEmbedding e) {
  return e == ChannelEmbedding::table ? "table" : "coordinate";
}

/// The Fourier features phi of a coordinate (the header comment gives the formula). The
/// defaults are Aurora's for pressure levels.
struct FourierFeatures {
  int count = 64;                 ///< F, even, >= 2
  double min_wavelength = 0.01;   ///< lambda_min, in the coordinate's unit, > 0
  double max_wavelength = 1.0e5;  ///< lambda_max >= lambda_min

  /// phi(x) into out[0, count).
  void evaluate(double x, double* out) const {
    const int n = count / 2;
    const double a = std::log10(min_wavelength), b = std::log10(max_wavelength);
    const double step = n > 1 ? (b - a) / (n - 1) : 0.0;
    for (int k = 0; k < n; ++k) {
      const double lambda = std::pow(10.0, a + k * step);
      const double arg = x * (2 * std::numbers::pi / lambda);
      out[k] = std::sin(arg);
      out[n + k] = std::cos(arg);
    }
  }
};

/// What a tokenizer is built with. Aggregate: fill it with designated or brace initialisers.
struct TokenizerPolicy {
  TokenizerWeights weights = TokenizerWeights::per_channel;
  ChannelEmbedding embedding = ChannelEmbedding::table;
  /// With ChannelEmbedding::coordinate: the coordinate of every model channel (index = global
  /// channel id), finite; empty otherwise.
  std::vector<double> coordinates = {};
  /// With ChannelEmbedding::coordinate: phi.
  FourierFeatures fourier = {};

  bool shared() const { return weights == TokenizerWeights::shared; }
  bool coordinate() const { return embedding == ChannelEmbedding::coordinate; }
  /// Whether a model takes channels it was not built with (by coordinate).
  bool takes_new_channels() const { return shared() && coordinate(); }

  /// Refuses an unknown policy, coordinates that are missing, of another count than
  /// `channels`, non-finite, or given to a table embedding, and bad Fourier features. `where`
  /// names the caller; `field` how the caller's user spells this struct ("config.tokenizer").
  void validate(const char* where, std::int64_t channels,
                const char* field = "config.tokenizer") const {
    DCHAG_EXPECT(weights == TokenizerWeights::per_channel || weights == TokenizerWeights::shared,
                 where, field, ".weights is ", static_cast<int>(weights),
                 ", expected per_channel or shared");
    DCHAG_EXPECT(embedding == ChannelEmbedding::table || embedding == ChannelEmbedding::coordinate,
                 where, field, ".embedding is ", static_cast<int>(embedding),
                 ", expected table or coordinate");
    if (!coordinate()) {
      DCHAG_EXPECT(coordinates.empty(), where, field, ".coordinates has ", coordinates.size(),
                   " values, expected none: ", field, ".embedding is table");
      return;
    }
    DCHAG_EXPECT(std::int64_t(coordinates.size()) == channels, where, field, ".coordinates has ",
                 coordinates.size(), " values, expected one per model channel, C = ", channels,
                 " (", field, ".embedding is coordinate)");
    for (std::size_t c = 0; c < coordinates.size(); ++c) {
      DCHAG_EXPECT(std::isfinite(coordinates[c]), where, field, ".coordinates[", c, "] is ",
                   coordinates[c], ", expected a finite value");
    }
    DCHAG_EXPECT(fourier.count >= 2 && fourier.count % 2 == 0, where, field, ".fourier.count is ",
                 fourier.count, ", expected an even number >= 2");
    DCHAG_EXPECT(std::isfinite(fourier.min_wavelength) && fourier.min_wavelength > 0, where, field,
                 ".fourier.min_wavelength is ", fourier.min_wavelength,
                 ", expected a finite value > 0");
    DCHAG_EXPECT(
        std::isfinite(fourier.max_wavelength) && fourier.max_wavelength >= fourier.min_wavelength,
        where, field, ".fourier.max_wavelength is ", fourier.max_wavelength,
        ", expected a finite value >= min_wavelength = ", fourier.min_wavelength);
  }

  /// Elements of the parameters every channel shares (the shared weight and bias, the
  /// coordinate map): what D-CHAG replicates on every rank.
  std::int64_t replicated_elements(int patch, int dim) const {
    std::int64_t n = 0;
    if (shared()) n += std::int64_t(patch) * patch * dim + dim;
    if (coordinate()) n += std::int64_t(dim) * fourier.count + dim;
    return n;
  }

  /// FNV-1a over the coordinates and the Fourier wavelengths, for cross-rank agreement.
  std::uint64_t fingerprint() const {
    std::uint64_t h = 0xcbf29ce484222325ull;
    const auto mix = [&h](double v) {
      unsigned char bytes[sizeof(double)];
      std::memcpy(bytes, &v, sizeof v);
      for (unsigned char b : bytes) h = (h ^ b) * 0x100000001b3ull;
    };
    for (double x : coordinates) mix(x);
    mix(fourier.min_wavelength);
    mix(fourier.max_wavelength);
    return h;
  }
};

}  // namespace dchag
