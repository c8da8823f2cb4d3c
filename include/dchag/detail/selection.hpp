#pragma once
/// Per-call channel selections of the D-CHAG front ends (DchagEmulation, DistributedFrontEnd).
/// Images hold a subset or permutation of the model's channels; a module folds its own channels
/// (a rank's, placed by the map), and the channels the images lack are missing in every sample
/// (DESIGN 3.10): the same model, the same result as a mask that removes them. The module still
/// tokenizes a lacking channel (from any image channel, so the pixels are finite) and drops it.
#include <dchag/detail/masks.hpp>
#include <dchag/error.hpp>
#include <dchag/tokenizer.hpp>

#include <cstdint>
#include <vector>

namespace dchag::detail {

/// Refuses a selection the images and the model cannot serve: ids in [0, C), each once, image
/// indices inside the images' `image_channels`.
inline void check_selection(const char* where, const ChannelSelection& sel, int C,
                            std::size_t image_channels) {
  DCHAG_EXPECT(sel.size() >= 1, where, "selection is empty, expected at least one channel");
  DCHAG_EXPECT(sel.image_index.size() == sel.channel_id.size(), where, "selection has ",
               sel.image_index.size(), " image indices for ", sel.channel_id.size(),
               " channel ids, expected one each");
  std::vector<char> seen(std::size_t(C), 0);
  for (int j = 0; j < sel.size(); ++j) {
    const int c = sel.channel_id[j], i = sel.image_index[j];
    DCHAG_EXPECT(c >= 0 && c < C, where, "selection channel ", j, " is ", c,
                 ", expected 0 <= channel < C = ", C);
    DCHAG_EXPECT(!seen[c]++, where, "channel ", c, " is selected twice, expected once");
    DCHAG_EXPECT(i >= 0 && std::size_t(i) < image_channels, where, "selection image index ", j,
                 " is ", i, ", expected 0 <= index < images.extent(1) = ", image_channels);
  }
}

/// The caller's mask [B, C] (empty: all valid) with every channel `sel` lacks missing; empty when
/// nothing is missing.
inline HostMask restrict_mask(const HostMask& mask, const ChannelSelection& sel, std::size_t B,
                              int C) {
  if (mask.data() == nullptr && sel.size() == C) return {};
  std::vector<char> present(std::size_t(C), 0);
  for (int c : sel.channel_id) present[std::size_t(c)] = 1;
  HostMask out("dchag::mask::restricted", B, std::size_t(C));
  for (std::size_t b = 0; b < B; ++b)
    for (int c = 0; c < C; ++c)
      out(b, c) = present[c] && (mask.data() == nullptr || mask(b, c)) ? 1 : 0;
  return out;
}

/// How a module holding `channels` reads them from the images `sel` describes: a selected channel
/// from its image, a lacking one from the first image channel (masked out by restrict_mask).
inline ChannelSelection module_selection(const ChannelSelection& sel,
                                         const std::vector<int>& channels, int C) {
  std::vector<int> image_of(std::size_t(C), -1);
  for (int j = 0; j < sel.size(); ++j)
    image_of[std::size_t(sel.channel_id[j])] = sel.image_index[j];
  ChannelSelection out;
  for (int c : channels) {
    out.channel_id.push_back(c);
    out.image_index.push_back(image_of[std::size_t(c)] >= 0 ? image_of[std::size_t(c)]
                                                            : sel.image_index.front());
  }
  out.holds = ChannelSelection::Holds::any;
  return out;
}

}  // namespace dchag::detail
