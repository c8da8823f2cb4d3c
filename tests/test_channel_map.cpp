#include <catch2/catch.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "dchag/aggregate.hpp"
#include "dchag/channel_map.hpp"

using dchag::ChannelMap;
using Lists = std::vector<std::vector<int>>;

namespace {
// Owner and local index must be the inverse of the per-rank lists.
void require_consistent(const ChannelMap& map) {
  std::vector<int> hits(static_cast<std::size_t>(map.channels()), 0);
  for (int r = 0; r < map.ranks(); ++r) {
    const auto& list = map.channels_of(r);
    REQUIRE_FALSE(list.empty());
    CHECK(map.groups().at(std::size_t(r)) == list);  // groups() lists the same, rank by rank
    for (std::size_t i = 0; i < list.size(); ++i) {
      CHECK(map.owner(list[i]) == r);
      CHECK(map.local_index(list[i]) == static_cast<int>(i));
      ++hits[static_cast<std::size_t>(list[i])];
    }
  }
  for (const int h : hits) CHECK(h == 1);
}

Lists lists_of(const ChannelMap& map) {
  Lists out;
  for (int r = 0; r < map.ranks(); ++r) out.push_back(map.channels_of(r));
  return out;
}
}  // namespace

TEST_CASE("ChannelMap::blocks splits evenly", "[channel_map]") {
  const auto map = ChannelMap::blocks(8, 4);
  CHECK(map.channels() == 8);
  CHECK(map.ranks() == 4);
  CHECK(map.kind() == "blocks");
  CHECK(lists_of(map) == Lists{{0, 1}, {2, 3}, {4, 5}, {6, 7}});
  CHECK(map.owner(5) == 2);
  CHECK(map.local_index(5) == 1);
  require_consistent(map);
}

TEST_CASE("ChannelMap::blocks gives the first C % P ranks one extra channel", "[channel_map]") {
  const auto map = ChannelMap::blocks(7, 3);
  CHECK(lists_of(map) == Lists{{0, 1, 2}, {3, 4}, {5, 6}});
  CHECK(map.owner(2) == 0);
  CHECK(map.owner(3) == 1);
  CHECK(map.local_index(6) == 1);
  require_consistent(map);

  CHECK(lists_of(ChannelMap::blocks(10, 4)) == Lists{{0, 1, 2}, {3, 4, 5}, {6, 7}, {8, 9}});
  CHECK(lists_of(ChannelMap::blocks(4, 4)) == Lists{{0}, {1}, {2}, {3}});
  CHECK(lists_of(ChannelMap::blocks(5, 1)) == Lists{{0, 1, 2, 3, 4}});
}

TEST_CASE("ChannelMap::round_robin deals channels like cards", "[channel_map]") {
  const auto map = ChannelMap::round_robin(7, 3);
  CHECK(map.kind() == "round_robin");
  CHECK(lists_of(map) == Lists{{0, 3, 6}, {1, 4}, {2, 5}});
  CHECK(map.owner(4) == 1);
  CHECK(map.local_index(6) == 2);
  require_consistent(map);
}

TEST_CASE("ChannelMap::from_lists keeps the given order", "[channel_map]") {
  const auto map = ChannelMap::from_lists(6, {{5, 0}, {3}, {1, 4, 2}});
  CHECK(map.kind() == "lists");
  CHECK(map.ranks() == 3);
  CHECK(map.channels_of(0) == std::vector<int>{5, 0});
  CHECK(map.owner(2) == 2);
  CHECK(map.local_index(2) == 2);
  CHECK(map.local_index(0) == 1);
  require_consistent(map);
}

TEST_CASE("ChannelMap equality and fingerprint follow the lists, not the kind", "[channel_map]") {
  const auto blocks = ChannelMap::blocks(7, 3);
  const auto same = ChannelMap::from_lists(7, {{0, 1, 2}, {3, 4}, {5, 6}});
  CHECK(blocks == same);
  CHECK(blocks.fingerprint() == same.fingerprint());

  const std::vector<ChannelMap> different = {
      ChannelMap::round_robin(7, 3),
      ChannelMap::blocks(7, 2),
      ChannelMap::blocks(8, 3),
      ChannelMap::from_lists(7, {{0, 2, 1}, {3, 4}, {5, 6}}),  // same sets, other local order
      ChannelMap::from_lists(7, {{0, 1}, {2, 3, 4}, {5, 6}}),  // same order, other split
  };
  for (const auto& other : different) {
    CHECK_FALSE(blocks == other);
    CHECK(blocks != other);
    CHECK(blocks.fingerprint() != other.fingerprint());
  }
}

TEST_CASE("ChannelMap rejects bad counts with a message naming the argument", "[channel_map]") {
  CHECK_THROWS_WITH(ChannelMap::blocks(0, 2),
                    "dchag::ChannelMap::blocks: channels is 0, expected >= 1");
  CHECK_THROWS_WITH(ChannelMap::blocks(4, 0),
                    "dchag::ChannelMap::blocks: ranks is 0, expected >= 1");
  CHECK_THROWS_WITH(ChannelMap::blocks(3, 4),
                    "dchag::ChannelMap::blocks: rank 3 of 4 would hold no channel (channels = 3); "
                    "need channels >= ranks");
  CHECK_THROWS_WITH(ChannelMap::round_robin(-1, 2),
                    "dchag::ChannelMap::round_robin: channels is -1, expected >= 1");
  CHECK_THROWS_WITH(ChannelMap::round_robin(2, -3),
                    "dchag::ChannelMap::round_robin: ranks is -3, expected >= 1");
  CHECK_THROWS_WITH(ChannelMap::round_robin(2, 5),
                    "dchag::ChannelMap::round_robin: rank 2 of 5 would hold no channel (channels = "
                    "2); need channels >= ranks");
  CHECK_THROWS_AS(ChannelMap::blocks(3, 4), std::invalid_argument);
}

