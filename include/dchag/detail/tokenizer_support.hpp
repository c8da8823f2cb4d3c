#pragma once
/// The tokenizer's host-side helpers (dchag/tokenizer.hpp): the checks of its input and
/// selection, the names of the parameters every channel shares, the Fourier features of a
/// selection.
#include <dchag/channel_selection.hpp>
#include <dchag/detail/sizes.hpp>
#include <dchag/error.hpp>
#include <dchag/tensor.hpp>
#include <dchag/tokenizer_policy.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace dchag::detail {

/// The selection's channel ids and image indices against a tokenizer of slot_of.size() model
/// channels holding `owned` of them (slot_of[c] >= 0) under `policy`, and its coordinates.
inline void check_selection(const char* where, const ChannelSelection& sel,
                            std::size_t image_channels, const std::vector<int>& slot_of,
                            std::size_t owned, const TokenizerPolicy& policy) {
  const int C = static_cast<int>(slot_of.size()), J = sel.size();
  const bool given = !sel.coordinates.empty();
  DCHAG_EXPECT(!given || policy.coordinate(), where, "selection has ", sel.coordinates.size(),
               " coordinates, expected none: the tokenizer's channel embedding is table");
  DCHAG_EXPECT(!given || sel.coordinates.size() == std::size_t(J), where, "selection has ",
               sel.coordinates.size(), " coordinates, expected one per selected channel, J = ", J);
  std::vector<char> seen(C, 0);
  for (int j = 0; j < J; ++j) {
    const int c = sel.channel_id[j], i = sel.image_index[j];
    if (given) {
      DCHAG_EXPECT(std::isfinite(sel.coordinates[j]), where, "selection coordinates[", j, "] is ",
                   sel.coordinates[j], ", expected a finite value");
    }
    if (c == -1) {
      DCHAG_EXPECT(policy.takes_new_channels(), where, "channel id -1 at position ", j,
                   " (a channel the model was not built with) needs shared weights and the "
                   "coordinate embedding; the tokenizer's policy is ",
                   to_string(policy.weights), " weights, ", to_string(policy.embedding),
                   " embedding");
      DCHAG_EXPECT(given, where, "channel id -1 at position ", j,
                   " has no coordinate, expected selection coordinates (one per channel)");
    } else {
      DCHAG_EXPECT(c >= 0 && c < C, where, "channel id ", c, " at position ", j,
                   " is out of range, expected 0 <= id < C = ", C,
                   policy.takes_new_channels() ? " (or -1 for a new channel)" : "");
      DCHAG_EXPECT(slot_of[c] >= 0, where, "channel id ", c, " at position ", j,
                   " is not held by this tokenizer, expected one of its ", owned,
                   " owned channels");
      DCHAG_EXPECT(!seen[c], where, "channel id ", c, " is selected twice, expected unique ids");
      seen[c] = 1;
      DCHAG_EXPECT(!given || sel.coordinates[j] == policy.coordinates[c], where,
                   "selection coordinates[", j, "] is ", sel.coordinates[j],
                   ", expected the coordinate of model channel ", c, ", ", policy.coordinates[c],
                   " (or channel id -1 for a channel the model was not built with)");
    }
    DCHAG_EXPECT(i >= 0 && std::size_t(i) < image_channels, where, "image index ", i,
                 " at position ", j,
                 " is out of range, expected < images.extent(1) = ", image_channels);
  }
}

