#pragma once
/// The tokenizer's kernels (dchag/tokenizer.hpp): patch extraction, the coordinate channel
/// embedding and the gradient sums of the policies of dchag/tokenizer_policy.hpp. Free functions:
/// nvcc refuses device lambdas in private member functions (CONTRIBUTING).
#include <dchag/detail/batched_gemm.hpp>
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/detail/loops.hpp>
#include <dchag/precision.hpp>
#include <dchag/tensor.hpp>

#include <cstdint>

namespace dchag::detail {

/// im2col of the selected channels [j0, j1): patches(j - j0, b, l, kr * p + kc) =
/// images(b, image_index(j), row, col), widened from the images' storage type. One loop row per
/// image row: its W / p patches each take p contiguous pixels.
template <class ExecSpace, class Scalar, class Pixel, class MemSpace>
void extract_patches(const ExecSpace& exec, const View4<const Pixel, MemSpace>& images,
                     const View1<int, MemSpace>& image_index,
                     const View4<Scalar, MemSpace>& patches, int j0, int j1, int p) {
  using Team = Kokkos::TeamPolicy<ExecSpace>;
  const int B = static_cast<int>(images.extent(0)), H = static_cast<int>(images.extent(2));
  const int wp = static_cast<int>(images.extent(3)) / p;
  // (j1 - j0) * B * H <= INT_MAX: the tokenizer's forward check refuses more.
  Kokkos::parallel_for(
      "dchag::tokenize::im2col",
      Team(exec, static_cast<int>(std::int64_t(j1 - j0) * B * H), Kokkos::AUTO),
      KOKKOS_LAMBDA(const typename Team::member_type& team) {
        const int y = team.league_rank() % H;
        const int b = (team.league_rank() / H) % B;
        const int jj = team.league_rank() / (H * B);
        const Pixel* src = &images(b, image_index(j0 + jj), y, 0);
        const int l0 = (y / p) * wp, kr = y % p;
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, wp), [&](const int c) {
          Scalar* dst = &patches(jj, b, l0 + c, kr * p);
          Kokkos::parallel_for(Kokkos::ThreadVectorRange(team, p),
                               [&](const int kc) { dst[kc] = convert<Scalar>(src[c * p + kc]); });
        });
      });
}

/// embed(j, :) = w phi(j, :) + b for every row j of phi [J, F]: the coordinate embedding of the
/// selected channels, w [D, F] (nn.Linear's layout), b [D].
template <class ExecSpace, class Scalar, class MemSpace>
void coordinate_embed(const ExecSpace& exec, const View2<Scalar, MemSpace>& phi,
                      const View2<Scalar, MemSpace>& w, const View1<Scalar, MemSpace>& b,
                      const View2<Scalar, MemSpace>& embed) {
  const int D = static_cast<int>(w.extent(0)), F = static_cast<int>(w.extent(1));
  for_each_row(
      exec, "dchag::tokenize::coordinate_embed", std::int64_t(phi.extent(0)), D,
      KOKKOS_LAMBDA(const std::int64_t j, const int d) {
        embed(j, d) = b(d) + lane_dot(&w(d, 0), &phi(j, 0), F);
      });
}

/// The per-channel sums over (b, l) of d_tokens [B, nj, L, D] (channels [j0, j0 + nj) of the
/// selection): added to the channel's rows of d_bias and d_embed (selection slot `slot`), and
/// stored in sums(jj, :); an empty view is skipped. One team per channel, rows contiguous in d;
/// channel ids are unique, so no two teams write the same row.
template <class ExecSpace, class Scalar, class MemSpace>
void token_grad_sums(const ExecSpace& exec, const View4<const Scalar, MemSpace>& d_tokens, int j0,
                     const View1<int, MemSpace>& slot, const View2<Scalar, MemSpace>& d_bias,
                     const View2<Scalar, MemSpace>& d_embed, const View2<Scalar, MemSpace>& sums) {
  using Member = typename Kokkos::TeamPolicy<ExecSpace>::member_type;
  const int B = static_cast<int>(d_tokens.extent(0)), nj = static_cast<int>(d_tokens.extent(1));
  const int L = static_cast<int>(d_tokens.extent(2)), D = static_cast<int>(d_tokens.extent(3));
  const bool bias = d_bias.data() != nullptr, embed = d_embed.data() != nullptr;
  const bool sum = sums.data() != nullptr;
  Kokkos::parallel_for(
      "dchag::tokenize::d_bias", row_teams(exec, nj), KOKKOS_LAMBDA(const Member& team) {
        const int jj = team.league_rank();
        Scalar* db = bias ? &d_bias(slot(j0 + jj), 0) : nullptr;
        Scalar* de = embed ? &d_embed(slot(j0 + jj), 0) : nullptr;
        Scalar* s = sum ? &sums(jj, 0) : nullptr;
        for (int b = 0; b < B; ++b) {
          for (int l = 0; l < L; ++l) {
            const Scalar* g = &d_tokens(b, jj, l, 0);
            const bool first = b == 0 && l == 0;
            Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D), [&](const int d) {
              if (db) db[d] += g[d];
              if (de) de[d] += g[d];
              if (s) s[d] = first ? g[d] : s[d] + g[d];
            });
          }
        }
      });
}

