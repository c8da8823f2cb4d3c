// Hyperspectral pretraining, MAE-style, with a D-CHAG-L front end over MPI ranks.
//
// Each scene is a reflectance cube of `--bands` bands over 400-900 nm from a linear mixing model
// (scene.hpp); a few bands of every scene saturate and the channel mask marks them missing. 75%
// of the patches are hidden; the front end (dchag_linear: every rank tokenizes and folds its own
// bands, a final cross-attention folds the ranks' partial tokens) encodes the scene, and a linear
// decoder (mae.hpp) predicts the hidden patches' pixels of every band from the visible tokens
// around them. AdamW with a warmup-cosine schedule; the loss is the mean squared error in
// standardised units over hidden patches and valid bands (1 = predicting each band's mean).
//
// Writes to --out: loss.csv, loss.png (gnuplot), mae.safetensors (the front end and the decoder,
// one file; scripts/convert_checkpoint.py --to-pytorch turns it into a state dict). Exits
// non-zero on every rank unless the validation loss fell at least --min-drop times.
//
//   mpiexec -n 4 build/examples/dchag_hyperspectral            (500 bands, 64x64, 300 steps)
#include "mae.hpp"
#include "scene.hpp"

#include <dchag/device.hpp>
#include <dchag/distributed.hpp>
#include <dchag/distributed_weights.hpp>
#include <dchag/optimizer.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace hyperspectral;

struct Options {
  int bands = 500, size = 64, patch = 8, dim = 128, heads = 4, batch = 4, steps = 300;
  int warmup = 20, eval_every = 25, validation = 8, print_every = 10;
  double lr = 6e-3, hide = 0.75, radius = 1.0, min_drop = 10.0, smoothness = 0.6, noise = 0.004;
  std::uint64_t seed = 1;
  std::string out = "hyperspectral_out";
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i];
    if (i + 1 >= argc) throw std::invalid_argument("dchag_hyperspectral: " + k + " needs a value");
    const char* v = argv[i + 1];
    if (k == "--bands")
      o.bands = std::atoi(v);
    else if (k == "--size")
      o.size = std::atoi(v);
    else if (k == "--patch")
      o.patch = std::atoi(v);
    else if (k == "--dim")
      o.dim = std::atoi(v);
    else if (k == "--heads")
      o.heads = std::atoi(v);
    else if (k == "--batch")
      o.batch = std::atoi(v);
    else if (k == "--steps")
      o.steps = std::atoi(v);
    else if (k == "--warmup")
      o.warmup = std::atoi(v);
    else if (k == "--eval-every")
      o.eval_every = std::atoi(v);
    else if (k == "--validation")
      o.validation = std::atoi(v);
    else if (k == "--lr")
      o.lr = std::atof(v);
    else if (k == "--hide")
      o.hide = std::atof(v);
    else if (k == "--min-drop")
      o.min_drop = std::atof(v);
    else if (k == "--smoothness")
      o.smoothness = std::atof(v);
    else if (k == "--radius")
      o.radius = std::atof(v);
    else if (k == "--noise")
      o.noise = std::atof(v);
    else if (k == "--seed")
      o.seed = std::strtoull(v, nullptr, 10);
    else if (k == "--out")
      o.out = v;
    else
      throw std::invalid_argument("dchag_hyperspectral: unknown option " + k);
  }
  if (o.batch < 1 || o.steps <= o.warmup || o.validation < 1 || o.hide <= 0 || o.hide >= 1)
    throw std::invalid_argument(
        "dchag_hyperspectral: expected --batch >= 1, --steps > --warmup, --validation >= 1 and "
        "0 < --hide < 1");
  return o;
}

// One batch of scenes on this rank: its bands' raw pixels, the hidden patches, the masks, the
// decoder's neighbour weights.
struct Batch {
  V4<float> raw, images;
  V3<float> targets, k;
  V2<std::uint8_t> visible, band_valid, mask;  // [B, L], [B, Cr], [B, C]
  double count = 0;                            // squared-error terms of this rank
  V4<float>::HostMirror raw_host;
  V3<float>::HostMirror k_host;
  V2<std::uint8_t>::HostMirror visible_host, band_valid_host, mask_host;
};

struct Model {
  const Options& o;
  SceneOptions scene;
  Geometry g;
  std::vector<int> bands;  // this rank's global band ids
  V1<float> mean, inv_std;
};

