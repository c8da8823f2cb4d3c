#pragma once
/// What the distributed front end (dchag/distributed.hpp) builds on: the group reduction over a
/// Communicator, head shares, checksums of replicated tensors, the per-rank validation its
/// constructor and estimate_memory share, and the bytes MPI staging needs.
#include <dchag/channel_map.hpp>
#include <dchag/communicator.hpp>
#include <dchag/config.hpp>
#include <dchag/detail/loops.hpp>
#include <dchag/front_end_config.hpp>
#include <dchag/tensor.hpp>

#include <Kokkos_Core.hpp>
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace dchag {

namespace detail {

/// GroupReduce over a Communicator, on the execution space that produced the data.
template <class ExecSpace, class Scalar>
class CommunicatorReduce final : public GroupReduce<Scalar, typename ExecSpace::memory_space> {
 public:
  using V = Unmanaged1<Scalar, typename ExecSpace::memory_space>;
  CommunicatorReduce(const ExecSpace& exec, const Communicator& comm) : exec_(exec), comm_(comm) {}
  void max(const V& values) const override { allreduce_max(exec_, comm_, values); }
  void sum(const V& values) const override { allreduce_sum(exec_, comm_, values); }

 private:
  ExecSpace exec_;
  Communicator comm_;
};

/// Heads [begin, end) of `rank` when `heads` are split over `ranks` in contiguous blocks (the
/// first heads % ranks ranks get one more).
inline std::pair<int, int> head_share(int heads, int ranks, int rank) {
  const int base = heads / ranks, extra = heads % ranks;
  const int begin = rank * base + (rank < extra ? rank : extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

/// FNV-1a over the bytes of a contiguous View, continuing from `h` (a host copy is made when the
/// View lives where the host cannot read it).
template <class V>
std::uint64_t checksum_view(const V& v, std::uint64_t h = 0xcbf29ce484222325ull) {
  using T = typename V::non_const_value_type;
  Kokkos::View<const T*, typename V::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>> flat(
      v.data(), v.span());
  auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), flat);
  const auto* bytes = reinterpret_cast<const unsigned char*>(host.data());
  for (std::size_t i = 0; i < host.span() * sizeof(T); ++i) h = (h ^ bytes[i]) * 0x100000001b3ull;
  return h;
}

/// The same over a list of ids (a channel selection).
inline std::uint64_t checksum_ids(const std::vector<int>& ids) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (int id : ids)
    h = (h ^ static_cast<std::uint64_t>(static_cast<std::uint32_t>(id))) * 0x100000001b3ull;
  return h;
}

/// The same over every piece of every tensor in `list`, for cross-rank comparison.
template <class Scalar, class MemSpace>
std::uint64_t checksum(const TensorList<Scalar, MemSpace>& list) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (const auto& t : list)
    for (const auto& p : t.pieces) h = checksum_view(p.values, h);
  return h;
}

constexpr bool is_dchag(Mode m) { return m == Mode::dchag_linear || m == Mode::dchag_xattn; }

/// What rank `rank` of map.ranks() may be built with: the configuration, the map against it,
/// the rank, the local tree and what each mode needs. The constructor and estimate_memory share
/// it.
inline void validate_rank(const char* where, const FrontEndConfig& cfg, Mode mode,
                          const ChannelMap& map, int rank, int tree) {
  cfg.validate(where);
  DCHAG_EXPECT(map.channels() == cfg.channels, where, "map.channels() is ", map.channels(),
               ", expected config.channels = ", cfg.channels);
  DCHAG_EXPECT(rank >= 0 && rank < map.ranks(), where, "rank is ", rank,
               ", expected 0 <= rank < map.ranks() = ", map.ranks());
  const int held = static_cast<int>(map.channels_of(rank).size());
  DCHAG_EXPECT(tree >= 1 && (!is_dchag(mode) || tree <= held), where, "tree is ", tree,
               ", expected 1 <= tree <= channels of rank ", rank, " = ", held);
  DCHAG_EXPECT(mode != Mode::dchag_linear || held % tree == 0, where, "rank ", rank, " holds ",
               held, " channels, expected a multiple of tree = ", tree,
               " (the linear tree shares one weight vector across groups)");
  DCHAG_EXPECT(mode != Mode::exact_flat || cfg.strategy == Strategy::pooled, where,
               "exact_flat needs the pooled strategy, config.strategy is ",
               to_string(cfg.strategy));
  DCHAG_EXPECT(mode != Mode::tp_only || cfg.strategy == Strategy::materialized, where,
               "tp_only is the materialized baseline, config.strategy is ",
               to_string(cfg.strategy));
  DCHAG_EXPECT(mode != Mode::tp_only || cfg.heads >= map.ranks(), where, "tp_only splits ",
               cfg.heads, " heads over ", map.ranks(), " ranks, expected heads >= ranks");
}

