#pragma once
/// Single-query cross-attention ("attention pooling", DESIGN 3.2): folds the N tokens of every
/// patch position into one token with a learned query. Two strategies give the same result:
/// `materialized` forms K and V like PyTorch; `pooled` (the default) scores tokens against
/// u_h = Wk_h^T q_h / sqrt(hd), pools them per head and projects once.
///
/// Tokens x are [B, N, L, D] (LayoutRight). The N inputs may be split into k contiguous
/// `Segments`, each folded on its own: the output is then [B, k, L, D] (k = 1: [B, L, D]). With
/// N_q = config.queries learned queries (DESIGN 3.9) every position gives N_q tokens, query j
/// its own softmax per head, and the output is [B, k, L * N_q, D] (the bytes of [B, k, L, N_q, D]);
/// the query parameter is [N_q, D] (climax `var_query` [1, N_q, D]). Internally each (query j,
/// head h) pair is one score column j * heads + h of the softmax kernels.
/// Forward saves what backward needs in a `Saved` object owned by the caller, so one module can be
/// applied several times (the local tree of DESIGN 3.3 shares one module across levels). Backward
/// runs with the strategy its forward ran with, whatever set_strategy said in between.
///
/// Kernels: detail/attention_common.hpp, detail/attention_pooled.hpp,
/// detail/attention_stream.hpp, detail/attention_materialized.hpp; the saved state, names and
/// byte counts: detail/attention_plan.hpp.
#include <dchag/attention_state.hpp>
#include <dchag/config.hpp>
#include <dchag/detail/attention_materialized.hpp>
#include <dchag/detail/attention_plan.hpp>
#include <dchag/detail/attention_pooled.hpp>
#include <dchag/detail/attention_stream.hpp>
#include <dchag/detail/sizes.hpp>
#include <dchag/error.hpp>
#include <dchag/init.hpp>
#include <dchag/tensor.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace dchag {

template <class ExecSpace, class Scalar = float>
class CrossAttention {
 public:
  using execution_space = ExecSpace;
  using memory_space = typename ExecSpace::memory_space;
  using scalar_type = Scalar;
  using X4 = View4<const Scalar, memory_space>;
  using Saved = AttentionSaved<Scalar, memory_space>;
  using Group = GroupReduce<Scalar, memory_space>;
  using Mask = InputMask<memory_space>;

  /// Allocates and initialises (ClimaX: zero query, xavier-uniform in_proj for the climax
  /// convention, trunc-normal 0.02 otherwise, zero biases) a module named `name` (the seed
  /// stream of its parameters).
  CrossAttention(const ExecSpace& exec, AttentionConfig cfg, std::uint64_t seed = 0,
                 std::string name = "var_agg")
      : cfg_(cfg), name_(std::move(name)) {
    check_config("dchag::CrossAttention", cfg);
    const int D = cfg.dim, nh = cfg.heads, Q = cfg.queries;
    w_ = allocate_params("dchag::attention::", D, Q);
    grad_ = allocate_params("dchag::attention::d_", D, Q);
    head_end_ = nh;
    work_.q = V1("dchag::attention::q", std::size_t(Q) * D);
    work_.u = V2("dchag::attention::u", detail::score_columns(cfg), D);
    work_.dq = V1("dchag::attention::dq", std::size_t(Q) * D);
    if (cfg.convention == Convention::climax) {
      init_uniform(w_.w_in, std::sqrt(6.0 / (4.0 * D)), seed, name_ + ".in_proj_weight");
    } else {
      init_trunc_normal(w_.w_in, 0.02, seed, name_ + ".in_proj_weight");
    }
    init_trunc_normal(w_.w_out, 0.02, seed, name_ + ".out_proj.weight");
    exec.fence();
  }

  const AttentionConfig& config() const { return cfg_; }
  int dim() const { return cfg_.dim; }
  int heads() const { return cfg_.heads; }
  int queries() const { return cfg_.queries; }
  /// Strategy of the next forward; a backward follows its own forward's.
  void set_strategy(Strategy s) {
    DCHAG_EXPECT(s == Strategy::materialized || (head_begin_ == 0 && head_end_ == cfg_.heads),
                 "dchag::CrossAttention::set_strategy", "a head share [", head_begin_, ", ",
                 head_end_, ") needs the materialized strategy, got ", to_string(s));
    cfg_.strategy = s;
  }

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

