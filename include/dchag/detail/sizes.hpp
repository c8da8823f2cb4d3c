#pragma once
/// Size arithmetic for validation: products in 64 bits that report overflow instead of wrapping,
/// and the limits of the index types the kernels use (CONTRIBUTING, Code).
#include <dchag/error.hpp>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>

namespace dchag::detail {

/// A TeamPolicy league size is an int, and the kernels index patches, pixels of a patch and rows
/// inside a league with int: every count that feeds one must stay at or below this.
inline constexpr std::int64_t max_int_index = INT_MAX;

/// Elements of one tensor. Indices are 64-bit; the limit keeps the bytes of a tensor of 8-byte
/// scalars (2^56) and the sum of the few dozen tensors a memory estimate adds inside int64_t.
inline constexpr std::int64_t max_elements = std::int64_t(1) << 53;

/// The product of non-negative factors, or -1 when it does not fit std::int64_t.
inline std::int64_t checked_product(std::initializer_list<std::int64_t> factors) {
  std::int64_t p = 1;
  for (const std::int64_t f : factors) {
    if (f < 0) return -1;
    if (f != 0 && p > std::numeric_limits<std::int64_t>::max() / f) return -1;
    p *= f;
  }
  return p;
}

/// Throws std::invalid_argument unless the product of `factors` is at most `limit`:
///   "where: token rows C * L = 4 * 4294967296 is 17179869184, expected <= INT_MAX = 2147483647
///    (a kernel league size)". Returns the product.
inline std::int64_t expect_size(const char* where, const char* what,
                                std::initializer_list<std::int64_t> factors, std::int64_t limit) {
  const std::int64_t n = checked_product(factors);
  if (n >= 0 && n <= limit) return n;
  std::ostringstream os;
  os << what;
  if (factors.size() > 1) {
    const char* sep = " = ";
    for (const std::int64_t f : factors) {
      os << sep << f;
      sep = " * ";
    }
  }
  os << " is ";
  if (n < 0) {
    os << "more than " << std::numeric_limits<std::int64_t>::max();
  } else {
    os << n;
  }
  if (limit == max_int_index) {
    os << ", expected <= INT_MAX = " << limit << " (a kernel league size or int index)";
  } else if (limit == max_elements) {
    os << ", expected <= 2^53 = " << limit << " elements of one tensor";
  } else {
    os << ", expected <= " << limit;
  }
  throw std::invalid_argument(concat(where, ": ", os.str()));
}

/// expect_size against the int indices of the kernels.
inline std::int64_t expect_int_size(const char* where, const char* what,
                                    std::initializer_list<std::int64_t> factors) {
  return expect_size(where, what, factors, max_int_index);
}

/// expect_size against the element count of one tensor.
inline std::int64_t expect_elements(const char* where, const char* what,
                                    std::initializer_list<std::int64_t> factors) {
  return expect_size(where, what, factors, max_elements);
}

}  // namespace dchag::detail
