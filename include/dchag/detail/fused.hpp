#pragma once
/// The fused front-end loop (DESIGN 3.8): tokenize a chunk of channels and fold it at once, while
/// it is in cache; in backward, the token gradients of one chunk at a time go straight into the
/// tokenizer, so no B·C·L·D gradient exists. What is kept between the two follows MemoryPolicy:
/// keep holds every token, recompute tokenizes each chunk again in backward, inference keeps
/// nothing. The fold is anything with the streaming protocol of AttentionFold below (the flat
/// cross-attention, or a PartialAggregator for a D-CHAG rank).
#include <dchag/cross_attention.hpp>
#include <dchag/tokenizer.hpp>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace dchag::detail {

/// Channels per chunk of the fused front ends. Host spaces: about 512 KiB of tokens per thread (a
/// chunk stays in the cores' L2 between being produced and consumed). Devices: every channel
/// when the Scalar tokens are kept anyway (launches cost more than cache misses there), else
/// about 256 MiB of tokens, so that memory stays flat in C. A narrow Storage under keep holds
/// the Scalar chunk and its gradient beside the kept tokens: at most a quarter of the channels
/// per chunk, so that it never holds more than keeping the tokens in Scalar would.
template <class ExecSpace, class Scalar, class Storage = Scalar>
int fused_chunk_channels(std::size_t B, std::size_t L, std::size_t D, int channels,
                         int requested = 0, MemoryPolicy memory = MemoryPolicy::keep) {
  if (requested > 0) return std::min(requested, channels);
  const std::size_t per_channel = std::max<std::size_t>(B * L * D * sizeof(Scalar), 1);
  std::size_t budget = std::size_t(256) << 20;
  if constexpr (runs_on_host<ExecSpace>) {
    budget = std::size_t(std::max(ExecSpace().concurrency(), 1)) << 19;
  } else {
    if (memory == MemoryPolicy::keep && std::is_same_v<Scalar, Storage>) return channels;
  }
  int chunk = static_cast<int>(std::clamp<std::size_t>(budget / per_channel, 1, channels));
  if (!std::is_same_v<Scalar, Storage> && memory == MemoryPolicy::keep)
    chunk = std::min(chunk, std::max(1, channels / 4));
  return chunk;
}

/// The flat cross-attention as a fold of `inputs` channels: its Saved state and, for the exact
/// distributed form, the group.
template <class ExecSpace, class Scalar>
struct AttentionFold {
  using memory_space = typename ExecSpace::memory_space;
  using V4 = View4<Scalar, memory_space>;
  using C4 = View4<const Scalar, memory_space>;

  CrossAttention<ExecSpace, Scalar>& attention;
  typename CrossAttention<ExecSpace, Scalar>::Saved& saved;
  const GroupReduce<Scalar, memory_space>* group;
  int inputs;

  /// Output rows per patch position: out is [B, 1, L * queries, D].
  int queries() const { return attention.queries(); }
  void stream_begin(const ExecSpace& exec, const V4& out, MemoryPolicy memory,
                    const InputMask<memory_space>& valid) {
    attention.stream_begin(exec, saved, static_cast<int>(out.extent(0)), inputs,
                           static_cast<int>(out.extent(2)) / queries(), Segments::whole(inputs),
                           memory, group != nullptr, valid);
  }
  void stream_chunk(const ExecSpace& exec, const C4& x, int n0, int n1) {
    attention.stream_chunk(exec, x, n0, n1, saved);
  }
  void stream_end(const ExecSpace& exec, const V4& out) {
    attention.stream_end(exec, saved, out, group);
  }
  void backward_begin(const ExecSpace& exec, const C4& d_out) {
    attention.backward_begin(exec, saved, d_out, group);
  }
  void backward_chunk(const ExecSpace& exec, const C4& x, int n0, int n1, const V4& dx) {
    attention.backward_chunk(exec, x, saved, n0, n1, dx);
  }
  void backward_end(const ExecSpace& exec) { attention.backward_end(exec, saved, group); }
};