// A batch of B scenes' buffers, device and host, allocated once and refilled every step.
Batch allocate_batch(const Model& m, int B) {
  const Geometry& g = m.g;
  const int L = g.L();
  Batch b{V4<float>("raw", B, g.Cr, g.H, g.W),
          V4<float>("images", B, g.Cr, g.H, g.W),
          V3<float>("targets", B, L, g.row()),
          V3<float>("k", B, moments * L, L),
          V2<std::uint8_t>("visible", B, L),
          V2<std::uint8_t>("band_valid", B, g.Cr),
          V2<std::uint8_t>("mask", B, m.scene.bands),
          0,
          {},
          {},
          {},
          {},
          {}};
  b.raw_host = Kokkos::create_mirror_view(b.raw);
  b.k_host = Kokkos::create_mirror_view(b.k);
  b.visible_host = Kokkos::create_mirror_view(b.visible);
  b.band_valid_host = Kokkos::create_mirror_view(b.band_valid);
  b.mask_host = Kokkos::create_mirror_view(b.mask);
  return b;
}

// Scenes first_scene ... first_scene + B - 1 into b.
void fill_batch(const Model& m, std::uint64_t first_scene, Batch& b) {
  const Geometry& g = m.g;
  const int B = int(b.raw.extent(0)), L = g.L(), C = m.scene.bands, pp = g.p * g.p;
  const auto& raw = b.raw_host;
  const auto &mask = b.mask_host, &vis = b.visible_host, &valid = b.band_valid_host;
  b.count = 0;
  std::vector<std::uint8_t> visible(std::size_t(B) * L);
  const int shown = std::max(1, int(std::lround((1.0 - m.o.hide) * L)));
  for (int s = 0; s < B; ++s) {
    const std::uint64_t id = first_scene + std::uint64_t(s);
    const auto a = abundances(m.scene, id);
    const auto sat = saturated_bands(m.scene, id);
    for (int c = 0; c < C; ++c) mask(s, c) = !std::binary_search(sat.begin(), sat.end(), c);
    for (int j = 0; j < g.Cr; ++j) {
      render_band(m.scene, id, a, sat, m.bands[j], &raw(s, j, 0, 0));
      valid(s, j) = mask(s, m.bands[j]);
    }
    // The same hidden patches on every rank: a shuffle keyed by the scene.
    std::vector<int> order(L);
    std::iota(order.begin(), order.end(), 0);
    for (int i = L - 1; i > 0; --i)
      std::swap(order[i], order[key(m.scene.seed, id, 0x4a5e, i) % std::uint64_t(i + 1)]);
    for (int i = 0; i < L; ++i) visible[std::size_t(s) * L + order[i]] = i < shown;
    for (int l = 0; l < L; ++l) vis(s, l) = visible[std::size_t(s) * L + l];
    int valid_bands = 0;
    for (int j = 0; j < g.Cr; ++j) valid_bands += valid(s, j);
    b.count += double(L - shown) * valid_bands * pp;
  }
  Geometry gb = g;
  gb.B = B;
  const auto weights = neighbour_weights(gb, visible, m.o.radius);
  std::copy(weights.begin(), weights.end(), b.k_host.data());
  Kokkos::deep_copy(b.k, b.k_host);
  Kokkos::deep_copy(b.raw, raw);
  Kokkos::deep_copy(b.visible, vis);
  Kokkos::deep_copy(b.band_valid, valid);
  Kokkos::deep_copy(b.mask, mask);
  hide_and_standardise(Exec(), gb, b.raw, m.mean, m.inv_std, b.visible, b.images, b.targets);
}

// Per-band mean and 1 / standard deviation over calibration scenes, saturated bands left out.
void standardisation(Model& m) {
  const int n = 8, HW = m.g.H * m.g.W;
  std::vector<double> sum(m.g.Cr), sq(m.g.Cr), cnt(m.g.Cr);
  std::vector<float> px(HW);
  for (int s = 0; s < n; ++s) {
    const std::uint64_t id = 1000000 + std::uint64_t(s);
    const auto a = abundances(m.scene, id);
    const auto sat = saturated_bands(m.scene, id);
    for (int j = 0; j < m.g.Cr; ++j) {
      if (std::binary_search(sat.begin(), sat.end(), m.bands[j])) continue;
      render_band(m.scene, id, a, sat, m.bands[j], px.data());
      for (float v : px) sum[j] += v, sq[j] += double(v) * v, cnt[j] += 1;
    }
  }
  auto mean = Kokkos::create_mirror_view(m.mean);
  auto inv = Kokkos::create_mirror_view(m.inv_std);
  for (int j = 0; j < m.g.Cr; ++j) {
    const double mu = sum[j] / cnt[j], var = std::max(sq[j] / cnt[j] - mu * mu, 1e-12);
    mean(j) = float(mu);
    inv(j) = float(1.0 / std::sqrt(var));
  }
  Kokkos::deep_copy(m.mean, mean);
  Kokkos::deep_copy(m.inv_std, inv);
}