/// Channels the largest module of `rank` folds in one call: its own (exact_flat), every channel
/// (tp_only), or the larger of its own and the P gathered partial tokens (D-CHAG modes).
inline int channels_folded(Mode mode, const ChannelMap& map, int rank) {
  const int held = static_cast<int>(map.channels_of(rank).size());
  if (mode == Mode::tp_only) return map.channels();
  return is_dchag(mode) ? std::max(held, map.ranks()) : held;
}

/// Host bytes the largest collective of one training step stages through when MPI cannot read
/// the execution space's memory (0 when it can): D-CHAG's all-gather of the partial tokens,
/// exact_flat's merge of the pooled sums or its summed parameter gradients, tp_only's all-reduce
/// of the token gradients. J: channels the rank tokenizes.
template <class ExecSpace, class Scalar>
std::int64_t staging_bytes(const FrontEndConfig& cfg, Mode mode, int P, std::int64_t J,
                           std::int64_t B) {
  if (!mpi_needs_host_staging<typename ExecSpace::memory_space>) return 0;
  const std::int64_t L = cfg.patches(), D = cfg.dim, nh = cfg.heads;
  // The group sum of the tokenizer's shared parameters' gradients (tokenizer_policy.hpp).
  const std::int64_t shared = cfg.tokenizer.replicated_elements(cfg.patch, cfg.dim);
  switch (mode) {
    case Mode::dchag_linear:
    case Mode::dchag_xattn:
      return std::int64_t(staged_bytes<Scalar>(B * L * D) +
                          staged_bytes<Scalar>(std::max(P * B * L * D, shared)));
    case Mode::exact_flat:
      return std::int64_t(
          staged_bytes<Scalar>(std::max({B * L * (D + nh), nh * D + D * D, shared})));
    case Mode::tp_only:
      return std::int64_t(staged_bytes<Scalar>(B * J * L * D));
  }
  return 0;
}

/// The start of a group sum of what one backward adds to `grads` (a rank's tokenizer sees only
/// its channels' share of a shared parameter's gradient): before = grads, grads = 0.
template <class ExecSpace, class V>
void begin_group_gradient(const ExecSpace& exec, const V& grads, const V& before) {
  Kokkos::deep_copy(exec, before, grads);
  Kokkos::deep_copy(exec, grads, typename V::value_type(0));
}

/// Its end, collective: grads = before + the sum over the group of grads, the same on every
/// rank. (Summing only this backward's share, not the gradients accumulated before it.)
template <class ExecSpace, class V>
void end_group_gradient(const ExecSpace& exec, const Communicator& comm, const V& grads,
                        const V& before) {
  using T = typename V::value_type;
  allreduce_sum(exec, comm, Unmanaged1<T, typename V::memory_space>(grads.data(), grads.span()));
  Kokkos::parallel_for(
      "dchag::distributed::group_gradient",
      Kokkos::RangePolicy<ExecSpace>(exec, 0, std::int64_t(grads.span())),
      KOKKOS_LAMBDA(const std::int64_t i) { grads(i) += before(i); });
}

/// gathered [B, P, L, D] = received [P, B, L, D] (the all-gather's rank-major order). A free
/// function: nvcc refuses device lambdas in private member functions (CONTRIBUTING).
template <class ExecSpace, class V4>
void rank_major_to_batch_major(const ExecSpace& exec, const V4& received, const V4& gathered) {
  const std::int64_t P = received.extent(0), B = received.extent(1), L = received.extent(2);
  for_each_row(
      exec, "dchag::distributed::rank_major_to_batch_major", B * P * L,
      static_cast<int>(received.extent(3)), KOKKOS_LAMBDA(const std::int64_t r, const int d) {
        const std::int64_t l = r % L, rk = (r / L) % P, b = r / (L * P);
        gathered(b, rk, l, d) = received(rk, b, l, d);
      });
}

}  // namespace detail

}  // namespace dchag
