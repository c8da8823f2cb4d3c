#pragma once
/// Single-query cross-attention ("attention pooling", DESIGN 3.2): folds the N tokens of every
/// patch position into one token with a learned query. Two strategies give the same result:
/// `materialized` forms K and V like PyTorch; `pooled` (the default) scores tokens against
/// u_h = Wk_h^T q_h / sqrt(hd), pools them per head and projects once.
///
/// Tokens x are [B, N, L, D] (LayoutRight). The N inputs may be split into k contiguous
/// `Segments`, each folded on its own: the output is then [B, k, L, D] (k = 1: [B, L, D]).
/// Forward saves what backward needs in a `Saved` object owned by the caller, so one module can be
/// applied several times (the local tree of DESIGN 3.3 shares one module across levels).
#include <dchag/config.hpp>
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/detail/loops.hpp>
#include <dchag/detail/workspace.hpp>
#include <dchag/error.hpp>
#include <dchag/init.hpp>
#include <dchag/tensor.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace dchag {

/// k contiguous groups of N inputs: group j is [offsets[j], offsets[j+1]).
struct Segments {
  std::vector<int> offsets;

  static Segments whole(int n) { return {{0, n}}; }
  /// numpy.array_split: the first n % k groups get one extra input.
  static Segments split(int n, int k) {
    DCHAG_EXPECT(k >= 1 && k <= n, "dchag::Segments::split", "k is ", k,
                 ", expected 1 <= k <= n = ", n);
    Segments s{{0}};
    for (int j = 0; j < k; ++j) s.offsets.push_back(s.offsets.back() + n / k + (j < n % k ? 1 : 0));
    return s;
  }
  int count() const { return static_cast<int>(offsets.size()) - 1; }
  int size(int j) const { return offsets[j + 1] - offsets[j]; }
  int total() const { return offsets.back(); }
};

/// Reduces a contiguous device buffer in place over the ranks of a channel group. The exact
/// distributed flat aggregation (DESIGN 3.7) runs the pooled kernels with one of these, keeping
/// MPI out of this header; without one (nullptr) the reduction is over this process only.
template <class Scalar, class MemSpace>
struct GroupReduce {
  virtual ~GroupReduce() = default;
  virtual void max(const Unmanaged1<Scalar, MemSpace>& values) const = 0;
  virtual void sum(const Unmanaged1<Scalar, MemSpace>& values) const = 0;
};

struct AttentionConfig {
  int dim = 0;
  int heads = 1;
  Convention convention = Convention::climax;
  Strategy strategy = Strategy::pooled;
};

template <class ExecSpace, class Scalar = float>
class CrossAttention {
 public:
  using execution_space = ExecSpace;
  using memory_space = typename ExecSpace::memory_space;
  using scalar_type = Scalar;
  using X4 = View4<const Scalar, memory_space>;

  /// What one forward keeps for its backward.
  struct Saved {
    int B = 0, N = 0, L = 0, k = 0;
    View1<int, memory_space> offsets;              // [k+1]
    View1<int, memory_space> segment;              // [N]: segment of each input
    View2<Scalar, memory_space> a;                 // [B*N*L, heads] softmax weights
    View3<Scalar, memory_space> z;                 // pooled: [heads, P, D] attention-pooled tokens
    View2<Scalar, memory_space> kmat;              // materialized: [B*N*L, D]
    View2<Scalar, memory_space> vmat;              // materialized: [B*N*L, D]
    View2<Scalar, memory_space> ocat;              // [P, D] heads' outputs before out-projection
    View2<Scalar, memory_space> run_max, run_sum;  // pooled: [P, heads] softmax max and sum
    std::vector<int> host_offsets;
  };

  /// Allocates and initialises (ClimaX: zero query, xavier-uniform in_proj for the climax
  /// convention, trunc-normal 0.02 otherwise, zero biases) a module named `name` (the seed
  /// stream of its parameters).
  CrossAttention(const ExecSpace& exec, AttentionConfig cfg, std::uint64_t seed = 0,
                 std::string name = "var_agg")
      : cfg_(cfg), name_(std::move(name)) {
    constexpr const char* where = "dchag::CrossAttention";
    DCHAG_EXPECT(cfg.dim >= 1, where, "dim is ", cfg.dim, ", expected >= 1");
    DCHAG_EXPECT(cfg.heads >= 1 && cfg.dim % cfg.heads == 0, where, "heads is ", cfg.heads,
                 ", expected a divisor of dim = ", cfg.dim);
    const int D = cfg.dim, nh = cfg.heads;
    query_ = View1<Scalar, memory_space>("dchag::attention::query", D);
    w_in_ = View3<Scalar, memory_space>("dchag::attention::w_in", 3, D, D);
    b_in_ = View2<Scalar, memory_space>("dchag::attention::b_in", 3, D);
    w_out_ = View2<Scalar, memory_space>("dchag::attention::w_out", D, D);
    b_out_ = View1<Scalar, memory_space>("dchag::attention::b_out", D);
    d_query_ = View1<Scalar, memory_space>("dchag::attention::d_query", D);
    d_w_in_ = View3<Scalar, memory_space>("dchag::attention::d_w_in", 3, D, D);
    d_b_in_ = View2<Scalar, memory_space>("dchag::attention::d_b_in", 3, D);
    d_w_out_ = View2<Scalar, memory_space>("dchag::attention::d_w_out", D, D);
    d_b_out_ = View1<Scalar, memory_space>("dchag::attention::d_b_out", D);
    head_end_ = nh;
    q_ = View1<Scalar, memory_space>("dchag::attention::q", D);
    u_ = View2<Scalar, memory_space>("dchag::attention::u", nh, D);
    dq_ = View1<Scalar, memory_space>("dchag::attention::dq", D);
    du_ = View2<Scalar, memory_space>("dchag::attention::du", nh, D);
    if (cfg.convention == Convention::climax) {
      init_uniform(w_in_, std::sqrt(6.0 / (4.0 * D)), seed, name_ + ".in_proj_weight");
    } else {
      init_trunc_normal(w_in_, 0.02, seed, name_ + ".in_proj_weight");
    }
    init_trunc_normal(w_out_, 0.02, seed, name_ + ".out_proj.weight");
    exec.fence();
  }

  const AttentionConfig& config() const { return cfg_; }
  int dim() const { return cfg_.dim; }
  int heads() const { return cfg_.heads; }
  void set_strategy(Strategy s) { cfg_.strategy = s; }

  /// Tensor-parallel share (the paper's baseline, DESIGN 3.6): this module computes heads
  /// [begin, end) only (materialized strategy), adds the output bias only if `out_bias`, and its
  /// output and gradients are this rank's share, to be summed over the group.
  void set_head_range(int begin, int end, bool out_bias) {
    constexpr const char* where = "dchag::CrossAttention::set_head_range";
    DCHAG_EXPECT(0 <= begin && begin < end && end <= cfg_.heads, where, "heads [", begin, ", ", end,
                 ") is not a non-empty range inside [0, ", cfg_.heads, ")");
    DCHAG_EXPECT(cfg_.strategy == Strategy::materialized || (begin == 0 && end == cfg_.heads),
                 where, "a head share needs the materialized strategy, strategy is ",
                 to_string(cfg_.strategy));
    head_begin_ = begin;
    head_end_ = end;
    out_bias_ = out_bias;
  }

