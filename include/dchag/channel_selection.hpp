#pragma once
/// Which image channels a tokenizer reads and which model channels they are (dchag/tokenizer.hpp).
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
}  // namespace dchag
