#pragma once
/// The one place that absorbs Kokkos 3.4 <-> 4.x/5.x differences (math functions, fences,
/// profiling regions, Kokkos Kernels GEMM). Only this header may spell Kokkos::Experimental.
#include <KokkosBlas3_gemm.hpp>
#include <Kokkos_Core.hpp>
#include <dchag/detail/small_float.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace dchag::detail {

#if KOKKOS_VERSION >= 30700
namespace kmath = ::Kokkos;
#else
namespace kmath = ::Kokkos::Experimental;
#endif

template <class T>
KOKKOS_INLINE_FUNCTION T exp(T x) {
  return kmath::exp(x);
}
template <class T>
KOKKOS_INLINE_FUNCTION T sqrt(T x) {
  return kmath::sqrt(x);
}
/// False for NaN and +-Inf (Kokkos 3.4: Kokkos::Experimental::isfinite, later Kokkos::isfinite).
template <class T>
KOKKOS_INLINE_FUNCTION bool isfinite(T x) {
  return kmath::isfinite(x);
}
template <class T>
KOKKOS_INLINE_FUNCTION T max(T a, T b) {
  return a < b ? b : a;
}
/// +Inf of a floating-point type, in host and device code.
template <class T>
KOKKOS_INLINE_FUNCTION constexpr T infinity() {
  return ::Kokkos::Experimental::infinity<T>::value;
}

/// 16-bit storage types: Kokkos' own where it has a real 16-bit one (CUDA, HIP, SYCL), else
/// dchag's (Kokkos 3.4 has no bhalf_t, and host-only builds alias both to float).
#if defined(KOKKOS_HALF_T_IS_FLOAT) && !KOKKOS_HALF_T_IS_FLOAT
using fp16_type = ::Kokkos::Experimental::half_t;
#else
using fp16_type = fp16_storage;
#endif
#if defined(KOKKOS_BHALF_T_IS_FLOAT) && !KOKKOS_BHALF_T_IS_FLOAT
using bf16_type = ::Kokkos::Experimental::bhalf_t;
#else
using bf16_type = bf16_storage;
#endif
static_assert(sizeof(fp16_type) == 2 && sizeof(bf16_type) == 2);

/// Devices Kokkos can see for its default execution space, callable before initialize: 0 with a
/// host-only default space, and 0 (unknown) before Kokkos 4.3, which has no such query.
inline int visible_devices() {
#if KOKKOS_VERSION >= 40300
  const int n = Kokkos::num_devices();
  return n < 0 ? 0 : n;
#else
  return 0;
#endif
}

/// Fence with a label where the Kokkos version takes one.
template <class ExecSpace>
void fence(const ExecSpace& exec, const char* label) {
#if KOKKOS_VERSION >= 30600
  exec.fence(label);
#else
  (void)label;
  exec.fence();
#endif
}

/// RAII profiling region (Kokkos::Profiling::ScopedRegion appeared in 4.1).
class ScopedRegion {
 public:
  explicit ScopedRegion(const std::string& name) { Kokkos::Profiling::pushRegion(name); }
  ~ScopedRegion() { Kokkos::Profiling::popRegion(); }
  ScopedRegion(const ScopedRegion&) = delete;
  ScopedRegion& operator=(const ScopedRegion&) = delete;
};

/// Routes Kokkos Tools allocation events (every memory space) to `on_alloc(bytes)` and
/// `on_free(bytes)`; nullptrs restore no callbacks.
using AllocationHook = void (*)(std::int64_t);
inline AllocationHook& allocation_hook() {
  static AllocationHook h = nullptr;
  return h;
}
inline AllocationHook& deallocation_hook() {
  static AllocationHook h = nullptr;
  return h;
}
inline void set_allocation_callbacks(AllocationHook on_alloc, AllocationHook on_free) {
  allocation_hook() = on_alloc;
  deallocation_hook() = on_free;
  using Kokkos::Tools::Experimental::set_allocate_data_callback;
  using Kokkos::Tools::Experimental::set_deallocate_data_callback;
  if (on_alloc == nullptr) {
    set_allocate_data_callback(nullptr);
    set_deallocate_data_callback(nullptr);
    return;
  }
  set_allocate_data_callback(
      [](const Kokkos::Profiling::SpaceHandle, const char*, const void*, const std::uint64_t size) {
        allocation_hook()(std::int64_t(size));
      });
  set_deallocate_data_callback(
      [](const Kokkos::Profiling::SpaceHandle, const char*, const void*, const std::uint64_t size) {
        deallocation_hook()(std::int64_t(size));
      });
}

/// C = alpha * op(A) * op(B) + beta * C on `exec`. Kokkos Kernels takes an execution space
/// instance from 4.1 on; before, it runs on the default instance, so fence around it.
template <class ExecSpace, class AV, class BV, class CV>
void gemm(const ExecSpace& exec, const char* trans_a, const char* trans_b,
          typename CV::const_value_type alpha, const AV& a, const BV& b,
          typename CV::const_value_type beta, const CV& c) {
  // One region per call, so that Kokkos Tools count GEMMs like kernel launches (a BLAS or
  // cuBLAS call launches no Kokkos kernel of its own).
  ScopedRegion region("dchag::gemm");
#if defined(KOKKOSKERNELS_VERSION) && KOKKOSKERNELS_VERSION >= 40100
  KokkosBlas::gemm(exec, trans_a, trans_b, alpha, a, b, beta, c);
#else
  exec.fence();
  KokkosBlas::gemm(trans_a, trans_b, alpha, a, b, beta, c);
  typename CV::execution_space().fence();
#endif
}

}  // namespace dchag::detail
