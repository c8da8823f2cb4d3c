// GPU-shaped work and in-situ input (DESIGN 4): the number of kernel launches, deep copies and GEMM
// calls of a forward and of a backward does not grow with the channel count C or the batch size B
// (counted through Kokkos Tools callbacks; dchag's GEMM wrapper opens a "dchag::gemm" region per
// call), and a simulation's own memory goes into a forward through unmanaged Views, uncopied.
#include <catch2/catch.hpp>

#include <dchag/aggregate.hpp>
#include <dchag/memory.hpp>

#include <KokkosKernels_config.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace dchag_test;
using dchag::FrontEndConfig;
using dchag::Strategy;

namespace {

struct Counts {
  int kernels = 0, copies = 0, gemms = 0;
};
Counts g_counts;

void on_kernel(const char*, std::uint32_t, std::uint64_t* id) {
  *id = 0;
  ++g_counts.kernels;
}
void on_copy(Kokkos::Tools::SpaceHandle, const char*, const void*, Kokkos::Tools::SpaceHandle,
             const char*, const void*, std::uint64_t) {
  ++g_counts.copies;
}
void on_region(const char* name) {
  if (std::strcmp(name, "dchag::gemm") == 0) ++g_counts.gemms;
}

// Counts what `f` launches.
template <class F>
Counts count(F&& f) {
  using namespace Kokkos::Tools::Experimental;
  Exec().fence();
  g_counts = {};
  set_begin_parallel_for_callback(on_kernel);
  set_begin_parallel_reduce_callback(on_kernel);
  set_begin_parallel_scan_callback(on_kernel);
  set_begin_deep_copy_callback(on_copy);
  set_push_region_callback(on_region);
  f();
  Exec().fence();
  set_begin_parallel_for_callback(nullptr);
  set_begin_parallel_reduce_callback(nullptr);
  set_begin_parallel_scan_callback(nullptr);
  set_begin_deep_copy_callback(nullptr);
  set_push_region_callback(nullptr);
  return g_counts;
}

struct StepCounts {
  Counts forward, backward;
};

// A second forward and backward (the first allocates and fills what is reused) of a front end
// over C channels and B images.
template <class MakeFrontEnd>
StepCounts step_counts(int C, int B, MakeFrontEnd&& make) {
  Exec exec;
  FrontEndConfig cfg;
  cfg.channels = C;
  cfg.height = 8;
  cfg.width = 8;
  cfg.patch = 4;
  cfg.dim = 8;
  cfg.heads = 2;
  auto fe = make(exec, cfg);
  V4<float> images("images", B, C, cfg.height, cfg.width);
  V3<float> out("out", B, cfg.patches(), cfg.dim), g("g", B, cfg.patches(), cfg.dim);
  fill_normal(images, 1);
  fill_normal(g, 2);
  fe->forward(exec, images, out);
  fe->backward(exec, g);
  StepCounts s;
  s.forward = count([&] { fe->forward(exec, images, out); });
  s.backward = count([&] { fe->backward(exec, g); });
  return s;
}

template <class MakeFrontEnd>
void require_flat_counts(const char* what, MakeFrontEnd&& make) {
  const StepCounts base = step_counts(8, 1, make);
  INFO(what << ": C = 8, B = 1: forward " << base.forward.kernels << " kernels, "
            << base.forward.copies << " copies, " << base.forward.gemms << " GEMMs; backward "
            << base.backward.kernels << " kernels, " << base.backward.copies << " copies, "
            << base.backward.gemms << " GEMMs");
  CHECK(base.forward.kernels > 0);
  CHECK(base.backward.kernels > 0);
  for (const auto& [C, B] : {std::pair{512, 1}, std::pair{8, 4}, std::pair{512, 4}}) {
    const StepCounts s = step_counts(C, B, make);
    INFO("C = " << C << ", B = " << B << ": forward " << s.forward.kernels << " kernels, "
                << s.forward.copies << " copies, " << s.forward.gemms << " GEMMs; backward "
                << s.backward.kernels << " kernels, " << s.backward.copies << " copies, "
                << s.backward.gemms << " GEMMs");
    CHECK(s.forward.kernels == base.forward.kernels);
    CHECK(s.forward.copies == base.forward.copies);
    CHECK(s.backward.kernels == base.backward.kernels);
    CHECK(s.backward.copies == base.backward.copies);
    // Every batch of GEMMs is one launch. Only a host space without a BLAS library calls
    // Kokkos Kernels' GEMM once per channel and sample, so only there the count may grow.
#if !defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
    if (!dchag::detail::runs_on_host<Exec>)
#endif
    {
      CHECK(s.forward.gemms == base.forward.gemms);
      CHECK(s.backward.gemms == base.backward.gemms);
    }
  }
}

}  // namespace

