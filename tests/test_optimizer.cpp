// AdamW and the warmup-cosine schedule (dchag/optimizer.hpp): against torch.optim.AdamW on the
// same gradients (tests/golden/adamw.safetensors, make_goldens.py), ClimaX's decay rule, a run
// that stops, saves and continues bit for bit, and bad input.
#include <catch2/catch.hpp>

#include <dchag/aggregate.hpp>
#include <dchag/optimizer.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace dchag_test;

namespace st = dchag::safetensors;

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

double meta(const st::File& f, const char* key) {
  const auto v = f.metadata_value(key);
  REQUIRE(v.has_value());
  return std::stod(*v);
}

}  // namespace

#ifdef DCHAG_GOLDEN_DIR
TEST_CASE("AdamW and the schedule match torch.optim.AdamW", "[optimizer]") {
  // Float32 in both, the same operations in the same order except where PyTorch fuses a
  // multiply-add: a few ulps per step of the largest value of each tensor.
  Exec exec;
  const auto f = st::File::read(std::string(DCHAG_GOLDEN_DIR) + "/adamw.safetensors");
  REQUIRE(f.metadata_value("kind") == std::optional<std::string>("adamw"));
  const auto names = split(*f.metadata_value("names"));
  const int steps = int(meta(f, "steps"));
  std::vector<dchag::View1<float, Mem>> p, g;
  List<float> params, grads;
  for (const auto& n : names) {
    const auto shape = f.info("param." + n).shape;
    const auto init = f.values<double>("param." + n);
    p.emplace_back("p", init.size());
    g.emplace_back("g", init.size());
    from_host(p.back(), init);
    params.push_back(dchag::detail::whole<float, Mem>(n, shape, p.back()));
    grads.push_back(dchag::detail::whole<float, Mem>(n, shape, g.back()));
  }
  dchag::AdamWConfig cfg;
  cfg.beta1 = meta(f, "beta1");
  cfg.beta2 = meta(f, "beta2");
  cfg.eps = meta(f, "eps");
  cfg.weight_decay = meta(f, "weight_decay");
  dchag::AdamW<Exec, float> opt(exec, params, grads, cfg);
  for (std::size_t t = 0; t < names.size(); ++t) {
    INFO(names[t]);
    const bool embedding_or_query =
        names[t] == "var_embed" || names[t] == "var_query" || names[t] == "final.query";
    CHECK(opt.decays(t) == !embedding_or_query);
  }
  dchag::WarmupCosine schedule{meta(f, "base_lr"), std::int64_t(meta(f, "warmup_steps")),
                               std::int64_t(meta(f, "max_steps")), meta(f, "warmup_start_lr"),
                               meta(f, "eta_min")};
  const auto lrs = f.values<double>("lr");
  REQUIRE(lrs.size() == std::size_t(steps));
  for (int k = 0; k < steps; ++k) {
    const double lr = schedule(k);
    CHECK(std::abs(lr - lrs[k]) <= 1e-7 * lrs[k]);  // the file holds float32
    for (std::size_t t = 0; t < names.size(); ++t)
      from_host(g[t], f.values<double>("grad." + std::to_string(k) + "." + names[t]));
    opt.step(exec, lr);
  }
  CHECK(opt.steps() == steps);
  exec.fence();
  const auto state = opt.state();
  for (std::size_t t = 0; t < names.size(); ++t) {
    INFO(names[t]);
    auto compare = [&](const std::vector<double>& got, const std::string& ref_name) {
      const auto ref = f.values<double>(ref_name);
      INFO(ref_name);
      const double allowed = 8 * steps * 0x1.0p-24 * max_abs(ref);
      CHECK(max_abs_diff(got, ref) <= allowed);
      if (std::getenv("DCHAG_GOLDEN_REPORT"))
        std::printf("%-40s error / allowed = %.3g\n", ref_name.c_str(),
                    max_abs_diff(got, ref) / allowed);
    };
    compare(to_host(p[t]), "final." + names[t]);
    compare(values_of(state, "adamw.exp_avg." + names[t]), "exp_avg." + names[t]);
    compare(values_of(state, "adamw.exp_avg_sq." + names[t]), "exp_avg_sq." + names[t]);
    // The update moved every parameter: the comparison is not of the initial values.
    CHECK(max_abs_diff(to_host(p[t]), f.values<double>("param." + names[t])) > 1e-4);
  }
}
#endif

