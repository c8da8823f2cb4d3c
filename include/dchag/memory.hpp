#pragma once
/// Measured memory: the bytes Kokkos allocates (every memory space), current and high-water mark,
/// counted through Kokkos Tools allocation callbacks. Works on Kokkos 3.4 and 4.x, any backend.
/// The callbacks are process-wide: while a MemoryTracker is active, no other Kokkos tool receives
/// allocation events (a tool loaded with KOKKOS_TOOLS_LIBS gets them back when it is destroyed).
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/error.hpp>

#include <atomic>
#include <cstdint>

namespace dchag {

class MemoryTracker {
 public:
  /// Starts counting from now (after Kokkos::initialize). Only one tracker may be active.
  MemoryTracker() {
    DCHAG_EXPECT(!active().exchange(true), "dchag::MemoryTracker",
                 "another MemoryTracker is active, expected at most one per process");
    current() = 0;
    peak() = 0;
    detail::set_allocation_callbacks(&on_allocate, &on_deallocate);
  }
  ~MemoryTracker() {
    detail::set_allocation_callbacks(nullptr, nullptr);
    active() = false;
  }
  MemoryTracker(const MemoryTracker&) = delete;
  MemoryTracker& operator=(const MemoryTracker&) = delete;

  /// Bytes allocated since the tracker started and not yet freed (may be negative when views
  /// that existed before are freed).
  std::int64_t current_bytes() const { return current(); }
  /// Largest current_bytes() seen since the start or the last reset_peak().
  std::int64_t peak_bytes() const { return peak(); }
  /// Peak restarts from the current value: measure one phase on top of what already exists.
  void reset_peak() { peak() = current().load(); }

 private:
  static std::atomic<bool>& active() {
    static std::atomic<bool> a{false};
    return a;
  }
  static std::atomic<std::int64_t>& current() {
    static std::atomic<std::int64_t> c{0};
    return c;
  }
  static std::atomic<std::int64_t>& peak() {
    static std::atomic<std::int64_t> p{0};
    return p;
  }
  static void on_allocate(std::int64_t bytes) {
    const std::int64_t now = current() += bytes;
    std::int64_t seen = peak();
    while (now > seen && !peak().compare_exchange_weak(seen, now)) {
    }
  }
  static void on_deallocate(std::int64_t bytes) { current() -= bytes; }
};

}  // namespace dchag
