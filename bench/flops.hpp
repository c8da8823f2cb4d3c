#pragma once
/// Work counts of the benchmarked operations: the one place the flop and byte formulas live
/// (bench/README.md documents them).
///
/// Counting rule: every multiply and every add of a matrix product or of a token-sized dot
/// product counts one flop (a multiply-add is 2). Left out: softmax exponentials and maxima,
/// bias and embedding additions, copies, and the once-per-call D x D products (q = Wq qv,
/// u = Wk^T q), none of which grows with both C and D.
#include <cstdint>

namespace dchag_bench {

/// One benchmark configuration (DESIGN 2 notation).
struct Shape {
  std::int64_t B = 1, C = 500, H = 64, W = 64, p = 8, D = 256, heads = 8;

  std::int64_t L() const { return (H / p) * (W / p); }
  /// Tokens of the [B, C, L, D] tensor.
  std::int64_t tokens() const { return B * C * L(); }
  /// Bytes of the [B, C, L, D] token tensor.
  template <class Scalar>
  std::int64_t token_bytes() const {
    return tokens() * D * std::int64_t(sizeof(Scalar));
  }
};

/// Per-channel tokenizer (a [B*L, p*p] x [p*p, D] GEMM per channel).
/// forward: tokens = patches . Wt;  backward: dWt += patches^T . d_tokens (no image gradient).
inline double tokenizer_forward(const Shape& s) {
  return 2.0 * s.B * s.C * s.L() * s.p * s.p * s.D;
}
inline double tokenizer_backward(const Shape& s) {
  return 2.0 * s.B * s.C * s.L() * s.p * s.p * s.D;
}

/// Single-query cross-attention folding N inputs at each of `positions` positions; M = positions*N
/// tokens in all. nh heads, width D.
struct Attention {
  double M, positions, D, nh;
};

/// Materialized (K, V formed, as PyTorch):
///   forward  4 M D^2 (K, V)  + 4 M D (scores, weighted sum)  + 2 P D^2 (out-projection)
///   backward 8 M D^2 (dx = dK Wk + dV Wv, dWk, dWv) + 4 M D (da, dq) + 4 P D^2 (dWo, go)
inline double materialized_forward(const Attention& a) {
  return 4 * a.M * a.D * a.D + 4 * a.M * a.D + 2 * a.positions * a.D * a.D;
}
inline double materialized_backward(const Attention& a) {
  return 8 * a.M * a.D * a.D + 4 * a.M * a.D + 4 * a.positions * a.D * a.D;
}

/// Pooled (scores against u_h = Wk_h^T q_h, pooled tokens z_h, DESIGN 3.2):
///   forward  4 M nh D (scores, z)  + 4 P D^2 (Wv_h z_h, out-projection)
///   backward 8 M nh D (gz.x, dx, du) + 8 P D^2 (dWo, go, dWv, gz)
inline double pooled_forward(const Attention& a) {
  return 4 * a.M * a.nh * a.D + 4 * a.positions * a.D * a.D;
}
inline double pooled_backward(const Attention& a) {
  return 8 * a.M * a.nh * a.D + 8 * a.positions * a.D * a.D;
}

inline double attention_forward(bool pooled, const Attention& a) {
  return pooled ? pooled_forward(a) : materialized_forward(a);
}
inline double attention_backward(bool pooled, const Attention& a) {
  return pooled ? pooled_backward(a) : materialized_backward(a);
}

/// The flat (ClimaX) cross-attention: all C channels at each of the B*L positions.
inline Attention flat_attention(const Shape& s) {
  return {double(s.tokens()), double(s.B * s.L()), double(s.D), double(s.heads)};
}

/// Flat front end: tokenizer + cross-attention over all C channels.
inline double flat_forward(const Shape& s, bool pooled) {
  return tokenizer_forward(s) + attention_forward(pooled, flat_attention(s));
}
inline double flat_forward_backward(const Shape& s, bool pooled) {
  return flat_forward(s, pooled) + attention_backward(pooled, flat_attention(s)) +
         tokenizer_backward(s);
}

/// D-CHAG on one process with P channel groups (DESIGN 3.3, 3.4), no local tree:
///   linear partial:          forward 2 B C L D, backward 3 B C L D (dx = w dy, dw)
///   cross-attention partial: the attention formulas with M = B C L, P B L positions
///   final:                   the attention formulas with M = P B L, B L positions
inline double dchag_forward_backward(const Shape& s, std::int64_t groups, bool linear,
                                     bool pooled) {
  const double BCLD = double(s.tokens()) * s.D;
  const Attention partial{double(s.tokens()), double(groups * s.B * s.L()), double(s.D),
                          double(s.heads)};
  const Attention final{double(groups * s.B * s.L()), double(s.B * s.L()), double(s.D),
                        double(s.heads)};
  const double part =
      linear ? 2 * BCLD + 3 * BCLD
             : attention_forward(pooled, partial) + attention_backward(pooled, partial);
  return tokenizer_forward(s) + tokenizer_backward(s) + part + attention_forward(pooled, final) +
         attention_backward(pooled, final);
}

}  // namespace dchag_bench
