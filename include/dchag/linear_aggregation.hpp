#pragma once
/// Learned linear channel sum (D-CHAG-L, DESIGN 3.3): every segment of n inputs folds to
///   y[b, j, l, :] = sum_i w_i x[b, offset_j + i, l, :] + beta,
/// with one weight per input position inside a segment (shared by all segments) and one scalar
/// bias. Segments must all hold n inputs.
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

  /// y [B, k, L, D] from x [B, k*n, L, D] split into k segments of n inputs.
  void forward(const ExecSpace& exec, const View4<const Scalar, memory_space>& x,
               const Segments& seg, const View4<Scalar, memory_space>& y) const {
    detail::ScopedRegion region("dchag::LinearAggregation::forward");
    check("dchag::LinearAggregation::forward", x, seg, y.extent(0), y.extent(1), y.extent(2),
          y.extent(3), "y");
    const int n = n_, k = seg.count(), L = x.extent(2), D = x.extent(3);
    auto w = weight_;
    auto beta = bias_;
    detail::for_each_row(
        exec, "dchag::linear::forward", std::int64_t(y.extent(0)) * k * L, D,
        KOKKOS_LAMBDA(const std::int64_t r, const int d) {
          const int l = static_cast<int>(r % L);
          const int j = static_cast<int>((r / L) % k);
          const int b = static_cast<int>(r / (std::int64_t(L) * k));
          Scalar acc = beta(0);
          for (int i = 0; i < n; ++i) acc += w(i) * x(b, j * n + i, l, d);
          y(b, j, l, d) = acc;
        });
  }

  /// Accumulates dw, dbeta and writes dx (overwritten) from the forward's x and dy.
  void backward(const ExecSpace& exec, const View4<const Scalar, memory_space>& x,
                const Segments& seg, const View4<const Scalar, memory_space>& dy,
                const View4<Scalar, memory_space>& dx) const {
    detail::ScopedRegion region("dchag::LinearAggregation::backward");
    constexpr const char* where = "dchag::LinearAggregation::backward";
    check(where, x, seg, dy.extent(0), dy.extent(1), dy.extent(2), dy.extent(3), "dy");
    DCHAG_EXPECT(dx.extent(0) == x.extent(0) && dx.extent(1) == x.extent(1) &&
                     dx.extent(2) == x.extent(2) && dx.extent(3) == x.extent(3),
                 where, "dx is [", dx.extent(0), ", ", dx.extent(1), ", ", dx.extent(2), ", ",
                 dx.extent(3), "], expected the shape of x");
    const int n = n_, k = seg.count(), L = x.extent(2), D = x.extent(3);
    const std::int64_t B = x.extent(0);
    auto w = weight_;
    detail::for_each_row(
        exec, "dchag::linear::input_grad", B * n * k * L, D,
        KOKKOS_LAMBDA(const std::int64_t r, const int d) {
          const int l = static_cast<int>(r % L);
          const int c = static_cast<int>((r / L) % (n * k));
          const int b = static_cast<int>(r / (std::int64_t(L) * n * k));
          dx(b, c, l, d) = w(c % n) * dy(b, c / n, l, d);
        });
    // dw_i = sum over (b, j, l) of dy[b, j, l] . x[b, j*n + i, l]: one team per weight.
    using Team = Kokkos::TeamPolicy<ExecSpace>;
    const std::int64_t rows = B * k * L;
    auto dw = d_weight_;
    Kokkos::parallel_for(
        "dchag::linear::weight_grad", Team(exec, n, Kokkos::AUTO),
        KOKKOS_LAMBDA(const typename Team::member_type& team) {
          const int i = team.league_rank();
          Scalar sum = 0;
          Kokkos::parallel_reduce(
              Kokkos::TeamThreadRange(team, rows),
              [&](const std::int64_t r, Scalar& acc) {
                const int l = static_cast<int>(r % L);
                const int j = static_cast<int>((r / L) % k);
                const int b = static_cast<int>(r / (std::int64_t(L) * k));
                acc += detail::lane_dot(&dy(b, j, l, 0), &x(b, j * n + i, l, 0), D);
              },
              sum);
          Kokkos::single(Kokkos::PerTeam(team), [&]() { dw(i) += sum; });
        });
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

  int n_;
  View1<Scalar, memory_space> weight_, bias_, d_weight_, d_bias_;
};

}  // namespace dchag
