#pragma once
/// Training a front end: AdamW (decoupled weight decay, bias correction; Loshchilov & Hutter) over
/// its parameters() and gradients(), and the linear-warmup cosine learning-rate schedule ClimaX
/// trains with. Both run on any execution space. Under MPI, sum the gradients over the data-
/// parallel group first (dchag::sum_gradients, communicator.hpp); every rank then takes the same
/// step on the parameters it holds.
///
/// The update of one element is torch.optim.AdamW's (torch 1.13, single-tensor path), in the
/// parameters' type:
///   p -= lr * weight_decay * p   (only where the parameter decays)
///   m = beta1 * m + (1 - beta1) * g,   v = beta2 * v + (1 - beta2) * g * g
///   p -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
/// with the bias corrections computed in double on the host, as PyTorch does.
///
/// The optimizer state (state()) is a TensorList shaped as the parameters: `adamw.exp_avg.<name>`,
/// `adamw.exp_avg_sq.<name>` and the step count `adamw.step` [1]. It saves and loads through the
/// weights machinery (save_state / load_state here; under MPI the collective save_weights /
/// load_weights of distributed_weights.hpp with replicated_state_names), so a run stops and
/// continues bit for bit.
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/error.hpp>
#include <dchag/tensor.hpp>
#include <dchag/weights.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace dchag {

struct AdamWConfig {
  double lr = 1e-3;  ///< used by step() without a learning rate
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

/// ClimaX's rule: the embeddings and queries do not decay (`var_embed`, `pos_embed`, and the
/// aggregation queries `var_query` / `query`, under any prefix); every other parameter does.
inline bool climax_decays(const std::string& name) {
  const auto dot = name.rfind('.');
  const std::string_view last =
      dot == std::string::npos ? std::string_view(name) : std::string_view(name).substr(dot + 1);
  return !(last == "var_embed" || last == "pos_embed" || last == "var_query" || last == "query");
}

/// Linear warmup from `warmup_start_lr` to `base_lr` over `warmup_steps`, then cosine annealing
/// to `eta_min` at `max_steps` (the closed form of the LinearWarmupCosineAnnealingLR ClimaX
/// uses). lr(step) for step = 0, 1, ...; constant eta_min after max_steps.
struct WarmupCosine {
  double base_lr = 1e-3;
  std::int64_t warmup_steps = 0;
  std::int64_t max_steps = 1;
  double warmup_start_lr = 0.0;
  double eta_min = 0.0;

  void validate(const char* where) const {
    DCHAG_EXPECT(warmup_steps >= 0, where, "warmup_steps is ", warmup_steps, ", expected >= 0");
    DCHAG_EXPECT(max_steps > warmup_steps, where, "max_steps is ", max_steps,
                 ", expected > warmup_steps = ", warmup_steps);
    DCHAG_EXPECT(std::isfinite(base_lr) && base_lr >= 0, where, "base_lr is ", base_lr,
                 ", expected a finite value >= 0");
  }
  double operator()(std::int64_t step) const {
    validate("dchag::WarmupCosine");
    DCHAG_EXPECT(step >= 0, "dchag::WarmupCosine", "step is ", step, ", expected >= 0");
    if (step < warmup_steps) {
      const double span = double(warmup_steps > 1 ? warmup_steps - 1 : 1);
      return warmup_start_lr + double(step) * (base_lr - warmup_start_lr) / span;
    }
    if (step >= max_steps) return eta_min;
    const double pi = 3.14159265358979323846;
    return eta_min + 0.5 * (base_lr - eta_min) *
                         (1.0 + std::cos(pi * double(step - warmup_steps) /
                                         double(max_steps - warmup_steps)));
  }
};

namespace detail {

struct AdamWScalars {
  double decay_factor;  // 1 - lr * weight_decay (1 where the parameter does not decay)
  double beta1, beta2;
  double step_size;   // lr / (1 - beta1^t)
  double bias2_sqrt;  // sqrt(1 - beta2^t)
  double eps;
};

// One AdamW step on a piece: p, g, m, v of the same length.
template <class ExecSpace, class Scalar, class MemSpace>
void adamw_update(const ExecSpace& exec, const Unmanaged1<Scalar, MemSpace>& p,
                  const Unmanaged1<Scalar, MemSpace>& g, const Unmanaged1<Scalar, MemSpace>& m,
                  const Unmanaged1<Scalar, MemSpace>& v, const AdamWScalars& c) {
  const Scalar decay = Scalar(c.decay_factor), b1 = Scalar(c.beta1), b2 = Scalar(c.beta2);
  const Scalar one_b1 = Scalar(1.0 - c.beta1), one_b2 = Scalar(1.0 - c.beta2);
  const Scalar step_size = Scalar(c.step_size), bias2_sqrt = Scalar(c.bias2_sqrt);
  const Scalar eps = Scalar(c.eps);
  Kokkos::parallel_for(
      "dchag::adamw::update", Kokkos::RangePolicy<ExecSpace>(exec, 0, std::int64_t(p.extent(0))),
      KOKKOS_LAMBDA(const std::int64_t i) {
        const Scalar gi = g(i);
        const Scalar mi = m(i) * b1 + one_b1 * gi;
        const Scalar vi = v(i) * b2 + one_b2 * gi * gi;
        m(i) = mi;
        v(i) = vi;
        const Scalar denom = detail::sqrt(vi) / bias2_sqrt + eps;
        p(i) = p(i) * decay - step_size * (mi / denom);
      });
}

}  // namespace detail

template <class ExecSpace, class Scalar = float>
class AdamW {
 public:
  using memory_space = typename ExecSpace::memory_space;
  using List = TensorList<Scalar, memory_space>;