  /// Allocates the saved state and every workspace that one forward and backward of B x N x L
  /// inputs folded into `seg` need (`grouped`: over a channel group; `stream_chunk`: the widest
  /// chunk a streaming forward and a chunked backward will pass, 0 for none; `memory`: what the
  /// forward keeps). A collective caller runs this before its first collective and agrees that
  /// it succeeded; forward and backward then allocate nothing.
  void reserve(Saved& saved, int B, int N, int L, const Segments& seg, bool grouped = false,
               int stream_chunk = 0, MemoryPolicy memory = MemoryPolicy::keep) {
    DCHAG_EXPECT(memory == MemoryPolicy::keep || cfg_.strategy == Strategy::pooled,
                 "dchag::CrossAttention::reserve", "memory is ", to_string(memory),
                 ", which needs the pooled strategy, strategy is ", to_string(cfg_.strategy));
    const int chunk = stream_chunk > 0 ? stream_chunk : N;
    prepare(B, N, L, seg, grouped, saved, memory, chunk);
    const std::size_t P = std::size_t(B) * seg.count() * L, M = std::size_t(B) * N * L;
    // nh: the score columns (queries x heads); Q output rows per position.
    const std::size_t D = cfg_.dim, nh = detail::score_columns(cfg_), hd = D / cfg_.heads;
    const std::size_t Q = cfg_.queries;
    using detail::ensure_view;
    if (cfg_.strategy == Strategy::pooled) {
      ensure_view(work_.oh, "dchag::attention::oh", nh, P, hd);
      if (grouped) {
        ensure_view(work_.merge, "dchag::attention::merge", P * (Q * D + nh));
        ensure_view(work_.c_group, "dchag::attention::c_group", P, nh);
      }
      if (stream_chunk > 0) ensure_chunk_weights(std::size_t(B) * L, stream_chunk);
      if (memory == MemoryPolicy::inference) return;  // no backward: none of its scratch
      ensure_view(work_.go, "dchag::attention::go", P * Q, D);
      ensure_view(work_.c, "dchag::attention::c", P, nh);
      ensure_view(work_.gz, "dchag::attention::gz", nh, P, D);
      ensure_view(work_.shared, "dchag::attention::group_grads", nh * D + (grouped ? D * D : 0));
      // Score gradients of one chunk in the device shape; the host shape keeps each token's in
      // its block's scratch.
      if constexpr (detail::runs_on_host<ExecSpace>) {
        ensure_view(work_.du_blocks, "dchag::attention::du_blocks",
                    std::size_t(detail::pooled_grad_blocks<ExecSpace>(std::int64_t(B) * L)),
                    detail::pooled_grad_block_width(int(nh), int(D)));
      } else {
        ensure_view(work_.ds, "dchag::attention::ds", std::size_t(B) * chunk * L, nh);
      }
    } else {
      ensure_view(work_.go, "dchag::attention::go", P * Q, D);
      ensure_view(work_.c, "dchag::attention::c", P, nh);
      ensure_view(work_.ds, "dchag::attention::ds", M, nh);
      const std::size_t Dr = std::size_t(head_end_ - head_begin_) * hd;
      ensure_view(work_.dk, "dchag::attention::dk", M, Dr);
      ensure_view(work_.dv, "dchag::attention::dv", M, Dr);
    }
  }

  /// out [B, k, L * N_q, D] = the k segments of x [B, N, L, D] folded; saves for backward into
  /// `saved`.
  /// With `group`, x holds this rank's share of the N inputs of one segment and the softmax and
  /// pooling run over the inputs of every rank (pooled strategy, exact; DESIGN 3.7).
  /// `valid` [B, N] (empty: every input valid) removes inputs from their softmax (DESIGN 3.10);
  /// it must stay unchanged until the backward. An output position whose segment holds no valid
  /// input comes out as the output bias bo and passes no gradient back: mask it downstream.
  /// Missing inputs must still hold finite values.
  void forward(const ExecSpace& exec, const X4& x, const Segments& seg,
               const View4<Scalar, memory_space>& out, Saved& saved, const Group* group = nullptr,
               const Mask& valid = {}) {
    detail::ScopedRegion region("dchag::CrossAttention::forward");
    constexpr const char* where = "dchag::CrossAttention::forward";
    check_shapes(where, x, seg, out.extent(0), out.extent(1), out.extent(2), out.extent(3), "out");
    check_group(where, cfg_.strategy, seg, group);
    check_mask(where, valid, x.extent(0), x.extent(1));
    prepare(x.extent(0), x.extent(1), x.extent(2), seg, group != nullptr, saved, MemoryPolicy::keep,
            0, valid);
    detail::compute_query(exec, cfg_, w_, work_);
    const auto x2 = rows_of(x);
    if (cfg_.strategy == Strategy::pooled) {
      detail::gemm(exec, "N", "T", Scalar(1), x2, work_.u, Scalar(0), saved.a);  // scores
      detail::mask_scores(exec, saved);
      detail::segment_max(exec, saved, 0, detail::score_columns(cfg_));
      if (group)
        group->max(Unmanaged1<Scalar, memory_space>(saved.run_max.data(), saved.run_max.span()));
      detail::exponentiate(exec, saved, 0, detail::score_columns(cfg_));
      detail::pool_tokens(exec, cfg_, x2, saved);
      detail::finish_pooled(exec, cfg_, w_, saved, work_, group, true);
    } else {
      detail::forward_materialized(exec, cfg_, w_, work_, x2, saved);
    }
    detail::project_out(exec, saved, w_, out_bias_, out);
  }

