#pragma once
/// Learned linear channel sum (D-CHAG-L, DESIGN 3.3): every segment of n inputs folds to
///   y[b, j, l, :] = sum_i w_i x[b, offset_j + i, l, :] + beta,
/// with one weight per input position inside a segment (shared by all segments) and one scalar
/// bias. Segments must all hold n inputs. A mask `valid` [B, k*n] (DESIGN 3.10; empty: all
/// valid) drops missing inputs from the sum (they get zero gradient); it must stay unchanged
/// until the backward.
#include <dchag/cross_attention.hpp>
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/detail/loops.hpp>
#include <dchag/error.hpp>
#include <dchag/init.hpp>
#include <dchag/tensor.hpp>

#include <string>

namespace dchag {

template <class ExecSpace, class Scalar = float>
class LinearAggregation {
 public:
  using execution_space = ExecSpace;
  using memory_space = typename ExecSpace::memory_space;
  using scalar_type = Scalar;

  /// `inputs` weights, trunc-normal 0.02 (ClimaX init for linear weights), zero bias; `name`
  /// keys the seed stream.
  LinearAggregation(const ExecSpace& exec, int inputs, std::uint64_t seed = 0,
                    std::string name = "linear")
      : n_(inputs) {
    DCHAG_EXPECT(inputs >= 1, "dchag::LinearAggregation", "inputs is ", inputs, ", expected >= 1");
    weight_ = View1<Scalar, memory_space>("dchag::linear::weight", inputs);
    bias_ = View1<Scalar, memory_space>("dchag::linear::bias", 1);
    d_weight_ = View1<Scalar, memory_space>("dchag::linear::d_weight", inputs);
    d_bias_ = View1<Scalar, memory_space>("dchag::linear::d_bias", 1);
    init_trunc_normal(weight_, 0.02, seed, name + ".weight");
    exec.fence();
  }

  int inputs() const { return n_; }
  using Mask = InputMask<memory_space>;

  /// y [B, k, L, D] from x [B, k*n, L, D] split into k segments of n inputs.
  void forward(const ExecSpace& exec, const View4<const Scalar, memory_space>& x,
               const Segments& seg, const View4<Scalar, memory_space>& y,
               const Mask& valid = {}) const {
    detail::ScopedRegion region("dchag::LinearAggregation::forward");
    check("dchag::LinearAggregation::forward", x, seg, y.extent(0), y.extent(1), y.extent(2),
          y.extent(3), "y");
    stream_begin(exec, y);
    stream_chunk(exec, x, 0, static_cast<int>(x.extent(1)), y, valid);
  }

  /// Accumulates dw, dbeta and writes dx (overwritten) from the forward's x and dy.
  void backward(const ExecSpace& exec, const View4<const Scalar, memory_space>& x,
                const Segments& seg, const View4<const Scalar, memory_space>& dy,
                const View4<Scalar, memory_space>& dx, const Mask& valid = {}) const {
    detail::ScopedRegion region("dchag::LinearAggregation::backward");
    constexpr const char* where = "dchag::LinearAggregation::backward";
    check(where, x, seg, dy.extent(0), dy.extent(1), dy.extent(2), dy.extent(3), "dy");
    DCHAG_EXPECT(dx.extent(0) == x.extent(0) && dx.extent(1) == x.extent(1) &&
                     dx.extent(2) == x.extent(2) && dx.extent(3) == x.extent(3),
                 where, "dx is [", dx.extent(0), ", ", dx.extent(1), ", ", dx.extent(2), ", ",
                 dx.extent(3), "], expected the shape of x");
    backward_chunk(exec, x, 0, static_cast<int>(x.extent(1)), dy, dx, valid);
    backward_bias(exec, dy);
  }

  /// Streamed forward over consecutive chunks of the k*n inputs (the fused front ends, DESIGN
  /// 3.8): stream_begin sets y [B, k, L, D] to beta, then stream_chunk adds inputs [n0, n1),
  /// held in x as all inputs [B, k*n, L, D] or this chunk's only [B, n1 - n0, L, D].
  void stream_begin(const ExecSpace& exec, const View4<Scalar, memory_space>& y) const {
    auto beta = bias_;
    auto y_flat = Unmanaged1<Scalar, memory_space>(y.data(), y.span());
    Kokkos::parallel_for(
        "dchag::linear::init", Kokkos::RangePolicy<ExecSpace>(exec, 0, std::int64_t(y.span())),
        KOKKOS_LAMBDA(const std::int64_t t) { y_flat(t) = beta(0); });
  }
  void stream_chunk(const ExecSpace& exec, const View4<const Scalar, memory_space>& x, int n0,
                    int n1, const View4<Scalar, memory_space>& y, const Mask& valid = {}) const {
    constexpr const char* where = "dchag::LinearAggregation::stream_chunk";
    const int x0 = first_input(where, x, n0, n1, y);
    check_mask(where, valid, y);
    const int n = n_, k = y.extent(1), L = x.extent(2), D = x.extent(3);
    auto w = weight_;
    detail::for_each_row(
        exec, "dchag::linear::forward", std::int64_t(y.extent(0)) * k * L, D,
        KOKKOS_LAMBDA(const std::int64_t r, const int d) {
          const int l = static_cast<int>(r % L);
          const int j = static_cast<int>((r / L) % k);
          const int b = static_cast<int>(r / (std::int64_t(L) * k));
          const int lo = n0 > j * n ? n0 : j * n, hi = n1 < (j + 1) * n ? n1 : (j + 1) * n;
          if (lo >= hi) return;  // no input of this segment in the chunk
          Scalar acc = y(b, j, l, d);
          for (int c = lo; c < hi; ++c)
            if (!detail::is_missing(valid, b, c)) acc += w(c - j * n) * x(b, c - x0, l, d);
          y(b, j, l, d) = acc;
        });
  }

