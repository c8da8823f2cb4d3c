#pragma once
/// Storage and accumulation types (DESIGN 3.12). A front end's `Scalar` is its accumulation type:
/// parameters, gradients, dot products, softmax statistics, pooled sums and GEMMs. Its `Storage`
/// type (default: Scalar) is what the images and every token are held in: bf16, fp16, float or
/// double. Each token is computed in Scalar and rounded to Storage once, where it is formed, so
/// a kept token, a recomputed one and a streamed one are the same value under every
/// MemoryPolicy; the backward treats that rounding as the identity (straight-through), as
/// mixed-precision training does.
#include <dchag/detail/kokkos_compat.hpp>

#include <cstdint>
#include <type_traits>

namespace dchag {

/// bfloat16 (8 exponent, 7 mantissa bits): Kokkos::Experimental::bhalf_t where it is a 16-bit
/// type, else dchag's own. Storage only: convert to float to compute.
using bf16 = detail::bf16_type;
/// IEEE binary16 (5 exponent, 10 mantissa bits): Kokkos::Experimental::half_t where it is a
/// 16-bit type, else dchag's own.
using fp16 = detail::fp16_type;

/// What dchag knows about a storage type: its name (messages, JSON) and its unit roundoff u
/// (half an ulp at 1: a rounded x is x * (1 + e) with |e| <= u), from which tolerances follow.
template <class T>
struct StorageTraits;
template <>
struct StorageTraits<double> {
  static constexpr const char* name = "double";
  static constexpr std::int64_t code = 0;                          // compared across ranks
  static constexpr double unit_roundoff = 1.1102230246251565e-16;  // 2^-53
};
template <>
struct StorageTraits<float> {
  static constexpr const char* name = "float";
  static constexpr std::int64_t code = 1;                          // compared across ranks
  static constexpr double unit_roundoff = 5.9604644775390625e-08;  // 2^-24
};
template <>
struct StorageTraits<bf16> {
  static constexpr const char* name = "bf16";
  static constexpr std::int64_t code = 2;              // compared across ranks
  static constexpr double unit_roundoff = 0.00390625;  // 2^-8
};
template <>
struct StorageTraits<fp16> {
  static constexpr const char* name = "fp16";
  static constexpr std::int64_t code = 3;                 // compared across ranks
  static constexpr double unit_roundoff = 0.00048828125;  // 2^-11
};

/// True for the types a front end can store images and tokens in.
template <class T>
inline constexpr bool is_storage_type_v = std::is_same_v<T, double> || std::is_same_v<T, float> ||
                                          std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

namespace detail {

/// x as a `To`; between a 16-bit type and anything else through float.
template <class To, class From>
KOKKOS_FORCEINLINE_FUNCTION To convert(const From& x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (sizeof(From) == 2) {
    return static_cast<To>(static_cast<float>(x));
  } else if constexpr (sizeof(To) == 2) {
    return To(static_cast<float>(x));
  } else {
    return static_cast<To>(x);
  }
}

/// x rounded to Storage, back in Scalar.
template <class Storage, class Scalar>
KOKKOS_FORCEINLINE_FUNCTION Scalar round_to(const Scalar& x) {
  return convert<Scalar>(convert<Storage>(x));
}

}  // namespace detail
}  // namespace dchag