TEST_CASE("Launches per forward and backward do not grow with C or B", "[launches]") {
  SECTION("FlatFrontEnd, pooled, all channels in one chunk (the device shape)") {
    require_flat_counts("flat pooled", [](const Exec& exec, const FrontEndConfig& cfg) {
      auto fe = std::make_unique<dchag::FlatFrontEnd<Exec, float>>(exec, cfg);
      fe->set_chunk_channels(cfg.channels);
      return fe;
    });
  }
  SECTION("FlatFrontEnd, materialized") {
    require_flat_counts("flat materialized", [](const Exec& exec, FrontEndConfig cfg) {
      cfg.strategy = Strategy::materialized;
      return std::make_unique<dchag::FlatFrontEnd<Exec, float>>(exec, cfg);
    });
  }
  SECTION("DchagEmulation, linear and cross-attention partial aggregation, two groups") {
    for (const auto kind : {dchag::PartialKind::linear, dchag::PartialKind::cross_attention}) {
      require_flat_counts(dchag::to_string(kind).data(),
                          [kind](const Exec& exec, const FrontEndConfig& cfg) {
                            std::vector<std::vector<int>> groups(2);
                            for (int c = 0; c < cfg.channels; ++c)
                              groups[c * 2 / cfg.channels].push_back(c);
                            return std::make_unique<dchag::DchagEmulation<Exec, float>>(
                                exec, cfg, dchag::DchagOptions{kind, 1}, groups);
                          });
    }
  }
}

TEST_CASE("On host spaces the automatic chunks add a fixed set of launches per chunk",
          "[launches]") {
  if (!dchag::detail::runs_on_host<Exec>) return;  // devices take every channel in one chunk
  // Chunks keep the tokens of a chunk in cache between the tokenizer and the attention: the
  // per-chunk work is the tokenizer projection and the streamed softmax, a constant count each.
  const auto with_chunk = [](int chunk) {
    return [chunk](const Exec& exec, const FrontEndConfig& cfg) {
      auto fe = std::make_unique<dchag::FlatFrontEnd<Exec, float>>(exec, cfg);
      fe->set_chunk_channels(chunk);
      return fe;
    };
  };
  const StepCounts one = step_counts(64, 1, with_chunk(64));
  const StepCounts two = step_counts(64, 1, with_chunk(32));
  const StepCounts four = step_counts(64, 1, with_chunk(16));
  CHECK(two.forward.kernels > one.forward.kernels);  // chunks do add launches on host spaces
  CHECK(two.backward.kernels > one.backward.kernels);
  CHECK(four.forward.kernels - two.forward.kernels ==
        2 * (two.forward.kernels - one.forward.kernels));
  CHECK(four.backward.kernels - two.backward.kernels ==
        2 * (two.backward.kernels - one.backward.kernels));
}