TEST_CASE("the warmup-cosine schedule", "[optimizer]") {
  const dchag::WarmupCosine s{1.0, 4, 14, 0.1, 0.01};
  CHECK(s(0) == 0.1);
  CHECK(std::abs(s(3) - 1.0) < 1e-15);                  // the end of the warmup
  CHECK(std::abs(s(4) - 1.0) < 1e-15);                  // cosine from base_lr
  CHECK(std::abs(s(9) - (0.01 + 0.99 * 0.5)) < 1e-15);  // half way
  CHECK(s(14) == 0.01);
  CHECK(s(100) == 0.01);
  for (int k = 4; k < 14; ++k) CHECK(s(k + 1) < s(k));
  require_invalid(
      [] {
        dchag::WarmupCosine{1.0, 5, 5}(0);
      },
      {"dchag::WarmupCosine", "max_steps is 5", "expected > warmup_steps = 5"});
  require_invalid([&] { s(-1); }, {"step is -1", "expected >= 0"});
}

TEST_CASE("ClimaX's decay rule", "[optimizer]") {
  for (const char* n :
       {"var_embed", "pos_embed", "var_query", "final.var_query", "final.query", "partial.3.query"})
    CHECK_FALSE(dchag::climax_decays(n));
  for (const char* n : {"token_embeds.0.proj.weight", "var_agg.in_proj_weight",
                        "partial.0.q.weight", "lead_time_embed.weight", "partial.1.weight"})
    CHECK(dchag::climax_decays(n));
}

TEST_CASE("a run that stops and resumes from saved state continues bit for bit", "[optimizer]") {
  Exec exec;
  const dchag::FrontEndConfig cfg{5, 4, 6, 2, 8, 2};
  auto make = [&] { return dchag::FlatFrontEnd<Exec, float>(exec, cfg); };
  V4<float> images("images", 2, cfg.channels, cfg.height, cfg.width);
  V3<float> out("out", 2, cfg.patches(), cfg.dim), g("g", 2, cfg.patches(), cfg.dim);
  fill_normal(images, 4001);
  fill_normal(g, 4002);
  const dchag::WarmupCosine schedule{1e-2, 2, 8};
  auto train = [&](auto& model, auto& opt, int from, int to) {
    for (int k = from; k < to; ++k) {
      model.zero_gradients(exec);
      model.forward(exec, images, out);
      model.backward(exec, g);
      opt.step(exec, schedule(k));
    }
    exec.fence();
  };
  auto straight = make();
  dchag::AdamW<Exec, float> opt(exec, straight.parameters(), straight.gradients());
  train(straight, opt, 0, 6);

  const auto dir = std::filesystem::temp_directory_path() / "dchag_test_optimizer";
  std::filesystem::create_directories(dir);
  {
    auto first = make();
    dchag::AdamW<Exec, float> o1(exec, first.parameters(), first.gradients());
    train(first, o1, 0, 3);
    dchag::save_weights((dir / "model.safetensors").string(), first.parameters());
    o1.save_state(exec, (dir / "adamw.safetensors").string());
  }
  dchag::FrontEndConfig other = cfg;
  other.seed = 99;  // everything must come from the files
  dchag::FlatFrontEnd<Exec, float> resumed(exec, other);
  dchag::AdamW<Exec, float> o2(exec, resumed.parameters(), resumed.gradients());
  dchag::load_weights((dir / "model.safetensors").string(), resumed.parameters());
  o2.load_state((dir / "adamw.safetensors").string());
  CHECK(o2.steps() == 3);
  train(resumed, o2, 3, 6);
  const auto a = snapshot(straight.parameters()), b = snapshot(resumed.parameters());
  REQUIRE(a.size() == b.size());
  for (std::size_t t = 0; t < a.size(); ++t) {
    INFO(straight.parameters()[t].name);
    CHECK(a[t] == b[t]);
  }
  const auto sa = snapshot(opt.state()), sb = snapshot(o2.state());
  for (std::size_t t = 1; t < sa.size(); ++t) CHECK(sa[t] == sb[t]);
  std::filesystem::remove_all(dir);
}

TEST_CASE("AdamW refuses bad input by name", "[optimizer][errors]") {
  Exec exec;
  const dchag::FrontEndConfig cfg{3, 4, 4, 2, 4, 2};
  dchag::FlatFrontEnd<Exec, float> model(exec, cfg);
  auto params = model.parameters(), grads = model.gradients();
  dchag::AdamWConfig bad;
  bad.beta1 = 1.0;
  require_invalid([&] { dchag::AdamW<Exec, float>(exec, params, grads, bad); },
                  {"dchag::AdamW", "beta1 is 1", "expected 0 <= beta1 < 1"});
  auto fewer = grads;
  fewer.pop_back();
  require_invalid([&] { dchag::AdamW<Exec, float>(exec, params, fewer); },
                  {"dchag::AdamW", "expected the same"});
  auto swapped = grads;
  std::swap(swapped[0], swapped[1]);
  require_invalid([&] { dchag::AdamW<Exec, float>(exec, params, swapped); },
                  {"does not match params[0]"});
  dchag::AdamW<Exec, float> opt(exec, params, grads);
  require_invalid([&] { opt.step(exec, -1.0); }, {"dchag::AdamW::step", "lr is -1"});
}
