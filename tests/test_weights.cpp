// Tests for dchag/weights.hpp: save -> load round trips of whole front ends, F16/BF16 files,
// errors for wrong shapes and missing tensors, channels matched by name, and the transposed
// tokenizer weight against the file layout [D, 1, p, p].
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "dchag/aggregate.hpp"
#include "dchag/detail/half_bits.hpp"
#include "dchag/weights.hpp"
#include "tensor_host.hpp"

namespace st = dchag::safetensors;
using Catch::Matchers::Contains;
using dchag_test::file_order;
using dchag_test::fill_distinct;
using dchag_test::find;
using Exec = Kokkos::DefaultExecutionSpace;
using Mem = Exec::memory_space;

namespace {

template <class Scalar>
st::File to_file(const dchag::TensorList<Scalar, Mem>& params,
                 const std::vector<std::string>& names = {},
                 const std::string& source = "model.safetensors") {
  st::Writer w;
  dchag::save_weights(w, params, names);
  return st::File::parse(w.serialize(), source);
}

/// Every tensor of `a` has a tensor of the same name, shape and file-order values in `b`.
template <class Scalar>
void require_equal(const dchag::TensorList<Scalar, Mem>& a,
                   const dchag::TensorList<Scalar, Mem>& b) {
  REQUIRE(a.size() == b.size());
  for (const auto& t : a) {
    INFO(t.name);
    const auto& u = find(b, t.name);
    REQUIRE(t.shape == u.shape);
    const auto va = file_order(t), vb = file_order(u);
    for (std::size_t i = 0; i < va.size(); ++i) {
      INFO("element " << i);
      REQUIRE(va[i] == vb[i]);  // exact: the values are float-representable, the file is F32
    }
  }
}

/// Whether some value of `a` differs from `b` (so that a later equality means something).
template <class Scalar>
bool any_differs(const dchag::TensorList<Scalar, Mem>& a, const dchag::TensorList<Scalar, Mem>& b) {
  for (const auto& t : a) {
    const auto va = file_order(t), vb = file_order(find(b, t.name));
    for (std::size_t i = 0; i < va.size(); ++i)
      if (va[i] != vb[i]) return true;
  }
  return false;
}

template <class Scalar>
dchag::View4<Scalar, Mem> random_images(int B, int C, int H, int W, unsigned seed) {
  dchag::View4<Scalar, Mem> v("images", B, C, H, W);
  auto h = Kokkos::create_mirror_view(v);
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  for (std::size_t i = 0; i < h.span(); ++i) h.data()[i] = static_cast<Scalar>(normal(gen));
  Kokkos::deep_copy(v, h);
  return v;
}

std::string load_error(const st::File& f, const dchag::TensorList<double, Mem>& params,
                       const dchag::LoadOptions& options = {}) {
  try {
    dchag::load_weights(f, params, options);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "<no error>";
}

dchag::FrontEndConfig small_config(int channels, std::uint64_t seed) {
  dchag::FrontEndConfig cfg;
  cfg.channels = channels;
  cfg.height = 8;
  cfg.width = 4;
  cfg.patch = 2;
  cfg.dim = 8;
  cfg.heads = 2;
  cfg.seed = seed;
  return cfg;
}

}  // namespace

TEST_CASE("weights: FlatFrontEnd<double> save -> load round trip", "[weights]") {
  Exec exec;
  const auto cfg = small_config(3, 1);
  dchag::FlatFrontEnd<Exec, double> a(exec, cfg);
  auto cfg_b = cfg;
  cfg_b.seed = 2;
  dchag::FlatFrontEnd<Exec, double> b(exec, cfg_b);
  fill_distinct(a.parameters(), 1);  // every parameter differs from b's, not only the random ones
  REQUIRE(any_differs(a.parameters(), b.parameters()));

  const auto file = to_file(a.parameters());
  // ClimaX names and shapes: 3 x (weight, bias), var_embed, var_query, 4 var_agg, pos_embed.
  CHECK(file.tensors().size() == 3 * 2 + 1 + 1 + 4 + 1);
  CHECK(file.info("token_embeds.2.proj.weight").shape == std::vector<std::int64_t>{8, 1, 2, 2});
  CHECK(file.info("var_agg.in_proj_weight").shape == std::vector<std::int64_t>{24, 8});
  CHECK(file.info("pos_embed").shape == std::vector<std::int64_t>{1, 8, 8});
  CHECK_FALSE(file.metadata_value("channels").has_value());

  dchag::load_weights(file, b.parameters());
  require_equal(a.parameters(), b.parameters());

  // Same parameters, same computation: the outputs agree bit for bit.
  const auto images = random_images<double>(2, 3, 8, 4, 7);
  dchag::View3<double, Mem> out_a("out_a", 2, 8, 8), out_b("out_b", 2, 8, 8);
  a.forward(exec, images, out_a);
  b.forward(exec, images, out_b);
  auto ha = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), out_a);
  auto hb = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), out_b);
  for (std::size_t i = 0; i < ha.span(); ++i) REQUIRE(ha.data()[i] == hb.data()[i]);
}

