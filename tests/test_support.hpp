#pragma once
// Helpers shared by the kernel and front-end tests: seeded random fills of views and of whole
// TensorLists, host copies, max-abs differences, copies of parameters by name, and central-
// difference checks of a scalar loss (sum(out * g) in the tests) against analytic gradients.
// Everything works on views in the default execution space's memory (device or host) through
// host copies, so the same tests run on every backend.
#include <catch2/catch.hpp>

#include <Kokkos_Core.hpp>

#include <dchag/config.hpp>
#include <dchag/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace dchag_test {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;
template <class T>
using V3 = dchag::View3<T, Mem>;
template <class T>
using V4 = dchag::View4<T, Mem>;
// Every convention and strategy, for tests that sweep them.
constexpr dchag::Convention kConventions[] = {dchag::Convention::climax,
                                              dchag::Convention::artifact};
constexpr dchag::Strategy kStrategies[] = {dchag::Strategy::pooled, dchag::Strategy::materialized};

template <class T>
using List = dchag::TensorList<T, Mem>;

template <class T>
using Flat = Kokkos::View<T*, Kokkos::LayoutRight, Mem, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;

/// The elements of a contiguous view as one unmanaged 1-D view (memory order).
template <class V>
auto flat(const V& v) {
  REQUIRE(v.span_is_contiguous());
  return Flat<typename V::value_type>(v.data(), v.span());
}

/// Every element of a contiguous view, as doubles on the host, in memory order.
template <class V>
std::vector<double> to_host(const V& v) {
  using T = std::remove_const_t<typename V::value_type>;
  const auto src = flat(v);
  Kokkos::View<T*, Kokkos::HostSpace> h("dchag_test::to_host", src.extent(0));
  Kokkos::deep_copy(h, src);
  return std::vector<double>(h.data(), h.data() + h.extent(0));
}

/// Writes host values (memory order) into a contiguous view.
template <class V>
void from_host(const V& v, const std::vector<double>& values) {
  using T = typename V::value_type;
  const auto dst = flat(v);
  REQUIRE(values.size() == dst.extent(0));
  Kokkos::View<T*, Kokkos::HostSpace> h("dchag_test::from_host", dst.extent(0));
  for (std::size_t i = 0; i < values.size(); ++i) h(i) = static_cast<T>(values[i]);
  Kokkos::deep_copy(dst, h);
}

/// Fills a contiguous view with N(0, sd^2) values drawn from `seed`.
template <class V>
void fill_normal(const V& v, std::uint64_t seed, double sd = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(0.0, sd);
  std::vector<double> values(v.span());
  for (auto& x : values) x = dist(gen);
  from_host(v, values);
}

/// Fills every piece of every tensor of a TensorList with N(0, sd^2) values drawn from `seed`.
template <class T>
void fill_normal(const List<T>& list, std::uint64_t seed, double sd) {
  std::uint64_t stream = seed;
  for (const auto& t : list) {
    for (const auto& p : t.pieces) fill_normal(p.values, ++stream * 0x9E3779B97F4A7C15ull, sd);
  }
}

/// max |a - b| over two views (or host vectors) of the same size.
inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}
template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  return max_abs_diff(to_host(a), to_host(b));
}

inline double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::abs(x));
  return m;
}