  /// Chunked backward: writes dx [B, n1 - n0, L, D] of inputs [n0, n1) (x as in stream_chunk)
  /// and adds their share of dw. backward_bias adds dbeta, once per dy.
  void backward_chunk(const ExecSpace& exec, const View4<const Scalar, memory_space>& x, int n0,
                      int n1, const View4<const Scalar, memory_space>& dy,
                      const View4<Scalar, memory_space>& dx, const Mask& valid = {}) const {
    constexpr const char* where = "dchag::LinearAggregation::backward";
    const int x0 = first_input(where, x, n0, n1, dy);
    check_mask(where, valid, dy);
    DCHAG_EXPECT(dx.extent(0) == x.extent(0) && dx.extent(1) == std::size_t(n1 - n0) &&
                     dx.extent(2) == x.extent(2) && dx.extent(3) == x.extent(3),
                 where, "dx is [", dx.extent(0), ", ", dx.extent(1), ", ", dx.extent(2), ", ",
                 dx.extent(3), "], expected [B, n1 - n0, L, D] = [", x.extent(0), ", ", n1 - n0,
                 ", ", x.extent(2), ", ", x.extent(3), "]");
    const int n = n_, L = x.extent(2), D = x.extent(3), nc = n1 - n0;
    const std::int64_t B = x.extent(0);
    auto w = weight_;
    detail::for_each_row(
        exec, "dchag::linear::input_grad", B * nc * L, D,
        KOKKOS_LAMBDA(const std::int64_t r, const int d) {
          const int l = static_cast<int>(r % L);
          const int c = n0 + static_cast<int>((r / L) % nc);
          const int b = static_cast<int>(r / (std::int64_t(L) * nc));
          dx(b, c - n0, l, d) =
              detail::is_missing(valid, b, c) ? Scalar(0) : w(c % n) * dy(b, c / n, l, d);
        });
    // dw_i = sum over the chunk's inputs c = j*n + i and (b, l) of dy[b, j, l] . x[b, c, l]: one
    // team per weight, so the sum is deterministic.
    using Team = Kokkos::TeamPolicy<ExecSpace>;
    auto dw = d_weight_;
    Kokkos::parallel_for(
        "dchag::linear::weight_grad", Team(exec, n, Kokkos::AUTO),
        KOKKOS_LAMBDA(const typename Team::member_type& team) {
          const int i = team.league_rank();
          const int jlo = n0 <= i ? 0 : (n0 - i + n - 1) / n;  // first segment j with j*n+i >= n0
          const int jhi = n1 <= i ? 0 : (n1 - i + n - 1) / n;  // first with j*n+i >= n1
          if (jhi <= jlo) return;
          const std::int64_t per_j = B * L;
          Scalar sum = 0;
          Kokkos::parallel_reduce(
              Kokkos::TeamThreadRange(team, per_j * (jhi - jlo)),
              [&](const std::int64_t r, Scalar& acc) {
                const int j = jlo + static_cast<int>(r / per_j);
                const int b = static_cast<int>((r % per_j) / L), l = static_cast<int>(r % L);
                if (detail::is_missing(valid, b, j * n + i)) return;
                acc += detail::lane_dot(&dy(b, j, l, 0), &x(b, j * n + i - x0, l, 0), D);
              },
              sum);
          Kokkos::single(Kokkos::PerTeam(team), [&]() { dw(i) += sum; });
        });
  }
  void backward_bias(const ExecSpace& exec, const View4<const Scalar, memory_space>& dy) const {
    Scalar total = 0;
    auto dy_flat = Unmanaged1<const Scalar, memory_space>(dy.data(), dy.span());
    Kokkos::parallel_reduce(
        "dchag::linear::bias_grad",
        Kokkos::RangePolicy<ExecSpace>(exec, 0, std::int64_t(dy.span())),
        KOKKOS_LAMBDA(const std::int64_t t, Scalar& acc) { acc += dy_flat(t); }, total);
    auto db = d_bias_;
    Kokkos::parallel_for(
        "dchag::linear::bias_accumulate", Kokkos::RangePolicy<ExecSpace>(exec, 0, 1),
        KOKKOS_LAMBDA(const int) { db(0) += total; });
  }