TEST_CASE("weights: DchagEmulation save -> load round trip", "[weights]") {
  Exec exec;
  auto cfg = small_config(5, 3);
  cfg.convention = dchag::Convention::artifact;
  const std::vector<std::vector<int>> groups = {{0, 1}, {2, 3, 4}};
  for (auto kind : {dchag::PartialKind::linear, dchag::PartialKind::cross_attention}) {
    INFO(dchag::to_string(kind));
    const int tree = kind == dchag::PartialKind::linear ? 1 : 2;
    dchag::DchagEmulation<Exec, double> a(exec, cfg, {kind, tree}, groups);
    auto cfg_b = cfg;
    cfg_b.seed = 4;
    dchag::DchagEmulation<Exec, double> b(exec, cfg_b, {kind, tree}, groups);
    fill_distinct(a.parameters(), 2);
    REQUIRE(any_differs(a.parameters(), b.parameters()));

    const auto file = to_file(a.parameters());
    CHECK(file.contains("token_embeds.4.proj.weight"));
    CHECK(file.info("var_embed").shape == std::vector<std::int64_t>{1, 5, 8});
    CHECK(file.contains("final.kv.weight"));
    if (kind == dchag::PartialKind::linear) {
      CHECK(file.info("partial.1.weight").shape == std::vector<std::int64_t>{3});
    } else {
      CHECK(file.info("partial.0.kv.weight").shape == std::vector<std::int64_t>{16, 8});
    }
    // var_embed rows come from two tokenizers; every row must be in the file.
    for (double v : file.values<double>("var_embed")) CHECK(v != 0.0);

    dchag::load_weights(file, b.parameters());
    require_equal(a.parameters(), b.parameters());
  }
}

TEST_CASE("weights: save and load through a path", "[weights]") {
  Exec exec;
  dchag::CrossAttention<Exec, float> a(exec, {8, 2, dchag::Convention::climax}, 5);
  dchag::CrossAttention<Exec, float> b(exec, {8, 2, dchag::Convention::climax}, 6);
  fill_distinct(a.parameters(), 3);
  const auto path =
      std::filesystem::temp_directory_path() /
      ("dchag_test_weights_" + std::to_string(std::random_device{}()) + ".safetensors");
  dchag::save_weights(path.string(), a.parameters(), {});
  dchag::load_weights(path.string(), b.parameters());
  std::filesystem::remove(path);
  require_equal(a.parameters(), b.parameters());
}