  /// out [B, k, L, D] = the k segments of x [B, N, L, D] folded; saves for backward into `saved`.
  /// With `group`, x holds this rank's share of the N inputs of one segment and the softmax and
  /// pooling run over the inputs of every rank (pooled strategy, exact; DESIGN 3.7).
  void forward(const ExecSpace& exec, const X4& x, const Segments& seg,
               const View4<Scalar, memory_space>& out, Saved& saved,
               const GroupReduce<Scalar, memory_space>* group = nullptr) {
    detail::ScopedRegion region("dchag::CrossAttention::forward");
    constexpr const char* where = "dchag::CrossAttention::forward";
    check_shapes(where, x, seg, out.extent(0), out.extent(1), out.extent(2), out.extent(3), "out");
    check_group(where, seg, group);
    prepare(exec, x, seg, saved);
    compute_query(exec);
    if (cfg_.strategy == Strategy::pooled) {
      forward_pooled(exec, x, saved, group);
    } else {
      forward_materialized(exec, x, saved);
    }
    project_out(exec, saved, out);
  }

  /// Accumulates parameter gradients and writes dx [B, N, L, D] (overwritten), given the x and
  /// `saved` of the matching forward and d_out [B, k, L, D].
  /// With `group`: the backward of a group forward. d_out must be the same on every rank; dx is
  /// this rank's share and the parameter gradients come out identical on every rank.
  void backward(const ExecSpace& exec, const X4& x, const Saved& saved,
                const View4<const Scalar, memory_space>& d_out,
                const View4<Scalar, memory_space>& dx,
                const GroupReduce<Scalar, memory_space>* group = nullptr) {
    detail::ScopedRegion region("dchag::CrossAttention::backward");
    constexpr const char* where = "dchag::CrossAttention::backward";
    DCHAG_EXPECT(saved.k > 0, where, "saved state is empty, expected the state of a forward");
    const Segments seg{saved.host_offsets};
    check_group(where, seg, group);
    check_shapes(where, x, seg, d_out.extent(0), d_out.extent(1), d_out.extent(2), d_out.extent(3),
                 "d_out");
    DCHAG_EXPECT(x.extent(0) == std::size_t(saved.B) && x.extent(1) == std::size_t(saved.N) &&
                     x.extent(2) == std::size_t(saved.L),
                 where, "x is not the input of the saved forward");
    DCHAG_EXPECT(dx.extent(0) == x.extent(0) && dx.extent(1) == x.extent(1) &&
                     dx.extent(2) == x.extent(2) && dx.extent(3) == x.extent(3),
                 where, "dx is [", dx.extent(0), ", ", dx.extent(1), ", ", dx.extent(2), ", ",
                 dx.extent(3), "], expected the shape of x");
    back_project_out(exec, saved, d_out);
    if (cfg_.strategy == Strategy::pooled) {
      backward_pooled(exec, x, saved, dx, group);
    } else {
      backward_materialized(exec, x, saved, dx);
    }
    back_query(exec);
  }

  /// Convenience for one application over all N inputs: out [B, L, D].
  void forward(const ExecSpace& exec, const X4& x, const View3<Scalar, memory_space>& out) {
    forward(exec, x, Segments::whole(static_cast<int>(x.extent(1))), as4(out), own_saved_);
  }
  void backward(const ExecSpace& exec, const X4& x, const View3<const Scalar, memory_space>& d_out,
                const View4<Scalar, memory_space>& dx) {
    backward(exec, x, own_saved_, as4(d_out), dx);
  }

  /// Streaming forward of one segment (k = 1) for callers that produce tokens in chunks (the
  /// fused flat front end, DESIGN 3.8): stream_begin, then stream_chunk for consecutive input
  /// ranges [n0, n1) covering [0, N) once filled in x, then stream_end. Pooled strategy only.
  /// Online softmax keeps only a running max and sum per position and head, so each chunk of
  /// tokens is read once, while still in cache. Same result and Saved state as forward.
  void stream_begin(const ExecSpace& exec, const X4& x, Saved& saved) {
    detail::ScopedRegion region("dchag::CrossAttention::stream_begin");
    constexpr const char* where = "dchag::CrossAttention::stream_begin";
    DCHAG_EXPECT(cfg_.strategy == Strategy::pooled, where, "strategy is ", to_string(cfg_.strategy),
                 ", expected pooled");
    const Segments seg = Segments::whole(static_cast<int>(x.extent(1)));
    check_shapes(where, x, seg, x.extent(0), 1, x.extent(2), x.extent(3), "out");
    prepare(exec, x, seg, saved);
    Kokkos::deep_copy(exec, saved.run_sum, Scalar(0));
    Kokkos::deep_copy(exec, saved.z, Scalar(0));
    compute_query(exec);
    streamed_ = 0;
  }

