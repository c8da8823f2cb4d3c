// Weather inference: the variables of an ERA5-like NetCDF file go through ClimaX's front end on
// the ranks of one channel group, in D-CHAG-C (Mode::dchag_xattn) and in the exact distributed
// ClimaX aggregation (Mode::exact_flat), each with the weights of a PyTorch checkpoint, one time
// step after another, and both are held against PyTorch's tokens.
//
//   mpiexec -n 4 dchag_weather --data era5.nc --dchag dchag_c.safetensors
//       --climax climax.safetensors [--reference reference.safetensors] [--out tokens.safetensors]
//       [--heads 8] [--progress N]
//
// The checkpoints (scripts/convert_checkpoint.py --channels-file) name their channels; each one
// is read from the file's variable of that name (NetCDF-C), whatever the order of either. A
// channel missing from the file is an error; the file's other variables are listed and ignored.
// The model's channels are the checkpoint's in the file's order; rank r holds the variables of
// the checkpoint's contiguous block r (the channels partial.{r} was trained on), reads only those
// and standardizes each by its mean and deviation over the file. load_weights matches the
// checkpoint's tokenizers and var_embed rows to them by name. Rank 0 prints progress per time
// step and a summary, writes the tokens [T, L, D] of both modes to --out, and compares them with
// --reference (make_models.py): max |x - ref| / max |ref| against PyTorch in float64, held to the
// float32 bound of agreement.hpp. Every rank exits 1 when a mode exceeds it, or on any error.
#include <dchag/device.hpp>
#include <dchag/distributed.hpp>
#include <dchag/distributed_weights.hpp>
#include <dchag/safetensors.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "agreement.hpp"
#include "netcdf_input.hpp"

namespace {

using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;
using Clock = std::chrono::steady_clock;
using dchag::safetensors::File;

struct Options {
  std::string data, climax, dchag, reference, out;
  int heads = 8;     // attention heads (a checkpoint does not record them)
  int progress = 0;  // a progress line every N time steps; 0: about 24 lines per run
};

int integer(const std::string& option, const std::string& value) {
  std::size_t used = 0;
  int n = -1;
  try {
    n = std::stoi(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != value.size() || used == 0)
    throw std::invalid_argument("dchag_weather: " + option + " is '" + value +
                                "', expected an integer");
  return n;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i];
    if (i + 1 >= argc) throw std::invalid_argument("dchag_weather: " + k + " needs a value");
    const std::string v = argv[i + 1];
    if (k == "--data")
      o.data = v;
    else if (k == "--climax")
      o.climax = v;
    else if (k == "--dchag")
      o.dchag = v;
    else if (k == "--reference")
      o.reference = v;
    else if (k == "--out")
      o.out = v;
    else if (k == "--heads")
      o.heads = integer(k, v);
    else if (k == "--progress")
      o.progress = integer(k, v);
    else
      throw std::invalid_argument("dchag_weather: unknown option " + k);
  }
  for (const auto& [value, name] : {std::pair{o.data, "--data"}, std::pair{o.climax, "--climax"},
                                    std::pair{o.dchag, "--dchag"}})
    if (value.empty())
      throw std::invalid_argument(std::string("dchag_weather: ") + name + " is missing");
  if (o.heads < 1 || o.progress < 0)
    throw std::invalid_argument("dchag_weather: --heads is " + std::to_string(o.heads) +
                                " and --progress " + std::to_string(o.progress) +
                                ", expected --heads >= 1 and --progress >= 0");
  return o;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t begin = 0;
  for (std::size_t end; (end = s.find(',', begin)) != std::string::npos; begin = end + 1)
    out.push_back(s.substr(begin, end - begin));
  out.push_back(s.substr(begin));
  return out;
}

std::string join(const std::vector<std::string>& names, std::size_t most = 0) {
  std::string s;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (most && i == most) return s + ", ... (" + std::to_string(names.size()) + ")";
    s += (i ? ", " : "") + names[i];
  }
  return s;
}

// What a converted checkpoint holds: its channel names (in its own order) and shapes.
struct Checkpoint {
  std::string path;
  std::vector<std::string> channels;
  int dim = 0, patch = 0, partials = 0;  // partials: partial.{r} groups (D-CHAG)
  std::int64_t patches = 0;
  dchag::Convention convention = dchag::Convention::climax, partial = convention;
};

