#pragma once
/// ClimaX's lead-time embedding (DESIGN 3.11), the optional last stage of a front end:
///   out[b, l, :] += W * t[b] + bias,   W, bias [D],
/// with t[b] the lead time of sample b as the caller scales it (ClimaX passes hours / 100). With
/// it, a front end's output is the input of ClimaX's first transformer block. Names:
/// `lead_time_embed.weight` [D, 1], `lead_time_embed.bias` [D] (nn.Linear(1, D)); initialised as
/// ClimaX's _init_weights does for every Linear: trunc-normal 0.02 weight, zero bias.
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/detail/loops.hpp>
#include <dchag/detail/sizes.hpp>
#include <dchag/detail/workspace.hpp>
#include <dchag/error.hpp>
#include <dchag/init.hpp>
#include <dchag/tensor.hpp>

#include <cstdint>
#include <optional>

namespace dchag {

template <class ExecSpace, class Scalar = float>
class LeadTimeEmbedding {
 public:
  using execution_space = ExecSpace;
  using memory_space = typename ExecSpace::memory_space;

  LeadTimeEmbedding(const ExecSpace& exec, int dim, std::uint64_t seed = 0)
      : weight_("dchag::lead_time::weight", checked_dim("dchag::LeadTimeEmbedding", dim)),
        bias_("dchag::lead_time::bias", dim),
        d_weight_("dchag::lead_time::d_weight", dim),
        d_bias_("dchag::lead_time::d_bias", dim) {
    init_trunc_normal(weight_, 0.02, seed, "lead_time_embed.weight");
    exec.fence();
  }

  int dim() const { return static_cast<int>(weight_.extent(0)); }

  /// out [B, L, D] += W * lead_times[b] + bias, lead_times [B].
  void forward(const ExecSpace& exec, const View1<const Scalar, memory_space>& lead_times,
               const View3<Scalar, memory_space>& out) const {
    detail::ScopedRegion region("dchag::LeadTimeEmbedding::forward");
    check("dchag::LeadTimeEmbedding::forward", lead_times, out.extent(0), out.extent(2));
    const int L = static_cast<int>(out.extent(1));  // the front ends bound L by INT_MAX
    auto w = weight_;
    auto bias = bias_;
    detail::for_each_row(
        exec, "dchag::lead_time::forward", std::int64_t(out.extent(0)) * L, dim(),
        KOKKOS_LAMBDA(const std::int64_t r, const int d) {
          out(r / L, r % L, d) += w(d) * lead_times(r / L) + bias(d);
        });
  }

  /// d_W += sum over b, l of d_out[b, l, :] * lead_times[b]; d_bias += sum of d_out.
  void backward(const ExecSpace& exec, const View1<const Scalar, memory_space>& lead_times,
                const View3<const Scalar, memory_space>& d_out) {
    detail::ScopedRegion region("dchag::LeadTimeEmbedding::backward");
    check("dchag::LeadTimeEmbedding::backward", lead_times, d_out.extent(0), d_out.extent(2));
    const std::int64_t B = d_out.extent(0), L = d_out.extent(1);
    auto dw = d_weight_;
    auto db = d_bias_;
    detail::for_each_row(
        exec, "dchag::lead_time::backward", 1, dim(),
        KOKKOS_LAMBDA(const std::int64_t, const int d) {
          Scalar sw = 0, sb = 0;
          for (std::int64_t b = 0; b < B; ++b) {
            Scalar s = 0;
            for (std::int64_t l = 0; l < L; ++l) s += d_out(b, l, d);
            sw += s * lead_times(b);
            sb += s;
          }
          dw(d) += sw;
          db(d) += sb;
        });
  }

  void zero_gradients(const ExecSpace& exec) {
    Kokkos::deep_copy(exec, d_weight_, Scalar(0));
    Kokkos::deep_copy(exec, d_bias_, Scalar(0));
  }
  TensorList<Scalar, memory_space> parameters() const { return named(weight_, bias_); }
  TensorList<Scalar, memory_space> gradients() const { return named(d_weight_, d_bias_); }

  /// Parameters and gradients, and the B lead times a front end keeps for its backward.
  static MemoryEstimate estimate(int dim, std::int64_t B) {
    constexpr const char* where = "dchag::LeadTimeEmbedding::estimate";
    checked_dim(where, dim);
    DCHAG_EXPECT(B >= 1, where, "B is ", B, ", expected >= 1");
    MemoryEstimate e;
    e.parameters = 2 * std::int64_t(sizeof(Scalar)) * dim;
    e.gradients = e.parameters;
    e.activations = std::int64_t(sizeof(Scalar)) * B;
    return e;
  }