/// sum(out * g), accumulated in double on the host: the scalar loss of every gradient test.
template <class A, class B>
double dot(const A& out, const B& g) {
  const auto a = to_host(out), b = to_host(g);
  REQUIRE(a.size() == b.size());
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

/// A tensor's held elements, pieces one after the other (memory order), on the host.
template <class T>
std::vector<double> held_values(const dchag::NamedTensor<T, Mem>& t) {
  std::vector<double> all;
  for (const auto& p : t.pieces) {
    const auto v = to_host(p.values);
    all.insert(all.end(), v.begin(), v.end());
  }
  return all;
}

/// A fully held, untransposed tensor in file order (its pieces placed at their offsets).
template <class T>
std::vector<double> file_order(const dchag::NamedTensor<T, Mem>& t) {
  REQUIRE(t.transposed_rows == 0);
  REQUIRE(t.held() == t.numel());
  std::vector<double> all(static_cast<std::size_t>(t.numel()));
  for (const auto& p : t.pieces) {
    const auto v = to_host(p.values);
    std::copy(v.begin(), v.end(), all.begin() + p.offset);
  }
  return all;
}

/// Host snapshot of every tensor of a list (by position in the list).
template <class T>
std::vector<std::vector<double>> snapshot(const List<T>& list) {
  std::vector<std::vector<double>> s;
  for (const auto& t : list) s.push_back(held_values(t));
  return s;
}

/// The tensor called `name` in `list`, or nullptr. (Not on a temporary list: the pointer would
/// dangle.)
template <class T>
const dchag::NamedTensor<T, Mem>* find(const List<T>& list, const std::string& name) {
  for (const auto& t : list)
    if (t.name == name) return &t;
  return nullptr;
}
template <class T>
const dchag::NamedTensor<T, Mem>* find(const List<T>&& list, const std::string& name) = delete;

/// The held values of tensor `name` of `list`; fails when there is none.
template <class T>
std::vector<double> values_of(const List<T>& list, const std::string& name) {
  const auto* t = find(list, name);
  INFO("tensor " << name);
  REQUIRE(t != nullptr);
  return held_values(*t);
}

/// Copies `from` into `to` by name: every tensor of `to` must exist in `from` with the same shape
/// and memory layout, and every piece of `to` must match a piece of `from` at the same offset.
template <class T>
void copy_by_name(const List<T>& from, const List<T>& to) {
  for (const auto& t : to) {
    INFO("tensor " << t.name);
    const auto* f = find(from, t.name);
    REQUIRE(f != nullptr);
    REQUIRE(f->shape == t.shape);
    REQUIRE(f->transposed_rows == t.transposed_rows);
    for (const auto& p : t.pieces) {
      bool copied = false;
      for (const auto& q : f->pieces) {
        if (q.offset == p.offset && q.values.extent(0) == p.values.extent(0)) {
          Kokkos::deep_copy(p.values, q.values);
          copied = true;
        }
      }
      REQUIRE(copied);
    }
  }
}

/// Requires two lists to hold the same names, shapes and layouts, with values within `tol`
/// (max-abs, per tensor). `tol_of(name)` may give a per-tensor tolerance.
template <class T>
void require_same(const List<T>& a, const List<T>& b,
                  const std::function<double(const std::string&)>& tol_of) {
  REQUIRE(a.size() == b.size());
  for (const auto& t : a) {
    INFO("tensor " << t.name);
    const auto* u = find(b, t.name);
    REQUIRE(u != nullptr);
    REQUIRE(u->shape == t.shape);
    REQUIRE(u->transposed_rows == t.transposed_rows);
    REQUIRE(u->pieces.size() == t.pieces.size());
    const auto va = held_values(t), vb = held_values(*u);
    const double diff = max_abs_diff(va, vb), tol = tol_of(t.name);
    INFO("max |a - b| = " << diff << ", tolerance " << tol << ", max |a| = " << max_abs(va));
    CHECK(diff <= tol);
  }
}

// ---------------------------------------------------------------------------------------------
// Central differences.
//
// The loss is f = sum(out * g) for a fixed random g, evaluated in double. The central difference
// (f(x + h) - f(x - h)) / 2h differs from f'(x) by the truncation error h^2 f'''(x) / 6 and by the
// rounding error of the two loss values, about eps |f| / h. With h = 1e-5 and eps = 2^-53
// = 1.1e-16: truncation ~1e-10 |f'''| and rounding ~1e-11 |f|. In these tests the parameters are
// N(0, 0.3^2), inputs N(0, 1) and the losses O(1..100), so the two terms stay below about 1e-8
// relative to the gradient. The check |fd - g| <= 1e-6 (1 + |fd|) leaves two orders of magnitude
// for that and is still five orders of magnitude below the size of any gradient term a broken
// backward would drop or double (those are O(1e-3..1)).
// ---------------------------------------------------------------------------------------------

struct FdOptions {
  double h = 1e-5;
  double rel = 1e-6;
  /// At most this many elements of one tensor are checked (all of them when it has fewer);
  /// the sample always holds the first and the last element.
  int max_per_tensor = 64;
  std::uint64_t seed = 12345;
};

/// What one checked tensor showed: how many elements, the worst error against its tolerance and
/// the largest gradient seen (to tell a vanished gradient from a checked one).
struct FdResult {
  std::string name;
  int checked = 0;
  double worst_ratio = 0;  ///< max over elements of |fd - g| / (rel (1 + |fd|)); <= 1 passes
  double max_fd = 0;
  double max_grad = 0;
};

inline std::vector<std::int64_t> sample_indices(std::int64_t n, const FdOptions& opt,
                                                const std::string& name) {
  std::vector<std::int64_t> idx;
  if (n <= opt.max_per_tensor) {
    for (std::int64_t i = 0; i < n; ++i) idx.push_back(i);
    return idx;
  }
  std::uint64_t h = opt.seed;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  std::mt19937_64 gen(h);
  std::uniform_int_distribution<std::int64_t> dist(0, n - 1);
  std::set<std::int64_t> chosen{0, n - 1};
  while (static_cast<int>(chosen.size()) < opt.max_per_tensor) chosen.insert(dist(gen));
  return {chosen.begin(), chosen.end()};
}

template <class T>
double read_element(const Flat<T>& v, std::int64_t i) {
  std::remove_const_t<T> x{};
  Kokkos::deep_copy(x, Kokkos::subview(v, i));
  return static_cast<double>(x);
}
template <class T>
void write_element(const Flat<T>& v, std::int64_t i, double x) {
  Kokkos::deep_copy(Kokkos::subview(v, i), static_cast<T>(x));
}

/// Checks `grad` (host copy, memory order) against central differences of `loss` in the
/// elements of `pieces` (device memory, concatenated). Reports as one CHECK.
template <class T>
FdResult fd_check(const std::string& name, const std::vector<Flat<T>>& pieces,
                  const std::vector<double>& grad, const std::function<double()>& loss,
                  const FdOptions& opt = {}) {
  std::int64_t n = 0;
  for (const auto& p : pieces) n += static_cast<std::int64_t>(p.extent(0));
  REQUIRE(static_cast<std::int64_t>(grad.size()) == n);
  FdResult r{name};
  std::int64_t worst = -1;
  double worst_fd = 0;
  for (const std::int64_t i : sample_indices(n, opt, name)) {
    std::size_t piece = 0;
    std::int64_t j = i;
    while (j >= static_cast<std::int64_t>(pieces[piece].extent(0))) j -= pieces[piece++].extent(0);
    const auto& v = pieces[piece];
    const double x0 = read_element(v, j);
    write_element(v, j, x0 + opt.h);
    const double fp = loss();
    write_element(v, j, x0 - opt.h);
    const double fm = loss();
    write_element(v, j, x0);
    const double fd = (fp - fm) / (2 * opt.h);
    const double ratio = std::abs(fd - grad[i]) / (opt.rel * (1 + std::abs(fd)));
    if (worst < 0 || ratio > r.worst_ratio) {
      r.worst_ratio = ratio;
      worst = i;
      worst_fd = fd;
    }
    r.max_fd = std::max(r.max_fd, std::abs(fd));
    r.max_grad = std::max(r.max_grad, std::abs(grad[i]));
    ++r.checked;
  }
  INFO(name << ": " << r.checked << " of " << n << " elements checked; worst element " << worst
            << ": finite difference " << worst_fd << ", analytic "
            << (worst >= 0 ? grad[worst] : 0.0) << ", |fd - g| / (" << opt.rel
            << " (1 + |fd|)) = " << r.worst_ratio);
  CHECK(r.worst_ratio <= 1.0);
  return r;
}

/// Checks every tensor of `params` against the gradients `grads` (host snapshot of the matching
/// gradients() list, taken after one forward and backward).
template <class T>
std::vector<FdResult> fd_check(const List<T>& params, const List<T>& grads_list,
                               const std::function<double()>& loss, const FdOptions& opt = {}) {
  REQUIRE(params.size() == grads_list.size());
  REQUIRE_FALSE(params.empty());
  const auto grads = snapshot(grads_list);
  std::vector<FdResult> results;
  for (std::size_t t = 0; t < params.size(); ++t) {
    const auto& p = params[t];
    INFO("tensor " << p.name);
    REQUIRE(grads_list[t].name == p.name);
    REQUIRE(grads_list[t].shape == p.shape);
    REQUIRE(grads_list[t].pieces.size() == p.pieces.size());
    std::vector<Flat<T>> pieces;
    for (std::size_t k = 0; k < p.pieces.size(); ++k) {
      REQUIRE(grads_list[t].pieces[k].offset == p.pieces[k].offset);
      REQUIRE(grads_list[t].pieces[k].values.extent(0) == p.pieces[k].values.extent(0));
      pieces.push_back(p.pieces[k].values);
    }
    results.push_back(fd_check<T>(p.name, pieces, grads[t], loss, opt));
  }
  return results;
}

/// Checks the gradient `dx` (device view) of an input view `x` against central differences.
template <class X, class DX>
FdResult fd_check_input(const std::string& name, const X& x, const DX& dx,
                        const std::function<double()>& loss, const FdOptions& opt = {}) {
  using T = typename X::value_type;
  return fd_check<T>(name, {flat(x)}, to_host(dx), loss, opt);
}

/// The result for tensor `name`; fails when it was not checked.
inline const FdResult& result_of(const std::vector<FdResult>& rs, const std::string& name) {
  for (const auto& r : rs)
    if (r.name == name) return r;
  FAIL("tensor " << name << " was not checked");
  return rs.front();
}

/// Guards against a vacuous pass: the analytic gradient of `name` is not all zero.
inline void require_live(const std::vector<FdResult>& rs, const std::string& name) {
  INFO("tensor " << name << " should have a non-zero gradient");
  CHECK(result_of(rs, name).max_grad > 1e-6);
}

}  // namespace dchag_test

namespace dchag_test {

/// Requires `f()` to throw std::invalid_argument whose message contains every one of `parts`
/// (the function, the argument and the expected value).
template <class F>
void require_invalid(F&& f, const std::vector<std::string>& parts) {
  bool thrown = false;
  try {
    f();
  } catch (const std::invalid_argument& e) {
    thrown = true;
    const std::string what = e.what();
    INFO("message: " << what);
    for (const auto& p : parts) CHECK_THAT(what, Catch::Matchers::Contains(p));
  }
  INFO("expected std::invalid_argument mentioning "
       << (parts.empty() ? std::string() : parts.front()));
  CHECK(thrown);
}

}  // namespace dchag_test