  void zero_gradients(const ExecSpace& exec) {
    Kokkos::deep_copy(exec, d_weight_, Scalar(0));
    Kokkos::deep_copy(exec, d_bias_, Scalar(0));
  }

  /// `{prefix}weight` [n] and `{prefix}bias` [1].
  TensorList<Scalar, memory_space> parameters(const std::string& prefix = "",
                                              const std::string& weight = "weight",
                                              const std::string& bias = "bias") const {
    return {detail::whole<Scalar, memory_space>(prefix + weight, {n_}, weight_),
            detail::whole<Scalar, memory_space>(prefix + bias, {1}, bias_)};
  }
  TensorList<Scalar, memory_space> gradients(const std::string& prefix = "",
                                             const std::string& weight = "weight",
                                             const std::string& bias = "bias") const {
    return {detail::whole<Scalar, memory_space>(prefix + weight, {n_}, d_weight_),
            detail::whole<Scalar, memory_space>(prefix + bias, {1}, d_bias_)};
  }
  /// Validates `inputs` as the constructor does.
  static MemoryEstimate estimate(int inputs) {
    DCHAG_EXPECT(inputs >= 1, "dchag::LinearAggregation::estimate", "inputs is ", inputs,
                 ", expected >= 1");
    MemoryEstimate e;
    e.parameters = std::int64_t(sizeof(Scalar)) * (inputs + 1);
    e.gradients = e.parameters;
    return e;
  }

 private:
  void check(const char* where, const View4<const Scalar, memory_space>& x, const Segments& seg,
             std::size_t o0, std::size_t o1, std::size_t o2, std::size_t o3,
             const char* out) const {
    DCHAG_EXPECT(seg.count() >= 1 && seg.total() == static_cast<int>(x.extent(1)), where,
                 "segments cover ", seg.total(), " inputs, expected x.extent(1) = ", x.extent(1));
    for (int j = 0; j < seg.count(); ++j) {
      DCHAG_EXPECT(seg.size(j) == n_ && seg.offsets[j] == j * n_, where, "segment ", j, " holds ",
                   seg.size(j), " inputs, expected n = ", n_, " (linear groups must be equal)");
    }
    DCHAG_EXPECT(o0 == x.extent(0) && o1 == std::size_t(seg.count()) && o2 == x.extent(2) &&
                     o3 == x.extent(3),
                 where, out, " is [", o0, ", ", o1, ", ", o2, ", ", o3,
                 "], expected [B, k, L, D] = [", x.extent(0), ", ", seg.count(), ", ", x.extent(2),
                 ", ", x.extent(3), "]");
  }

  template <class Y>
  void check_mask(const char* where, const Mask& valid, const Y& y) const {
    const std::size_t N = y.extent(1) * std::size_t(n_);
    DCHAG_EXPECT(
        valid.data() == nullptr || (valid.extent(0) == y.extent(0) && valid.extent(1) == N), where,
        "valid is [", valid.extent(0), ", ", valid.extent(1), "], expected [B, k * n] = [",
        y.extent(0), ", ", N, "] or empty");
  }

  // The input index of x's first slot in a chunk call over [n0, n1) with outputs y [B, k, L, D]:
  // 0 when x holds all k*n inputs, n0 when it holds the chunk's.
  template <class Y>
  int first_input(const char* where, const View4<const Scalar, memory_space>& x, int n0, int n1,
                  const Y& y) const {
    const std::size_t N = y.extent(1) * std::size_t(n_);
    DCHAG_EXPECT(0 <= n0 && n0 < n1 && std::size_t(n1) <= N, where, "chunk [", n0, ", ", n1,
                 ") is not a non-empty range inside the k * n = ", N, " inputs");
    const bool all = x.extent(1) == N;
    DCHAG_EXPECT(x.extent(0) == y.extent(0) && (all || x.extent(1) == std::size_t(n1 - n0)) &&
                     x.extent(2) == y.extent(2) && x.extent(3) == y.extent(3),
                 where, "x is [", x.extent(0), ", ", x.extent(1), ", ", x.extent(2), ", ",
                 x.extent(3), "], expected [B, k * n, L, D] = [", y.extent(0), ", ", N, ", ",
                 y.extent(2), ", ", y.extent(3), "] or the chunk's [", y.extent(0), ", ", n1 - n0,
                 ", ", y.extent(2), ", ", y.extent(3), "]");
    return all ? 0 : n0;
  }

  int n_;
  View1<Scalar, memory_space> weight_, bias_, d_weight_, d_bias_;
};

}  // namespace dchag