TEST_CASE("Forwards take the caller's memory through unmanaged Views without copying it",
          "[in_situ]") {
  Exec exec;
  FrontEndConfig cfg;
  cfg.channels = 6;
  cfg.height = 8;
  cfg.width = 12;
  cfg.patch = 4;
  cfg.dim = 8;
  cfg.heads = 2;
  const int B = 2, L = cfg.patches();
  const std::size_t pixels = std::size_t(B) * cfg.channels * cfg.height * cfg.width;
  // The simulation's own arrays, in the execution space's memory, as raw pointers.
  auto* field = static_cast<float*>(Kokkos::kokkos_malloc<Mem>("simulation::field", 4 * pixels));
  auto* result = static_cast<float*>(
      Kokkos::kokkos_malloc<Mem>("simulation::tokens", 4 * std::size_t(B) * L * cfg.dim));
  using In = dchag::Unmanaged4<const float, Mem>;
  using Out = Kokkos::View<float***, Kokkos::LayoutRight, Mem, Kokkos::MemoryUnmanaged>;
  const In images(field, B, cfg.channels, cfg.height, cfg.width);
  const Out out(result, B, L, cfg.dim);
  fill_normal(dchag::Unmanaged4<float, Mem>(field, B, cfg.channels, cfg.height, cfg.width), 3);
  V4<float> managed("managed", B, cfg.channels, cfg.height, cfg.width);
  Kokkos::deep_copy(managed, images);
  V3<float> expected("expected", B, L, cfg.dim);

  const auto check = [&](auto& fe, const char* what) {
    INFO(what);
    fe.forward(exec, managed, expected);  // first call: the workspaces are allocated here
    exec.fence();
    dchag::MemoryTracker tracker;
    fe.forward(exec, images, out);
    exec.fence();
    CHECK(tracker.peak_bytes() == 0);  // no copy of the input, no new workspace
    CHECK(max_abs_diff(out, expected) == 0.0);
  };
  dchag::FlatFrontEnd<Exec, float> flat(exec, cfg);
  check(flat, "FlatFrontEnd, pooled");
  auto materialized = cfg;
  materialized.strategy = Strategy::materialized;
  dchag::FlatFrontEnd<Exec, float> flat_m(exec, materialized);
  check(flat_m, "FlatFrontEnd, materialized");
  dchag::DchagEmulation<Exec, float> emulation(exec, cfg, {dchag::PartialKind::cross_attention, 1},
                                               {{0, 1, 2}, {3, 4, 5}});
  check(emulation, "DchagEmulation");
  Kokkos::kokkos_free<Mem>(field);
  Kokkos::kokkos_free<Mem>(result);
}

TEMPLATE_TEST_CASE("The device-shaped batched GEMM equals the BLAS path", "[batched_gemm]", float,
                   double) {
  using T = TestType;
  Exec exec;
  // Shapes as the tokenizer uses them: forward (A row-major), weight gradient (A transposed,
  // summed over 3 sample blocks), and an odd shape with N not a multiple of anything.
  struct Case {
    int batch, M, N, K, KB;
    bool transposed;
  };
  for (const Case c :
       {Case{5, 6, 16, 9, 1, false}, Case{4, 9, 16, 6, 3, true}, Case{3, 7, 13, 5, 2, false}}) {
    INFO("batch " << c.batch << ", M " << c.M << ", N " << c.N << ", K " << c.K << ", KB " << c.KB
                  << (c.transposed ? ", A transposed" : ""));
    const std::int64_t a_block = std::int64_t(c.M) * c.K, b_block = std::int64_t(c.K) * c.N;
    dchag::View1<T, Mem> a("a", c.batch * c.KB * a_block), b("b", c.batch * c.KB * b_block);
    dchag::View1<T, Mem> c_blas("c_blas", c.batch * c.M * c.N),
        c_teams("c_teams", c.batch * c.M * c.N);
    fill_normal(a, 1);
    fill_normal(b, 2);
    fill_normal(c_blas, 3);
    Kokkos::deep_copy(c_teams, c_blas);
    const auto operands = [&](const dchag::View1<T, Mem>& out) {
      const T* ap = a.data();
      const T* bp = b.data();
      T* cp = out.data();
      const int M = c.M, N = c.N, K = c.K, KB = c.KB;
      const bool tr = c.transposed;
      return KOKKOS_LAMBDA(const int t) {
        return dchag::detail::GemmOperands<T>{ap + std::int64_t(t) * KB * a_block,
                                              a_block,
                                              tr ? 1 : K,
                                              tr ? M : 1,
                                              bp + std::int64_t(t) * KB * b_block,
                                              b_block,
                                              N,
                                              cp + std::int64_t(t) * M * N,
                                              N};
      };
    };
    const dchag::detail::BatchShape shape{c.batch, c.M, c.N, c.K, c.KB};
    if (dchag::detail::runs_on_host<Exec>)
      dchag::detail::batched_gemm_blas(exec, "test::blas", shape, operands(c_blas));
    else
      dchag::detail::batched_gemm_teams(exec, "test::teams", shape, operands(c_blas));
    dchag::detail::batched_gemm_teams(exec, "test::teams", shape, operands(c_teams));
    exec.fence();
    // Each element is a sum of KB * K products of N(0, 1) values: 2 K KB eps of its magnitude.
    const double tol = 2.0 * c.K * c.KB * std::numeric_limits<T>::epsilon() * 10.0;
    CHECK(max_abs_diff(c_teams, c_blas) <= tol * std::max(1.0, max_abs(to_host(c_blas))));
    CHECK(max_abs(to_host(c_blas)) > 0.5);
  }
}