  /// Accumulates parameter gradients and writes dx [B, N, L, D] (overwritten), given the x and
  /// `saved` of the matching forward and d_out [B, k, L, D].
  /// With `group`: the backward of a group forward. d_out must be the same on every rank; dx is
  /// this rank's share and the parameter gradients come out identical on every rank.
  void backward(const ExecSpace& exec, const X4& x, const Saved& saved,
                const View4<const Scalar, memory_space>& d_out,
                const View4<Scalar, memory_space>& dx, const Group* group = nullptr) {
    detail::ScopedRegion region("dchag::CrossAttention::backward");
    constexpr const char* where = "dchag::CrossAttention::backward";
    check_saved(where, saved, group);
    const Segments seg{saved.host_offsets};
    check_shapes(where, x, seg, d_out.extent(0), d_out.extent(1), d_out.extent(2), d_out.extent(3),
                 "d_out");
    DCHAG_EXPECT(x.extent(0) == std::size_t(saved.B) && x.extent(1) == std::size_t(saved.N) &&
                     x.extent(2) == std::size_t(saved.L),
                 where, "x is not the input of the saved forward");
    DCHAG_EXPECT(dx.extent(0) == x.extent(0) && dx.extent(1) == x.extent(1) &&
                     dx.extent(2) == x.extent(2) && dx.extent(3) == x.extent(3),
                 where, "dx is [", dx.extent(0), ", ", dx.extent(1), ", ", dx.extent(2), ", ",
                 dx.extent(3), "], expected the shape of x");
    detail::back_project_out(exec, saved, w_, grad_, out_bias_, d_out, work_);
    if (saved.strategy == Strategy::pooled) {
      detail::pooled_backward_begin(exec, cfg_, w_, grad_, saved, work_, group);
      detail::pooled_token_grad(exec, cfg_, rows_of(x), detail::InputRows::all(saved.N, saved.L),
                                saved, work_, 0, saved.N, dx);
      detail::pooled_backward_end(exec, cfg_, w_, grad_, work_, group);
    } else {
      detail::backward_materialized(
          exec, cfg_, w_, grad_, work_, rows_of(x), saved,
          detail::matrix<Scalar, memory_space>(dx.data(), std::size_t(saved.B) * saved.N * saved.L,
                                               std::size_t(cfg_.dim)));
    }
    detail::back_query(exec, w_, grad_, work_);
  }

  /// Convenience for one application over all N inputs: out [B, L * N_q, D].
  void forward(const ExecSpace& exec, const X4& x, const View3<Scalar, memory_space>& out,
               const Mask& valid = {}) {
    forward(exec, x, Segments::whole(static_cast<int>(x.extent(1))), as4(out), own_saved_, nullptr,
            valid);
  }
  void backward(const ExecSpace& exec, const X4& x, const View3<const Scalar, memory_space>& d_out,
                const View4<Scalar, memory_space>& dx) {
    backward(exec, x, own_saved_, as4(d_out), dx);
  }

