#pragma once
/// Which rank of a channel group holds which of the C global channels.
///
/// A ChannelMap is plain host data with no MPI in it, so the single-process emulation and the
/// distributed engine share it. Every rank holds at least one channel and every channel lives on
/// exactly one rank; uneven splits (C not divisible by P) are allowed.
///
///   auto map = dchag::ChannelMap::blocks(7, 3);  // rank 0: {0,1,2}, rank 1: {3,4}, rank 2: {5,6}
///   map.owner(4) == 1; map.local_index(4) == 1;
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "dchag/error.hpp"

namespace dchag {

class ChannelMap {
 public:
  /// Contiguous blocks in rank order. When P does not divide C, the first C % P ranks hold one
  /// channel more than the others (C = 7, P = 3 gives 3, 2, 2).
  static ChannelMap blocks(int channels, int ranks) {
    constexpr const char* where = "dchag::ChannelMap::blocks";
    check_counts(where, channels, ranks);
    std::vector<std::vector<int>> lists(static_cast<std::size_t>(ranks));
    const int base = channels / ranks;
    const int extra = channels % ranks;
    int next = 0;
    for (int r = 0; r < ranks; ++r) {
      const int count = base + (r < extra ? 1 : 0);
      for (int i = 0; i < count; ++i) lists[static_cast<std::size_t>(r)].push_back(next++);
    }
    return ChannelMap(channels, std::move(lists), kind_blocks);
  }

  /// Channel c on rank c % P; each rank's channels are ascending.
  static ChannelMap round_robin(int channels, int ranks) {
    constexpr const char* where = "dchag::ChannelMap::round_robin";
    check_counts(where, channels, ranks);
    std::vector<std::vector<int>> lists(static_cast<std::size_t>(ranks));
    for (int c = 0; c < channels; ++c) lists[static_cast<std::size_t>(c % ranks)].push_back(c);
    return ChannelMap(channels, std::move(lists), kind_round_robin);
  }

  /// Explicit lists: per_rank[r] are the global channel ids rank r holds, in the order that rank
  /// stores them. P = per_rank.size(). Every id in [0, channels) must appear exactly once.
  static ChannelMap from_lists(int channels, std::vector<std::vector<int>> per_rank) {
    constexpr const char* where = "dchag::ChannelMap::from_lists";
    DCHAG_EXPECT(channels >= 1, where, "channels is ", channels, ", expected >= 1");
    DCHAG_EXPECT(!per_rank.empty(), where, "per_rank is empty, expected one list per rank");
    const int ranks = static_cast<int>(per_rank.size());
    std::vector<int> seen_on(static_cast<std::size_t>(channels), -1);
    for (int r = 0; r < ranks; ++r) {
      const auto& list = per_rank[static_cast<std::size_t>(r)];
      DCHAG_EXPECT(!list.empty(), where, "per_rank[", r, "] is empty; every rank of ", ranks,
                   " must hold at least one channel");
      for (const int c : list) {
        DCHAG_EXPECT(c >= 0 && c < channels, where, "per_rank[", r, "] holds channel ", c,
                     ", expected 0 <= channel < ", channels);
        auto& first = seen_on[static_cast<std::size_t>(c)];
        DCHAG_EXPECT(first < 0, where, "channel ", c, " appears more than once (in per_rank[",
                     first, "] and per_rank[", r, "]), expected each channel exactly once");
        first = r;
      }
    }
    for (int c = 0; c < channels; ++c) {
      DCHAG_EXPECT(seen_on[static_cast<std::size_t>(c)] >= 0, where, "channel ", c,
                   " is on no rank, expected each of the ", channels, " channels exactly once");
    }
    return ChannelMap(channels, std::move(per_rank), kind_lists);
  }

  int channels() const noexcept { return channels_; }
  int ranks() const noexcept { return static_cast<int>(lists_.size()); }