// Decoder rows of the global bands, U(-1/sqrt(D), 1/sqrt(D)) as torch.nn.Linear, keyed by the
// global element so the start does not depend on the number of ranks.
Decoder make_decoder(const Model& m) {
  const int n = m.g.row(), D = moments * m.g.D, pp = m.g.p * m.g.p;
  Decoder d{V2<float>("decoder.weight", n, D), V2<float>("decoder.weight.grad", n, D),
            V1<float>("decoder.bias", n), V1<float>("decoder.bias.grad", n)};
  auto w = Kokkos::create_mirror_view(d.weight);
  auto b = Kokkos::create_mirror_view(d.bias);
  const double a = 1.0 / std::sqrt(double(D));
  for (int i = 0; i < n; ++i) {
    const std::uint64_t row = std::uint64_t(m.bands[i / pp]) * pp + std::uint64_t(i % pp);
    for (int k = 0; k < D; ++k)
      w(i, k) = float(a * (2 * uniform(key(m.o.seed, 0xdec, row, k)) - 1));
    b(i) = float(a * (2 * uniform(key(m.o.seed, 0xb1a5, row)) - 1));
  }
  Kokkos::deep_copy(d.weight, w);
  Kokkos::deep_copy(d.bias, b);
  return d;
}

double allreduce_sum(double v, const dchag::Communicator& comm) {
  double out = 0;
  MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_SUM, comm.comm());
  return out;
}

template <class T>
void append(dchag::TensorList<float, Mem>& to, const T& from) {
  to.insert(to.end(), from.begin(), from.end());
}

