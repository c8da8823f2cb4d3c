#pragma once
// Where the time of a front end call goes: wall time per Kokkos kernel label and per GEMM (dchag
// opens a "dchag::gemm" region around each one, attributed here to the region that called it),
// from Kokkos Tools callbacks. Kernels are timed from their begin to their end callback, which on
// host execution spaces brackets the whole kernel; on devices launches are asynchronous, so the
// profile is only meaningful for host spaces (dchag_bench refuses it elsewhere).
#include <Kokkos_Core.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace dchag_bench {

class KernelProfile {
 public:
  struct Entry {
    std::int64_t calls = 0;
    double seconds = 0;
  };

  /// Installs the callbacks; the profile collects until `uninstall`.
  static void install() {
    using namespace Kokkos::Tools::Experimental;
    set_begin_parallel_for_callback(&begin_kernel);
    set_end_parallel_for_callback(&end_kernel);
    set_begin_parallel_reduce_callback(&begin_kernel);
    set_end_parallel_reduce_callback(&end_kernel);
    set_begin_parallel_scan_callback(&begin_kernel);
    set_end_parallel_scan_callback(&end_kernel);
    set_push_region_callback(&push_region);
    set_pop_region_callback(&pop_region);
    entries().clear();
  }
  static void uninstall() {
    using namespace Kokkos::Tools::Experimental;
    set_begin_parallel_for_callback(nullptr);
    set_end_parallel_for_callback(nullptr);
    set_begin_parallel_reduce_callback(nullptr);
    set_end_parallel_reduce_callback(nullptr);
    set_begin_parallel_scan_callback(nullptr);
    set_end_parallel_scan_callback(nullptr);
    set_push_region_callback(nullptr);
    set_pop_region_callback(nullptr);
  }

  /// Prints the entries by decreasing time, per call of the profiled operation (`calls` of it
  /// over `total` seconds of wall time).
  static void print(const char* title, std::int64_t calls, double total) {
    std::vector<std::pair<std::string, Entry>> rows(entries().begin(), entries().end());
    std::sort(rows.begin(), rows.end(),
              [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
    double covered = 0;
    for (const auto& r : rows) covered += r.second.seconds;
    std::printf("\n%s: %.3f ms per call, %lld calls\n", title, 1e3 * total / calls,
                static_cast<long long>(calls));
    std::printf("| %-52s | %9s | %8s | %6s |\n", "kernel or GEMM (caller)", "ms/call", "launches",
                "share");
    std::printf("|%s|%s|%s|%s|\n", std::string(54, '-').c_str(), std::string(10, '-').c_str(),
                std::string(10, '-').c_str(), std::string(8, '-').c_str());
    for (const auto& [name, e] : rows) {
      std::printf("| %-52s | %9.3f | %8.1f | %5.1f%% |\n", name.c_str(), 1e3 * e.seconds / calls,
                  double(e.calls) / calls, 100 * e.seconds / total);
    }
    std::printf("| %-52s | %9.3f | %8s | %5.1f%% |\n", "(outside kernels and GEMMs)",
                1e3 * (total - covered) / calls, "", 100 * (total - covered) / total);
  }

 private:
  using Clock = std::chrono::steady_clock;

  static std::map<std::string, Entry>& entries() {
    static std::map<std::string, Entry> e;
    return e;
  }
  struct Open {
    std::string name;
    Clock::time_point start;
  };
  static std::vector<Open>& regions() {
    static std::vector<Open> r;
    return r;
  }
  static std::vector<Open>& kernels() {
    static std::vector<Open> k;
    return k;
  }
  static void add(const std::string& name, Clock::time_point start) {
    auto& e = entries()[name];
    e.calls += 1;
    e.seconds += std::chrono::duration<double>(Clock::now() - start).count();
  }

  static void begin_kernel(const char* name, std::uint32_t, std::uint64_t* id) {
    *id = kernels().size();
    kernels().push_back({name, Clock::now()});
  }
  static void end_kernel(std::uint64_t) {
    // Kernels inside a GEMM (a BLAS without TPL) count as the GEMM's time only.
    const Open k = kernels().back();
    kernels().pop_back();
    if (!inside_gemm()) add(k.name, k.start);
  }
  static bool inside_gemm() {
    for (const auto& r : regions())
      if (r.name == "dchag::gemm") return true;
    return false;
  }
  static void push_region(const char* name) { regions().push_back({name, Clock::now()}); }
  static void pop_region() {
    const Open r = regions().back();
    regions().pop_back();
    if (r.name != "dchag::gemm" || inside_gemm()) return;
    const std::string caller = regions().empty() ? "top level" : regions().back().name;
    add("gemm in " + caller, r.start);
  }
};

}  // namespace dchag_bench