/// From the per-channel sums [nj, D] of token_grad_sums, the gradients of the parameters every
/// channel shares: d_bias (the shared bias) and d_proj_b += sum_j sums(j, :), d_proj_w (the
/// coordinate map, [D, F]) += sum_j sums(j, :) phi(j0 + j, :)^T. An empty view is skipped.
template <class ExecSpace, class Scalar, class MemSpace>
void replicated_grads(const ExecSpace& exec, const View2<Scalar, MemSpace>& sums, int nj,
                      const View2<Scalar, MemSpace>& phi, int j0,
                      const View1<Scalar, MemSpace>& d_bias,
                      const View2<Scalar, MemSpace>& d_proj_w,
                      const View1<Scalar, MemSpace>& d_proj_b) {
  const int D = static_cast<int>(sums.extent(1));
  const bool bias = d_bias.data() != nullptr, proj = d_proj_b.data() != nullptr;
  for_each_row(
      exec, "dchag::tokenize::d_shared_bias", 1, D, KOKKOS_LAMBDA(const std::int64_t, const int d) {
        Scalar s = 0;
        for (int j = 0; j < nj; ++j) s += sums(j, d);
        if (bias) d_bias(d) += s;
        if (proj) d_proj_b(d) += s;
      });
  if (d_proj_w.data() == nullptr) return;
  const int F = static_cast<int>(d_proj_w.extent(1));
  for_each_row(
      exec, "dchag::tokenize::d_coordinate_map", D, F,
      KOKKOS_LAMBDA(const std::int64_t d, const int f) {
        Scalar s = 0;
        for (int j = 0; j < nj; ++j) s += sums(j, d) * phi(j0 + j, f);
        d_proj_w(d, f) += s;
      });
}

/// The shared weight's gradient dWt^T [p*p, D] += sum over channels jj < nj and samples b of
/// patches(j0 + jj - p0, b)^T d_tokens(b, jj). One batch over the samples, each GEMM summing its
/// channels (KB = nj: their rows are not contiguous); with B > 1 each sample's GEMM writes its
/// own slice of `scratch` [B, p*p, D] (GEMMs of a batch never share an output), then one kernel
/// adds the slices in sample order. B = 1 accumulates straight into d_weight.
template <class ExecSpace, class Scalar, class MemSpace>
void shared_weight_grad(const ExecSpace& exec, const View4<Scalar, MemSpace>& patches, int row0,
                        const View4<const Scalar, MemSpace>& d_tokens,
                        const View3<Scalar, MemSpace>& scratch,
                        const View3<Scalar, MemSpace>& d_weight) {
  const int B = static_cast<int>(d_tokens.extent(0)), nj = static_cast<int>(d_tokens.extent(1));
  const int L = static_cast<int>(d_tokens.extent(2)), D = static_cast<int>(d_tokens.extent(3));
  const int pp = static_cast<int>(patches.extent(3));
  const std::int64_t channel_stride = std::int64_t(B) * L * pp;
  if (B > 1) Kokkos::deep_copy(exec, scratch, Scalar(0));
  Scalar* out = B > 1 ? scratch.data() : d_weight.data();
  batched_gemm(
      exec, "dchag::tokenize::weight_grad", {B, pp, D, L, nj}, KOKKOS_LAMBDA(const int b) {
        return GemmOperands<Scalar>{&patches(row0, b, 0, 0),
                                    channel_stride,
                                    1,
                                    pp,
                                    &d_tokens(b, 0, 0, 0),
                                    std::int64_t(L) * D,
                                    D,
                                    out + std::int64_t(b) * pp * D,
                                    D};
      });
  if (B == 1) return;
  for_each_row(
      exec, "dchag::tokenize::d_shared_weight", pp, D,
      KOKKOS_LAMBDA(const std::int64_t k, const int d) {
        Scalar s = 0;
        for (int b = 0; b < B; ++b) s += scratch(b, k, d);
        d_weight(0, k, d) += s;
      });
}

}  // namespace dchag::detail