  /// Global channel ids held by `rank`, in local storage order.
  const std::vector<int>& channels_of(int rank) const {
    DCHAG_EXPECT(rank >= 0 && rank < ranks(), "dchag::ChannelMap::channels_of", "rank is ", rank,
                 ", expected 0 <= rank < ", ranks());
    return lists_[static_cast<std::size_t>(rank)];
  }

  /// Every rank's channels, rank by rank (channels_of of each): the groups of a DchagEmulation.
  const std::vector<std::vector<int>>& groups() const noexcept { return lists_; }

  /// Rank that holds global channel `channel`.
  int owner(int channel) const {
    check_channel("dchag::ChannelMap::owner", channel);
    return owner_[static_cast<std::size_t>(channel)];
  }

  /// Position of global channel `channel` in channels_of(owner(channel)).
  int local_index(int channel) const {
    check_channel("dchag::ChannelMap::local_index", channel);
    return local_[static_cast<std::size_t>(channel)];
  }

  /// How the map was built: "blocks", "round_robin" or "lists". Informational only: two maps with
  /// the same lists compare equal whatever their kind.
  std::string_view kind() const noexcept { return kind_; }

  /// 64-bit FNV-1a hash of (C, P, every list in order). Ranks compare it to check that they use
  /// the same layout before any data moves.
  std::uint64_t fingerprint() const noexcept {
    std::uint64_t h = 0xcbf29ce484222325ull;
    const auto mix = [&h](std::int64_t v) {
      auto u = static_cast<std::uint64_t>(v);
      for (int byte = 0; byte < 8; ++byte) {
        h ^= (u >> (8 * byte)) & 0xffu;
        h *= 0x100000001b3ull;
      }
    };
    mix(channels_);
    mix(ranks());
    for (const auto& list : lists_) {
      mix(static_cast<std::int64_t>(list.size()));
      for (const int c : list) mix(c);
    }
    return h;
  }

  friend bool operator==(const ChannelMap& a, const ChannelMap& b) {
    return a.channels_ == b.channels_ && a.lists_ == b.lists_;
  }

 private:
  static constexpr std::string_view kind_blocks = "blocks";
  static constexpr std::string_view kind_round_robin = "round_robin";
  static constexpr std::string_view kind_lists = "lists";

  ChannelMap(int channels, std::vector<std::vector<int>> lists, std::string_view kind)
      : channels_(channels),
        lists_(std::move(lists)),
        owner_(static_cast<std::size_t>(channels)),
        local_(static_cast<std::size_t>(channels)),
        kind_(kind) {
    for (std::size_t r = 0; r < lists_.size(); ++r) {
      for (std::size_t i = 0; i < lists_[r].size(); ++i) {
        const auto c = static_cast<std::size_t>(lists_[r][i]);
        owner_[c] = static_cast<int>(r);
        local_[c] = static_cast<int>(i);
      }
    }
  }

  static void check_counts(const char* where, int channels, int ranks) {
    DCHAG_EXPECT(channels >= 1, where, "channels is ", channels, ", expected >= 1");
    DCHAG_EXPECT(ranks >= 1, where, "ranks is ", ranks, ", expected >= 1");
    // With C < P the ranks C..P-1 get nothing; name the first of them.
    DCHAG_EXPECT(channels >= ranks, where, "rank ", channels, " of ", ranks,
                 " would hold no channel (channels = ", channels, "); need channels >= ranks");
  }

  void check_channel(const char* where, int channel) const {
    DCHAG_EXPECT(channel >= 0 && channel < channels_, where, "channel is ", channel,
                 ", expected 0 <= channel < ", channels_);
  }

  int channels_;
  std::vector<std::vector<int>> lists_;
  std::vector<int> owner_;  // owner_[c]: rank holding global channel c
  std::vector<int> local_;  // local_[c]: index of c in lists_[owner_[c]]
  std::string_view kind_;
};

}  // namespace dchag