/// What Tokenizer::forward requires of images [B0, Cimg, H, W] read through `sel` (patch `p`,
/// C = slot_of.size() model channels).
inline void check_tokenizer_input(const char* where, std::size_t B0, std::size_t Cimg,
                                  std::size_t H, std::size_t W, std::size_t p,
                                  const ChannelSelection& sel, const std::vector<int>& slot_of,
                                  std::size_t owned, const TokenizerPolicy& policy) {
  const int C = static_cast<int>(slot_of.size());
  DCHAG_EXPECT(B0 >= 1, where, "images.extent(0) is ", B0, ", expected B >= 1");
  DCHAG_EXPECT(H % p == 0 && H > 0, where, "images.extent(2) is H = ", H,
               ", expected a positive multiple of patch = ", p);
  DCHAG_EXPECT(W % p == 0 && W > 0, where, "images.extent(3) is W = ", W,
               ", expected a positive multiple of patch = ", p);
  DCHAG_EXPECT(sel.image_index.size() == sel.channel_id.size(), where, "selection has ",
               sel.image_index.size(), " image indices and ", sel.channel_id.size(),
               " channel ids, expected the same count");
  DCHAG_EXPECT(sel.size() >= 1, where, "selection is empty, expected at least one channel");
  DCHAG_EXPECT(sel.holds != ChannelSelection::Holds::selected || Cimg == std::size_t(sel.size()),
               where, "images.extent(1) is ", Cimg, ", expected J = ", sel.size(),
               " (the images hold the selected channels)");
  DCHAG_EXPECT(sel.holds != ChannelSelection::Holds::all || Cimg == std::size_t(C), where,
               "images.extent(1) is ", Cimg, ", expected C = ", C,
               " (the images hold every model channel)");
  const std::int64_t B = B0, J = sel.size();
  detail::expect_int_size(where, "image width W", {std::int64_t(W)});
  detail::expect_int_size(where, "image rows B * J * H", {B, J, std::int64_t(H)});
  detail::expect_int_size(where, "token rows B * J * L", {B, J, std::int64_t((H / p) * (W / p))});
  detail::expect_elements(where, "pixels B * J * H * W", {B, J, std::int64_t(H), std::int64_t(W)});
  check_selection(where, sel, Cimg, slot_of, owned, policy);
}

/// The parameters every channel shares, in the order of `block` (TokenizerPolicy::
/// replicated_elements): token_embed.proj.weight [D, 1, p, p] (held transposed, [p*p, D]) and
/// .bias [D] when shared, channel_embed.proj.weight [D, F] and .bias [D] with coordinates.
template <class Scalar, class MemSpace>
TensorList<Scalar, MemSpace> replicated_tensors(const TokenizerPolicy& policy, int patch, int dim,
                                                Scalar* at) {
  TensorList<Scalar, MemSpace> list;
  const std::int64_t D = dim, p = patch;
  if (policy.shared()) {
    list.push_back(whole<Scalar, MemSpace>("token_embed.proj.weight", {D, 1, p, p},
                                           Unmanaged1<Scalar, MemSpace>(at, D * p * p)));
    list.back().transposed_rows = D;
    list.push_back(whole<Scalar, MemSpace>("token_embed.proj.bias", {D},
                                           Unmanaged1<Scalar, MemSpace>(at + D * p * p, D)));
    at += D * p * p + D;
  }
  if (policy.coordinate()) {
    const std::int64_t F = policy.fourier.count;
    list.push_back(whole<Scalar, MemSpace>("channel_embed.proj.weight", {D, F},
                                           Unmanaged1<Scalar, MemSpace>(at, D * F)));
    list.push_back(whole<Scalar, MemSpace>("channel_embed.proj.bias", {D},
                                           Unmanaged1<Scalar, MemSpace>(at + D * F, D)));
  }
  return list;
}

/// phi(j, :) = the Fourier features of selected channel j's coordinate (the selection's, else
/// the model's of its id), computed in double and rounded once; phi is a host view [J, F].
template <class HostView>
void selection_features(const TokenizerPolicy& policy, const ChannelSelection& sel,
                        const HostView& phi) {
  using Scalar = typename HostView::value_type;
  const int F = policy.fourier.count;
  std::vector<double> row(F);
  for (int j = 0; j < sel.size(); ++j) {
    const int c = sel.channel_id[j];
    policy.fourier.evaluate(sel.coordinates.empty() ? policy.coordinates[c] : sel.coordinates[j],
                            row.data());
    for (int f = 0; f < F; ++f) phi(j, f) = static_cast<Scalar>(row[f]);
  }
}

}  // namespace dchag::detail