void plot(const std::string& dir) {
  const std::string gp = dir + "/loss.gp";
  std::ofstream(gp) << "set terminal pngcairo size 900,560\n"
                       "set output '"
                    << dir
                    << "/loss.png'\n"
                       "set datafile separator ','\n"
                       "set logscale y\nset grid\nset key top right\n"
                       "set xlabel 'step'\nset ylabel 'MSE (standardised, hidden patches)'\n"
                       "set title 'MAE pretraining with a D-CHAG-L front end'\n"
                       "plot '"
                    << dir
                    << "/loss.csv' every ::1 using 1:2 with lines title 'train', "
                       "'' every ::1 using 1:3 with linespoints pt 7 title 'validation'\n";
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
    std::printf("gnuplot not found: the loss curve is in %s/loss.csv (plot it with %s)\n",
                dir.c_str(), gp.c_str());
    return;
  }
  const int rc = std::system(("gnuplot '" + gp + "'").c_str());
  std::printf("loss curve: %s/loss.png%s\n", dir.c_str(), rc == 0 ? "" : " (gnuplot failed)");
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  dchag::initialize_on_local_device(argc, argv);
  int status = 0;
  try {
    const Options o = parse(argc, argv);
    dchag::Communicator comm(MPI_COMM_WORLD);
    const bool root = comm.rank() == 0;
    Exec exec;
    dchag::FrontEndConfig cfg;
    cfg.channels = o.bands;
    cfg.height = cfg.width = o.size;
    cfg.patch = o.patch;
    cfg.dim = o.dim;
    cfg.heads = o.heads;
    cfg.seed = o.seed;
    const auto map = dchag::ChannelMap::blocks(o.bands, comm.size());
    dchag::DistributedFrontEnd<Exec, float> fe(exec, comm, cfg, dchag::Mode::dchag_linear, map);

    SceneOptions scene;
    scene.bands = o.bands;
    scene.height = scene.width = o.size;
    scene.seed = o.seed;
    scene.smoothness = o.smoothness;
    scene.noise = o.noise;
    const int Cr = int(fe.channels().size());
    Model m{o,
            scene,
            Geometry{o.batch, Cr, o.size, o.size, o.patch, o.dim},
            fe.channels(),
            V1<float>("mean", Cr),
            V1<float>("inv_std", Cr)};
    standardisation(m);
    Decoder dec = make_decoder(m);
    auto params = fe.parameters(), grads = fe.gradients();
    append(params, decoder_tensors(dec, false, m.bands, o.bands, o.patch, moments * o.dim));
    append(grads, decoder_tensors(dec, true, m.bands, o.bands, o.patch, moments * o.dim));
    dchag::AdamW<Exec, float> opt(exec, params, grads, {o.lr, 0.9, 0.95, 1e-8, 0.05});
    const dchag::WarmupCosine schedule{o.lr, o.warmup, o.steps, 0.0, 0.0};

    const int B = o.batch, L = m.g.L(), D = o.dim;
    V3<float> tokens("tokens", B, L, D), s3("moments", B, moments * L, D),
        z("z", B, L, moments * D), pred("pred", B, L, m.g.row()), d_pred("d_pred", B, L, m.g.row()),
        d_z("d_z", B, L, moments * D), d_tokens("d_tokens", B, L, D);

    // Loss of one batch; with `train`, also the gradients of every parameter.
    const auto run = [&](const Batch& b, bool train) {
      fe.forward(exec, b.images, tokens, dchag::PerSample<float, Mem>{{}, b.mask});
      mix_patches(exec, m.g, b.k, tokens, s3, z);
      decode(exec, m.g, z, dec, pred);
      const double count = allreduce_sum(b.count, comm);
      const double sse = allreduce_sum(
          squared_error(exec, m.g, pred, b.targets, b.visible, b.band_valid, count, d_pred), comm);
      if (train) {
        decoder_backward(exec, m.g, z, d_pred, dec, d_z);
        dchag::sum_gradients(exec, comm, dchag::GradientReduction::sum, d_z);
        mix_patches_backward(exec, m.g, b.k, d_z, s3, d_tokens);
        fe.backward(exec, d_tokens);
      }
      return sse / count;
    };
    std::vector<Batch> validation;
    for (int v = 0; v < o.validation; v += B)
      fill_batch(m, 2000000 + std::uint64_t(v), validation.emplace_back(allocate_batch(m, B)));
    const auto evaluate = [&] {
      double total = 0;
      for (const Batch& b : validation) total += run(b, false);
      return total / double(validation.size());
    };

    if (root)
      std::printf(
          "dchag hyperspectral MAE: %d ranks, %d bands (%d-%d per rank) over 400-900 nm, %dx%d "
          "scenes, patch %d (L = %d), D = %d, %d heads, batch %d, %d steps, %.0f%% of patches "
          "hidden, %s\n",
          comm.size(), o.bands, o.bands / comm.size(), (o.bands + comm.size() - 1) / comm.size(),
          o.size, o.size, o.patch, L, D, o.heads, B, o.steps, 100 * o.hide, Exec::name());
    // Rank 0 writes the outputs; a failure there throws on every rank, not only on rank 0.
    std::ofstream csv;
    comm.check_collectively("dchag_hyperspectral: opening the outputs", [&] {
      if (!root) return;
      std::filesystem::create_directories(o.out);
      csv.open(o.out + "/loss.csv");
      if (!csv) throw std::runtime_error("cannot write " + o.out + "/loss.csv (--out)");
      csv << "step,train,validation,lr\n";
    });
    const double start = evaluate();
    if (root) {
      std::printf("validation loss before training: %.4f\n", start);
      csv << 0 << ",," << start << ",\n";
    }
    double last = start, seconds = 0;
    Batch b = allocate_batch(m, B);
    for (int s = 1; s <= o.steps; ++s) {
      fill_batch(m, std::uint64_t(s - 1) * B, b);
      const auto t0 = std::chrono::steady_clock::now();
      fe.zero_gradients(exec);
      Kokkos::deep_copy(exec, dec.d_weight, 0.0f);
      Kokkos::deep_copy(exec, dec.d_bias, 0.0f);
      const double lr = schedule(s - 1), loss = run(b, true);
      opt.step(exec, lr);
      exec.fence();
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const bool eval = s % o.eval_every == 0 || s == o.steps;
      if (eval) last = evaluate();
      if (root) {
        csv << s << ',' << loss << ',' << (eval ? std::to_string(last) : "") << ',' << lr << '\n';
        if (s % o.print_every == 0 || s == o.steps || s == 1)
          std::printf("step %4d/%d  train %.4f  validation %.4f  lr %.2e  %.1f ms/step\n", s,
                      o.steps, loss, last, lr, 1e3 * seconds / s);
      }
    }
    if (root) csv.close(), plot(o.out);

    std::vector<std::string> names, replicated;
    for (int c = 0; c < o.bands; ++c) {
      char name[32];
      std::snprintf(name, sizeof name, "band%03d_%.1fnm", c, wavelength(c, o.bands));
      names.push_back(name);
    }
    fe.verify_replicated(exec);
    for (const auto& t : fe.replicated_parameters()) replicated.push_back(t.name);
    dchag::save_weights(comm, o.out + "/mae.safetensors", params, replicated, names);

    const double drop = start / last;
    const bool ok = drop >= o.min_drop;
    if (root)
      std::printf(
          "summary: validation loss %.4f -> %.4f, fell %.1fx (required %.1fx): %s; %.1f ms per "
          "step on %d ranks; weights in %s/mae.safetensors\n",
          start, last, drop, o.min_drop, ok ? "ok" : "NOT MET", 1e3 * seconds / o.steps,
          comm.size(), o.out.c_str());
    status = ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dchag_hyperspectral: %s\n", e.what());
    status = 2;
  }
  Kokkos::finalize();
  MPI_Finalize();
  return status;
}