dchag::Convention convention_of(const File& f, const std::string& prefix) {
  if (f.contains(prefix + "var_query")) return dchag::Convention::climax;
  if (f.contains(prefix + "query")) return dchag::Convention::artifact;
  throw std::invalid_argument("dchag_weather: '" + f.source() + "' holds neither " + prefix +
                              "var_query nor " + prefix + "query, expected a cross-attention");
}

File open_checkpoint(const std::string& path) {
  try {
    return File::open(path);
  } catch (const std::exception& e) {
    throw std::invalid_argument(std::string(e.what()) +
                                " (expected a safetensors file of scripts/convert_checkpoint.py)");
  }
}

Checkpoint read_checkpoint(const std::string& path, bool dchag) {
  const File f = open_checkpoint(path);
  Checkpoint c;
  c.path = path;
  const auto names = f.metadata_value("channels");
  if (!names)
    throw std::invalid_argument("dchag_weather: '" + path +
                                "' has no \"channels\" metadata, expected the channel names "
                                "(scripts/convert_checkpoint.py --channels-file)");
  c.channels = split(*names);
  const auto& embed = f.info("var_embed").shape;                  // [1, C, D] or [C, D]
  const auto& conv = f.info("token_embeds.0.proj.weight").shape;  // [D, 1, p, p]
  const auto& pos = f.info("pos_embed").shape;                    // [1, L, D]
  if (embed.size() < 2 || conv.size() != 4 || pos.size() < 2 ||
      embed[embed.size() - 2] != std::int64_t(c.channels.size()))
    throw std::invalid_argument("dchag_weather: '" + path + "': var_embed, token_embeds.0.proj." +
                                "weight or pos_embed has an unexpected shape, or the " +
                                std::to_string(c.channels.size()) +
                                " channel names do not match var_embed's rows");
  c.dim = int(embed.back());
  c.patch = int(conv.back());
  c.patches = pos[pos.size() - 2];
  if (!dchag) {
    c.convention = convention_of(f, "var_");
    if (c.convention == dchag::Convention::artifact) c.convention = convention_of(f, "");
    return c;
  }
  c.convention = convention_of(f, "final.");
  while (f.contains("partial." + std::to_string(c.partials) + ".query") ||
         f.contains("partial." + std::to_string(c.partials) + ".var_query"))
    ++c.partials;
  if (c.partials == 0)
    throw std::invalid_argument("dchag_weather: '" + path + "' holds no partial.0.query, " +
                                "expected a D-CHAG-C checkpoint");
  c.partial = convention_of(f, "partial.0.");
  return c;
}

// The file's variables that the checkpoint takes, in the file's order.
struct Inputs {
  std::vector<const weather::Variable*> variables;  // model channel c is variables[c]
  std::vector<std::string> names, ignored;
  std::size_t T = 0, H = 0, W = 0;
};

Inputs match(const weather::NetcdfFile& nc, const Checkpoint& ck) {
  std::vector<std::string> missing;
  for (std::size_t f = 0; f < ck.channels.size(); ++f)
    if (nc.find(ck.channels[f]) == nullptr)
      missing.push_back(ck.channels[f] + " (channel " + std::to_string(f) + ")");
  if (!missing.empty())
    throw std::invalid_argument(
        "dchag_weather: '" + nc.path() + "' lacks " + std::to_string(missing.size()) + " of the " +
        std::to_string(ck.channels.size()) + " variables of '" + ck.path + "': " + join(missing) +
        (missing.size() == 1 ? " is" : " are") + " not in the file");
  Inputs in;
  for (const auto& v : nc.variables()) {
    const bool taken =
        std::find(ck.channels.begin(), ck.channels.end(), v.name) != ck.channels.end();
    if (!taken) {
      if (!weather::NetcdfFile::is_coordinate(v))
        in.ignored.push_back(v.name + " (" + join(v.dims) + ")");
      continue;
    }
    const auto& first = in.variables.empty() ? v : *in.variables.front();
    if (v.extents.size() != 3 || v.dims != first.dims || v.extents != first.extents)
      throw std::invalid_argument(
          "dchag_weather: variable '" + v.name + "' of '" + nc.path() + "' has dimensions (" +
          join(v.dims) + "), expected (" +
          (v.extents.size() == 3 ? join(first.dims) : std::string("time, lat, lon")) +
          ") of the same sizes as " + first.name);
    in.variables.push_back(&v);
    in.names.push_back(v.name);
  }
  in.T = in.variables[0]->extents[0];
  in.H = in.variables[0]->extents[1];
  in.W = in.variables[0]->extents[2];
  return in;
}

