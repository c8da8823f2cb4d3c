#pragma once
/// The element types of safetensors files that dchag reads and writes, their sizes and names, and
/// the host conversions between their little-endian bytes and float/double (not part of the API:
/// dchag/safetensors.hpp is).
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include "dchag/detail/half_bits.hpp"

namespace dchag::safetensors {

/// The floating-point dtypes of the format that dchag reads and writes (PyTorch writes all four).
enum class DType { F32, F16, BF16, F64 };

/// Bytes per element.
inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64:
      return 8;
    case DType::F32:
      return 4;
    case DType::F16:
    case DType::BF16:
      return 2;
  }
  return 0;
}

/// The name used in the header ("F32", "F16", "BF16", "F64").
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::F64:
      return "F64";
  }
  return "?";
}

/// The dtypes a file may hold, as listed in error messages.
inline constexpr const char* supported_dtypes = "F32, F64, F16, BF16";

/// The dtype called `name` in a header (case-sensitive, as the format is), or nullopt.
inline std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::F64}) {
    if (name == dtype_name(t)) return t;
  }
  return std::nullopt;
}

namespace detail {

inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

/// Whether two shapes hold the same row-major data: equal once every dimension of size 1 is left
/// out (`[]` and `[1]`, `[C, D]` and `[1, C, D]`). Leaving out a size-1 dimension never changes
/// the row-major order of the elements, so such a tensor is read as it is.
inline bool same_up_to_unit_dims(std::span<const std::int64_t> a, std::span<const std::int64_t> b) {
  std::size_t i = 0, j = 0;
  for (;;) {
    while (i < a.size() && a[i] == 1) ++i;
    while (j < b.size() && b[j] == 1) ++j;
    if (i == a.size() || j == b.size()) return i == a.size() && j == b.size();
    if (a[i] != b[j]) return false;
    ++i;
    ++j;
  }
}

/// numel of `shape`, or nullopt if a dimension is negative or the product (times `elem`) overflows.
inline std::optional<std::int64_t> checked_numel(std::span<const std::int64_t> shape,
                                                 std::size_t elem) {
  std::int64_t n = 1;
  for (auto d : shape) {
    if (d < 0) return std::nullopt;
    if (d != 0 && n > std::numeric_limits<std::int64_t>::max() / d) return std::nullopt;
    n *= d;
  }
  if (static_cast<std::uint64_t>(n) > std::numeric_limits<std::size_t>::max() / elem) {
    return std::nullopt;
  }
  return n;
}

inline std::uint64_t load_le(const unsigned char* p, int bytes) {
  std::uint64_t u = 0;
  for (int i = bytes - 1; i >= 0; --i) u = (u << 8) | p[i];
  return u;
}

/// The element at `p` as T (float or double). F16, BF16 and F32 widen exactly; F64 read as float
/// is rounded to nearest.
template <class T>
T load_as(const unsigned char* p, DType t) {
  switch (t) {
    case DType::F64:
      return static_cast<T>(std::bit_cast<double>(load_le(p, 8)));
    case DType::F32:
      return static_cast<T>(std::bit_cast<float>(static_cast<std::uint32_t>(load_le(p, 4))));
    case DType::F16:
      return static_cast<T>(
          ::dchag::detail::half_bits_to_float(static_cast<std::uint16_t>(load_le(p, 2))));
    case DType::BF16:
      return static_cast<T>(
          ::dchag::detail::bf16_bits_to_float(static_cast<std::uint16_t>(load_le(p, 2))));
  }
  return T(0);
}

/// Stores `v` at `p` as `t`, rounded to nearest even (F16/BF16 directly from double).
inline void store_from_double(unsigned char* p, double v, DType t) {
  std::uint64_t u = 0;
  switch (t) {
    case DType::F64:
      u = std::bit_cast<std::uint64_t>(v);
      break;
    case DType::F32:
      u = std::bit_cast<std::uint32_t>(static_cast<float>(v));
      break;
    case DType::F16:
      u = ::dchag::detail::double_to_half_bits(v);
      break;
    case DType::BF16:
      u = ::dchag::detail::double_to_bf16_bits(v);
      break;
  }
  const auto n = static_cast<int>(dtype_size(t));
  for (int i = 0; i < n; ++i) p[i] = static_cast<unsigned char>(u >> (8 * i));
}

template <class T>
inline constexpr bool is_value_type_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

}  // namespace detail
}  // namespace dchag::safetensors
