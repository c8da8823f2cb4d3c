#pragma once
/// The vocabulary of the single-query cross-attention (dchag/cross_attention.hpp): its
/// configuration, how its N inputs split into segments, the group reduction of the exact
/// distributed form, and the state one forward keeps for its backward.
#include <dchag/config.hpp>
#include <dchag/error.hpp>
#include <dchag/tensor.hpp>

#include <cstdint>
#include <vector>

namespace dchag {

/// Which inputs are present (DESIGN 3.10): mask(b, n) is 1 where input n of sample b is valid
/// and 0 where it is missing. An empty view: every input is valid.
template <class MemSpace>
using InputMask = View2<const std::uint8_t, MemSpace>;

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
/// MPI out of the attention headers; without one (nullptr) the reduction is over this process.
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
  /// N_q learned queries (DESIGN 3.9): each output position gives N_q tokens, [.., L, N_q, D].
  int queries = 1;
};

namespace detail {
/// The score columns of a cross-attention: one softmax per (query j, head h), column j * heads + h.
inline int score_columns(const AttentionConfig& cfg) { return cfg.heads * cfg.queries; }
}  // namespace detail

/// What one forward keeps for its backward. The backward runs with the strategy, head share and
/// group of the forward that filled it, whatever the module is set to in between. P below is
/// B·k·L, the number of output positions, S the score columns (queries x heads).
template <class Scalar, class MemSpace>
struct AttentionSaved {
  int B = 0, N = 0, L = 0, k = 0;
  Strategy strategy = Strategy::pooled;
  int head_begin = 0, head_end = 0;          // materialized head share
  bool grouped = false;                      // forward ran over a channel group (exact distributed)
  MemoryPolicy memory = MemoryPolicy::keep;  // what the forward kept (keep: the weights a)
  View1<int, MemSpace> offsets;              // [k+1]
  View1<int, MemSpace> segment;              // [N]: segment of each input
  InputMask<MemSpace> valid;                 // [B, N] the forward's mask; empty: all valid
  View2<Scalar, MemSpace> a;     // keep: [B*N*L, S] softmax weights; else one chunk's scores
  View3<Scalar, MemSpace> z;     // pooled: [S, P, D] pooled tokens (this rank's share)
  View2<Scalar, MemSpace> kmat;  // materialized: [B*N*L, D]
  View2<Scalar, MemSpace> vmat;  // materialized: [B*N*L, D]
  View2<Scalar, MemSpace> ocat;  // [P * queries, D] heads' outputs before out-projection
  View2<Scalar, MemSpace> run_max, run_sum;  // [P, S] softmax max and denominator
  View2<Scalar, MemSpace> inv_share;         // grouped: [P, S] group denominator / this rank's
  std::vector<int> host_offsets;

  bool empty() const { return k == 0; }
};

}  // namespace dchag
