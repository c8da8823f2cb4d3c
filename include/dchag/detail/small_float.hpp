#pragma once
/// dchag's own 16-bit storage types, for Kokkos builds that have no 16-bit half_t / bhalf_t
/// (Kokkos 3.4, and every host-only Kokkos 4, where both are aliases of float). Storage only:
/// no arithmetic, explicit conversions from and to float, callable on host and device. Narrowing
/// rounds to nearest, ties to even, in integer arithmetic (independent of FTZ and rounding
/// modes); NaN stays a quiet NaN, overflow gives infinity. detail/half_bits.hpp holds the host
/// reference the tests compare these against.
#include <Kokkos_Core.hpp>

#include <cstdint>

namespace dchag::detail {

KOKKOS_INLINE_FUNCTION std::uint32_t float_bits(float f) {
  union {
    float f;
    std::uint32_t u;
  } v{f};
  return v.u;
}
KOKKOS_INLINE_FUNCTION float bits_float(std::uint32_t u) {
  union {
    std::uint32_t u;
    float f;
  } v{u};
  return v.f;
}

KOKKOS_INLINE_FUNCTION std::uint16_t float_to_bf16_bits(float f) {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  // Adding 0x7FFF plus the lowest kept bit rounds to nearest even; a carry reaches infinity.
  return static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
KOKKOS_INLINE_FUNCTION float bf16_bits_to_float_device(std::uint16_t b) {
  return bits_float(static_cast<std::uint32_t>(b) << 16);
}

KOKKOS_INLINE_FUNCTION std::uint16_t float_to_fp16_bits(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u);  // NaN
  // 65520 is halfway between 65504 (odd mantissa) and 2^16: it and above round to infinity.
  if (a >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
  if (a < 0x38800000u) {  // below 2^-14: fp16 subnormal or zero
    if (a <= 0x33000000u) return static_cast<std::uint16_t>(sign);  // <= 2^-25 rounds to 0
    const std::uint32_t e = a >> 23;                                // 102 ... 112
    const std::uint32_t m = (a & 0x7FFFFFu) | 0x800000u;            // value = m * 2^(e - 150)
    const std::uint32_t shift = 126u - e;                           // to units of 2^-24: 14 ... 24
    std::uint32_t r = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;  // 0x400 is the smallest normal: fine
    return static_cast<std::uint16_t>(sign | r);
  }
  std::uint32_t h = (a - 0x38000000u) >> 13;  // rebias 127 -> 15, keep 10 mantissa bits
  const std::uint32_t rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves to the exponent
  return static_cast<std::uint16_t>(sign | h);
}
KOKKOS_INLINE_FUNCTION float fp16_bits_to_float_device(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1Fu) return bits_float(sign | 0x7F800000u | (m << 13));
  if (e == 0) {  // m * 2^-24, exact in float
    const float mag = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

/// bfloat16 storage: the top half of a float.
struct bf16_storage {
  std::uint16_t bits;
  bf16_storage() = default;
  KOKKOS_INLINE_FUNCTION static bf16_storage from_bits(std::uint16_t b) {
    bf16_storage s;
    s.bits = b;
    return s;
  }
  KOKKOS_INLINE_FUNCTION explicit bf16_storage(float f) : bits(float_to_bf16_bits(f)) {}
  KOKKOS_INLINE_FUNCTION explicit operator float() const { return bf16_bits_to_float_device(bits); }
};

/// IEEE binary16 storage.
struct fp16_storage {
  std::uint16_t bits;
  fp16_storage() = default;
  KOKKOS_INLINE_FUNCTION static fp16_storage from_bits(std::uint16_t b) {
    fp16_storage s;
    s.bits = b;
    return s;
  }
  KOKKOS_INLINE_FUNCTION explicit fp16_storage(float f) : bits(float_to_fp16_bits(f)) {}
  KOKKOS_INLINE_FUNCTION explicit operator float() const { return fp16_bits_to_float_device(bits); }
};

}  // namespace dchag::detail