TEST_CASE("weights: a model holding some channels loads them through File::open", "[weights]") {
  // As one rank of a distributed model does: only its channels' tensors and var_embed rows.
  Exec exec;
  const int D = 4, p = 2;
  dchag::Tokenizer<Exec, double> src(exec, 4, p, D, {0, 1, 2, 3}, 1);
  fill_distinct(src.parameters(), 8);
  const auto path =
      std::filesystem::temp_directory_path() /
      ("dchag_test_weights_open_" + std::to_string(std::random_device{}()) + ".safetensors");
  dchag::save_weights(path.string(), src.parameters(), {"a", "b", "c", "d"});
  dchag::LoadOptions options;
  options.channel_names = {"d", "c", "b", "a"};  // model channel c is file channel 3 - c
  dchag::Tokenizer<Exec, double> opened(exec, 4, p, D, {3, 1}, 2), read(exec, 4, p, D, {3, 1}, 3);
  dchag::load_weights(st::File::open(path.string()), opened.parameters(), options);
  dchag::load_weights(st::File::read(path.string()), read.parameters(), options);
  const auto pieces = [](const dchag::TensorList<double, Mem>& list) {
    std::vector<std::vector<double>> v;
    for (const auto& t : list)
      for (const auto& piece : t.pieces) {
        auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), piece.values);
        v.emplace_back(h.data(), h.data() + h.extent(0));
      }
    return v;
  };
  CHECK(pieces(opened.parameters()) == pieces(read.parameters()));
  const auto file = st::File::read(path.string());
  const auto params = opened.parameters();
  CHECK(file_order(find(params, "token_embeds.3.proj.weight")) ==
        file.values<double>("token_embeds.0.proj.weight"));
  const auto var = file_order(find(params, "var_embed")),
             file_var = file.values<double>("var_embed");
  for (int d = 0; d < D; ++d) {
    CHECK(var[3 * D + d] == file_var[0 * D + d]);
    CHECK(var[1 * D + d] == file_var[2 * D + d]);
  }

  // A file that changes after it was opened fails the load before any parameter changes.
  dchag::Tokenizer<Exec, double> late(exec, 4, p, D, {3, 1}, 4);
  fill_distinct(late.parameters(), 9);
  const auto unchanged = pieces(late.parameters());
  const auto file_open = st::File::open(path.string());
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 4);
  CHECK_THROWS_WITH(dchag::load_weights(file_open, late.parameters(), options),
                    Contains("changed since it was opened"));
  CHECK(pieces(late.parameters()) == unchanged);
  std::filesystem::remove(path);
}

TEST_CASE("weights: loading from a directory or a missing path is an error naming it",
          "[weights]") {
  Exec exec;
  dchag::CrossAttention<Exec, float> a(exec, {8, 2, dchag::Convention::climax}, 5);
  const auto dir = std::filesystem::temp_directory_path() /
                   ("dchag_test_weights_dir_" + std::to_string(std::random_device{}()));
  std::filesystem::create_directory(dir);
  // Used to throw std::bad_alloc: the size of a directory read as a file is 2^63 - 1.
  CHECK_THROWS_AS(dchag::load_weights(dir.string(), a.parameters()), dchag::error);
  CHECK_THROWS_WITH(dchag::load_weights(dir.string(), a.parameters()),
                    Contains(dir.string()) && Contains("is a directory"));
  std::filesystem::remove(dir);
  CHECK_THROWS_WITH(dchag::load_weights(dir.string(), a.parameters()),
                    Contains(dir.string()) && Contains("does not exist"));
}

TEST_CASE("weights: F16 and BF16 values are converted on load", "[weights]") {
  Exec exec;
  const int D = 4;
  dchag::CrossAttention<Exec, double> att(exec, {D, 2, dchag::Convention::climax}, 1);
  // Values that are not all representable in half precision: each loads as the nearest F16 (or
  // BF16) value, which the writer rounded to nearest even.
  st::Writer w;
  std::vector<std::vector<double>> original, rounded;
  int salt = 0;
  for (const auto& t : att.parameters()) {
    std::vector<double> v(static_cast<std::size_t>(t.numel()));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = 0.1 * std::sin(1.0 + salt++) + 1e-3;
    const auto dtype = t.name == "var_agg.out_proj.weight" ? st::DType::BF16 : st::DType::F16;
    w.add(t.name, t.shape, v.data(), dtype);
    original.push_back(v);
    for (auto& x : v) {
      x = dtype == st::DType::F16
              ? dchag::detail::half_bits_to_float(dchag::detail::double_to_half_bits(x))
              : dchag::detail::bf16_bits_to_float(dchag::detail::double_to_bf16_bits(x));
    }
    rounded.push_back(std::move(v));
  }
  const auto f = st::File::parse(w.serialize(), "half.safetensors");
  CHECK(f.info("var_query").dtype == st::DType::F16);
  dchag::load_weights(f, att.parameters());
  const auto params = att.parameters();
  for (std::size_t t = 0; t < params.size(); ++t) {
    INFO(params[t].name);
    const auto got = file_order(params[t]);
    for (std::size_t i = 0; i < got.size(); ++i) REQUIRE(got[i] == rounded[t][i]);
    CHECK(got != original[t]);  // the file held rounded values, not the F64 ones
  }
}