  /// Over `params` and the matching `grads` (a front end's parameters() and gradients(): the same
  /// names, shapes and pieces, in the same order). `decays(name)` says which parameters decay.
  AdamW(const ExecSpace& exec, List params, List grads, AdamWConfig cfg = {},
        std::function<bool(const std::string&)> decays = climax_decays)
      : params_(std::move(params)), grads_(std::move(grads)), cfg_(cfg) {
    constexpr const char* where = "dchag::AdamW";
    DCHAG_EXPECT(cfg.beta1 >= 0 && cfg.beta1 < 1, where, "beta1 is ", cfg.beta1,
                 ", expected 0 <= beta1 < 1");
    DCHAG_EXPECT(cfg.beta2 >= 0 && cfg.beta2 < 1, where, "beta2 is ", cfg.beta2,
                 ", expected 0 <= beta2 < 1");
    DCHAG_EXPECT(cfg.eps > 0, where, "eps is ", cfg.eps, ", expected > 0");
    DCHAG_EXPECT(cfg.weight_decay >= 0, where, "weight_decay is ", cfg.weight_decay,
                 ", expected >= 0");
    DCHAG_EXPECT(params_.size() == grads_.size(), where, "params has ", params_.size(),
                 " tensors and grads ", grads_.size(), ", expected the same");
    for (std::size_t t = 0; t < params_.size(); ++t) {
      const auto &p = params_[t], &g = grads_[t];
      DCHAG_EXPECT(p.name == g.name && p.shape == g.shape && p.pieces.size() == g.pieces.size() &&
                       p.transposed_rows == g.transposed_rows,
                   where, "grads[", t, "] (", g.name, ") does not match params[", t, "] (", p.name,
                   "): expected the same name, shape and pieces");
      for (std::size_t k = 0; k < p.pieces.size(); ++k)
        DCHAG_EXPECT(p.pieces[k].offset == g.pieces[k].offset &&
                         p.pieces[k].values.extent(0) == g.pieces[k].values.extent(0),
                     where, "gradient piece ", k, " of ", p.name,
                     " does not match the parameter's");
      decays_.push_back(decays(p.name));
      moments_.push_back(allocate_like(p, "adamw.exp_avg."));
      moments_.push_back(allocate_like(p, "adamw.exp_avg_sq."));
    }
    step_view_ = View1<Scalar, memory_space>("dchag::adamw::step", 1);
    exec.fence();
  }

  const AdamWConfig& config() const { return cfg_; }
  /// Steps taken (the t of the bias corrections is steps() + 1 in the next step).
  std::int64_t steps() const { return steps_; }
  bool decays(std::size_t tensor) const { return decays_.at(tensor); }