  /// Streaming forward (DESIGN 3.8) for callers that produce the inputs in chunks (the fused
  /// front ends): stream_begin, then stream_chunk for consecutive input ranges [n0, n1) covering
  /// [0, N) once, then stream_end. Pooled strategy only; a chunk may cut through segments. An
  /// online softmax keeps a running max and sum per position and head, so each chunk of tokens
  /// is read once, while it is in cache. The same result as forward. `memory`: what the Saved
  /// state keeps: keep (every input's weights, as forward), recompute (the softmax statistics
  /// and pooled tokens only; the backward is given the same inputs again, chunk by chunk) or
  /// inference (no backward may follow). `grouped`: over a channel group (one segment). `valid`:
  /// the inputs present, as for forward.
  void stream_begin(const ExecSpace& exec, Saved& saved, int B, int N, int L, const Segments& seg,
                    MemoryPolicy memory = MemoryPolicy::keep, bool grouped = false,
                    const Mask& valid = {}) {
    detail::ScopedRegion region("dchag::CrossAttention::stream_begin");
    constexpr const char* where = "dchag::CrossAttention::stream_begin";
    DCHAG_EXPECT(cfg_.strategy == Strategy::pooled, where, "strategy is ", to_string(cfg_.strategy),
                 ", expected pooled");
    check_extents(where, B, N, L, seg);
    DCHAG_EXPECT(!grouped || seg.count() == 1, where, "a group stream needs one segment, got ",
                 seg.count());
    check_mask(where, valid, std::size_t(B), std::size_t(N));
    prepare(B, N, L, seg, grouped, saved, memory, 0, valid);
    detail::compute_query(exec, cfg_, w_, work_);
    work_.streamed = 0;
  }
  /// The same for all inputs of x [B, N, L, D] in one segment.
  void stream_begin(const ExecSpace& exec, const X4& x, Saved& saved, bool grouped = false,
                    MemoryPolicy memory = MemoryPolicy::keep) {
    DCHAG_EXPECT(x.extent(3) == std::size_t(cfg_.dim), "dchag::CrossAttention::stream_begin",
                 "x.extent(3) is ", x.extent(3), ", expected D = ", cfg_.dim);
    const int N = static_cast<int>(x.extent(1));
    stream_begin(exec, saved, static_cast<int>(x.extent(0)), N, static_cast<int>(x.extent(2)),
                 Segments::whole(N), memory, grouped);
  }

  /// Folds inputs [n0, n1) in. x holds all N inputs [B, N, L, D] or these only [B, n1 - n0, L, D].
  void stream_chunk(const ExecSpace& exec, const X4& x, int n0, int n1, Saved& s) {
    detail::ScopedRegion region("dchag::CrossAttention::stream_chunk");
    constexpr const char* where = "dchag::CrossAttention::stream_chunk";
    DCHAG_EXPECT(n0 == work_.streamed && n1 > n0 && n1 <= s.N, where, "chunk [", n0, ", ", n1,
                 ") does not continue the stream at ", work_.streamed, " of N = ", s.N);
    const auto xr = input_rows(where, x, s, n0, n1);
    work_.streamed = n1;
    const std::size_t chunk_rows = std::size_t(s.B) * (n1 - n0) * s.L;
    // Not kept: the scores of the widest chunk, which is the first (released if a keep forward
    // left all of them).
    if (s.memory != MemoryPolicy::keep &&
        (n0 == 0 ? s.a.extent(0) != chunk_rows : s.a.extent(0) < chunk_rows))
      detail::ensure_view(s.a, "dchag::attention::chunk_scores", chunk_rows,
                          std::size_t(detail::score_columns(cfg_)));
    const auto ar = s.memory == MemoryPolicy::keep ? detail::InputRows::all(s.N, s.L)
                                                   : detail::InputRows::chunk(n0, n1, s.L);
    ensure_chunk_weights(std::size_t(s.B) * s.L, n1 - n0);
    if constexpr (detail::runs_on_host<ExecSpace>) {
      detail::stream_pool_host(exec, cfg_, rows_of(x), xr, ar, s, work_, n0, n1);
    } else {
      detail::stream_pool_team(exec, cfg_, rows_of(x), xr, ar, s, work_, n0, n1);
    }
  }