TEST_CASE("weights: a shape mismatch names the function, tensor, file and both shapes",
          "[weights]") {
  Exec exec;
  dchag::CrossAttention<Exec, double> small(exec, {4, 2, dchag::Convention::climax}, 1);
  dchag::CrossAttention<Exec, double> big(exec, {8, 2, dchag::Convention::climax}, 1);
  const auto f = to_file(big.parameters(), {}, "big.safetensors");
  const auto msg = load_error(f, small.parameters());
  CHECK_THAT(msg, Contains("dchag::load_weights"));
  CHECK_THAT(msg, Contains("'var_query'"));  // the first tensor of the list
  CHECK_THAT(msg, Contains("big.safetensors"));
  CHECK_THAT(msg, Contains("has shape [1, 1, 8]"));
  CHECK_THAT(msg, Contains("expected [1, 1, 4]"));

  // A tokenizer weight: file shape [D, 1, p, p] against the model's.
  dchag::Tokenizer<Exec, double> t3(exec, 1, 3, 4, {0}, 1), t2(exec, 1, 2, 4, {0}, 1);
  const auto msg2 = load_error(to_file(t3.parameters()), t2.parameters());
  CHECK_THAT(msg2, Contains("'token_embeds.0.proj.weight'"));
  CHECK_THAT(msg2, Contains("has shape [4, 1, 3, 3], expected [4, 1, 2, 2]"));
}

TEST_CASE("weights: a missing tensor is an error unless allow_missing", "[weights]") {
  Exec exec;
  const dchag::AttentionConfig ac{4, 2, dchag::Convention::climax};
  dchag::CrossAttention<Exec, double> a(exec, ac, 1), b(exec, ac, 2);
  fill_distinct(a.parameters(), 4);
  fill_distinct(b.parameters(), 5);
  // A file with every tensor but the out-projection bias.
  dchag::TensorList<double, Mem> partial;
  for (const auto& t : a.parameters())
    if (t.name != "var_agg.out_proj.bias") partial.push_back(t);
  const auto f = to_file(partial, {}, "partial.safetensors");

  std::vector<std::vector<double>> unchanged;
  for (const auto& t : b.parameters()) unchanged.push_back(file_order(t));
  const auto msg = load_error(f, b.parameters());
  CHECK_THAT(msg, Contains("dchag::load_weights"));
  CHECK_THAT(msg, Contains("'var_agg.out_proj.bias'"));
  CHECK_THAT(msg, Contains("partial.safetensors"));
  CHECK_THAT(msg, Contains("allow_missing"));
  // Checked before anything is copied: the tensors listed before the missing one are untouched.
  for (std::size_t i = 0; i < unchanged.size(); ++i)
    CHECK(file_order(b.parameters()[i]) == unchanged[i]);

  const auto before = file_order(find(b.parameters(), "var_agg.out_proj.bias"));
  dchag::LoadOptions options;
  options.allow_missing = true;
  dchag::load_weights(f, b.parameters(), options);
  for (const auto& t : b.parameters()) {
    INFO(t.name);
    const auto got = file_order(t);
    const auto want =
        t.name == "var_agg.out_proj.bias" ? before : file_order(find(a.parameters(), t.name));
    CHECK(got == want);
  }
}

