// libFuzzer target for the safetensors reader and load_weights (scripts/fuzz.sh builds and runs
// it). The input is a whole safetensors file. When File::parse accepts it, every tensor is read,
// and the file is loaded into a small FlatFrontEnd twice: channels matched by index, and by name
// with allow_missing. Any std::exception is a correct answer to bad input; a crash, a sanitizer
// report, any other exception, or a load_weights that throws after changing a parameter (it must
// check everything before the first copy) is a finding.
#include <dchag/aggregate.hpp>
#include <dchag/safetensors.hpp>
#include <dchag/weights.hpp>

#include <Kokkos_Core.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <vector>

namespace {

using Exec = Kokkos::DefaultExecutionSpace;
using Params = dchag::TensorList<float, Exec::memory_space>;

// The sizes of tests/golden/flat_all.safetensors, a seed: it loads completely, so mutations start
// from a file that passes every check.
dchag::FrontEndConfig flat_all_config() {
  dchag::FrontEndConfig cfg;
  cfg.channels = 6;
  cfg.height = 8;
  cfg.width = 12;
  cfg.patch = 4;
  cfg.dim = 16;
  cfg.heads = 4;
  return cfg;
}

// Matched against a "channels" metadata entry (tests/fuzz/safetensors.dict has them).
const std::vector<std::string> channel_names = {"a", "b", "c", "d", "e", "f"};

// Created once and never destroyed: Kokkos is never finalized, so no View outlives it.
dchag::FlatFrontEnd<Exec, float>* front_end = nullptr;

std::vector<float> snapshot(const Params& params) {
  std::vector<float> out;
  for (const auto& t : params) {
    for (const auto& piece : t.pieces) {
      auto host = Kokkos::create_mirror_view(piece.values);
      Kokkos::deep_copy(host, piece.values);
      out.insert(out.end(), host.data(), host.data() + host.extent(0));
    }
  }
  return out;
}

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "fuzz_safetensors: %s\n", what);
  std::abort();
}

void load(const dchag::safetensors::File& file, const dchag::LoadOptions& options) {
  const Params params = front_end->parameters();
  const std::vector<float> before = snapshot(params);
  try {
    dchag::load_weights(file, params, options);
  } catch (const std::exception&) {
    const std::vector<float> after = snapshot(params);
    // Bitwise, so that NaNs compare equal to themselves.
    if (after.size() != before.size() ||
        std::memcmp(after.data(), before.data(), after.size() * sizeof(float)) != 0) {
      finding("load_weights threw after changing parameters");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // No arguments: the command line is libFuzzer's.
  Kokkos::initialize();
  front_end = new dchag::FlatFrontEnd<Exec, float>(Exec(), flat_all_config());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::optional<dchag::safetensors::File> file;
  try {
    file.emplace(dchag::safetensors::File::parse(std::vector<unsigned char>(data, data + size),
                                                 "<fuzz input>"));
  } catch (const std::exception&) {
    return 0;
  }
  try {
    for (const auto& t : file->tensors()) {
      const std::vector<double> values = file->values<double>(t.name);
      if (values.size() != static_cast<std::size_t>(t.numel()))
        finding("values() has the wrong size");
    }
    (void)file->metadata_value("channels");
  } catch (const std::exception&) {
    finding("reading a tensor of a file that parsed threw");
  }
  load(*file, {});
  dchag::LoadOptions by_name;
  by_name.allow_missing = true;
  by_name.channel_names = channel_names;
  load(*file, by_name);
  return 0;
}