// Rank r holds the model channels (file order) of the checkpoint's block r.
dchag::ChannelMap map_of(const std::vector<std::string>& model, const Checkpoint& ck, int P) {
  const auto blocks = dchag::ChannelMap::blocks(int(ck.channels.size()), P);
  std::vector<std::vector<int>> lists(static_cast<std::size_t>(P));
  for (std::size_t c = 0; c < model.size(); ++c) {
    const auto f = std::find(ck.channels.begin(), ck.channels.end(), model[c]);
    lists[std::size_t(blocks.owner(int(f - ck.channels.begin())))].push_back(int(c));
  }
  return dchag::ChannelMap::from_lists(int(model.size()), std::move(lists));
}

// "hours since 1979-01-01 00:00:00" + h as 1979-01-02T06:00; else the number.
std::string when(double h, const std::string& units) {
  int y = 0, mo = 0, d = 0, hh = 0, mm = 0;
  if (std::sscanf(units.c_str(), "hours since %d-%d-%d %d:%d", &y, &mo, &d, &hh, &mm) < 3)
    return std::to_string(h);
  using namespace std::chrono;
  const auto t = sys_days(year(y) / month(unsigned(mo)) / day(unsigned(d))) + hours(hh) +
                 minutes(mm) + minutes(std::llround(60 * h));
  const year_month_day ymd(floor<days>(t));
  const auto hm = hh_mm_ss(t - floor<days>(t));
  char s[64];
  std::snprintf(s, sizeof s, "%04d-%02u-%02uT%02ld:%02ld", int(ymd.year()), unsigned(ymd.month()),
                unsigned(ymd.day()), long(hm.hours().count()), long(hm.minutes().count()));
  return s;
}

struct ModeRun {
  const char* name;
  const char* reference_key;
  dchag::Mode mode;
  Checkpoint checkpoint;
  std::vector<float> tokens;  // [T, L, D] on rank 0
  std::vector<double> ms;     // per time step, the slowest rank
};