TEST_CASE("weights: channels are matched by name when the file carries names", "[weights]") {
  Exec exec;
  const int D = 4, p = 2;
  // The file's model: channels a, b, c, d (ids 0..3), with distinct values everywhere.
  dchag::Tokenizer<Exec, double> src(exec, 4, p, D, {0, 1, 2, 3}, 1);
  fill_distinct(src.parameters(), 6);
  const auto f = to_file(src.parameters(), {"a", "b", "c", "d"}, "abcd.safetensors");
  REQUIRE(f.metadata_value("channels") == std::string("a,b,c,d"));
  const auto file_var = f.values<double>("var_embed");  // [1, 4, D]

  SECTION("the model's channels c, a read file channels 2, 0") {
    dchag::Tokenizer<Exec, double> dst(exec, 2, p, D, {0, 1}, 2);
    dchag::LoadOptions options;
    options.channel_names = {"c", "a"};
    dchag::load_weights(f, dst.parameters(), options);
    const auto params = dst.parameters();
    for (auto [c, fc] : {std::pair{0, 2}, std::pair{1, 0}}) {
      for (const std::string part : {".proj.weight", ".proj.bias"}) {
        INFO("model channel " << c << part);
        CHECK(file_order(find(params, "token_embeds." + std::to_string(c) + part)) ==
              f.values<double>("token_embeds." + std::to_string(fc) + part));
      }
      const auto var = file_order(find(params, "var_embed"));  // [1, 2, D]
      for (int d = 0; d < D; ++d) CHECK(var[c * D + d] == file_var[fc * D + d]);
    }
  }

  SECTION("a model channel absent from the file is an error naming it") {
    dchag::Tokenizer<Exec, double> dst(exec, 2, p, D, {0, 1}, 2);
    fill_distinct(dst.parameters(), 7);
    dchag::LoadOptions options;
    options.channel_names = {"c", "e"};
    const auto msg = load_error(f, dst.parameters(), options);
    CHECK_THAT(msg, Contains("dchag::load_weights"));
    CHECK_THAT(msg, Contains("model channel 1 'e'"));
    CHECK_THAT(msg, Contains("abcd.safetensors"));

    // With allow_missing, channel e keeps its weights and its var_embed row.
    const auto before = dst.parameters();
    const auto w1 = file_order(find(before, "token_embeds.1.proj.weight"));
    const auto var_before = file_order(find(before, "var_embed"));
    options.allow_missing = true;
    dchag::load_weights(f, dst.parameters(), options);
    const auto after = dst.parameters();
    CHECK(file_order(find(after, "token_embeds.1.proj.weight")) == w1);
    CHECK(file_order(find(after, "token_embeds.0.proj.weight")) ==
          f.values<double>("token_embeds.2.proj.weight"));
    const auto var = file_order(find(after, "var_embed"));
    for (int d = 0; d < D; ++d) {
      CHECK(var[d] == file_var[2 * D + d]);
      CHECK(var[D + d] == var_before[D + d]);
    }
  }

  SECTION("without model names, channels match by index") {
    dchag::Tokenizer<Exec, double> dst(exec, 4, p, D, {0, 1, 2, 3}, 2);
    dchag::load_weights(f, dst.parameters());
    require_equal(src.parameters(), dst.parameters());
  }

  SECTION("names must be one per model channel and unique") {
    dchag::Tokenizer<Exec, double> dst(exec, 2, p, D, {0, 1}, 2);
    dchag::LoadOptions options;
    options.channel_names = {"c"};
    CHECK_THAT(load_error(f, dst.parameters(), options), Contains("channel_names has 1 names"));
    options.channel_names = {"c", "c"};
    CHECK_THAT(load_error(f, dst.parameters(), options), Contains("appears twice"));
    st::Writer w;
    CHECK_THROWS_WITH(dchag::save_weights(w, dst.parameters(), {"x,y", "z"}),
                      Contains("without commas"));
    CHECK_THROWS_WITH(dchag::save_weights(w, dst.parameters(), {"x", "y", "z"}),
                      Contains("expected C = 2"));
  }
}