/// The tokens a fused loop works in. `work` (Scalar) is what the tokenizer writes and the fold
/// reads: every token when they are kept and Storage is Scalar, else one chunk's. With another
/// Storage, every chunk is rounded to it in place (precision.hpp), and keep stores the rounded
/// tokens in `kept` for the backward.
template <class Scalar, class Storage, class MemSpace>
struct FusedTokens {
  static constexpr bool narrow = !std::is_same_v<Scalar, Storage>;
  using V4 = View4<Scalar, MemSpace>;

  V4 work;
  View4<Storage, MemSpace> kept;  // keep with a narrow Storage only

  /// Whether `work` holds every token (then chunks are views of channels, not of memory).
  static bool whole(MemoryPolicy memory) { return !narrow && memory == MemoryPolicy::keep; }
  /// Whether the tokenizer can keep every channel's patches: only when it keeps the tokens in
  /// Scalar; otherwise it extracts them again per chunk from the caller's images.
  static bool all_patches(MemoryPolicy memory) { return whole(memory); }

  void ensure(std::size_t B, std::size_t J, std::size_t L, std::size_t D, int chunk,
              MemoryPolicy memory) {
    if (whole(memory)) {
      ensure_view(work, "dchag::fused::tokens", B, J, L, D);
    } else {
      ensure_view(work, "dchag::fused::tokens_chunk", B, std::size_t(chunk), L, D);
    }
    if (narrow && memory == MemoryPolicy::keep) {
      ensure_view(kept, "dchag::fused::tokens", B, J, L, D);
    } else {
      kept = {};
    }
  }
  /// The Scalar tokens of channels [j0, j1) as the fold and the tokenizer address them.
  V4 chunk(MemoryPolicy memory, int j0, int j1) const {
    if (whole(memory)) return work;
    return V4(work.data(), work.extent(0), std::size_t(j1 - j0), work.extent(2), work.extent(3));
  }
};

/// Rounds the chunk x [B, n, L, D] (channels [j0, j0 + n)) to Storage in place and, when `kept`
/// is allocated, stores the rounded tokens in its slots. One team per (b, j): its L * D values
/// are contiguous in both views, so the lanes stream them with no index arithmetic.
template <class ExecSpace, class Scalar, class Storage, class MemSpace>
void round_tokens(const ExecSpace& exec, const View4<Scalar, MemSpace>& x,
                  const View4<Storage, MemSpace>& kept, int j0) {
  using Member = typename Kokkos::TeamPolicy<ExecSpace>::member_type;
  const int n = static_cast<int>(x.extent(1));
  const std::int64_t block = std::int64_t(x.extent(2)) * x.extent(3);
  const bool store = kept.data() != nullptr;
  Kokkos::parallel_for(
      "dchag::fused::round_tokens", row_teams(exec, std::int64_t(x.extent(0)) * n),
      KOKKOS_LAMBDA(const Member& team) {
        const int b = team.league_rank() / n, j = team.league_rank() % n;
        Scalar* xs = &x(b, j, 0, 0);
        if (store) {
          Storage* ks = &kept(b, j0 + j, 0, 0);
          Kokkos::parallel_for(Kokkos::TeamVectorRange(team, block), [&](const std::int64_t i) {
            const Storage v = convert<Storage>(xs[i]);
            xs[i] = convert<Scalar>(v);
            ks[i] = v;
          });
        } else {
          Kokkos::parallel_for(Kokkos::TeamVectorRange(team, block),
                               [&](const std::int64_t i) { xs[i] = round_to<Storage>(xs[i]); });
        }
      });
}