  /// out [B, k, L, D]. With `group`: each rank streamed its share of the inputs; the running
  /// statistics and the pooled sums are merged exactly over the group (DESIGN 3.7).
  void stream_end(const ExecSpace& exec, Saved& s, const View4<Scalar, memory_space>& out,
                  const Group* group = nullptr) {
    detail::ScopedRegion region("dchag::CrossAttention::stream_end");
    constexpr const char* where = "dchag::CrossAttention::stream_end";
    DCHAG_EXPECT(!s.empty() && work_.streamed == s.N, where, "stream covered ", work_.streamed,
                 " of N = ", s.N, " inputs, expected all");
    DCHAG_EXPECT(s.grouped == (group != nullptr), where,
                 s.grouped ? "stream_begin was told grouped, but no group is given"
                           : "a group is given, but stream_begin was not told grouped");
    DCHAG_EXPECT(out.extent(0) == std::size_t(s.B) && out.extent(1) == std::size_t(s.k) &&
                     out.extent(2) == std::size_t(s.L) * cfg_.queries &&
                     out.extent(3) == std::size_t(cfg_.dim),
                 where, "out is [", out.extent(0), ", ", out.extent(1), ", ", out.extent(2), ", ",
                 out.extent(3), "], expected ", out_shape(), " = [", s.B, ", ", s.k, ", ",
                 std::int64_t(s.L) * cfg_.queries, ", ", cfg_.dim, "]");
    if (group) {
      // The local maxima wait in c_group (free until backward) while run_max takes the group's.
      detail::ensure_view(work_.c_group, "dchag::attention::c_group", s.run_max.extent(0),
                          s.run_max.extent(1));
      Kokkos::deep_copy(exec, work_.c_group, s.run_max);
      group->max(Unmanaged1<Scalar, memory_space>(s.run_max.data(), s.run_max.span()));
      detail::rescale_to_group_max(exec, cfg_, s, work_.c_group);
    }
    detail::finish_pooled(exec, cfg_, w_, s, work_, group, false);
    if (s.memory == MemoryPolicy::keep) detail::stream_weights(exec, s);
    detail::project_out(exec, s, w_, out_bias_, out);
  }

  /// Chunked backward of a pooled forward, for callers that consume input gradients in chunks
  /// (the fused front ends): backward_begin, then backward_chunk for consecutive input ranges
  /// [n0, n1) covering [0, N), writing dx of those inputs [B, n1 - n0, L, D], then backward_end.
  /// Same gradients as backward; the full dx never has to exist. After a recompute forward, x is
  /// the same inputs again (all, or this chunk's only).
  void backward_begin(const ExecSpace& exec, const Saved& saved,
                      const View4<const Scalar, memory_space>& d_out,
                      const Group* group = nullptr) {
    detail::ScopedRegion region("dchag::CrossAttention::backward_begin");
    constexpr const char* where = "dchag::CrossAttention::backward_begin";
    check_saved(where, saved, group);
    DCHAG_EXPECT(saved.strategy == Strategy::pooled, where,
                 "the saved state is of a materialized forward, expected a pooled one");
    DCHAG_EXPECT(d_out.extent(0) == std::size_t(saved.B) &&
                     d_out.extent(1) == std::size_t(saved.k) &&
                     d_out.extent(2) == std::size_t(saved.L) * cfg_.queries &&
                     d_out.extent(3) == std::size_t(cfg_.dim),
                 where, "d_out is [", d_out.extent(0), ", ", d_out.extent(1), ", ", d_out.extent(2),
                 ", ", d_out.extent(3), "], expected ", out_shape(), " = [", saved.B, ", ", saved.k,
                 ", ", std::int64_t(saved.L) * cfg_.queries, ", ", cfg_.dim, "]");
    detail::back_project_out(exec, saved, w_, grad_, out_bias_, d_out, work_);
    detail::pooled_backward_begin(exec, cfg_, w_, grad_, saved, work_, group);
    work_.back_streamed = 0;
  }
  void backward_chunk(const ExecSpace& exec, const X4& x, const Saved& saved, int n0, int n1,
                      const View4<Scalar, memory_space>& dx) {
    detail::ScopedRegion region("dchag::CrossAttention::backward_chunk");
    constexpr const char* where = "dchag::CrossAttention::backward_chunk";
    DCHAG_EXPECT(n0 == work_.back_streamed && n1 > n0 && n1 <= saved.N, where, "chunk [", n0, ", ",
                 n1, ") does not continue the backward at ", work_.back_streamed,
                 " of N = ", saved.N);
    const auto xr = input_rows(where, x, saved, n0, n1);
    DCHAG_EXPECT(dx.extent(0) == std::size_t(saved.B) && dx.extent(1) == std::size_t(n1 - n0) &&
                     dx.extent(2) == std::size_t(saved.L) && dx.extent(3) == std::size_t(cfg_.dim),
                 where, "dx is [", dx.extent(0), ", ", dx.extent(1), ", ", dx.extent(2), ", ",
                 dx.extent(3), "], expected [B, n1 - n0, L, D] = [", saved.B, ", ", n1 - n0, ", ",
                 saved.L, ", ", cfg_.dim, "]");
    work_.back_streamed = n1;
    detail::pooled_token_grad(exec, cfg_, rows_of(x), xr, saved, work_, n0, n1, dx);
  }
  void backward_end(const ExecSpace& exec, const Saved& saved, const Group* group = nullptr) {
    detail::ScopedRegion region("dchag::CrossAttention::backward_end");
    constexpr const char* where = "dchag::CrossAttention::backward_end";
    DCHAG_EXPECT(work_.back_streamed == saved.N, where, "backward covered ", work_.back_streamed,
                 " of N = ", saved.N, " inputs, expected all");
    DCHAG_EXPECT((group != nullptr) == work_.group_backward, where,
                 "group given to backward_end does not match backward_begin");
    detail::pooled_backward_end(exec, cfg_, w_, grad_, work_, group);
    detail::back_query(exec, w_, grad_, work_);
  }

