#pragma once
/// Exceptions and precondition checks shared by every dchag entry point.
///
/// Bad arguments throw std::invalid_argument; runtime and MPI failures throw dchag::error.
/// Messages name the function, the argument and the expected value, e.g.
/// "dchag::CrossAttention::forward: x.extent(3) is 96, expected D = 128".
#include <sstream>
#include <stdexcept>
#include <string>

namespace dchag {

/// Runtime failure that is not the caller's argument: MPI errors, I/O errors, cross-rank mismatch.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}
}  // namespace detail
}  // namespace dchag

/// Throws std::invalid_argument("where: message") when `cond` holds. `...` is streamed.
#define DCHAG_THROW_IF(cond, where, ...)                                              \
  do {                                                                                \
    if (cond) {                                                                       \
      throw std::invalid_argument(::dchag::detail::concat(where, ": ", __VA_ARGS__)); \
    }                                                                                 \
  } while (false)

/// Throws std::invalid_argument unless `cond` holds.
#define DCHAG_EXPECT(cond, where, ...) DCHAG_THROW_IF(!(cond), where, __VA_ARGS__)