int run(int argc, char** argv) {
  dchag::Communicator comm(MPI_COMM_WORLD);
  const int rank = comm.rank(), P = comm.size();
  const bool root = rank == 0;
  Options o;
  ModeRun modes[2] = {{"dchag_xattn", "dchag_xattn", dchag::Mode::dchag_xattn, {}, {}, {}},
                      {"exact_flat", "climax", dchag::Mode::exact_flat, {}, {}, {}}};
  std::unique_ptr<weather::NetcdfFile> nc;
  Inputs in;
  // Everything before the first collective is local; its failure on one rank throws on all.
  comm.check_collectively("dchag_weather: setting up", [&] {
    o = parse(argc, argv);
    modes[0].checkpoint = read_checkpoint(o.dchag, true);
    modes[1].checkpoint = read_checkpoint(o.climax, false);
    const auto &d = modes[0].checkpoint, &f = modes[1].checkpoint;
    if (d.partials != P)
      throw std::invalid_argument("dchag_weather: '" + d.path + "' holds " +
                                  std::to_string(d.partials) + " partial aggregators, one per " +
                                  "rank: run it on " + std::to_string(d.partials) + " ranks, not " +
                                  std::to_string(P));
    for (const auto& name : f.channels)
      if (std::find(d.channels.begin(), d.channels.end(), name) == d.channels.end() ||
          f.channels.size() != d.channels.size())
        throw std::invalid_argument("dchag_weather: '" + f.path + "' and '" + d.path +
                                    "' take other channels ('" + name + "'), expected the same");
    nc = std::make_unique<weather::NetcdfFile>(o.data);
    in = match(*nc, d);
    for (const auto& m : modes) {
      const auto p = std::size_t(m.checkpoint.patch);
      if (in.H % p || in.W % p || std::int64_t((in.H / p) * (in.W / p)) != m.checkpoint.patches)
        throw std::invalid_argument(
            "dchag_weather: the grid " + std::to_string(in.H) + "x" + std::to_string(in.W) +
            " of '" + o.data + "' in patches of " + std::to_string(p) + "x" + std::to_string(p) +
            " does not make the " + std::to_string(m.checkpoint.patches) + " patches of '" +
            m.checkpoint.path + "' (pos_embed), expected the grid it was trained on");
    }
  });
  const auto map = map_of(in.names, modes[0].checkpoint, P);
  const int C = int(in.names.size());
  int largest = 0;
  for (const auto& list : map.groups()) largest = std::max(largest, int(list.size()));
  if (root) {
    std::printf(
        "dchag_weather: %s: %zu times of %zux%zu, %d variables taken by name, %zu "
        "ignored%s%s\n",
        o.data.c_str(), in.T, in.H, in.W, C, in.ignored.size(), in.ignored.empty() ? "" : ": ",
        join(in.ignored).c_str());
    for (int r = 0; r < P; ++r) {
      std::vector<std::string> names;
      for (int c : map.channels_of(r)) names.push_back(in.names[std::size_t(c)]);
      std::printf("  rank %d reads %zu: %s\n", r, names.size(), join(names, 4).c_str());
    }
  }

  Exec exec;
  std::vector<std::unique_ptr<dchag::DistributedFrontEnd<Exec, float>>> fronts;
  std::vector<dchag::FrontEndConfig> cfgs;
  for (auto& m : modes) {
    dchag::FrontEndConfig cfg;
    cfg.channels = C;
    cfg.height = int(in.H);
    cfg.width = int(in.W);
    cfg.patch = m.checkpoint.patch;
    cfg.dim = m.checkpoint.dim;
    cfg.heads = o.heads;
    cfg.convention = m.checkpoint.convention;
    cfg.partial_convention = m.checkpoint.partial;
    cfg.memory = dchag::MemoryPolicy::inference;  // no backward: nothing kept
    fronts.push_back(
        std::make_unique<dchag::DistributedFrontEnd<Exec, float>>(exec, comm, cfg, m.mode, map));
    dchag::load_weights(m.checkpoint.path, *fronts.back(), {.channel_names = in.names});
    cfgs.push_back(cfg);
  }

  // This rank's variables and their statistics over the file.
  const auto& own = fronts[0]->channels();
  const std::size_t Cr = own.size(), HW = in.H * in.W;
  std::vector<weather::Moments> stats(Cr);
  comm.check_collectively("dchag_weather: statistics", [&] {
    for (std::size_t j = 0; j < Cr; ++j)
      stats[j] = weather::moments(nc->read_all(*in.variables[std::size_t(own[j])]));
  });
  const auto hours = nc->coordinate("time");
  const auto units = nc->text_attribute("time", "units");
  dchag::View4<float, Mem> images("weather::images", 1, Cr, in.H, in.W);
  auto host = Kokkos::create_mirror_view(images);
  std::vector<float> slice(HW);
  const int every = o.progress ? o.progress : std::max(1, int(in.T) / 24);
  std::vector<double> read_ms;
  std::vector<dchag::View3<float, Mem>> outs;
  for (const auto& cfg : cfgs) outs.emplace_back("weather::tokens", 1, cfg.patches(), cfg.dim);
  for (std::size_t t = 0; t < in.T; ++t) {
    const auto t0 = Clock::now();
    comm.check_collectively("dchag_weather: reading", [&] {
      for (std::size_t j = 0; j < Cr; ++j) {
        nc->read_slice(*in.variables[std::size_t(own[j])], t, slice.data());
        for (std::size_t i = 0; i < HW; ++i)
          host.data()[j * HW + i] = float((double(slice[i]) - stats[j].mean) / stats[j].std);
      }
    });
    Kokkos::deep_copy(exec, images, host);
    exec.fence();
    double ms[3] = {std::chrono::duration<double, std::milli>(Clock::now() - t0).count(), 0, 0};
    for (std::size_t k = 0; k < 2; ++k) {
      const auto& out = outs[k];
      const auto t1 = Clock::now();
      fronts[k]->forward(exec, images, out);
      exec.fence();
      ms[k + 1] = std::chrono::duration<double, std::milli>(Clock::now() - t1).count();
      if (root) {
        auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), out);
        modes[k].tokens.insert(modes[k].tokens.end(), h.data(), h.data() + h.span());
      }
    }
    MPI_Allreduce(MPI_IN_PLACE, ms, 3, MPI_DOUBLE, MPI_MAX, comm.comm());
    read_ms.push_back(ms[0]);
    modes[0].ms.push_back(ms[1]);
    modes[1].ms.push_back(ms[2]);
    if (root && ((t + 1) % std::size_t(every) == 0 || t + 1 == in.T))
      std::printf("time %zu/%zu %s: read %.1f ms, dchag_xattn %.1f ms, exact_flat %.1f ms\n", t + 1,
                  in.T, t < hours.size() ? when(hours[t], units).c_str() : "", ms[0], ms[1], ms[2]);
    std::fflush(stdout);
  }

  // Rank 0 writes the tokens and judges them; every rank returns its verdict.
  int failed = 0;
  comm.check_collectively("dchag_weather: writing and comparing", [&] {
    if (!root) return;
    const std::int64_t L = cfgs[0].patches();
    dchag::safetensors::Writer w;
    w.set_metadata("channels", join(in.names));
    w.set_metadata("data", o.data);
    for (auto& m : modes) w.add(m.name, {std::int64_t(in.T), L, m.checkpoint.dim}, m.tokens.data());
    std::vector<std::string> lines;
    if (!o.reference.empty()) {
      const File ref = File::open(o.reference);
      for (std::size_t k = 0; k < 2; ++k) {
        auto& m = modes[k];
        const std::vector<std::int64_t> shape = {std::int64_t(in.T), L, m.checkpoint.dim};
        const auto a = weather::agreement(ref, m.reference_key, m.tokens, shape,
                                          weather::bound(cfgs[k], m.mode, largest, P));
        char s[256];
        std::snprintf(s, sizeof s,
                      "%.3e (bound %.2e): %s; PyTorch float32 %.3e, dchag vs "
                      "PyTorch float32 %.3e",
                      a.error, a.bound, a.holds() ? "holds" : "EXCEEDED", a.torch, a.vs_f32);
        lines.push_back(std::string(m.name) + " against PyTorch float64: " + s);
        w.set_metadata(std::string("agreement.") + m.name, s);
        failed |= a.holds() ? 0 : 1;
      }
    }
    if (!o.out.empty()) w.write(o.out);
    const auto mean = [](const std::vector<double>& v) {
      double s = 0;
      for (std::size_t i = v.size() > 1 ? 1 : 0; i < v.size(); ++i) s += v[i];
      return v.size() > 1 ? s / double(v.size() - 1) : v.empty() ? 0.0 : v[0];
    };
    std::printf(
        "summary: %d ranks, %d channels (%d per rank at most) of %zux%zu, %zu times, "
        "L = %lld, D = %d, %d heads, inference\n",
        P, C, largest, in.H, in.W, in.T, (long long)L, cfgs[0].dim, o.heads);
    std::printf(
        "  per time step after the first (max over ranks): read %.2f ms, dchag_xattn %.2f "
        "ms (first %.2f), exact_flat %.2f ms (first %.2f)\n",
        mean(read_ms), mean(modes[0].ms), modes[0].ms[0], mean(modes[1].ms), modes[1].ms[0]);
    for (const auto& l : lines) std::printf("  %s\n", l.c_str());
    if (o.reference.empty()) std::printf("  no --reference: agreement not checked\n");
    if (!o.out.empty())
      std::printf("  wrote %s: dchag_xattn, exact_flat [T, L, D]\n", o.out.c_str());
  });
  MPI_Bcast(&failed, 1, MPI_INT, 0, comm.comm());
  return failed;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  dchag::initialize_on_local_device(argc, argv);
  int status = 0, rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  try {
    status = run(argc, argv);
  } catch (const std::exception& e) {
    // Collective failures reach every rank; rank 0 says what happened once.
    if (rank == 0) std::fprintf(stderr, "%s\n", e.what());
    status = 1;
  }
  MPI_Allreduce(MPI_IN_PLACE, &status, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  Kokkos::finalize();
  MPI_Finalize();
  return status;
}