TEST_CASE("weights: transposed tokenizer weights against the file layout [D, 1, p, p]",
          "[weights]") {
  Exec exec;
  const int C = 2, p = 3, D = 5, pp = p * p;
  dchag::Tokenizer<Exec, double> tok(exec, C, p, D, {0, 1}, 1);
  fill_distinct(tok.parameters(), 8);
  const auto params = tok.parameters();
  const auto& w1 = find(params, "token_embeds.1.proj.weight");
  REQUIRE(w1.transposed_rows == D);
  REQUIRE(w1.pieces.size() == 1);
  // The piece in memory is Wt^T: [p*p, D], element (k, d) at k * D + d.
  auto mem = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), w1.pieces[0].values);

  const auto f = to_file(params);
  REQUIRE(f.info("token_embeds.1.proj.weight").shape == std::vector<std::int64_t>{D, 1, p, p});
  const auto file_w = f.values<double>("token_embeds.1.proj.weight");
  for (int d = 0; d < D; ++d)
    for (int kr = 0; kr < p; ++kr)
      for (int kc = 0; kc < p; ++kc) {
        INFO("d " << d << " kr " << kr << " kc " << kc);
        REQUIRE(file_w[(d * p + kr) * p + kc] ==
                mem(static_cast<std::size_t>((kr * p + kc) * D + d)));
      }

  // And back: a file made element by element in [D, 1, p, p] loads into the transposed layout,
  // and the tokenizer then computes the convolution of that file weight.
  st::Writer w;
  std::vector<double> conv(static_cast<std::size_t>(D * pp)), zero_d(D, 0.0), var(C * D, 0.0);
  for (std::size_t i = 0; i < conv.size(); ++i) conv[i] = 0.25 * static_cast<double>(i) - 3.0;
  w.add("token_embeds.0.proj.weight", {D, 1, p, p}, conv.data());
  w.add("token_embeds.0.proj.bias", {D}, zero_d.data());
  w.add("token_embeds.1.proj.weight", {D, 1, p, p}, conv.data());
  w.add("token_embeds.1.proj.bias", {D}, zero_d.data());
  w.add("var_embed", {1, C, D}, var.data());
  dchag::load_weights(st::File::parse(w.serialize()), params);
  auto mem0 = Kokkos::create_mirror_view_and_copy(
      Kokkos::HostSpace(), find(params, "token_embeds.0.proj.weight").pieces[0].values);
  for (int d = 0; d < D; ++d)
    for (int k = 0; k < pp; ++k)
      REQUIRE(mem0(static_cast<std::size_t>(k * D + d)) == conv[d * pp + k]);

  // One image of one patch with a single 1 at (kr, kc): token[d] = conv[d, 0, kr, kc].
  for (int k = 0; k < pp; ++k) {
    dchag::View4<double, Mem> img("img", 1, 1, p, p);
    auto h = Kokkos::create_mirror_view(img);
    Kokkos::deep_copy(h, 0.0);
    h(0, 0, k / p, k % p) = 1.0;
    Kokkos::deep_copy(img, h);
    dchag::View4<double, Mem> tokens("tokens", 1, 1, 1, D);
    tok.forward(exec, img, dchag::ChannelSelection::own({0}), tokens);
    auto ht = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), tokens);
    for (int d = 0; d < D; ++d) REQUIRE(ht(0, 0, 0, d) == conv[d * pp + k]);
  }
}

TEST_CASE("weights: tensors held in part are saved with zeros elsewhere", "[weights]") {
  // A tokenizer owning channel 1 of 3 (as one rank of a distributed model): its var_embed rows
  // 0 and 2 are not held and are written as zero; only channel 1's weights are in the file.
  Exec exec;
  const int D = 4;
  dchag::Tokenizer<Exec, double> tok(exec, 3, 2, D, {1}, 1);
  fill_distinct(tok.parameters(), 9);
  const auto f = to_file(tok.parameters());
  CHECK(f.contains("token_embeds.1.proj.weight"));
  CHECK_FALSE(f.contains("token_embeds.0.proj.weight"));
  const auto var = f.values<double>("var_embed");
  const auto held = file_order(find(tok.parameters(), "var_embed"));
  REQUIRE(var.size() == 3 * D);
  for (int i = 0; i < 3 * D; ++i) {
    INFO(i);
    if (i / D == 1) {
      CHECK(var[i] == held[i]);
    } else {
      CHECK(var[i] == 0.0);
    }
  }
}
