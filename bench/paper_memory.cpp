// dchag_paper_memory: dchag::estimate_memory at the paper's scale (DESIGN 5), every mode, memory
// policy and storage type (float accumulation), as the Markdown table of bench/README.md. Allocates
// nothing but Kokkos itself.
//
//   dchag_paper_memory [--C 1024] [--P 8] [--rank 0]
//
// Configuration: 128x256 images, p = 4 (L = 2048), B = 2 per rank, D = 2048, 32 heads, channels
// in contiguous blocks. The numbers are those of the execution space this was built for (the
// chunk of the fused front ends depends on it: DESIGN 3.8, detail/fused.hpp).
#include <dchag/distributed.hpp>

#include <Kokkos_Core.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

using Exec = Kokkos::DefaultExecutionSpace;

struct Row {
  dchag::Mode mode;
  dchag::Strategy strategy;
};

template <class Storage>
dchag::MemoryEstimate estimate(dchag::FrontEndConfig cfg, Row row, dchag::MemoryPolicy memory,
                               int P, int rank) {
  cfg.strategy = row.strategy;
  cfg.memory = memory;
  return dchag::estimate_memory<float, Exec, Storage>(
      cfg, row.mode, dchag::ChannelMap::blocks(cfg.channels, P), rank, 2);
}

double gb(std::int64_t bytes) { return double(bytes) / 1e9; }

template <class Storage>
void rows_for(const dchag::FrontEndConfig& cfg, const Row& row, int P, int rank,
              std::int64_t base) {
  for (const auto memory : {dchag::MemoryPolicy::keep, dchag::MemoryPolicy::recompute,
                            dchag::MemoryPolicy::inference}) {
    if (memory != dchag::MemoryPolicy::keep && row.strategy != dchag::Strategy::pooled) continue;
    const auto e = estimate<Storage>(cfg, row, memory, P, rank);
    std::printf("| %s | %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f%% |\n",
                std::string(dchag::to_string(row.mode)).c_str(),
                std::string(dchag::to_string(row.strategy)).c_str(),
                std::string(dchag::to_string(memory)).c_str(), dchag::StorageTraits<Storage>::name,
                gb(e.parameters + e.gradients), gb(e.activations), gb(e.workspace),
                gb(e.communication), gb(e.total()), 100.0 * double(e.total()) / double(base));
  }
}

int run(int C, int P, int rank) {
  dchag::FrontEndConfig cfg;
  cfg.channels = C;
  cfg.height = 128;
  cfg.width = 256;
  cfg.patch = 4;
  cfg.dim = 2048;
  cfg.heads = 32;
  const Row rows[] = {{dchag::Mode::tp_only, dchag::Strategy::materialized},
                      {dchag::Mode::dchag_xattn, dchag::Strategy::pooled},
                      {dchag::Mode::dchag_linear, dchag::Strategy::pooled},
                      {dchag::Mode::exact_flat, dchag::Strategy::pooled}};
  const auto base = estimate<float>(cfg, rows[0], dchag::MemoryPolicy::keep, P, rank).total();
  std::printf(
      "estimate_memory per rank, GB (1e9 B): C = %d, 128x256, p = 4, D = 2048, 32 heads, B = 2, "
      "P = %d, rank %d, float accumulation, %s\n\n",
      C, P, rank, Exec::name());
  std::printf(
      "| mode | strategy | memory | storage | parameters + gradients | activations | workspace | "
      "communication | total | vs tp_only float keep |\n");
  std::printf("|---|---|---|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& row : rows) {
    rows_for<float>(cfg, row, P, rank, base);
    rows_for<dchag::bf16>(cfg, row, P, rank, base);
  }
  return 0;
}

int value(int argc, char** argv, const char* name, int fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == name) return std::atoi(argv[i + 1]);
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::initialize(argc, argv);
  int status = 0;
  try {
    status = run(value(argc, argv, "--C", 1024), value(argc, argv, "--P", 8),
                 value(argc, argv, "--rank", 0));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dchag_paper_memory: %s\n", e.what());
    status = 1;
  }
  Kokkos::finalize();
  return status;
}