  void zero_gradients(const ExecSpace& exec) {
    Kokkos::deep_copy(exec, grad_.query, Scalar(0));
    Kokkos::deep_copy(exec, grad_.w_in, Scalar(0));
    Kokkos::deep_copy(exec, grad_.b_in, Scalar(0));
    Kokkos::deep_copy(exec, grad_.w_out, Scalar(0));
    Kokkos::deep_copy(exec, grad_.b_out, Scalar(0));
  }

  /// Names and shapes of the convention: climax `{prefix}var_query` [1,1,D],
  /// `{prefix}var_agg.in_proj_weight` [3D,D], `.in_proj_bias` [3D], `.out_proj.weight`,
  /// `.out_proj.bias`; artifact `{prefix}query` [D], `q.weight` [D,D], `kv.weight` [2D,D],
  /// `proj.weight`, `proj.bias`.
  TensorList<Scalar, memory_space> parameters(const std::string& prefix = "") const {
    return named(prefix, w_.query, w_.w_in, w_.b_in, w_.w_out, w_.b_out);
  }
  TensorList<Scalar, memory_space> gradients(const std::string& prefix = "") const {
    return named(prefix, grad_.query, grad_.w_in, grad_.b_in, grad_.w_out, grad_.b_out);
  }

  /// Memory of one application to B x N x L inputs folded into k segments: the Saved state
  /// (activations) and the forward/backward scratch (workspace). `heads_held` is the head share
  /// of the materialized strategy (all heads unless tensor-parallel); `group`: exact distributed;
  /// `chunk`: inputs per chunk of a streamed forward and chunked backward (0: one-shot);
  /// `memory`: what the forward keeps (inference: no backward scratch either).
  static MemoryEstimate estimate_application(const AttentionConfig& cfg, std::int64_t B,
                                             std::int64_t N, std::int64_t L, std::int64_t k,
                                             int heads_held, bool group, std::int64_t chunk = 0,
                                             MemoryPolicy memory = MemoryPolicy::keep) {
    constexpr const char* where = "dchag::CrossAttention::estimate_application";
    check_config(where, cfg);
    DCHAG_EXPECT(B >= 1 && N >= 1 && L >= 1 && k >= 1 && k <= N, where, "B, N, L, k are ", B, ", ",
                 N, ", ", L, ", ", k, ", expected each >= 1 and k <= N");
    DCHAG_EXPECT(heads_held >= 1 && heads_held <= cfg.heads, where, "heads_held is ", heads_held,
                 ", expected 1 <= heads_held <= heads = ", cfg.heads);
    DCHAG_EXPECT(chunk >= 0 && chunk <= N, where, "chunk is ", chunk,
                 ", expected 0 <= chunk <= N = ", N);
    DCHAG_EXPECT(memory == MemoryPolicy::keep || cfg.strategy == Strategy::pooled, where,
                 "memory is ", to_string(memory), ", which needs the pooled strategy");
    detail::expect_int_size(where, "token rows B * N * L", {B, N, L});
    return detail::application_bytes<ExecSpace, Scalar>(cfg, B, N, L, k, heads_held, group, chunk,
                                                        memory);
  }
  /// Memory of the module itself: parameters, gradients and the per-call query vectors.
  static MemoryEstimate estimate_module(const AttentionConfig& cfg) {
    check_config("dchag::CrossAttention::estimate_module", cfg);
    const std::int64_t S = sizeof(Scalar), D = cfg.dim, Q = cfg.queries;
    const std::int64_t nh = detail::score_columns(cfg);
    MemoryEstimate e;
    e.parameters = S * (4 * D * D + 4 * D + Q * D);
    e.gradients = e.parameters;
    e.workspace = S * (2 * Q * D + 2 * nh * D);  // q, dq, u, du
    return e;
  }