  /// One step with the configured learning rate, or with `lr` (a schedule's value).
  void step(const ExecSpace& exec) { step(exec, cfg_.lr); }
  void step(const ExecSpace& exec, double lr) {
    detail::ScopedRegion region("dchag::AdamW::step");
    DCHAG_EXPECT(std::isfinite(lr) && lr >= 0, "dchag::AdamW::step", "lr is ", lr,
                 ", expected a finite value >= 0");
    const double t = double(steps_ + 1);
    detail::AdamWScalars c{1.0,
                           cfg_.beta1,
                           cfg_.beta2,
                           lr / (1.0 - std::pow(cfg_.beta1, t)),
                           std::sqrt(1.0 - std::pow(cfg_.beta2, t)),
                           cfg_.eps};
    for (std::size_t i = 0; i < params_.size(); ++i) {
      c.decay_factor = decays_[i] ? 1.0 - lr * cfg_.weight_decay : 1.0;
      const auto &p = params_[i], &g = grads_[i], &m = moments_[2 * i].tensor,
                 &v = moments_[2 * i + 1].tensor;
      for (std::size_t k = 0; k < p.pieces.size(); ++k)
        detail::adamw_update(exec, p.pieces[k].values, g.pieces[k].values, m.pieces[k].values,
                             v.pieces[k].values, c);
    }
    ++steps_;
  }

  /// The state as a TensorList (views of the optimizer's own memory): `adamw.step` [1], then per
  /// parameter `adamw.exp_avg.<name>` and `adamw.exp_avg_sq.<name>` with its shape and pieces.
  /// `adamw.step` holds steps() after sync_step_to_state() and is read back by
  /// sync_step_from_state() (save_state / load_state do both).
  List state() const {
    List list;
    list.push_back(detail::whole<Scalar, memory_space>("adamw.step", {1}, step_view_));
    for (const auto& m : moments_) list.push_back(m.tensor);
    return list;
  }
  /// The state names of the parameters every rank holds the same copy of (the distributed
  /// front end's replicated_parameters()), for the collective save_weights.
  static std::vector<std::string> replicated_state_names(const List& replicated_params) {
    std::vector<std::string> names{"adamw.step"};
    for (const auto& t : replicated_params) {
      names.push_back("adamw.exp_avg." + t.name);
      names.push_back("adamw.exp_avg_sq." + t.name);
    }
    return names;
  }

  /// Writes steps() into the `adamw.step` tensor (exact while steps() < 2^24 in float).
  void sync_step_to_state(const ExecSpace& exec) {
    constexpr double exact = Scalar(1) / std::numeric_limits<Scalar>::epsilon() * 2;
    DCHAG_EXPECT(double(steps_) < exact, "dchag::AdamW", "steps() is ", steps_, ", expected below ",
                 exact, " to be held exactly by the state tensor");
    Kokkos::deep_copy(exec, step_view_, Scalar(steps_));
    exec.fence();
  }
  /// Reads steps() back from the `adamw.step` tensor (after a load into state()).
  void sync_step_from_state() {
    Scalar s{};
    Kokkos::deep_copy(s, Kokkos::subview(step_view_, 0));
    DCHAG_EXPECT(s >= 0 && s == std::floor(s), "dchag::AdamW", "the state's adamw.step is ",
                 double(s), ", expected a whole number >= 0");
    steps_ = std::int64_t(s);
  }

  /// Single process: saves the state to a safetensors file / loads it back (the parameters are
  /// saved separately, with save_weights).
  void save_state(const ExecSpace& exec, const std::string& path) {
    sync_step_to_state(exec);
    save_weights(path, state());
  }
  void load_state(const std::string& path) {
    load_weights(path, state());
    sync_step_from_state();
  }

 private:
  struct Owned {
    NamedTensor<Scalar, memory_space> tensor;          // views into `storage`
    std::vector<View1<Scalar, memory_space>> storage;  // one per piece, zero-initialized
  };
  static Owned allocate_like(const NamedTensor<Scalar, memory_space>& p,
                             const std::string& prefix) {
    Owned o;
    o.tensor.name = prefix + p.name;
    o.tensor.shape = p.shape;
    o.tensor.transposed_rows = p.transposed_rows;
    for (const auto& piece : p.pieces) {
      o.storage.emplace_back("dchag::adamw::" + prefix, piece.values.extent(0));
      o.tensor.pieces.push_back(
          {piece.offset,
           Unmanaged1<Scalar, memory_space>(o.storage.back().data(), piece.values.extent(0))});
    }
    return o;
  }

  List params_, grads_;
  AdamWConfig cfg_;
  std::vector<bool> decays_;
  std::vector<Owned> moments_;  // exp_avg, exp_avg_sq of each parameter
  View1<Scalar, memory_space> step_view_;
  std::int64_t steps_ = 0;
};

}  // namespace dchag