TEST_CASE("ChannelMap::from_lists rejects malformed lists", "[channel_map]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(ChannelMap::from_lists(0, {{0}}),
                    "dchag::ChannelMap::from_lists: channels is 0, expected >= 1");
  CHECK_THROWS_WITH(ChannelMap::from_lists(2, {}),
                    "dchag::ChannelMap::from_lists: per_rank is empty, expected one list per rank");
  CHECK_THROWS_WITH(
      ChannelMap::from_lists(2, {{0, 1}, {}}),
      "dchag::ChannelMap::from_lists: per_rank[1] is empty; every rank of 2 must hold "
      "at least one channel");
  CHECK_THROWS_WITH(ChannelMap::from_lists(3, {{0, 1}, {3}}),
                    "dchag::ChannelMap::from_lists: per_rank[1] holds channel 3, expected 0 <= "
                    "channel < 3");
  CHECK_THROWS_WITH(ChannelMap::from_lists(3, {{0, -1}, {2}}), Contains("holds channel -1"));
  CHECK_THROWS_WITH(ChannelMap::from_lists(3, {{0, 1}, {1, 2}}),
                    "dchag::ChannelMap::from_lists: channel 1 appears more than once (in "
                    "per_rank[0] and per_rank[1]), expected each channel exactly once");
  CHECK_THROWS_WITH(ChannelMap::from_lists(3, {{0, 0, 1, 2}}), Contains("channel 0 appears more"));
  CHECK_THROWS_WITH(ChannelMap::from_lists(4, {{0, 1}, {3}}),
                    "dchag::ChannelMap::from_lists: channel 2 is on no rank, expected each of the "
                    "4 channels exactly once");
  CHECK_THROWS_AS(ChannelMap::from_lists(4, {{0, 1}, {3}}), std::invalid_argument);
}

TEST_CASE("ChannelMap lookups reject out-of-range channels and ranks", "[channel_map]") {
  const auto map = ChannelMap::blocks(7, 3);
  CHECK_THROWS_WITH(map.owner(7),
                    "dchag::ChannelMap::owner: channel is 7, expected 0 <= channel < 7");
  CHECK_THROWS_WITH(map.owner(-1),
                    "dchag::ChannelMap::owner: channel is -1, expected 0 <= channel < 7");
  CHECK_THROWS_WITH(map.local_index(9),
                    "dchag::ChannelMap::local_index: channel is 9, expected 0 <= channel < 7");
  CHECK_THROWS_WITH(map.channels_of(3),
                    "dchag::ChannelMap::channels_of: rank is 3, expected 0 <= rank < 3");
  CHECK_THROWS_AS(map.channels_of(-1), std::invalid_argument);
}

TEST_CASE("DchagEmulation takes its groups from a ChannelMap", "[channel_map][front_end]") {
  using Exec = Kokkos::DefaultExecutionSpace;
  using Mem = Exec::memory_space;
  Exec exec;
  dchag::FrontEndConfig cfg{7, 4, 4, 2, 8, 2, dchag::Strategy::pooled, dchag::Convention::artifact,
                            31};
  const auto map = ChannelMap::round_robin(7, 3);
  REQUIRE(map.ranks() == 3);
  const dchag::DchagOptions options{dchag::PartialKind::cross_attention, 1};
  dchag::DchagEmulation<Exec, double> from_map(exec, cfg, options, map);
  dchag::DchagEmulation<Exec, double> from_groups(exec, cfg, options, map.groups());
  CHECK(from_map.groups() == 3);
  dchag::View4<double, Mem> images("images", 2, 7, 4, 4);
  Kokkos::deep_copy(images, 0.25);
  dchag::View3<double, Mem> a("a", 2, cfg.patches(), cfg.dim), b("b", 2, cfg.patches(), cfg.dim);
  from_map.forward(exec, images, a);
  from_groups.forward(exec, images, b);
  auto ha = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), a);
  auto hb = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), b);
  for (std::size_t i = 0; i < ha.span(); ++i) REQUIRE(ha.data()[i] == hb.data()[i]);
  // Same names: partial.{r} for the map's rank r.
  const auto names = from_map.parameters();
  bool has_rank2 = false;
  for (const auto& t : names) has_rank2 = has_rank2 || t.name.rfind("partial.2.", 0) == 0;
  CHECK(has_rank2);
  REQUIRE_THROWS_WITH(
      (dchag::DchagEmulation<Exec, double>(exec, cfg, options, ChannelMap::blocks(6, 3))),
      Catch::Contains("dchag::DchagEmulation") && Catch::Contains("map.channels() is 6") &&
          Catch::Contains("expected config.channels = 7"));
}