 private:
  using V1 = View1<Scalar, memory_space>;
  using V2 = View2<Scalar, memory_space>;
  using V3 = View3<Scalar, memory_space>;
  using Params = detail::AttentionParams<Scalar, memory_space>;

  static void check_config(const char* where, const AttentionConfig& cfg) {
    DCHAG_EXPECT(cfg.dim >= 1, where, "dim is ", cfg.dim, ", expected >= 1");
    DCHAG_EXPECT(cfg.queries >= 1, where, "queries is ", cfg.queries, ", expected >= 1");
    DCHAG_EXPECT(cfg.heads >= 1 && cfg.dim % cfg.heads == 0, where, "heads is ", cfg.heads,
                 ", expected a divisor of dim = ", cfg.dim);
    detail::expect_elements(where, "in_proj weights 3 * D * D", {3, cfg.dim, cfg.dim});
  }

  static Params allocate_params(const std::string& prefix, int D, int Q) {
    return {V1(prefix + "query", std::size_t(Q) * D), V3(prefix + "w_in", 3, D, D),
            V2(prefix + "b_in", 3, D), V2(prefix + "w_out", D, D), V1(prefix + "b_out", D)};
  }

  template <class V>
  static auto as4(const V& v) {
    using T = typename V::value_type;
    return View4<T, memory_space>(v.data(), v.extent(0), 1, v.extent(1), v.extent(2));
  }
  /// x [B, N, L, D] as [B*N*L, D] rows.
  static Unmanaged2<const Scalar, memory_space> rows_of(const X4& x) {
    return Unmanaged2<const Scalar, memory_space>(x.data(), x.extent(0) * x.extent(1) * x.extent(2),
                                                  x.extent(3));
  }

  void ensure_chunk_weights(std::size_t positions, int width) {
    auto& e = work_.e_chunk;
    if (e.extent(0) != positions || e.extent(1) < std::size_t(width) ||
        e.extent(2) != std::size_t(detail::score_columns(cfg_))) {
      detail::ensure_view(e, "dchag::attention::chunk_weights", positions, std::size_t(width),
                          std::size_t(detail::score_columns(cfg_)));
    }
  }

  // B x N x L inputs folded into `seg`: extents >= 1, sizes the kernels index, segments that
  // cover the N inputs.
  void check_extents(const char* where, std::int64_t B, std::int64_t N, std::int64_t L,
                     const Segments& seg) const {
    DCHAG_EXPECT(B >= 1 && N >= 1 && L >= 1, where, "inputs are B x N x L = ", B, " x ", N, " x ",
                 L, ", expected every extent >= 1");
    // Rows and positions are kernel league sizes and int indices.
    detail::expect_int_size(where, "token rows B * N * L", {B, N, L});
    detail::expect_elements(where, "pooled state heads * B * k * L * D",
                            {detail::score_columns(cfg_), B, seg.count(), L, cfg_.dim});
    DCHAG_EXPECT(seg.count() >= 1 && seg.offsets.front() == 0 && seg.total() == N, where,
                 "segments cover ", seg.total(), " inputs, expected x.extent(1) = ", N);
    for (int j = 0; j < seg.count(); ++j) {
      DCHAG_EXPECT(seg.size(j) >= 1, where, "segment ", j, " is empty, expected >= 1 input");
    }
  }

  void check_shapes(const char* where, const X4& x, const Segments& seg, std::size_t o0,
                    std::size_t o1, std::size_t o2, std::size_t o3, const char* out_name) const {
    DCHAG_EXPECT(x.extent(3) == std::size_t(cfg_.dim), where, "x.extent(3) is ", x.extent(3),
                 ", expected D = ", cfg_.dim);
    check_extents(where, std::int64_t(x.extent(0)), std::int64_t(x.extent(1)),
                  std::int64_t(x.extent(2)), seg);
    DCHAG_EXPECT(o0 == x.extent(0) && o1 == std::size_t(seg.count()) &&
                     o2 == x.extent(2) * cfg_.queries && o3 == x.extent(3),
                 where, out_name, " is [", o0, ", ", o1, ", ", o2, ", ", o3, "], expected ",
                 out_shape(), " = [", x.extent(0), ", ", seg.count(), ", ",
                 x.extent(2) * cfg_.queries, ", ", x.extent(3), "]");
  }

