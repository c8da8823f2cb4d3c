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

namespace dchag::detail {

/// Channels per chunk of the fused front ends. Host spaces: about 512 KiB of tokens per thread (a
/// chunk stays in the cores' L2 between being produced and consumed). Devices: every channel
/// when tokens are kept anyway (launches cost more than cache misses there), else about 256 MiB
/// of tokens, so that memory stays flat in C.
template <class ExecSpace, class Scalar>
int fused_chunk_channels(std::size_t B, std::size_t L, std::size_t D, int channels,
                         int requested = 0, MemoryPolicy memory = MemoryPolicy::keep) {
  if (requested > 0) return std::min(requested, channels);
  const std::size_t per_channel = std::max<std::size_t>(B * L * D * sizeof(Scalar), 1);
  std::size_t budget = std::size_t(256) << 20;
  if constexpr (runs_on_host<ExecSpace>) {
    budget = std::size_t(std::max(ExecSpace().concurrency(), 1)) << 19;
  } else {
    if (memory == MemoryPolicy::keep) return channels;
  }
  return static_cast<int>(std::clamp<std::size_t>(budget / per_channel, 1, channels));
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

  void stream_begin(const ExecSpace& exec, const V4& out, MemoryPolicy memory) {
    attention.stream_begin(exec, saved, static_cast<int>(out.extent(0)), inputs,
                           static_cast<int>(out.extent(2)), Segments::whole(inputs), memory,
                           group != nullptr);
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

/// The tokens a fused forward works in: all of them (keep) or one chunk's.
template <class Scalar, class MemSpace>
void ensure_fused_tokens(View4<Scalar, MemSpace>& tokens, std::size_t B, std::size_t J,
                         std::size_t L, std::size_t D, int chunk, MemoryPolicy memory) {
  if (memory == MemoryPolicy::keep) {
    ensure_view(tokens, "dchag::fused::tokens", B, J, L, D);
  } else {
    ensure_view(tokens, "dchag::fused::tokens_chunk", B, std::size_t(chunk), L, D);
  }
}

/// Allocates what fused_forward and fused_backward need for B images of J channels besides the
/// fold's own state (the tokens, the gradient chunk where a backward may follow, the tokenizer's
/// patches), so that a collective caller allocates before its first collective. Returns the
/// chunk width, for the fold's reserve.
template <class ExecSpace, class Scalar>
int reserve_fused(Tokenizer<ExecSpace, Scalar>& tokenizer,
                  View4<Scalar, typename ExecSpace::memory_space>& tokens,
                  View1<Scalar, typename ExecSpace::memory_space>& d_chunk, std::size_t B,
                  std::size_t J, std::size_t L, std::size_t D, MemoryPolicy memory) {
  const int chunk = fused_chunk_channels<ExecSpace, Scalar>(B, L, D, int(J), 0, memory);
  ensure_fused_tokens(tokens, B, J, L, D, chunk, memory);
  if (memory != MemoryPolicy::inference)
    ensure_view(d_chunk, "dchag::fused::d_tokens_chunk", B * chunk * L * D);
  tokenizer.reserve(int(B), int(J), int(L), memory == MemoryPolicy::keep ? 0 : chunk);
  return chunk;
}

/// out = fold(tokens of the channels `sel` names in images), chunk by chunk.
template <class ExecSpace, class Scalar, class Fold>
void fused_forward(const ExecSpace& exec, Tokenizer<ExecSpace, Scalar>& tokenizer, Fold& fold,
                   const View4<const Scalar, typename ExecSpace::memory_space>& images,
                   const ChannelSelection& sel,
                   View4<Scalar, typename ExecSpace::memory_space>& tokens,
                   const View4<Scalar, typename ExecSpace::memory_space>& out, int requested_chunk,
                   MemoryPolicy memory) {
  using V4 = View4<Scalar, typename ExecSpace::memory_space>;
  const std::size_t B = images.extent(0), L = out.extent(2), D = out.extent(3);
  const int J = sel.size();
  const int chunk = fused_chunk_channels<ExecSpace, Scalar>(B, L, D, J, requested_chunk, memory);
  const bool keep = memory == MemoryPolicy::keep;
  ensure_fused_tokens(tokens, B, std::size_t(J), L, D, chunk, memory);
  tokenizer.prepare(exec, images, sel, keep ? 0 : chunk);
  fold.stream_begin(exec, out, memory);
  for (int j0 = 0; j0 < J; j0 += chunk) {
    const int j1 = std::min(J, j0 + chunk);
    const V4 x = keep ? tokens : V4(tokens.data(), B, j1 - j0, L, D);
    tokenizer.project(exec, j0, j1, x);
    fold.stream_chunk(exec, x, j0, j1);
  }
  fold.stream_end(exec, out);
}

/// The backward of fused_forward from d_out: token gradients one chunk at a time, into
/// `d_chunk`, consumed by the tokenizer at once. After a recompute forward each chunk is
/// tokenized again first (the images the forward read must be unchanged).
template <class ExecSpace, class Scalar, class Fold>
void fused_backward(const ExecSpace& exec, Tokenizer<ExecSpace, Scalar>& tokenizer, Fold& fold,
                    const View4<Scalar, typename ExecSpace::memory_space>& tokens, int J,
                    const View4<const Scalar, typename ExecSpace::memory_space>& d_out,
                    View1<Scalar, typename ExecSpace::memory_space>& d_chunk, int requested_chunk,
                    MemoryPolicy memory) {
  using V4 = View4<Scalar, typename ExecSpace::memory_space>;
  const std::size_t B = d_out.extent(0), L = d_out.extent(2), D = d_out.extent(3);
  const int chunk = fused_chunk_channels<ExecSpace, Scalar>(B, L, D, J, requested_chunk, memory);
  const bool keep = memory == MemoryPolicy::keep;
  ensure_view(d_chunk, "dchag::fused::d_tokens_chunk", B * chunk * L * D);
  fold.backward_begin(exec, d_out);
  for (int j0 = 0; j0 < J; j0 += chunk) {
    const int j1 = std::min(J, j0 + chunk);
    const V4 x = keep ? tokens : V4(tokens.data(), B, j1 - j0, L, D);
    if (!keep) tokenizer.project(exec, j0, j1, x);
    const V4 dt(d_chunk.data(), B, j1 - j0, L, D);
    fold.backward_chunk(exec, x, j0, j1, dt);
    tokenizer.backward(exec, dt, j0, j1);
  }
  fold.backward_end(exec);
}

/// Bytes of the fused loop's own buffers for B images of J channels: the tokens (all of them,
/// kept for backward, or one chunk's) and, where a backward may follow, the gradient chunk.
template <class ExecSpace, class Scalar>
MemoryEstimate fused_buffers_estimate(std::int64_t B, std::int64_t L, std::int64_t D, int J,
                                      int requested_chunk, MemoryPolicy memory) {
  const std::int64_t per_channel = std::int64_t(sizeof(Scalar)) * B * L * D;
  const int chunk = fused_chunk_channels<ExecSpace, Scalar>(B, L, D, J, requested_chunk, memory);
  MemoryEstimate e;
  if (memory == MemoryPolicy::keep) {
    e.activations = per_channel * J;
  } else {
    e.workspace = per_channel * chunk;
  }
  if (memory != MemoryPolicy::inference) e.workspace += per_channel * chunk;
  return e;
}

}  // namespace dchag::detail
