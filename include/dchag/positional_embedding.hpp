#pragma once
/// Learned positional embedding added to the aggregated tokens (DESIGN 3.5): out[b, l, :] +=
/// pos[l, :], initialised with ClimaX's 2-D sin-cos embedding of the patch grid (patch column in
/// the first D/2 values, row in the rest). Name: `pos_embed`
/// [1, L, D].
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/detail/loops.hpp>
#include <dchag/detail/sizes.hpp>
#include <dchag/error.hpp>
#include <dchag/init.hpp>
#include <dchag/tensor.hpp>

namespace dchag {

template <class ExecSpace, class Scalar = float>
class PositionalEmbedding {
 public:
  using execution_space = ExecSpace;
  using memory_space = typename ExecSpace::memory_space;

  PositionalEmbedding(const ExecSpace& exec, int grid_h, int grid_w, int dim)
      : pos_("dchag::pos_embed", checked_patches("dchag::PositionalEmbedding", grid_h, grid_w, dim),
             dim),
        d_pos_("dchag::d_pos_embed", pos_.extent(0), dim) {
    init_sincos_2d(pos_, grid_h, grid_w);
    exec.fence();
  }

  /// out [B, L, D] += pos. With several queries (DESIGN 3.9) out is [B, L, N_q * D], N_q tokens
  /// per patch, and each gets its patch's pos.
  void forward(const ExecSpace& exec, const View3<Scalar, memory_space>& out) const {
    detail::ScopedRegion region("dchag::PositionalEmbedding::forward");
    check("dchag::PositionalEmbedding::forward", out.extent(1), out.extent(2));
    const int L = pos_.extent(0), D = pos_.extent(1);  // L <= INT_MAX: checked at construction
    const int W = static_cast<int>(out.extent(2));     // N_q * D
    auto pos = pos_;
    detail::for_each_row(
        exec, "dchag::pos_embed::forward", std::int64_t(out.extent(0)) * L, W,
        KOKKOS_LAMBDA(const std::int64_t r, const int c) {
          out(r / L, r % L, c) += pos(r % L, c % D);
        });
  }

  /// d_pos += sum over the batch (and the queries) of d_out [B, L, N_q * D] (the gradient passes
  /// through unchanged).
  void backward(const ExecSpace& exec, const View3<const Scalar, memory_space>& d_out) {
    detail::ScopedRegion region("dchag::PositionalEmbedding::backward");
    check("dchag::PositionalEmbedding::backward", d_out.extent(1), d_out.extent(2));
    const std::int64_t B = d_out.extent(0);
    const int D = pos_.extent(1), queries = static_cast<int>(d_out.extent(2)) / D;
    auto d_pos = d_pos_;
    detail::for_each_row(
        exec, "dchag::pos_embed::backward", d_pos.extent(0), D,
        KOKKOS_LAMBDA(const std::int64_t l, const int d) {
          Scalar acc = 0;
          for (std::int64_t b = 0; b < B; ++b)
            for (int j = 0; j < queries; ++j) acc += d_out(b, l, j * D + d);
          d_pos(l, d) += acc;
        });
  }

  void zero_gradients(const ExecSpace& exec) { Kokkos::deep_copy(exec, d_pos_, Scalar(0)); }
  TensorList<Scalar, memory_space> parameters() const { return named(pos_); }
  TensorList<Scalar, memory_space> gradients() const { return named(d_pos_); }
  /// Validates its arguments as the constructor does.
  static MemoryEstimate estimate(std::int64_t patches, int dim) {
    constexpr const char* where = "dchag::PositionalEmbedding::estimate";
    DCHAG_EXPECT(patches >= 1, where, "patches is ", patches, ", expected >= 1");
    DCHAG_EXPECT(dim >= 1, where, "dim is ", dim, ", expected >= 1");
    detail::expect_int_size(where, "patches L", {patches});
    detail::expect_elements(where, "positional embedding L * D", {patches, dim});
    MemoryEstimate e;
    e.parameters = std::int64_t(sizeof(Scalar)) * patches * dim;
    e.gradients = e.parameters;
    return e;
  }

 private:
  // L = grid_h * grid_w, refused unless the kernels can index it and L * D elements.
  static std::int64_t checked_patches(const char* where, int grid_h, int grid_w, int dim) {
    DCHAG_EXPECT(grid_h >= 1, where, "grid_h is ", grid_h, ", expected >= 1");
    DCHAG_EXPECT(grid_w >= 1, where, "grid_w is ", grid_w, ", expected >= 1");
    DCHAG_EXPECT(dim >= 1, where, "dim is ", dim, ", expected >= 1");
    const std::int64_t L =
        detail::expect_int_size(where, "patches L = grid_h * grid_w", {grid_h, grid_w});
    detail::expect_elements(where, "positional embedding L * D", {L, dim});
    return L;
  }

  void check(const char* where, std::size_t l, std::size_t d) const {
    DCHAG_EXPECT(l == pos_.extent(0) && d >= pos_.extent(1) && d % pos_.extent(1) == 0, where,
                 "tensor is [B, ", l, ", ", d, "], expected [B, L, D] = [B, ", pos_.extent(0), ", ",
                 pos_.extent(1), "] (or [B, L, N_q * D] with several queries)");
  }
  TensorList<Scalar, memory_space> named(const View2<Scalar, memory_space>& v) const {
    return {detail::whole<Scalar, memory_space>(
        "pos_embed", {1, std::int64_t(v.extent(0)), std::int64_t(v.extent(1))}, v)};
  }

  View2<Scalar, memory_space> pos_, d_pos_;
};

}  // namespace dchag