/// x [B, n, L, D] = the kept tokens of channels [j0, j0 + n), widened to Scalar.
template <class ExecSpace, class Scalar, class Storage, class MemSpace>
void load_tokens(const ExecSpace& exec, const View4<Storage, MemSpace>& kept,
                 const View4<Scalar, MemSpace>& x, int j0) {
  using Member = typename Kokkos::TeamPolicy<ExecSpace>::member_type;
  const int n = static_cast<int>(x.extent(1));
  const std::int64_t block = std::int64_t(x.extent(2)) * x.extent(3);
  Kokkos::parallel_for(
      "dchag::fused::load_tokens", row_teams(exec, std::int64_t(x.extent(0)) * n),
      KOKKOS_LAMBDA(const Member& team) {
        const int b = team.league_rank() / n, j = team.league_rank() % n;
        Scalar* xs = &x(b, j, 0, 0);
        const Storage* ks = &kept(b, j0 + j, 0, 0);
        Kokkos::parallel_for(Kokkos::TeamVectorRange(team, block),
                             [&](const std::int64_t i) { xs[i] = convert<Scalar>(ks[i]); });
      });
}

/// The materialized path's rounding: every token of x [B, J, L, D] to Storage, in place (a
/// no-op when Storage is Scalar), so that both strategies see the same tokens.
template <class Storage, class ExecSpace, class Scalar, class MemSpace>
void round_all_tokens(const ExecSpace& exec, const View4<Scalar, MemSpace>& x) {
  if constexpr (!std::is_same_v<Scalar, Storage>)
    round_tokens(exec, x, View4<Storage, MemSpace>(), 0);
}

/// Allocates what fused_forward and fused_backward need for B images of J channels besides the
/// fold's own state (the tokens, the gradient chunk where a backward may follow, the tokenizer's
/// patches), so that a collective caller allocates before its first collective. Returns the
/// chunk width, for the fold's reserve.
template <class ExecSpace, class Scalar, class Storage>
int reserve_fused(Tokenizer<ExecSpace, Scalar, Storage>& tokenizer,
                  FusedTokens<Scalar, Storage, typename ExecSpace::memory_space>& tokens,
                  View1<Scalar, typename ExecSpace::memory_space>& d_chunk, std::size_t B,
                  std::size_t J, std::size_t L, std::size_t D, MemoryPolicy memory) {
  using Tokens = FusedTokens<Scalar, Storage, typename ExecSpace::memory_space>;
  const int chunk = fused_chunk_channels<ExecSpace, Scalar, Storage>(B, L, D, int(J), 0, memory);
  tokens.ensure(B, J, L, D, chunk, memory);
  if (memory != MemoryPolicy::inference)
    ensure_view(d_chunk, "dchag::fused::d_tokens_chunk", B * chunk * L * D);
  tokenizer.reserve(int(B), int(J), int(L), Tokens::all_patches(memory) ? 0 : chunk);
  return chunk;
}

/// out = fold(tokens of the channels `sel` names in images), chunk by chunk; `valid` [B, J]:
/// the selected channels present in each sample (empty: all).
template <class ExecSpace, class Scalar, class Storage, class Fold>
void fused_forward(const ExecSpace& exec, Tokenizer<ExecSpace, Scalar, Storage>& tokenizer,
                   Fold& fold, const View4<const Storage, typename ExecSpace::memory_space>& images,
                   const ChannelSelection& sel,
                   FusedTokens<Scalar, Storage, typename ExecSpace::memory_space>& tokens,
                   const View4<Scalar, typename ExecSpace::memory_space>& out, int requested_chunk,
                   MemoryPolicy memory,
                   const InputMask<typename ExecSpace::memory_space>& valid = {}) {
  using Tokens = FusedTokens<Scalar, Storage, typename ExecSpace::memory_space>;
  const std::size_t B = images.extent(0), L = out.extent(2) / fold.queries(), D = out.extent(3);
  const int J = sel.size();
  const int chunk =
      fused_chunk_channels<ExecSpace, Scalar, Storage>(B, L, D, J, requested_chunk, memory);
  tokens.ensure(B, std::size_t(J), L, D, chunk, memory);
  tokenizer.prepare(exec, images, sel, Tokens::all_patches(memory) ? 0 : chunk);
  fold.stream_begin(exec, out, memory, valid);
  for (int j0 = 0; j0 < J; j0 += chunk) {
    const int j1 = std::min(J, j0 + chunk);
    const auto x = tokens.chunk(memory, j0, j1);
    tokenizer.project(exec, j0, j1, x);
    if constexpr (Tokens::narrow) round_tokens(exec, x, tokens.kept, j0);
    fold.stream_chunk(exec, x, j0, j1);
  }
  fold.stream_end(exec, out);
}