  // The rows of x in a chunk call of the state `s` over inputs [n0, n1): x holds all N inputs or
  // just these.
  detail::InputRows input_rows(const char* where, const X4& x, const Saved& s, int n0,
                               int n1) const {
    const bool all = x.extent(1) == std::size_t(s.N);
    DCHAG_EXPECT(x.extent(0) == std::size_t(s.B) && (all || x.extent(1) == std::size_t(n1 - n0)) &&
                     x.extent(2) == std::size_t(s.L) && x.extent(3) == std::size_t(cfg_.dim),
                 where, "x is [", x.extent(0), ", ", x.extent(1), ", ", x.extent(2), ", ",
                 x.extent(3), "], expected all inputs [B, N, L, D] = [", s.B, ", ", s.N, ", ", s.L,
                 ", ", cfg_.dim, "] or the chunk's [", s.B, ", ", n1 - n0, ", ", s.L, ", ",
                 cfg_.dim, "]");
    return all ? detail::InputRows::all(s.N, s.L) : detail::InputRows::chunk(n0, n1, s.L);
  }

  // The output's shape as messages name it.
  const char* out_shape() const {
    return cfg_.queries == 1 ? "[B, k, L, D]" : "[B, k, L * queries, D]";
  }

  static void check_mask(const char* where, const Mask& valid, std::size_t B, std::size_t N) {
    DCHAG_EXPECT(valid.data() == nullptr || (valid.extent(0) == B && valid.extent(1) == N), where,
                 "valid is [", valid.extent(0), ", ", valid.extent(1), "], expected [B, N] = [", B,
                 ", ", N, "] or empty");
  }

  static void check_group(const char* where, Strategy strategy, const Segments& seg,
                          const Group* group) {
    if (group == nullptr) return;
    DCHAG_EXPECT(strategy == Strategy::pooled && seg.count() == 1, where,
                 "a group reduction needs the pooled strategy and one segment, got ",
                 to_string(strategy), " and ", seg.count(), " segments");
  }

  void check_saved(const char* where, const Saved& saved, const Group* group) const {
    DCHAG_EXPECT(!saved.empty(), where, "saved state is empty, expected the state of a forward");
    DCHAG_EXPECT(saved.memory != MemoryPolicy::inference, where,
                 "the forward ran with MemoryPolicy::inference and kept nothing for a backward");
    DCHAG_EXPECT(saved.grouped == (group != nullptr), where,
                 saved.grouped ? "the forward ran over a group, but no group is given"
                               : "a group is given, but the forward ran without one");
    check_group(where, saved.strategy, Segments{saved.host_offsets}, group);
    DCHAG_EXPECT(saved.strategy == Strategy::pooled ||
                     (saved.head_begin == head_begin_ && saved.head_end == head_end_),
                 where, "the saved state is of heads [", saved.head_begin, ", ", saved.head_end,
                 "), this module computes [", head_begin_, ", ", head_end_, ")");
  }

  // The saved state of a forward over B x N x L inputs in `seg`, with the current strategy:
  // the weights of every input (keep) or the scores of one chunk of `chunk` inputs (0: grown by
  // the first stream_chunk).
  void prepare(std::size_t B, std::size_t N, std::size_t L, const Segments& seg, bool grouped,
               Saved& s, MemoryPolicy memory, int chunk, const Mask& valid = {}) const {
    detail::prepare_saved(cfg_, head_begin_, head_end_, B, N, L, seg, grouped, s, memory, chunk,
                          valid);
  }

  TensorList<Scalar, memory_space> named(const std::string& prefix, const V1& qv, const V3& w_in,
                                         const V2& b_in, const V2& w_out, const V1& b_out) const {
    return detail::attention_tensors(cfg_, prefix, qv, w_in, b_in, w_out, b_out);
  }

  AttentionConfig cfg_;
  std::string name_;
  Params w_, grad_;
  detail::AttentionWork<Scalar, memory_space> work_;
  Saved own_saved_;
  int head_begin_ = 0, head_end_ = 0;  // set to [0, heads) in the constructor
  bool out_bias_ = true;
};

}  // namespace dchag