 private:
  static int checked_dim(const char* where, int dim) {
    DCHAG_EXPECT(dim >= 1, where, "dim is ", dim, ", expected >= 1");
    return dim;
  }
  void check(const char* where, const View1<const Scalar, memory_space>& lead_times, std::size_t B,
             std::size_t D) const {
    DCHAG_EXPECT(D == weight_.extent(0), where, "tokens are [B, L, ", D,
                 "], expected D = ", weight_.extent(0));
    DCHAG_EXPECT(lead_times.extent(0) == B, where, "lead_times.extent(0) is ", lead_times.extent(0),
                 ", expected B = ", B);
  }
  TensorList<Scalar, memory_space> named(const View1<Scalar, memory_space>& w,
                                         const View1<Scalar, memory_space>& b) const {
    const std::int64_t D = dim();
    return {detail::whole<Scalar, memory_space>("lead_time_embed.weight", {D, 1}, w),
            detail::whole<Scalar, memory_space>("lead_time_embed.bias", {D}, b)};
  }

  View1<Scalar, memory_space> weight_, bias_, d_weight_, d_bias_;
};

namespace detail {

/// A front end's optional lead-time stage (FrontEndConfig::lead_time): the module, and the lead
/// times of the last forward, copied for its backward.
template <class ExecSpace, class Scalar>
class LeadTimeStage {
 public:
  using memory_space = typename ExecSpace::memory_space;
  using Times = View1<const Scalar, memory_space>;

  LeadTimeStage(const ExecSpace& exec, bool enabled, int dim, std::uint64_t seed) {
    if (enabled) module_.emplace(exec, dim, seed);
  }
  bool enabled() const { return module_.has_value(); }

  /// Refuses lead times where the configuration has none, none where it has them, and other
  /// than one per sample of a batch of B.
  void check(const char* where, const Times* lead_times, std::size_t B) const {
    DCHAG_EXPECT(enabled() || lead_times == nullptr, where,
                 "lead_times given, expected none: config.lead_time is false");
    DCHAG_EXPECT(!enabled() || lead_times != nullptr, where,
                 "no lead_times given, expected [B] values: config.lead_time is true");
    DCHAG_EXPECT(!lead_times || lead_times->extent(0) == B, where, "lead_times.extent(0) is ",
                 lead_times ? lead_times->extent(0) : 0, ", expected B = ", B);
  }
  /// out [B, L, N_q * D]: every one of the N_q tokens of a patch gets the sample's embedding.
  void forward(const ExecSpace& exec, const Times* lead_times,
               const View3<Scalar, memory_space>& out) {
    if (!module_) return;
    ensure_view(saved_, "dchag::lead_time::saved", lead_times->extent(0));
    Kokkos::deep_copy(exec, saved_, *lead_times);
    module_->forward(exec, saved_, tokens(out));
  }
  void backward(const ExecSpace& exec, const View3<const Scalar, memory_space>& d_out) {
    if (module_) module_->backward(exec, saved_, tokens(d_out));
  }
  void zero_gradients(const ExecSpace& exec) {
    if (module_) module_->zero_gradients(exec);
  }
  void append_to(TensorList<Scalar, memory_space>& list, bool grads) const {
    if (!module_) return;
    auto more = grads ? module_->gradients() : module_->parameters();
    list.insert(list.end(), more.begin(), more.end());
  }
  static MemoryEstimate estimate(bool enabled, int dim, std::int64_t B) {
    return enabled ? LeadTimeEmbedding<ExecSpace, Scalar>::estimate(dim, B) : MemoryEstimate{};
  }

 private:
  // [B, L, N_q * D] as the [B, L * N_q, D] tokens it holds.
  template <class V>
  V tokens(const V& v) const {
    const std::size_t D = std::size_t(module_->dim());
    return V(v.data(), v.extent(0), v.extent(1) * (v.extent(2) / D), D);
  }

  std::optional<LeadTimeEmbedding<ExecSpace, Scalar>> module_;
  View1<Scalar, memory_space> saved_;
};

}  // namespace detail
}  // namespace dchag
