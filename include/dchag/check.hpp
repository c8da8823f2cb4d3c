#pragma once
/// Opt-in checks for non-finite values (DESIGN 7). dchag never inspects the values it is given: a
/// NaN or Inf in the images or the parameters propagates through every stage (CONTRIBUTING,
/// Errors). Call these where one should stop the run instead, for example on the images before
/// forward and on the parameters or gradients after a step:
///
///   dchag::check_finite(exec, "images", images);
///   dchag::check_finite(exec, model.gradients());
///
/// Each throws dchag::error naming the first non-finite element and its index. The cost is one
/// reduction over the values (one per tensor piece) and a fence; nothing is allocated.
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/error.hpp>
#include <dchag/precision.hpp>
#include <dchag/tensor.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace dchag {
namespace detail {

/// Index of the first element of the 1-D view `v` that is NaN or +-Inf, or -1: the minimum over
/// i of (isfinite(v(i)) ? INT64_MAX : i).
template <class ExecSpace, class V>
std::int64_t first_non_finite(const ExecSpace& exec, const V& v) {
  const std::int64_t none = std::numeric_limits<std::int64_t>::max();
  std::int64_t first = none;
  Kokkos::parallel_reduce(
      "dchag::check_finite",
      Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(
          exec, 0, static_cast<std::int64_t>(v.extent(0))),
      KOKKOS_LAMBDA(const std::int64_t i, std::int64_t& m) {
        // 16-bit storage types are checked as the floats they widen to (exactly).
        using T = std::remove_const_t<typename V::value_type>;
        using Wide = std::conditional_t<sizeof(T) == 2, float, T>;
        const std::int64_t here = detail::isfinite(convert<Wide>(v(i))) ? none : i;
        if (here < m) m = here;
      },
      Kokkos::Min<std::int64_t>(first));
  return first == none ? -1 : first;
}

/// Element `i` of a 1-D view, copied to the host, as a double.
template <class V>
double element_at(const V& v, std::int64_t i) {
  std::remove_const_t<typename V::value_type> x{};
  Kokkos::deep_copy(x, Kokkos::subview(v, i));
  return convert<double>(x);
}

inline void bracketed(std::ostream& os, const std::vector<std::int64_t>& values) {
  os << "[";
  for (std::size_t r = 0; r < values.size(); ++r) os << (r ? ", " : "") << values[r];
  os << "]";
}

/// "([i0, i1, ...] of [n0, n1, ...])": the row-major multi-index of flat index `i` in `shape`.
inline std::string position(std::int64_t i, const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> idx(shape.size());
  for (std::size_t r = shape.size(); r-- > 0;) {
    const std::int64_t n = shape[r] > 0 ? shape[r] : 1;
    idx[r] = i % n;
    i /= n;
  }
  std::ostringstream os;
  os << "(";
  bracketed(os, idx);
  os << " of ";
  bracketed(os, shape);
  os << ")";
  return os.str();
}

[[noreturn]] inline void throw_non_finite(const std::string& name, std::int64_t index,
                                          const std::string& position, double value) {
  std::ostringstream os;
  os << "dchag::check_finite: " << name << " element " << index << " " << position << " is ";
  if (std::isnan(value)) {
    os << "nan";  // whatever its sign bit
  } else {
    os << value;
  }
  os << ", expected every element finite";
  throw error(os.str());
}

}  // namespace detail

/// Throws dchag::error unless every element of `view` (any rank and layout, contiguous, in
/// memory `exec` can access) is finite. The message names `name`, the memory-order index of the
/// first non-finite element, its multi-index for LayoutRight views, and its value.
template <class ExecSpace, class V>
void check_finite(const ExecSpace& exec, const std::string& name, const V& view) {
  static_assert(Kokkos::SpaceAccessibility<ExecSpace, typename V::memory_space>::accessible,
                "dchag::check_finite: the view's memory must be accessible from exec");
  detail::ScopedRegion region("dchag::check_finite");
  DCHAG_EXPECT(view.span_is_contiguous(), "dchag::check_finite", name,
               " is not contiguous, expected a contiguous View");
  using T = typename V::value_type;
  const Unmanaged1<const std::remove_const_t<T>, typename V::memory_space> flat(view.data(),
                                                                                view.span());
  const std::int64_t i = detail::first_non_finite(exec, flat);
  if (i < 0) return;
  std::string at = "(in memory order)";
  if (std::is_same_v<typename V::array_layout, Kokkos::LayoutRight> || int(V::rank) <= 1) {
    std::vector<std::int64_t> shape;
    for (int r = 0; r < int(V::rank); ++r) shape.push_back(std::int64_t(view.extent(r)));
    at = detail::position(i, shape);
  }
  detail::throw_non_finite(name, i, at, detail::element_at(flat, i));
}

/// Throws dchag::error unless every element of every tensor of `list` (a module's parameters()
/// or gradients()) is finite. The message names the tensor (its ClimaX name) and the index of the
/// first non-finite element in the file tensor, as a weight file holds it.
template <class ExecSpace, class Scalar, class MemSpace>
void check_finite(const ExecSpace& exec, const TensorList<Scalar, MemSpace>& list) {
  detail::ScopedRegion region("dchag::check_finite");
  for (const auto& t : list) {
    for (const auto& p : t.pieces) {
      const std::int64_t i = detail::first_non_finite(exec, p.values);
      if (i < 0) continue;
      const std::int64_t file =
          t.transposed_rows > 0 ? file_index(i, t.transposed_rows, t.numel()) : p.offset + i;
      detail::throw_non_finite(t.name, file, detail::position(file, t.shape),
                               detail::element_at(p.values, i));
    }
  }
}

}  // namespace dchag
