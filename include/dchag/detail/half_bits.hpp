#pragma once
/// Host-side conversions between IEEE binary16 / bfloat16 bit patterns and float/double.
///
/// Widening is exact. Narrowing rounds to nearest, ties to even, directly from double, so a
/// double input is rounded once (going through float first would round twice). Overflow gives
/// infinity, NaN stays a (quiet) NaN with its sign. Independent of the FPU rounding mode.
#include <bit>
#include <cmath>
#include <cstdint>

namespace dchag::detail {

/// binary16 bits -> float (exact).
inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  const std::uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) {  // inf / nan
    return std::bit_cast<float>(sign | 0x7F800000u | (man << 13));
  }
  if (exp == 0) {  // zero / subnormal: man * 2^-24, exact in float
    const float mag = std::ldexp(static_cast<float>(man), -24);
    return sign ? -mag : mag;
  }
  return std::bit_cast<float>(sign | ((exp - 15 + 127) << 23) | (man << 13));
}

/// bfloat16 bits -> float (exact: bfloat16 is the top half of a float).
inline float bf16_bits_to_float(std::uint16_t b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

/// Rounds `x` to a binary format with `ExpBits` exponent and `ManBits` mantissa bits
/// (IEEE layout, subnormals, round to nearest even) and returns its bit pattern.
template <int ExpBits, int ManBits>
std::uint16_t round_to_small_float(double x) {
  static_assert(1 + ExpBits + ManBits == 16);
  constexpr int bias = (1 << (ExpBits - 1)) - 1;
  constexpr int emin = 1 - bias;
  constexpr std::uint32_t inf_bits = ((1u << ExpBits) - 1u) << ManBits;
  const std::uint32_t sign = std::signbit(x) ? (1u << 15) : 0u;
  if (std::isnan(x)) return static_cast<std::uint16_t>(sign | inf_bits | (1u << (ManBits - 1)));
  const double a = std::fabs(x);
  // Halfway between the largest finite value and 2^(bias+1); ties there round up to infinity.
  const double overflow = std::ldexp(2.0 - std::ldexp(1.0, -(ManBits + 1)), bias);
  if (a >= overflow) return static_cast<std::uint16_t>(sign | inf_bits);
  if (a == 0.0) return static_cast<std::uint16_t>(sign);
  int e2;
  (void)std::frexp(a, &e2);  // a = f * 2^e2, f in [0.5, 1)
  int e = e2 - 1;            // a in [2^e, 2^(e+1))
  if (e < emin) e = emin;    // subnormal range shares the quantum of the smallest normal binade
  // m = a / quantum is exact (power-of-two scaling, far from double's limits), m < 2^(ManBits+1).
  const double m = std::ldexp(a, ManBits - e);
  double r = std::floor(m);
  const double frac = m - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
  const auto ri = static_cast<std::uint32_t>(r);
  // Subnormals (e == emin, r < 2^ManBits) encode as r; normals as (e+bias-1)*2^ManBits + r,
  // which also carries a mantissa overflow (r == 2^(ManBits+1)) into the exponent.
  const std::uint32_t bits = static_cast<std::uint32_t>(e - emin) * (1u << ManBits) + ri;
  return static_cast<std::uint16_t>(sign | bits);
}

inline std::uint16_t double_to_half_bits(double x) { return round_to_small_float<5, 10>(x); }
inline std::uint16_t double_to_bf16_bits(double x) { return round_to_small_float<8, 7>(x); }

}  // namespace dchag::detail