  void stream_chunk(const ExecSpace& exec, const X4& x, int n0, int n1, Saved& s) {
    detail::ScopedRegion region("dchag::CrossAttention::stream_chunk");
    DCHAG_EXPECT(n0 == streamed_ && n1 > n0 && n1 <= s.N, "dchag::CrossAttention::stream_chunk",
                 "chunk [", n0, ", ", n1, ") does not continue the stream at ", streamed_,
                 " of N = ", s.N);
    DCHAG_EXPECT(x.extent(0) == std::size_t(s.B) && x.extent(1) == std::size_t(s.N) &&
                     x.extent(2) == std::size_t(s.L) && x.extent(3) == std::size_t(cfg_.dim),
                 "dchag::CrossAttention::stream_chunk", "x is [", x.extent(0), ", ", x.extent(1),
                 ", ", x.extent(2), ", ", x.extent(3),
                 "], expected the view given to stream_begin [", s.B, ", ", s.N, ", ", s.L, ", ",
                 cfg_.dim, "]");
    streamed_ = n1;
    const int N = s.N, L = s.L, D = cfg_.dim, nh = cfg_.heads;
    const std::size_t M = std::size_t(s.B) * N * L;
    auto x2 = as2(x.data(), M, D);
    auto u = u_;
    auto a = s.a;
    auto z = s.z;
    auto run_max = s.run_max;
    auto run_sum = s.run_sum;
    constexpr bool on_host =
        Kokkos::SpaceAccessibility<Kokkos::HostSpace, memory_space>::accessible;
    V3 e_chunk = workspace3(e_chunk_, "dchag::attention::chunk_weights", std::size_t(s.B) * L,
                            std::size_t(n1 - n0), std::size_t(nh));
    // The host branch below is written for one thread per team (each team member would redo
    // the whole position and race on z); Kokkos does not promise that AUTO means one on every
    // host backend, so ask for it.
    const Team policy = on_host ? Team(exec, s.B * L, 1) : Team(exec, s.B * L, Kokkos::AUTO);
    Kokkos::parallel_for(
        "dchag::attention::stream_pool", policy, KOKKOS_LAMBDA(const Member& team) {
          const int pos = team.league_rank();
          const std::int64_t row0 = std::int64_t(pos / L) * N * L + pos % L;
          // Scores of this chunk while its tokens are in cache: s[row, h] = x[row] . u_h.
          for (int n = n0; n < n1; ++n) {
            const std::int64_t row = row0 + std::int64_t(n) * L;
            for (int h = 0; h < nh; ++h) {
              if constexpr (on_host) {
                a(row, h) = detail::lane_dot(&x2(row, 0), &u(h, 0), D);
              } else {
                const Scalar sc = detail::team_dot(team, &x2(row, 0), &u(h, 0), D);
                Kokkos::single(Kokkos::PerTeam(team), [&]() { a(row, h) = sc; });
              }
            }
          }
          team.team_barrier();
          // Online softmax: rescale what was pooled so far to the new running max, then add.
          for (int h = 0; h < nh; ++h) {
            const bool first = n0 == 0;
            Scalar mx = first ? a(row0 + std::int64_t(n0) * L, h) : run_max(pos, h);
            for (int n = n0; n < n1; ++n) mx = detail::max(mx, a(row0 + std::int64_t(n) * L, h));
            const Scalar rescale = first ? Scalar(0) : detail::exp(run_max(pos, h) - mx);
            Scalar* zh = &z(h, pos, 0);
            Scalar sum = first ? Scalar(0) : run_sum(pos, h) * rescale;
            if constexpr (on_host) {
              // One lane: the weights first, then z in blocks of 16 values held in registers
              // across the chunk's tokens (one store per block instead of one per token).
              Scalar* e = &e_chunk(pos, 0, 0);
              for (int n = n0; n < n1; ++n) {
                e[(n - n0) * nh + h] = detail::exp(a(row0 + std::int64_t(n) * L, h) - mx);
                sum += e[(n - n0) * nh + h];
              }
              constexpr int block = 32;
              int d0 = 0;
              for (; d0 + block <= D; d0 += block) {
                Scalar acc[block];
                for (int v = 0; v < block; ++v) acc[v] = zh[d0 + v] * rescale;
                for (int n = n0; n < n1; ++n) {
                  const Scalar w = e[(n - n0) * nh + h];
                  const Scalar* xr = &x2(row0 + std::int64_t(n) * L, d0);
                  for (int v = 0; v < block; ++v) acc[v] += w * xr[v];
                }
                for (int v = 0; v < block; ++v) zh[d0 + v] = acc[v];
              }
              for (int d = d0; d < D; ++d) {
                Scalar acc = zh[d] * rescale;
                for (int n = n0; n < n1; ++n)
                  acc += e[(n - n0) * nh + h] * x2(row0 + std::int64_t(n) * L, d);
                zh[d] = acc;
              }
            } else {
              Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D),
                                   [&](const int d) { zh[d] *= rescale; });
              for (int n = n0; n < n1; ++n) {
                const std::int64_t row = row0 + std::int64_t(n) * L;
                const Scalar e = detail::exp(a(row, h) - mx);
                sum += e;
                const Scalar* xr = &x2(row, 0);
                Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D),
                                     [&](const int d) { zh[d] += e * xr[d]; });
              }
            }
            team.team_barrier();  // every lane has read run_sum / run_max before they change
            Kokkos::single(Kokkos::PerTeam(team), [&]() {
              run_max(pos, h) = mx;
              run_sum(pos, h) = sum;
            });
          }
        });
  }

  /// With `group`: each rank streamed its share of the inputs; the running statistics and the
  /// pooled sums are merged exactly over the group (DESIGN 3.7).
  void stream_end(const ExecSpace& exec, Saved& s, const View4<Scalar, memory_space>& out,
                  const GroupReduce<Scalar, memory_space>* group = nullptr) {
    detail::ScopedRegion region("dchag::CrossAttention::stream_end");
    constexpr const char* where = "dchag::CrossAttention::stream_end";
    DCHAG_EXPECT(s.k == 1 && streamed_ == s.N, where, "stream covered ", streamed_, " of N = ", s.N,
                 " inputs, expected all");
    DCHAG_EXPECT(out.extent(0) == std::size_t(s.B) && out.extent(1) == 1 &&
                     out.extent(2) == std::size_t(s.L) && out.extent(3) == std::size_t(cfg_.dim),
                 where, "out is [", out.extent(0), ", ", out.extent(1), ", ", out.extent(2), ", ",
                 out.extent(3), "], expected [B, 1, L, D] = [", s.B, ", 1, ", s.L, ", ", cfg_.dim,
                 "]");
    if (group) {
      // Rescale each rank's pooled sums from its own running max to the group's.
      const std::size_t P = std::size_t(s.B) * s.L;
      const int D = cfg_.dim;
      V2 local = workspace2(c_, "dchag::attention::c", P, std::size_t(cfg_.heads));
      Kokkos::deep_copy(exec, local, s.run_max);
      group->max(Unmanaged1<Scalar, memory_space>(s.run_max.data(), s.run_max.span()));
      auto z = s.z;
      auto run_max = s.run_max;
      detail::for_each_row(
          exec, "dchag::attention::stream_rescale", std::int64_t(cfg_.heads) * P, D,
          KOKKOS_LAMBDA(const std::int64_t r, const int d) {
            const std::int64_t pos = r % std::int64_t(P), h = r / std::int64_t(P);
            z(h, pos, d) *= detail::exp(local(pos, h) - run_max(pos, h));
          });
    }
    exponentiate(exec, s);
    finish_pooled(exec, s, group);
    project_out(exec, s, out);
  }

  /// Chunked backward of a pooled forward, for callers that consume input gradients in chunks
  /// (the fused front ends): backward_begin, then backward_chunk for consecutive input ranges
  /// [n0, n1) covering [0, N), writing dx of those inputs [B, n1 - n0, L, D], then backward_end.
  /// Same gradients as backward; the full dx never has to exist.
  void backward_begin(const ExecSpace& exec, const Saved& saved,
                      const View4<const Scalar, memory_space>& d_out,
                      const GroupReduce<Scalar, memory_space>* group = nullptr) {
    detail::ScopedRegion region("dchag::CrossAttention::backward_begin");
    constexpr const char* where = "dchag::CrossAttention::backward_begin";
    DCHAG_EXPECT(saved.k > 0 && cfg_.strategy == Strategy::pooled, where,
                 "expected the saved state of a pooled forward");
    const Segments seg{saved.host_offsets};
    check_group(where, seg, group);
    DCHAG_EXPECT(
        d_out.extent(0) == std::size_t(saved.B) && d_out.extent(1) == std::size_t(saved.k) &&
            d_out.extent(2) == std::size_t(saved.L) && d_out.extent(3) == std::size_t(cfg_.dim),
        where, "d_out is [", d_out.extent(0), ", ", d_out.extent(1), ", ", d_out.extent(2), ", ",
        d_out.extent(3), "], expected [B, k, L, D] = [", saved.B, ", ", saved.k, ", ", saved.L,
        ", ", cfg_.dim, "]");
    back_project_out(exec, saved, d_out);
    pooled_backward_begin(exec, saved, group != nullptr);
    back_streamed_ = 0;
  }
  void backward_chunk(const ExecSpace& exec, const X4& x, const Saved& saved, int n0, int n1,
                      const View4<Scalar, memory_space>& dx) {
    detail::ScopedRegion region("dchag::CrossAttention::backward_chunk");
    constexpr const char* where = "dchag::CrossAttention::backward_chunk";
    DCHAG_EXPECT(n0 == back_streamed_ && n1 > n0 && n1 <= saved.N, where, "chunk [", n0, ", ", n1,
                 ") does not continue the backward at ", back_streamed_, " of N = ", saved.N);
    DCHAG_EXPECT(x.extent(0) == std::size_t(saved.B) && x.extent(1) == std::size_t(saved.N) &&
                     x.extent(2) == std::size_t(saved.L) && x.extent(3) == std::size_t(cfg_.dim),
                 where, "x is not the input of the saved forward");
    DCHAG_EXPECT(dx.extent(0) == std::size_t(saved.B) && dx.extent(1) == std::size_t(n1 - n0) &&
                     dx.extent(2) == std::size_t(saved.L) && dx.extent(3) == std::size_t(cfg_.dim),
                 where, "dx is [", dx.extent(0), ", ", dx.extent(1), ", ", dx.extent(2), ", ",
                 dx.extent(3), "], expected [B, n1 - n0, L, D] = [", saved.B, ", ", n1 - n0, ", ",
                 saved.L, ", ", cfg_.dim, "]");
    back_streamed_ = n1;
    pooled_token_grad(exec, x, saved, n0, n1, dx);
  }
  void backward_end(const ExecSpace& exec, const Saved& saved,
                    const GroupReduce<Scalar, memory_space>* group = nullptr) {
    detail::ScopedRegion region("dchag::CrossAttention::backward_end");
    DCHAG_EXPECT(back_streamed_ == saved.N, "dchag::CrossAttention::backward_end",
                 "backward covered ", back_streamed_, " of N = ", saved.N, " inputs, expected all");
    pooled_backward_end(exec, group);
    back_query(exec);
  }

  void zero_gradients(const ExecSpace& exec) {
    Kokkos::deep_copy(exec, d_query_, Scalar(0));
    Kokkos::deep_copy(exec, d_w_in_, Scalar(0));
    Kokkos::deep_copy(exec, d_b_in_, Scalar(0));
    Kokkos::deep_copy(exec, d_w_out_, Scalar(0));
    Kokkos::deep_copy(exec, d_b_out_, Scalar(0));
  }

  /// Names and shapes of the convention: climax `{prefix}var_query` [1,1,D],
  /// `{prefix}var_agg.in_proj_weight` [3D,D], `.in_proj_bias` [3D], `.out_proj.weight`,
  /// `.out_proj.bias`; artifact `{prefix}query` [D], `q.weight` [D,D], `kv.weight` [2D,D],
  /// `proj.weight`, `proj.bias`.
  TensorList<Scalar, memory_space> parameters(const std::string& prefix = "") const {
    return named(prefix, query_, w_in_, b_in_, w_out_, b_out_);
  }
  TensorList<Scalar, memory_space> gradients(const std::string& prefix = "") const {
    return named(prefix, d_query_, d_w_in_, d_b_in_, d_w_out_, d_b_out_);
  }

  /// Memory of one application to B x N x L inputs folded into k segments: the Saved state
  /// (activations) and the forward/backward scratch (workspace). `heads_held` is the head share
  /// of the materialized strategy (all heads unless tensor-parallel); `group`: exact distributed.
  static MemoryEstimate estimate_application(const AttentionConfig& cfg, int B, int N, int L, int k,
                                             int heads_held, bool group) {
    const std::int64_t S = sizeof(Scalar), D = cfg.dim, nh = cfg.heads;
    const std::int64_t M = std::int64_t(B) * N * L, P = std::int64_t(B) * k * L;
    const std::int64_t Dr = heads_held * (D / nh);
    MemoryEstimate e;
    e.activations = std::int64_t(sizeof(int)) * (k + 1 + N) + S * (M * nh + P * D + 2 * P * nh);
    if (cfg.strategy == Strategy::pooled) {
      e.activations += S * nh * P * D;
      // oh, go, gz, c, ds, the group-summed gradients (du, dWv share) and the merge buffer.
      e.workspace =
          S * (P * D + P * D + nh * P * D + P * nh + M * nh + nh * D + (group ? D * D : 0));
      e.communication = group ? S * P * (D + nh) : 0;
    } else {
      e.activations += S * 2 * M * Dr;
      e.workspace = S * (P * D + P * nh + 2 * M * Dr + M * nh);  // go, c, dK, dV, ds
    }
    return e;
  }
  /// Memory of the module itself: parameters, gradients and the per-call query vectors.
  static MemoryEstimate estimate_module(const AttentionConfig& cfg) {
    const std::int64_t S = sizeof(Scalar), D = cfg.dim, nh = cfg.heads;
    MemoryEstimate e;
    e.parameters = S * (4 * D * D + 5 * D);
    e.gradients = e.parameters;
    e.workspace = S * (2 * D + 2 * nh * D);  // q, dq, u, du
    return e;
  }

 private:
  using V1 = View1<Scalar, memory_space>;
  using V2 = View2<Scalar, memory_space>;
  using V3 = View3<Scalar, memory_space>;
  using Policy = Kokkos::RangePolicy<ExecSpace>;
  using Team = Kokkos::TeamPolicy<ExecSpace>;
  using Member = typename Team::member_type;

  template <class V>
  static auto as4(const V& v) {
    using T = typename V::value_type;
    return View4<T, memory_space>(v.data(), v.extent(0), 1, v.extent(1), v.extent(2));
  }
  template <class T>
  static Unmanaged2<T, memory_space> as2(T* p, std::size_t rows, std::size_t cols) {
    return Unmanaged2<T, memory_space>(p, rows, cols);
  }

  void check_shapes(const char* where, const X4& x, const Segments& seg, std::size_t o0,
                    std::size_t o1, std::size_t o2, std::size_t o3, const char* out_name) const {
    DCHAG_EXPECT(x.extent(3) == std::size_t(cfg_.dim), where, "x.extent(3) is ", x.extent(3),
                 ", expected D = ", cfg_.dim);
    DCHAG_EXPECT(x.extent(0) >= 1 && x.extent(1) >= 1 && x.extent(2) >= 1, where, "x is [",
                 x.extent(0), ", ", x.extent(1), ", ", x.extent(2), ", ", x.extent(3),
                 "], expected every extent >= 1");
    DCHAG_EXPECT(seg.count() >= 1 && seg.offsets.front() == 0 &&
                     seg.total() == static_cast<int>(x.extent(1)),
                 where, "segments cover ", seg.total(),
                 " inputs, expected x.extent(1) = ", x.extent(1));
    for (int j = 0; j < seg.count(); ++j) {
      DCHAG_EXPECT(seg.size(j) >= 1, where, "segment ", j, " is empty, expected >= 1 input");
    }
    DCHAG_EXPECT(o0 == x.extent(0) && o1 == std::size_t(seg.count()) && o2 == x.extent(2) &&
                     o3 == x.extent(3),
                 where, out_name, " is [", o0, ", ", o1, ", ", o2, ", ", o3,
                 "], expected [B, k, L, D] = [", x.extent(0), ", ", seg.count(), ", ", x.extent(2),
                 ", ", x.extent(3), "]");
  }

  void check_group(const char* where, const Segments& seg,
                   const GroupReduce<Scalar, memory_space>* group) const {
    if (group == nullptr) return;
    DCHAG_EXPECT(cfg_.strategy == Strategy::pooled && seg.count() == 1, where,
                 "a group reduction needs the pooled strategy and one segment, got ",
                 to_string(cfg_.strategy), " and ", seg.count(), " segments");
  }

  void prepare(const ExecSpace& exec, const X4& x, const Segments& seg, Saved& s) const {
    const int B = x.extent(0), N = x.extent(1), L = x.extent(2), k = seg.count();
    const int D = cfg_.dim, nh = cfg_.heads;
    const std::size_t M = std::size_t(B) * N * L, P = std::size_t(B) * k * L;
    if (s.host_offsets != seg.offsets || s.B != B || s.N != N || s.L != L) {
      s.offsets = View1<int, memory_space>("dchag::attention::offsets", k + 1);
      s.segment = View1<int, memory_space>("dchag::attention::segment", N);
      auto ho = Kokkos::create_mirror_view(s.offsets);
      auto hs = Kokkos::create_mirror_view(s.segment);
      for (int j = 0; j <= k; ++j) ho(j) = seg.offsets[j];
      for (int j = 0; j < k; ++j)
        for (int n = seg.offsets[j]; n < seg.offsets[j + 1]; ++n) hs(n) = j;
      Kokkos::deep_copy(exec, s.offsets, ho);
      Kokkos::deep_copy(exec, s.segment, hs);
      s.host_offsets = seg.offsets;
    }
    detail::ensure_view(s.a, "dchag::attention::a", M, std::size_t(nh));
    detail::ensure_view(s.ocat, "dchag::attention::ocat", P, std::size_t(D));
    detail::ensure_view(s.run_max, "dchag::attention::run_max", P, std::size_t(nh));
    detail::ensure_view(s.run_sum, "dchag::attention::run_sum", P, std::size_t(nh));
    if (cfg_.strategy == Strategy::pooled) {
      detail::ensure_view(s.z, "dchag::attention::z", std::size_t(nh), P, std::size_t(D));
      s.kmat = V2();
      s.vmat = V2();
    } else {
      const std::size_t Dr = std::size_t(head_end_ - head_begin_) * (D / nh);
      detail::ensure_view(s.kmat, "dchag::attention::k", M, Dr);
      detail::ensure_view(s.vmat, "dchag::attention::v", M, Dr);
      s.z = V3();
    }
    s.B = B;
    s.N = N;
    s.L = L;
    s.k = k;
  }

  // q = Wq qv + bq; u_h = Wk_h^T q_h / sqrt(hd).
  void compute_query(const ExecSpace& exec) {
    const int D = cfg_.dim, hd = D / cfg_.heads, nh = cfg_.heads;
    const Scalar scale = Scalar(1) / detail::sqrt(Scalar(hd));
    auto w = w_in_;
    auto b = b_in_;
    auto qv = query_;
    auto q = q_;
    auto u = u_;
    Kokkos::parallel_for(
        "dchag::attention::query", Policy(exec, 0, D), KOKKOS_LAMBDA(const int r) {
          Scalar acc = b(0, r);
          for (int d = 0; d < D; ++d) acc += w(0, r, d) * qv(d);
          q(r) = acc;
        });
    Kokkos::parallel_for(
        "dchag::attention::u", Policy(exec, 0, nh * D), KOKKOS_LAMBDA(const int i) {
          const int h = i / D, d = i % D;
          Scalar acc = 0;
          for (int r = h * hd; r < (h + 1) * hd; ++r) acc += w(1, r, d) * q(r);
          u(h, d) = acc * scale;
        });
  }

  // Per output position and head [h0, h1): run_max = max over the segment of the scores in a.
  void segment_max(const ExecSpace& exec, const Saved& s, const V2& run_max, int h0, int h1) const {
    const int N = s.N, L = s.L, k = s.k;
    auto a = s.a;
    auto off = s.offsets;
    detail::for_each_row(
        exec, "dchag::attention::segment_max", std::int64_t(s.B) * k * L, h1 - h0,
        KOKKOS_LAMBDA(const std::int64_t pos, const int hh) {
          const int h = h0 + hh;
          const int l = static_cast<int>(pos % L), j = static_cast<int>((pos / L) % k);
          const std::int64_t row0 = (pos / (std::int64_t(L) * k)) * N * L + l;
          Scalar m = a(row0 + std::int64_t(off(j)) * L, h);
          for (int n = off(j) + 1; n < off(j + 1); ++n)
            m = detail::max(m, a(row0 + std::int64_t(n) * L, h));
          run_max(pos, h) = m;
        });
  }

  // In place on a: e = exp(score - run_max); run_sum = sum of e over the segment.
  void exponentiate(const ExecSpace& exec, const Saved& s, int h0 = 0, int h1 = -1) const {
    if (h1 < 0) h1 = cfg_.heads;
    const int N = s.N, L = s.L, k = s.k;
    auto a = s.a;
    auto off = s.offsets;
    auto run_max = s.run_max;
    auto run_sum = s.run_sum;
    detail::for_each_row(
        exec, "dchag::attention::exponentiate", std::int64_t(s.B) * k * L, h1 - h0,
        KOKKOS_LAMBDA(const std::int64_t pos, const int hh) {
          const int h = h0 + hh;
          const int l = static_cast<int>(pos % L), j = static_cast<int>((pos / L) % k);
          const std::int64_t row0 = (pos / (std::int64_t(L) * k)) * N * L + l;
          Scalar sum = 0;
          for (int n = off(j); n < off(j + 1); ++n) {
            Scalar& v = a(row0 + std::int64_t(n) * L, h);
            v = detail::exp(v - run_max(pos, h));
            sum += v;
          }
          run_sum(pos, h) = sum;
        });
  }

  // Softmax weights from the numerators: a[row, h] /= run_sum[pos(row), h], heads [h0, h1).
  void normalize_weights(const ExecSpace& exec, const Saved& s, int h0, int h1) const {
    const int N = s.N, L = s.L, k = s.k;
    auto a = s.a;
    auto run_sum = s.run_sum;
    auto seg = s.segment;
    detail::for_each_row(
        exec, "dchag::attention::normalize_weights", std::int64_t(s.B) * N * L, h1 - h0,
        KOKKOS_LAMBDA(const std::int64_t row, const int hh) {
          const std::int64_t bn = row / L;
          const std::int64_t pos = ((bn / N) * k + seg(bn % N)) * L + row % L;
          a(row, h0 + hh) /= run_sum(pos, h0 + hh);
        });
  }

  // Pooled forward: scores against u, softmax numerators, pooling, one projection per head.
  // The softmax is normalized after pooling so that a group can merge its ranks' partial sums.
  void forward_pooled(const ExecSpace& exec, const X4& x, Saved& s,
                      const GroupReduce<Scalar, memory_space>* group) {
    const int N = s.N, L = s.L, k = s.k, D = cfg_.dim, nh = cfg_.heads;
    const std::size_t M = std::size_t(s.B) * N * L, P = std::size_t(s.B) * k * L;
    auto x2 = as2(x.data(), M, D);
    // Scores s[row, h] = x[row] . u_h: one GEMM over all tokens.
    detail::gemm(exec, "N", "T", Scalar(1), x2, u_, Scalar(0), s.a);
    segment_max(exec, s, s.run_max, 0, nh);
    if (group) group->max(Unmanaged1<Scalar, memory_space>(s.run_max.data(), s.run_max.span()));
    exponentiate(exec, s);
    // z[h, pos] = sum_n e[row(n), h] x[row(n)]: each team owns one output position.
    auto a = s.a;
    auto z = s.z;
    auto off = s.offsets;
    Kokkos::parallel_for(
        "dchag::attention::pool", Team(exec, static_cast<int>(P), Kokkos::AUTO),
        KOKKOS_LAMBDA(const Member& team) {
          const int pos = team.league_rank();
          const int l = pos % L, j = (pos / L) % k, b = pos / (L * k);
          for (int h = 0; h < nh; ++h) {
            Scalar* zh = &z(h, pos, 0);
            Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D), [&](const int d) { zh[d] = 0; });
          }
          for (int n = off(j); n < off(j + 1); ++n) {
            const std::int64_t row = (std::int64_t(b) * N + n) * L + l;
            const Scalar* xr = &x2(row, 0);
            for (int h = 0; h < nh; ++h) {
              const Scalar c = a(row, h);
              Scalar* zh = &z(h, pos, 0);
              Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D),
                                   [&](const int d) { zh[d] += c * xr[d]; });
            }
          }
        });
    finish_pooled(exec, s, group);
  }

  // From the softmax numerators e (in a), their sums and the pooled z = sum e x: projects
  // y_h = Wv_h z_h, merges (y, sums) over the group, then normalizes a and z and writes
  // ocat[pos, h-block] = y_h / sum_h + bv_h.
  void finish_pooled(const ExecSpace& exec, const Saved& s,
                     const GroupReduce<Scalar, memory_space>* group) {
    const int L = s.L, k = s.k, D = cfg_.dim, nh = cfg_.heads, hd = D / nh;
    const std::size_t P = std::size_t(s.B) * k * L;
    V3 oh = workspace3(oh_, "dchag::attention::oh", nh, P, hd);
    for (int h = 0; h < nh; ++h) {
      auto zh = Kokkos::subview(s.z, h, Kokkos::ALL, Kokkos::ALL);
      auto wv = Kokkos::subview(w_in_, 2, Kokkos::make_pair(h * hd, (h + 1) * hd), Kokkos::ALL);
      detail::gemm(exec, "N", "T", Scalar(1), zh, wv, Scalar(0),
                   Kokkos::subview(oh, h, Kokkos::ALL, Kokkos::ALL));
    }
    auto run_sum = s.run_sum;
    if (group) {
      // One message: [P, D] projected sums then [P, heads] softmax denominators.
      V1 merged = workspace1(merge_, "dchag::attention::merge", P * (D + nh));
      detail::for_each_row(
          exec, "dchag::attention::pack", P, D + nh,
          KOKKOS_LAMBDA(const std::int64_t pos, const int c) {
            merged(pos * (D + nh) + c) = c < D ? oh(c / hd, pos, c % hd) : run_sum(pos, c - D);
          });
      group->sum(Unmanaged1<Scalar, memory_space>(merged.data(), merged.span()));
      detail::for_each_row(
          exec, "dchag::attention::unpack", P, D + nh,
          KOKKOS_LAMBDA(const std::int64_t pos, const int c) {
            if (c < D) {
              oh(c / hd, pos, c % hd) = merged(pos * (D + nh) + c);
            } else {
              run_sum(pos, c - D) = merged(pos * (D + nh) + c);
            }
          });
    }
    auto a = s.a;
    auto z = s.z;
    auto ocat = s.ocat;
    auto b_in = b_in_;
    normalize_weights(exec, s, 0, nh);
    detail::for_each_row(
        exec, "dchag::attention::normalize_pool", std::int64_t(nh) * P, D,
        KOKKOS_LAMBDA(const std::int64_t r, const int d) {
          const std::int64_t pos = r % std::int64_t(P);
          z(r / std::int64_t(P), pos, d) /= run_sum(pos, r / std::int64_t(P));
        });
    detail::for_each_row(
        exec, "dchag::attention::concat", P, D, KOKKOS_LAMBDA(const std::int64_t pos, const int r) {
          ocat(pos, r) = oh(r / hd, pos, r % hd) / run_sum(pos, r / hd) + b_in(2, r);
        });
  }

  // Materialized forward over heads [head_begin_, head_end_): K and V of those heads only.
  void forward_materialized(const ExecSpace& exec, const X4& x, Saved& s) {
    const int N = s.N, L = s.L, k = s.k, D = cfg_.dim, nh = cfg_.heads, hd = D / nh;
    const int h0 = head_begin_, h1 = head_end_, r0 = h0 * hd, Dr = (h1 - h0) * hd;
    const std::size_t M = std::size_t(s.B) * N * L, P = std::size_t(s.B) * k * L;
    const Scalar scale = Scalar(1) / detail::sqrt(Scalar(hd));
    auto x2 = as2(x.data(), M, D);
    auto K = s.kmat;
    auto V = s.vmat;
    auto b_in = b_in_;
    detail::for_each_row(
        exec, "dchag::attention::kv_bias", M, Dr,
        KOKKOS_LAMBDA(const std::int64_t row, const int c) {
          K(row, c) = b_in(1, r0 + c);
          V(row, c) = b_in(2, r0 + c);
        });
    const auto rows = Kokkos::make_pair(r0, r0 + Dr);
    detail::gemm(exec, "N", "T", Scalar(1), x2, Kokkos::subview(w_in_, 1, rows, Kokkos::ALL),
                 Scalar(1), K);
    detail::gemm(exec, "N", "T", Scalar(1), x2, Kokkos::subview(w_in_, 2, rows, Kokkos::ALL),
                 Scalar(1), V);
    auto a = s.a;
    auto q = q_;
    detail::for_each_row(
        exec, "dchag::attention::scores", M, h1 - h0,
        KOKKOS_LAMBDA(const std::int64_t row, const int hh) {
          const int h = h0 + hh;
          Scalar acc = 0;
          for (int c = (h - h0) * hd; c < (h - h0 + 1) * hd; ++c) acc += q(r0 + c) * K(row, c);
          a(row, h) = acc * scale;
        });
    segment_max(exec, s, s.run_max, h0, h1);
    exponentiate(exec, s, h0, h1);
    normalize_weights(exec, s, h0, h1);
    auto ocat = s.ocat;
    auto off = s.offsets;
    detail::for_each_row(
        exec, "dchag::attention::weighted_values", P, D,
        KOKKOS_LAMBDA(const std::int64_t pos, const int r) {
          if (r < r0 || r >= r0 + Dr) {
            ocat(pos, r) = 0;  // another rank's heads
            return;
          }
          const int l = static_cast<int>(pos % L);
          const int j = static_cast<int>((pos / L) % k);
          const std::int64_t b = pos / (std::int64_t(L) * k);
          Scalar acc = 0;
          for (int n = off(j); n < off(j + 1); ++n) {
            const std::int64_t row = (b * N + n) * L + l;
            acc += a(row, r / hd) * V(row, r - r0);
          }
          ocat(pos, r) = acc;
        });
  }

  // out = ocat Wo^T + bo (bo only where this module owns it).
  void project_out(const ExecSpace& exec, const Saved& s,
                   const View4<Scalar, memory_space>& out) const {
    const int D = cfg_.dim;
    const std::size_t P = s.ocat.extent(0);
    auto out2 = as2(out.data(), P, D);
    auto bo = b_out_;
    const bool with_bias = out_bias_;
    detail::for_each_row(
        exec, "dchag::attention::out_bias", P, D,
        KOKKOS_LAMBDA(const std::int64_t pos, const int d) {
          out2(pos, d) = with_bias ? bo(d) : Scalar(0);
        });
    detail::gemm(exec, "N", "T", Scalar(1), s.ocat, w_out_, Scalar(1), out2);
  }

  // dbo, dWo, and go = g Wo (into go_).
  void back_project_out(const ExecSpace& exec, const Saved& s,
                        const View4<const Scalar, memory_space>& d_out) {
    const int D = cfg_.dim;
    const std::size_t P = s.ocat.extent(0);
    auto g2 = as2(d_out.data(), P, D);
    if (out_bias_) column_sums(exec, g2, d_b_out_);
    detail::gemm(exec, "T", "N", Scalar(1), g2, s.ocat, Scalar(1), d_w_out_);
    V2 go = workspace2(go_, "dchag::attention::go", P, D);
    detail::gemm(exec, "N", "N", Scalar(1), g2, w_out_, Scalar(0), go);
  }

  // dst(c) += sum over rows of m(row, c).
  template <class M, class Dst>
  static void column_sums(const ExecSpace& exec, const M& m, const Dst& dst) {
    const std::int64_t rows = m.extent(0);
    Kokkos::parallel_for(
        "dchag::attention::column_sums", Policy(exec, 0, m.extent(1)), KOKKOS_LAMBDA(const int c) {
          Scalar acc = 0;
          for (std::int64_t r = 0; r < rows; ++r) acc += m(r, c);
          dst(c) += acc;
        });
  }

  void backward_pooled(const ExecSpace& exec, const X4& x, const Saved& s,
                       const View4<Scalar, memory_space>& dx,
                       const GroupReduce<Scalar, memory_space>* group) {
    pooled_backward_begin(exec, s, group != nullptr);
    pooled_token_grad(exec, x, s, 0, s.N, dx);
    pooled_backward_end(exec, group);
  }

  // Pooled backward, the parts before the tokens: dbv, dWv (share), gz_h = Wv_h^T go_h and
  // c[pos, h] = gz_h . z_h; zeroes du.
  void pooled_backward_begin(const ExecSpace& exec, const Saved& s, bool group) {
    const int L = s.L, k = s.k, D = cfg_.dim, nh = cfg_.heads, hd = D / nh;
    const std::size_t P = std::size_t(s.B) * k * L;
    auto go = go_;
    column_sums(exec, go, Kokkos::subview(d_b_in_, 2, Kokkos::ALL));
    // What a group sums: du [heads, D] then this rank's dWv share [D, D], as one message.
    V1 shared = workspace1(shared_, "dchag::attention::group_grads",
                           std::size_t(nh) * D + (group ? std::size_t(D) * D : 0));
    Kokkos::deep_copy(
        exec, Kokkos::subview(shared, Kokkos::make_pair(std::size_t(0), std::size_t(nh) * D)),
        Scalar(0));
    auto dwv = group ? Unmanaged2<Scalar, memory_space>(shared.data() + std::size_t(nh) * D, D, D)
                     : Unmanaged2<Scalar, memory_space>(&d_w_in_(2, 0, 0), D, D);
    group_backward_ = group;
    DCHAG_EXPECT(s.z.data() != nullptr, "dchag::CrossAttention::backward", "no pooled state saved");
    // Per head: dWv_h += go_h^T z_h, gz_h = go_h Wv_h.
    V3 goh = workspace3(oh_, "dchag::attention::oh", nh, P, hd);
    detail::for_each_row(
        exec, "dchag::attention::split_heads", P, D,
        KOKKOS_LAMBDA(const std::int64_t pos, const int r) {
          goh(r / hd, pos, r % hd) = go(pos, r);
        });
    V3 gz = workspace3(gz_, "dchag::attention::gz", nh, P, D);
    for (int h = 0; h < nh; ++h) {
      auto gh = Kokkos::subview(goh, h, Kokkos::ALL, Kokkos::ALL);
      auto zh = Kokkos::subview(s.z, h, Kokkos::ALL, Kokkos::ALL);
      auto rows = Kokkos::make_pair(h * hd, (h + 1) * hd);
      detail::gemm(exec, "T", "N", Scalar(1), gh, zh, group ? Scalar(0) : Scalar(1),
                   Kokkos::subview(dwv, rows, Kokkos::ALL));
      detail::gemm(exec, "N", "N", Scalar(1), gh, Kokkos::subview(w_in_, 2, rows, Kokkos::ALL),
                   Scalar(0), Kokkos::subview(gz, h, Kokkos::ALL, Kokkos::ALL));
    }
    // c[pos, h] = gz_h . z_h = go_h . (o_h - bv_h): from the (group-wide) output, so no z sum.
    V2 c = workspace2(c_, "dchag::attention::c", P, nh);
    auto ocat = s.ocat;
    auto b_in = b_in_;
    detail::for_each_row(
        exec, "dchag::attention::gz_dot_z", P, nh,
        KOKKOS_LAMBDA(const std::int64_t pos, const int h) {
          Scalar acc = 0;
          for (int r = h * hd; r < (h + 1) * hd; ++r)
            acc += go(pos, r) * (ocat(pos, r) - b_in(2, r));
          c(pos, h) = acc;
        });
    detail::ensure_view(ds_, "dchag::attention::ds", std::size_t(s.B) * s.N * L, std::size_t(nh));
  }

  // Pooled backward for the tokens of inputs [n0, n1): ds_h = a_h (gz_h . x - c_h),
  // dx = sum_h a_h gz_h + ds_h u_h (into dx [B, n1 - n0, L, D]), du += ds^T x.
  void pooled_token_grad(const ExecSpace& exec, const X4& x, const Saved& s, int n0, int n1,
                         const View4<Scalar, memory_space>& dx) {
    const int N = s.N, L = s.L, k = s.k, D = cfg_.dim, nh = cfg_.heads, nc = n1 - n0;
    const std::size_t M = std::size_t(s.B) * N * L;
    auto x2 = as2(x.data(), M, D);
    auto dx2 = as2(dx.data(), std::size_t(s.B) * nc * L, D);
    auto ds = ds_;
    auto gz = gz_;
    auto c = c_;
    auto a = s.a;
    auto u = u_;
    auto seg = s.segment;
    constexpr bool on_host =
        Kokkos::SpaceAccessibility<Kokkos::HostSpace, memory_space>::accessible;
    Kokkos::parallel_for(
        "dchag::attention::pooled_token_grad", Team(exec, s.B * nc * L, Kokkos::AUTO),
        KOKKOS_LAMBDA(const Member& team) {
          const std::int64_t crow = team.league_rank();  // row of the chunk
          const int l = static_cast<int>(crow % L);
          const int n = n0 + static_cast<int>((crow / L) % nc);
          const int b = static_cast<int>(crow / (std::int64_t(L) * nc));
          const std::int64_t row = (std::int64_t(b) * N + n) * L + l;
          const std::int64_t pos = (std::int64_t(b) * k + seg(n)) * L + l;
          const Scalar* xr = &x2(row, 0);
          Scalar* dxr = &dx2(crow, 0);
          for (int h = 0; h < nh; ++h) {
            Scalar t;
            if constexpr (on_host) {
              t = team.team_size() == 1 ? detail::lane_dot(&gz(h, pos, 0), xr, D)
                                        : detail::team_dot(team, &gz(h, pos, 0), xr, D);
            } else {
              t = detail::team_dot(team, &gz(h, pos, 0), xr, D);
            }
            const Scalar ah = a(row, h);
            const Scalar dsh = ah * (t - c(pos, h));
            Kokkos::single(Kokkos::PerTeam(team), [&]() { ds(row, h) = dsh; });
            const Scalar* gzh = &gz(h, pos, 0);
            const Scalar* uh = &u(h, 0);
            // Each lane owns its d across heads, so the accumulation needs no barrier.
            Kokkos::parallel_for(Kokkos::TeamVectorRange(team, D), [&](const int d) {
              const Scalar prev = h == 0 ? Scalar(0) : dxr[d];
              dxr[d] = prev + ah * gzh[d] + dsh * uh[d];
            });
          }
        });
    auto du = Unmanaged2<Scalar, memory_space>(shared_.data(), nh, D);
    for (int b = 0; b < s.B; ++b) {
      const auto rows =
          Kokkos::make_pair((std::size_t(b) * N + n0) * L, (std::size_t(b) * N + n1) * L);
      detail::gemm(exec, "T", "N", Scalar(1), Kokkos::subview(ds_, rows, Kokkos::ALL),
                   Kokkos::subview(x2, rows, Kokkos::ALL), Scalar(1), du);
    }
  }

  // Pooled backward after the tokens: group sums, then dWk_h = q_h (x) du_h / sqrt(hd) and
  // dq_h = Wk_h du_h / sqrt(hd).
  void pooled_backward_end(const ExecSpace& exec, const GroupReduce<Scalar, memory_space>* group) {
    DCHAG_EXPECT((group != nullptr) == group_backward_, "dchag::CrossAttention::backward_end",
                 "group given to backward_end does not match backward_begin");
    const int D = cfg_.dim, nh = cfg_.heads, hd = D / nh;
    auto shared = shared_;
    if (group) {
      group->sum(Unmanaged1<Scalar, memory_space>(shared.data(), shared.span()));
      auto dw = d_w_in_;
      const std::size_t off = std::size_t(nh) * D;
      detail::for_each_row(
          exec, "dchag::attention::add_value_grad", D, D,
          KOKKOS_LAMBDA(const std::int64_t r, const int d) {
            dw(2, r, d) += shared(off + r * D + d);
          });
    }
    auto du = Unmanaged2<Scalar, memory_space>(shared.data(), nh, D);
    const Scalar scale = Scalar(1) / detail::sqrt(Scalar(hd));
    auto q = q_;
    auto dq = dq_;
    auto w = w_in_;
    auto dw = d_w_in_;
    Kokkos::parallel_for(
        "dchag::attention::key_grad", Policy(exec, 0, D), KOKKOS_LAMBDA(const int r) {
          const int h = r / hd;
          Scalar acc = 0;
          for (int d = 0; d < D; ++d) {
            acc += w(1, r, d) * du(h, d);
            dw(1, r, d) += q(r) * du(h, d) * scale;
          }
          dq(r) = acc * scale;
        });
  }

  // Materialized backward over heads [head_begin_, head_end_).
  void backward_materialized(const ExecSpace& exec, const X4& x, const Saved& s,
                             const View4<Scalar, memory_space>& dx) {
    const int N = s.N, L = s.L, k = s.k, D = cfg_.dim, nh = cfg_.heads, hd = D / nh;
    const int h0 = head_begin_, h1 = head_end_, r0 = h0 * hd, Dr = (h1 - h0) * hd;
    const std::size_t M = std::size_t(s.B) * N * L, P = std::size_t(s.B) * k * L;
    const Scalar scale = Scalar(1) / detail::sqrt(Scalar(hd));
    auto go = go_;
    auto ocat = s.ocat;
    // c[pos, h] = go_h . o_h  (o_h without the out-projection; bv is inside V).
    V2 c = workspace2(c_, "dchag::attention::c", P, nh);
    detail::for_each_row(
        exec, "dchag::attention::go_dot_o", P, h1 - h0,
        KOKKOS_LAMBDA(const std::int64_t pos, const int hh) {
          const int h = h0 + hh;
          Scalar acc = 0;
          for (int r = h * hd; r < (h + 1) * hd; ++r) acc += go(pos, r) * ocat(pos, r);
          c(pos, h) = acc;
        });
    V2 dK = workspace2(dk_, "dchag::attention::dk", M, Dr);
    V2 dV = workspace2(dv_, "dchag::attention::dv", M, Dr);
    V2 dsv = workspace2(ds_, "dchag::attention::ds", M, nh);
    auto K = s.kmat;
    auto V = s.vmat;
    auto a = s.a;
    auto q = q_;
    auto seg = s.segment;
    detail::for_each_row(
        exec, "dchag::attention::materialized_token_grad", M, h1 - h0,
        KOKKOS_LAMBDA(const std::int64_t row, const int hh) {
          const int h = h0 + hh;
          const int l = static_cast<int>(row % L);
          const int n = static_cast<int>((row / L) % N);
          const std::int64_t b = row / (std::int64_t(L) * N);
          const std::int64_t pos = (b * k + seg(n)) * L + l;
          Scalar da = 0;
          for (int r = h * hd; r < (h + 1) * hd; ++r) da += go(pos, r) * V(row, r - r0);
          const Scalar ds = a(row, h) * (da - c(pos, h));
          dsv(row, h) = ds;
          for (int r = h * hd; r < (h + 1) * hd; ++r) {
            dV(row, r - r0) = a(row, h) * go(pos, r);
            dK(row, r - r0) = ds * q(r) * scale;
          }
        });
    // dq[r] = sum_rows ds[row, h] K[row, r] / sqrt(hd); zero outside this module's heads.
    auto dq = dq_;
    Kokkos::parallel_for(
        "dchag::attention::query_grad", Policy(exec, 0, D), KOKKOS_LAMBDA(const int r) {
          Scalar acc = 0;
          if (r >= r0 && r < r0 + Dr) {
            for (std::int64_t row = 0; row < std::int64_t(M); ++row)
              acc += dsv(row, r / hd) * K(row, r - r0);
          }
          dq(r) = acc * scale;
        });
    auto x2 = as2(x.data(), M, D);
    auto dx2 = as2(dx.data(), M, D);
    const auto rows = Kokkos::make_pair(r0, r0 + Dr);
    detail::gemm(exec, "N", "N", Scalar(1), dK, Kokkos::subview(w_in_, 1, rows, Kokkos::ALL),
                 Scalar(0), dx2);
    detail::gemm(exec, "N", "N", Scalar(1), dV, Kokkos::subview(w_in_, 2, rows, Kokkos::ALL),
                 Scalar(1), dx2);
    detail::gemm(exec, "T", "N", Scalar(1), dK, x2, Scalar(1),
                 Kokkos::subview(d_w_in_, 1, rows, Kokkos::ALL));
    detail::gemm(exec, "T", "N", Scalar(1), dV, x2, Scalar(1),
                 Kokkos::subview(d_w_in_, 2, rows, Kokkos::ALL));
    column_sums(exec, dK, Kokkos::subview(d_b_in_, 1, rows));
    column_sums(exec, dV, Kokkos::subview(d_b_in_, 2, rows));
  }
  // From dq: dqv = Wq^T dq, dWq += dq (x) qv, dbq += dq.
  void back_query(const ExecSpace& exec) {
    const int D = cfg_.dim;
    auto dq = dq_;
    auto w = w_in_;
    auto dw = d_w_in_;
    auto db = d_b_in_;
    auto qv = query_;
    auto dqv = d_query_;
    Kokkos::parallel_for(
        "dchag::attention::query_vector_grad", Policy(exec, 0, D), KOKKOS_LAMBDA(const int d) {
          Scalar acc = 0;
          for (int r = 0; r < D; ++r) acc += w(0, r, d) * dq(r);
          dqv(d) += acc;
        });
    Kokkos::parallel_for(
        "dchag::attention::query_weight_grad", Policy(exec, 0, D), KOKKOS_LAMBDA(const int r) {
          for (int d = 0; d < D; ++d) dw(0, r, d) += dq(r) * qv(d);
          db(0, r) += dq(r);
        });
  }

  static V1 workspace1(V1& v, const char* label, std::size_t n0) {
    detail::ensure_view(v, label, n0);
    return v;
  }
  static V2 workspace2(V2& v, const char* label, std::size_t n0, std::size_t n1) {
    detail::ensure_view(v, label, n0, n1);
    return v;
  }
  static V3 workspace3(V3& v, const char* label, std::size_t n0, std::size_t n1, std::size_t n2) {
    detail::ensure_view(v, label, n0, n1, n2);
    return v;
  }

  TensorList<Scalar, memory_space> named(const std::string& prefix, const V1& qv, const V3& w_in,
                                         const V2& b_in, const V2& w_out, const V1& b_out) const {
    const std::int64_t D = cfg_.dim;
    using detail::whole;
    TensorList<Scalar, memory_space> list;
    if (cfg_.convention == Convention::climax) {
      list.push_back(whole<Scalar, memory_space>(prefix + "var_query", {1, 1, D}, qv));
      list.push_back(
          whole<Scalar, memory_space>(prefix + "var_agg.in_proj_weight", {3 * D, D}, w_in));
      list.push_back(whole<Scalar, memory_space>(prefix + "var_agg.in_proj_bias", {3 * D}, b_in));
      list.push_back(
          whole<Scalar, memory_space>(prefix + "var_agg.out_proj.weight", {D, D}, w_out));
      list.push_back(whole<Scalar, memory_space>(prefix + "var_agg.out_proj.bias", {D}, b_out));
    } else {
      auto kv = Unmanaged1<Scalar, memory_space>(w_in.data() + D * D, 2 * D * D);
      list.push_back(whole<Scalar, memory_space>(prefix + "query", {D}, qv));
      list.push_back(whole<Scalar, memory_space>(
          prefix + "q.weight", {D, D}, Kokkos::subview(w_in, 0, Kokkos::ALL, Kokkos::ALL)));
      list.push_back(whole<Scalar, memory_space>(prefix + "kv.weight", {2 * D, D}, kv));
      list.push_back(whole<Scalar, memory_space>(prefix + "proj.weight", {D, D}, w_out));
      list.push_back(whole<Scalar, memory_space>(prefix + "proj.bias", {D}, b_out));
    }
    return list;
  }

  AttentionConfig cfg_;
  std::string name_;
  V1 query_, b_out_, d_query_, d_b_out_;
  V3 w_in_, d_w_in_;  // [3, D, D]: Wq, Wk, Wv (ClimaX in_proj_weight layout)
  V2 b_in_, d_b_in_;  // [3, D]: bq, bk, bv (zero and not a parameter for the artifact)
  V2 w_out_, d_w_out_;
  // Per-call values and workspace, reused across calls of the same shape.
  V1 q_, dq_;
  V2 u_, du_;
  V1 merge_, shared_;
  V2 go_, c_, ds_, dk_, dv_;
  V3 oh_, gz_, e_chunk_;
  Saved own_saved_;
  int streamed_ = 0, back_streamed_ = 0;
  bool group_backward_ = false;
  int head_begin_ = 0, head_end_ = 0;  // set to [0, heads) in the constructor
  bool out_bias_ = true;
};

}  // namespace dchag
