#pragma once
/// Which image channels a tokenizer reads and which model channels they are (dchag/tokenizer.hpp),
/// and the checks of a selection against a tokenizer.
#include <dchag/error.hpp>
#include <dchag/tokenizer_policy.hpp>

#include <cmath>
#include <cstddef>
#include <utility>
#include <vector>

namespace dchag {

/// Which image channels become which model channels. Token j reads channel image_index[j] of the
/// images and is tokenized with the weights of global channel channel_id[j]. With the coordinate
/// channel embedding, `coordinates` may give the coordinate of every selected channel (empty:
/// the model's coordinates of the ids); an id of -1 is then a channel the model was not built
/// with, which needs shared weights too (TokenizerPolicy::takes_new_channels). A model channel's
/// given coordinate must be the model's.
struct ChannelSelection {
  /// What the images hold: exactly the selected channels (own), every model channel
  /// (from_full_image), or, for a selection built by hand, any channels its indices fit.
  enum class Holds { any, selected, all };

  std::vector<int> image_index;
  std::vector<int> channel_id;
  Holds holds = Holds::any;
  std::vector<double> coordinates = {};

  /// The images hold exactly these channels, in this order.
  static ChannelSelection own(std::vector<int> ids) {
    std::vector<int> idx(ids.size());
    for (std::size_t j = 0; j < idx.size(); ++j) idx[j] = static_cast<int>(j);
    return {std::move(idx), std::move(ids), Holds::selected};
  }
  /// The images hold every model channel; read these ones.
  static ChannelSelection from_full_image(std::vector<int> ids) { return {ids, ids, Holds::all}; }
  /// The images hold channels at these coordinates, in this order, whether or not the model was
  /// built with them (ids -1): shared weights and the coordinate embedding only.
  static ChannelSelection at_coordinates(std::vector<double> coordinates) {
    std::vector<int> idx(coordinates.size());
    for (std::size_t j = 0; j < idx.size(); ++j) idx[j] = static_cast<int>(j);
    return {std::move(idx), std::vector<int>(coordinates.size(), -1), Holds::selected,
            std::move(coordinates)};
  }
  int size() const { return static_cast<int>(channel_id.size()); }
};

namespace detail {

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

}  // namespace detail
}  // namespace dchag