/// The backward of fused_forward from d_out: token gradients one chunk at a time, into
/// `d_chunk`, consumed by the tokenizer at once. After a recompute forward each chunk is
/// tokenized again first; with a narrow Storage the patches are extracted again (both read the
/// images the forward read, which must be unchanged).
template <class ExecSpace, class Scalar, class Storage, class Fold>
void fused_backward(const ExecSpace& exec, Tokenizer<ExecSpace, Scalar, Storage>& tokenizer,
                    Fold& fold,
                    FusedTokens<Scalar, Storage, typename ExecSpace::memory_space>& tokens, int J,
                    const View4<const Scalar, typename ExecSpace::memory_space>& d_out,
                    View1<Scalar, typename ExecSpace::memory_space>& d_chunk, int requested_chunk,
                    MemoryPolicy memory) {
  using V4 = View4<Scalar, typename ExecSpace::memory_space>;
  using Tokens = FusedTokens<Scalar, Storage, typename ExecSpace::memory_space>;
  const std::size_t B = d_out.extent(0), L = d_out.extent(2) / fold.queries(), D = d_out.extent(3);
  const int chunk =
      fused_chunk_channels<ExecSpace, Scalar, Storage>(B, L, D, J, requested_chunk, memory);
  const bool keep = memory == MemoryPolicy::keep;
  ensure_view(d_chunk, "dchag::fused::d_tokens_chunk", B * chunk * L * D);
  fold.backward_begin(exec, d_out);
  for (int j0 = 0; j0 < J; j0 += chunk) {
    const int j1 = std::min(J, j0 + chunk);
    const V4 x = tokens.chunk(memory, j0, j1);
    if (!keep) {
      tokenizer.project(exec, j0, j1, x);
      if constexpr (Tokens::narrow) round_tokens(exec, x, tokens.kept, j0);
    } else if constexpr (Tokens::narrow) {
      load_tokens(exec, tokens.kept, x, j0);
      tokenizer.load_patches(exec, j0, j1);
    }
    const V4 dt(d_chunk.data(), B, j1 - j0, L, D);
    fold.backward_chunk(exec, x, j0, j1, dt);
    tokenizer.backward(exec, dt, j0, j1);
  }
  fold.backward_end(exec);
}

/// Bytes of the fused loop's own buffers for B images of J channels: the tokens (all of them,
/// kept for backward, or one chunk's, and both with a narrow Storage) and, where a backward may
/// follow, the gradient chunk.
template <class ExecSpace, class Scalar, class Storage = Scalar>
MemoryEstimate fused_buffers_estimate(std::int64_t B, std::int64_t L, std::int64_t D, int J,
                                      int requested_chunk, MemoryPolicy memory) {
  using Tokens = FusedTokens<Scalar, Storage, typename ExecSpace::memory_space>;
  const std::int64_t per_channel = std::int64_t(sizeof(Scalar)) * B * L * D;
  const int chunk =
      fused_chunk_channels<ExecSpace, Scalar, Storage>(B, L, D, J, requested_chunk, memory);
  MemoryEstimate e;
  if (Tokens::whole(memory)) {
    e.activations = per_channel * J;
  } else {
    e.workspace = per_channel * chunk;
    if (memory == MemoryPolicy::keep) e.activations = std::int64_t(sizeof(Storage)) * B * L * D * J;
  }
  if (memory != MemoryPolicy::inference) e.workspace += per_channel * chunk;
  return e;
}

}  // namespace dchag::detail
