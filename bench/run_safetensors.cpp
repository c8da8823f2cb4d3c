// dchag_run: runs one front end on the configuration, weights and inputs of a safetensors file
// (written by bench/pytorch_dchag.py), forward and backward, and reports times and memory.
//
//   dchag_run IN.safetensors [--strategy pooled|materialized] [--reps 5] [--out OUT.safetensors]
//
// IN holds metadata (kind = flat | dchag; C, H, W, p, D, heads, B; for dchag: partial = linear |
// xattn, groups = P, map = blocks, tree = 1), the parameters by their ClimaX / D-CHAG names
// (token_embeds.{c}.proj.*, var_embed, var_query + var_agg.* (flat) or partial.{r}.* + final.*
// (dchag), pos_embed), the images [B, C, H, W] and the upstream gradient grad_out [B, L, D].
// flat runs FlatFrontEnd (ClimaX convention), dchag runs DchagEmulation (artifact convention, the
// groups contiguous blocks). The images, out and grad_out are allocated first; then a
// MemoryTracker starts, the model is built, its weights are loaded, and it runs one warm-up step
// and `reps` timed steps of zero_gradients + forward + backward(grad_out), fenced before each
// clock reading. Prints one JSON line: medians of forward and forward+backward (wall-clock and
// process CPU time), the tracker's peak bytes and the model's memory estimate. --out writes the
// last step's output `out` and every parameter gradient as `grad.<name>`.
#include <dchag/aggregate.hpp>
#include <dchag/channel_map.hpp>
#include <dchag/memory.hpp>
#include <dchag/weights.hpp>

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;
using Scalar = float;

struct Options {
  std::string in, out;
  dchag::Strategy strategy = dchag::Strategy::pooled;
  int reps = 5;
};

int to_int(const std::string& what, const std::string& v) {
  int x = 0;
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || end != v.data() + v.size() || x < 1) {
    throw std::invalid_argument(what + " is '" + v + "', expected a positive integer");
  }
  return x;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return std::string(argv[++i]);
    };
    if (a == "--strategy") {
      const std::string v = value();
      if (v != "pooled" && v != "materialized") {
        throw std::invalid_argument("--strategy is '" + v + "', expected pooled or materialized");
      }
      o.strategy = v == "pooled" ? dchag::Strategy::pooled : dchag::Strategy::materialized;
    } else if (a == "--reps") {
      o.reps = to_int("--reps", value());
    } else if (a == "--out") {
      o.out = value();
    } else if (a.rfind("--", 0) == 0 || !o.in.empty()) {
      throw std::invalid_argument("unexpected argument '" + a + "'");
    } else {
      o.in = a;
    }
  }
  if (o.in.empty()) {
    throw std::invalid_argument(
        "usage: dchag_run IN.safetensors [--strategy pooled|materialized] [--reps N] [--out "
        "OUT.safetensors]");
  }
  return o;
}

std::string meta(const dchag::safetensors::File& f, const char* key) {
  const auto v = f.metadata_value(key);
  if (!v) throw std::invalid_argument(f.source() + ": metadata \"" + key + "\" is missing");
  return *v;
}
int meta_int(const dchag::safetensors::File& f, const char* key) {
  return to_int(f.source() + ": metadata \"" + key + "\"", meta(f, key));
}

/// A flat device view with the values of tensor `name`, which must have shape `shape`.
dchag::View1<Scalar, Mem> read_tensor(const dchag::safetensors::File& f, const std::string& name,
                                      const std::vector<std::int64_t>& shape) {
  if (!f.contains(name))
    throw std::invalid_argument(f.source() + ": tensor '" + name + "' is missing");
  if (f.info(name).shape != shape) {
    throw std::invalid_argument(f.source() + ": tensor '" + name +
                                "' does not have the shape the metadata gives");
  }
  const std::vector<Scalar> values = f.values<Scalar>(name);
  dchag::View1<Scalar, Mem> v(Kokkos::view_alloc("dchag_run::" + name, Kokkos::WithoutInitializing),
                              values.size());
  auto host = Kokkos::create_mirror_view(v);
  std::copy(values.begin(), values.end(), host.data());
  Kokkos::deep_copy(v, host);
  return v;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double cpu_ms() { return 1e3 * double(std::clock()) / CLOCKS_PER_SEC; }

struct Times {
  std::vector<double> fwd, fwdbwd, fwd_cpu, fwdbwd_cpu;
};

/// One warm-up step, then `reps` timed steps; the model's forward is `forward()`.
template <class Model, class Forward>
Times run_steps(const Exec& exec, Model& model, Forward forward,
                const dchag::View3<Scalar, Mem>& d_out, int reps) {
  Times t;
  for (int s = 0; s <= reps; ++s) {
    model.zero_gradients(exec);
    exec.fence();
    const auto w0 = std::chrono::steady_clock::now();
    const double c0 = cpu_ms();
    forward();
    exec.fence();
    const auto w1 = std::chrono::steady_clock::now();
    const double c1 = cpu_ms();
    model.backward(exec, d_out);
    exec.fence();
    const auto w2 = std::chrono::steady_clock::now();
    const double c2 = cpu_ms();
    if (s == 0) continue;
    t.fwd.push_back(std::chrono::duration<double, std::milli>(w1 - w0).count());
    t.fwdbwd.push_back(std::chrono::duration<double, std::milli>(w2 - w0).count());
    t.fwd_cpu.push_back(c1 - c0);
    t.fwdbwd_cpu.push_back(c2 - c0);
  }
  return t;
}

int run(const Options& o) {
  Exec exec;
  const auto file = dchag::safetensors::File::read(o.in);
  const std::string kind = meta(file, "kind");
  if (kind != "flat" && kind != "dchag") {
    throw std::invalid_argument(o.in + ": metadata \"kind\" is '" + kind +
                                "', expected flat or dchag");
  }
  dchag::FrontEndConfig cfg;
  cfg.channels = meta_int(file, "C");
  cfg.height = meta_int(file, "H");
  cfg.width = meta_int(file, "W");
  cfg.patch = meta_int(file, "p");
  cfg.dim = meta_int(file, "D");
  cfg.heads = meta_int(file, "heads");
  cfg.strategy = o.strategy;
  cfg.convention = kind == "flat" ? dchag::Convention::climax : dchag::Convention::artifact;
  cfg.validate("dchag_run");
  const int B = meta_int(file, "B"), C = cfg.channels, L = cfg.patches(), D = cfg.dim;

  // Inputs first: they are the caller's, not the model's (the tracker starts after them).
  const auto images_flat = read_tensor(file, "images", {B, C, cfg.height, cfg.width});
  const auto d_out_flat = read_tensor(file, "grad_out", {B, L, D});
  const dchag::View4<Scalar, Mem> images(images_flat.data(), B, C, cfg.height, cfg.width);
  const dchag::View3<Scalar, Mem> d_out(d_out_flat.data(), B, L, D);
  dchag::View3<Scalar, Mem> out("dchag_run::out", B, L, D);
  exec.fence();

  std::string partial;
  int groups = 1;
  Times t;
  dchag::MemoryEstimate estimate;
  dchag::safetensors::Writer writer;
  dchag::MemoryTracker tracker;
  auto save = [&](const auto& model) {
    if (o.out.empty()) return;
    auto grads = model.gradients();
    for (auto& g : grads) g.name = "grad." + g.name;
    auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), out);
    writer.add("out", {B, L, D}, host.data());
    dchag::save_weights(writer, grads);
  };
  if (kind == "flat") {
    dchag::FlatFrontEnd<Exec, Scalar> model(exec, cfg);
    dchag::load_weights(file, model.parameters());
    estimate = model.memory_estimate(B);
    t = run_steps(
        exec, model, [&] { model.forward(exec, images, out); }, d_out, o.reps);
    save(model);
  } else {
    partial = meta(file, "partial");
    if (partial != "linear" && partial != "xattn") {
      throw std::invalid_argument(o.in + ": metadata \"partial\" is '" + partial +
                                  "', expected linear or xattn");
    }
    groups = meta_int(file, "groups");
    if (meta(file, "map") != "blocks" || meta_int(file, "tree") != 1) {
      throw std::invalid_argument(o.in + ": expected metadata map = blocks and tree = 1");
    }
    const auto map = dchag::ChannelMap::blocks(C, groups);
    std::vector<std::vector<int>> lists;
    for (int r = 0; r < groups; ++r) lists.push_back(map.channels_of(r));
    dchag::DchagOptions options;
    options.partial =
        partial == "linear" ? dchag::PartialKind::linear : dchag::PartialKind::cross_attention;
    dchag::DchagEmulation<Exec, Scalar> model(exec, cfg, options, lists);
    dchag::load_weights(file, model.parameters());
    estimate = model.memory_estimate(B);
    t = run_steps(
        exec, model, [&] { model.forward(exec, images, out); }, d_out, o.reps);
    save(model);
  }
  const std::int64_t peak = tracker.peak_bytes();
  if (!o.out.empty()) writer.write(o.out);

  std::printf(
      "{\"impl\":\"dchag\",\"kind\":\"%s\",\"partial\":\"%s\",\"groups\":%d,\"strategy\":\"%s\","
      "\"C\":%d,\"B\":%d,"
      "\"H\":%d,\"W\":%d,\"p\":%d,\"D\":%d,\"heads\":%d,\"reps\":%d,\"fwd_ms\":%.3f,\"fwdbwd_ms\":%"
      ".3f,"
      "\"fwd_cpu_ms\":%.3f,\"fwdbwd_cpu_ms\":%.3f,\"peak_bytes\":%lld,\"estimate_bytes\":%lld,"
      "\"exec\":\"%s\"}\n",
      kind.c_str(), partial.c_str(), groups, std::string(dchag::to_string(o.strategy)).c_str(), C,
      B, cfg.height, cfg.width, cfg.patch, D, cfg.heads, o.reps, median(t.fwd), median(t.fwdbwd),
      median(t.fwd_cpu), median(t.fwdbwd_cpu), static_cast<long long>(peak),
      static_cast<long long>(estimate.total()), Exec::name());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::initialize(argc, argv);
  int status = 0;
  try {
    status = run(parse(argc, argv));
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "dchag_run: %s\n", e.what());
    status = 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dchag_run: %s\n", e.what());
    status = 1;
  }
  Kokkos::finalize();
  return status;
}
