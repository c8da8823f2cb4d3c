// Tests for dchag/safetensors.hpp: round trips, exact half-precision conversion, every kind of
// malformed file, and reading the committed PyTorch golden files.
#include <algorithm>
#include <array>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "dchag/safetensors.hpp"

namespace st = dchag::safetensors;
using Catch::Matchers::Contains;

namespace {

/// A file from a hand-written header and `data_bytes` bytes of data (value i & 0xFF).
std::vector<unsigned char> make_file(const std::string& header, std::size_t data_bytes = 0) {
  std::vector<unsigned char> b;
  const auto n = static_cast<std::uint64_t>(header.size());
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<unsigned char>(n >> (8 * i)));
  b.insert(b.end(), header.begin(), header.end());
  for (std::size_t i = 0; i < data_bytes; ++i) b.push_back(static_cast<unsigned char>(i & 0xFF));
  return b;
}

/// The message of the dchag::error that parsing throws, or "<no error>".
std::string parse_error(const std::vector<unsigned char>& bytes) {
  try {
    (void)st::File::parse(bytes, "bad.safetensors");
  } catch (const dchag::error& e) {
    return e.what();
  }
  return "<no error>";
}

std::string parse_error(const std::string& header, std::size_t data_bytes = 0) {
  return parse_error(make_file(header, data_bytes));
}

/// A valid header holding one F32 tensor "t" of shape [2] at [0, 8).
const std::string one_tensor = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

std::filesystem::path temp_path(const std::string& name) {
  return std::filesystem::temp_directory_path() /
         ("dchag_test_" + std::to_string(std::random_device{}()) + "_" + name);
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Round trips
// ----------------------------------------------------------------------------------------------

TEST_CASE("safetensors: F32 round trip keeps values, shapes and order", "[safetensors]") {
  std::vector<double> a(6);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = 0.1 * static_cast<double>(i) - 0.25;
  const std::vector<float> b = {1.5f, -2.0f, 3.25e-3f, 7.0f};
  const double scalar = 42.0;

  st::Writer w;
  w.add("zeta", {2, 3}, a.data());
  w.add("alpha", {4}, b.data());
  w.add("scalar", {}, &scalar);
  w.add("empty", {0, 3}, static_cast<const float*>(nullptr));
  const auto bytes = w.serialize();

  // Header length is a multiple of 8, so the data buffer is 8-byte aligned.
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<std::size_t>(i)];
  CHECK(n % 8 == 0);
  CHECK(bytes.size() == 8 + n + (6 + 4 + 1) * 4);

  const auto f = st::File::parse(bytes);
  CHECK(f.names() == std::vector<std::string>{"zeta", "alpha", "scalar", "empty"});
  CHECK(f.contains("alpha"));
  CHECK_FALSE(f.contains("alph"));
  CHECK(f.info("zeta").shape == std::vector<std::int64_t>{2, 3});
  CHECK(f.info("zeta").dtype == st::DType::F32);
  CHECK(f.info("zeta").numel() == 6);
  CHECK(f.info("scalar").numel() == 1);
  CHECK(f.info("empty").numel() == 0);

  const auto za = f.values<double>("zeta");
  for (std::size_t i = 0; i < a.size(); ++i)
    CHECK(za[i] == static_cast<double>(static_cast<float>(a[i])));
  CHECK(f.values<float>("alpha") == b);
  CHECK(f.values<double>("scalar") == std::vector<double>{42.0});
  CHECK(f.values<float>("empty").empty());

  std::vector<float> dst(4);
  const std::array<std::int64_t, 1> shape{4};
  f.copy_to<float>("alpha", dst.data(), shape);
  CHECK(dst == b);
  CHECK(f.metadata().empty());

  // Deterministic: the same content serializes to the same bytes.
  st::Writer w2;
  w2.add("zeta", {2, 3}, a.data());
  w2.add("alpha", {4}, b.data());
  w2.add("scalar", {}, &scalar);
  w2.add("empty", {0, 3}, static_cast<const float*>(nullptr));
  CHECK(w2.serialize() == bytes);
}

TEST_CASE("safetensors: F16 round trip of exactly representable values", "[safetensors]") {
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> v = {0.0,       -0.0,         1.0,     -2.5,    3.140625,
                                 65504.0,   -65504.0,     0x1p-14, 0x1p-24, -0x3p-24,
                                 0x3FFp-24, 1.0009765625, inf,     -inf};
  st::Writer w;
  w.add("h", {static_cast<std::int64_t>(v.size())}, v.data(), st::DType::F16);
  const auto f = st::File::parse(w.serialize());
  CHECK(f.info("h").dtype == st::DType::F16);
  CHECK(f.info("h").end - f.info("h").begin == 2 * v.size());
  const auto got = f.values<double>("h");
  REQUIRE(got.size() == v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    INFO("index " << i);
    CHECK(got[i] == v[i]);
    CHECK(std::signbit(got[i]) == std::signbit(v[i]));
  }
}

TEST_CASE("safetensors: BF16 round trip of exactly representable values", "[safetensors]") {
  const std::vector<float> v = {0.0f,      -0.0f,       1.0f,       -2.0f,
                                3.140625f, 0x1p100f,    -0x1p-130f, 0x1p-126f,
                                0x1p-133f, 0x1.FEp127f, -255.0f,    0.0078125f};
  st::Writer w;
  w.add("b", {3, 4}, v.data(), st::DType::BF16);
  const auto f = st::File::parse(w.serialize());
  CHECK(f.info("b").dtype == st::DType::BF16);
  CHECK(f.values<float>("b") == v);
  CHECK(std::signbit(f.values<float>("b")[1]));
}

TEST_CASE("safetensors: F64 round trip is exact; read as float it rounds to nearest",
          "[safetensors]") {
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> v = {
      0.0,       -0.0,          0.1,           -1.0 / 3.0,    0x1.fffffffffffffp1023,
      0x1p-1074, 1.0 + 0x1p-52, 1.0 + 0x1p-24, 1.0 + 0x3p-24, inf};
  st::Writer w;
  w.add("d", {2, 5}, v.data(), st::DType::F64);
  const auto bytes = w.serialize();
  const auto f = st::File::parse(bytes);
  CHECK(f.info("d").dtype == st::DType::F64);
  CHECK(f.info("d").end - f.info("d").begin == 8 * v.size());
  CHECK(st::dtype_size(st::DType::F64) == 8);
  CHECK(std::string(st::dtype_name(st::DType::F64)) == "F64");
  // Little-endian IEEE binary64 bytes, as numpy's "<f8" writes them: 0.1 is 0x3FB999999999999A.
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<std::size_t>(i)];
  const std::size_t at = 8 + static_cast<std::size_t>(n) + 2 * 8;
  std::uint64_t u = 0;
  for (int i = 7; i >= 0; --i) u = (u << 8) | bytes[at + static_cast<std::size_t>(i)];
  CHECK(u == 0x3FB999999999999Aull);

  const auto d = f.values<double>("d");
  REQUIRE(d.size() == v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    INFO("index " << i);
    CHECK(std::bit_cast<std::uint64_t>(d[i]) == std::bit_cast<std::uint64_t>(v[i]));
  }
  const auto fl = f.values<float>("d");
  for (std::size_t i = 0; i < v.size(); ++i) CHECK(fl[i] == static_cast<float>(v[i]));
  CHECK(fl[7] == 1.0f);                     // a tie: to even
  CHECK(fl[8] == 1.0f + 0x1p-22f);          // a tie: to even (up)
  CHECK(fl[4] == static_cast<float>(inf));  // beyond float's range
}

TEST_CASE("safetensors: F16 and BF16 round to nearest even", "[safetensors]") {
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    double in, f16, bf16;
  };
  const std::vector<Case> cases = {
      {1.0 + 0x1p-11, 1.0, 1.0},                      // f16 tie -> even (1.0)
      {1.0 + 0x3p-11, 1.0 + 0x1p-9, 1.0},             // f16 tie -> even (up); bf16 below its tie
      {1.0 + 0x1p-11 + 0x1p-30, 1.0 + 0x1p-10, 1.0},  // just above a tie: rounded once from double
      {1.0 + 0x1p-8, 1.0 + 0x1p-8, 1.0},              // bf16 tie -> even (1.0)
      {1.0 + 0x3p-8, 1.0 + 0x3p-8, 1.0 + 0x1p-6},     // bf16 tie -> even (up)
      {65519.0, 65504.0, 65536.0},                    // below the f16 overflow threshold
      {65520.0, inf, 65536.0},                        // f16 tie at the top rounds to infinity
      {-1e6, -inf, -999424.0},
      {0x1p-25, 0.0, 0x1p-25},      // f16 subnormal tie -> 0
      {0x3p-25, 0x1p-23, 0x3p-25},  // f16 subnormal tie -> even (up)
      {0x1p-26, 0.0, 0x1p-26},
  };
  std::vector<double> in;
  for (const auto& c : cases) in.push_back(c.in);
  st::Writer w;
  w.add("h", {static_cast<std::int64_t>(in.size())}, in.data(), st::DType::F16);
  w.add("b", {static_cast<std::int64_t>(in.size())}, in.data(), st::DType::BF16);
  const auto f = st::File::parse(w.serialize());
  const auto h = f.values<double>("h");
  const auto b = f.values<double>("b");
  for (std::size_t i = 0; i < cases.size(); ++i) {
    INFO("case " << i << ": input " << cases[i].in);
    CHECK(h[i] == cases[i].f16);
    CHECK(b[i] == cases[i].bf16);
  }

  // NaN stays NaN.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  st::Writer wn;
  wn.add("h", {1}, &nan, st::DType::F16);
  wn.add("b", {1}, &nan, st::DType::BF16);
  const auto fn = st::File::parse(wn.serialize());
  CHECK(std::isnan(fn.values<float>("h")[0]));
  CHECK(std::isnan(fn.values<float>("b")[0]));
}

TEST_CASE("safetensors: every F16 and BF16 bit pattern converts exactly and back",
          "[safetensors]") {
  // Widening is exact and narrowing is its inverse; midpoints between neighbours round to the even
  // one. Checked over all 65536 patterns of both formats.
  using dchag::detail::bf16_bits_to_float;
  using dchag::detail::double_to_bf16_bits;
  using dchag::detail::double_to_half_bits;
  using dchag::detail::half_bits_to_float;
  std::size_t bad = 0;
  for (std::uint32_t u = 0; u < 0x10000; ++u) {
    const auto h = static_cast<std::uint16_t>(u);
    const bool h_nan = (h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0;
    const bool b_nan = (h & 0x7F80) == 0x7F80 && (h & 0x7F) != 0;
    if (!h_nan) {
      const double x = half_bits_to_float(h);
      if (double_to_half_bits(x) != h) ++bad;
      // Midpoint to the next larger magnitude (finite, below the largest finite value).
      if ((h & 0x7FFF) < 0x7BFF) {
        const double y = half_bits_to_float(static_cast<std::uint16_t>(h + 1));
        const auto r = double_to_half_bits(0.5 * (x + y));
        if (r != ((h & 1) ? h + 1 : h)) ++bad;
      }
    } else if (!std::isnan(half_bits_to_float(h))) {
      ++bad;
    }
    if (!b_nan) {
      const double x = bf16_bits_to_float(h);
      if (double_to_bf16_bits(x) != h) ++bad;
      if ((h & 0x7FFF) < 0x7F7F) {
        const double y = bf16_bits_to_float(static_cast<std::uint16_t>(h + 1));
        const auto r = double_to_bf16_bits(0.5 * (x + y));
        if (r != ((h & 1) ? h + 1 : h)) ++bad;
      }
    } else if (!std::isnan(bf16_bits_to_float(h))) {
      ++bad;
    }
  }
  CHECK(bad == 0);
  CHECK(half_bits_to_float(0x3C00) == 1.0f);
  CHECK(half_bits_to_float(0x0001) == 0x1p-24f);
  CHECK(half_bits_to_float(0xFBFF) == -65504.0f);
  CHECK(bf16_bits_to_float(0x3F80) == 1.0f);
}

TEST_CASE("safetensors: metadata round trip", "[safetensors]") {
  const float x = 1.0f;
  st::Writer w;
  w.set_metadata("format", "pt");
  w.set_metadata(
      "note", "quote \" backslash \\ newline \n tab \t ctrl \x01 utf8 \xC3\xA9 \xF0\x9F\x98\x80");
  w.set_metadata("empty", "");
  w.set_metadata("format", "np");  // replaces, keeps the first position
  w.add("x", {1}, &x);
  const auto f = st::File::parse(w.serialize());
  REQUIRE(f.metadata().size() == 3);
  CHECK(f.metadata()[0] == std::pair<std::string, std::string>{"format", "np"});
  CHECK(f.metadata()[1].first == "note");
  CHECK(f.metadata_value("note") ==
        "quote \" backslash \\ newline \n tab \t ctrl \x01 utf8 \xC3\xA9 \xF0\x9F\x98\x80");
  CHECK(f.metadata_value("empty") == "");
  CHECK_FALSE(f.metadata_value("missing").has_value());
  CHECK(f.names() == std::vector<std::string>{"x"});
}

TEST_CASE("safetensors: hand-written headers with escapes, spaces and other metadata values",
          "[safetensors]") {
  const std::string h =
      " {\n \"__metadata__\" : {\"k\": \"\\u00e9\\ud83d\\ude00\\/\\b\\f\\r\", \"n\": 1.5e3,"
      " \"b\": true, \"z\": null, \"o\": {\"p\": [1, -2.0, \"s\"]}, \"last\": \"v\"},\n"
      "  \"w\\u0065ight\": {\"shape\": [2], \"data_offsets\": [0, 8], \"dtype\": \"F32\","
      " \"extra\": [1]} }   ";
  const auto f = st::File::parse(make_file(h, 8));
  // Non-string metadata values are accepted and skipped.
  REQUIRE(f.metadata().size() == 2);
  CHECK(f.metadata_value("k") == "\xC3\xA9\xF0\x9F\x98\x80/\b\f\r");
  CHECK(f.metadata_value("last") == "v");
  CHECK(f.contains("weight"));
  CHECK(f.info("weight").shape == std::vector<std::int64_t>{2});

  // Little-endian F32 from the raw bytes 00 01 02 03 | 04 05 06 07.
  const auto v = f.values<float>("weight");
  CHECK(std::bit_cast<std::uint32_t>(v[0]) == 0x03020100u);
  CHECK(std::bit_cast<std::uint32_t>(v[1]) == 0x07060504u);

  // An empty file (no tensors) and unused trailing data are fine; so is an empty tensor at the end.
  CHECK(st::File::parse(make_file("{}")).names().empty());
  CHECK(st::File::parse(make_file(one_tensor, 12)).names().size() == 1);
  CHECK_NOTHROW(
      st::File::parse(make_file(R"({"e":{"dtype":"BF16","shape":[0],"data_offsets":[4,4]}})", 4)));
}

TEST_CASE("safetensors: lookup and shape errors name the tensor and the file", "[safetensors]") {
  const auto f = st::File::parse(make_file(one_tensor, 8), "model.safetensors");
  CHECK_THROWS_AS(f.info("nope"), std::invalid_argument);
  CHECK_THROWS_WITH(f.info("nope"), Contains("'nope'") && Contains("model.safetensors"));
  CHECK_THROWS_AS(f.values<float>("nope"), std::invalid_argument);
  std::vector<double> dst(2);
  const std::array<std::int64_t, 2> wrong{1, 2};
  CHECK_THROWS_AS(f.copy_to<double>("t", dst.data(), wrong), std::invalid_argument);
  CHECK_THROWS_WITH(f.copy_to<double>("t", dst.data(), wrong),
                    Contains("'t'") && Contains("model.safetensors") && Contains("[2]") &&
                        Contains("expected [1, 2]"));
  const std::array<std::int64_t, 1> right{2};
  CHECK_NOTHROW(f.copy_to<double>("t", dst.data(), right));
}

TEST_CASE("safetensors: Writer rejects bad names and shapes", "[safetensors]") {
  const float x[2] = {1.0f, 2.0f};
  st::Writer w;
  w.add("a", {2}, x);
  CHECK_THROWS_AS(w.add("a", {2}, x), std::invalid_argument);
  CHECK_THROWS_AS(w.add("", {2}, x), std::invalid_argument);
  CHECK_THROWS_AS(w.add("__metadata__", {2}, x), std::invalid_argument);
  CHECK_THROWS_AS(w.add("neg", {-1}, x), std::invalid_argument);
  CHECK_THROWS_AS(w.add("null", {2}, static_cast<const float*>(nullptr)), std::invalid_argument);
  CHECK_THROWS_AS(w.add("huge", {std::int64_t{1} << 40, std::int64_t{1} << 40}, x),
                  std::invalid_argument);
}

TEST_CASE("safetensors: write and read a file", "[safetensors]") {
  const auto path = temp_path("rw.safetensors");
  const std::vector<float> v = {1.0f, -1.0f, 0.5f};
  st::Writer w;
  w.set_metadata("k", "v");
  w.add("v", {3}, v.data(), st::DType::BF16);
  w.write(path.string());
  const auto f = st::File::read(path.string());
  CHECK(f.source() == path.string());
  CHECK(f.values<float>("v") == v);
  CHECK(f.metadata_value("k") == "v");
  std::filesystem::remove(path);

  CHECK_THROWS_AS(st::File::read(path.string()), dchag::error);
  CHECK_THROWS_WITH(st::File::read(path.string()), Contains(path.string()));
}

TEST_CASE("safetensors: a path that is not a regular readable file is an error naming it",
          "[safetensors]") {
  // A directory used to open fine, report a size of 2^63 - 1 from tellg() and throw bad_alloc.
  const auto dir = temp_path("dir.safetensors");
  std::filesystem::create_directory(dir);
  CHECK_THROWS_AS(st::File::read(dir.string()), dchag::error);
  CHECK_THROWS_WITH(st::File::read(dir.string()),
                    Contains("dchag::safetensors::File::read") && Contains(dir.string()) &&
                        Contains("is a directory") && Contains("expected a regular file"));
  std::filesystem::remove(dir);

  const auto missing = temp_path("missing.safetensors");
  CHECK_THROWS_WITH(st::File::read(missing.string()),
                    Contains(missing.string()) && Contains("does not exist"));

  // A file without read permission (root reads it anyway: then there is nothing to test).
  const auto locked = temp_path("locked.safetensors");
  st::Writer w;
  const std::vector<float> v = {1.0f, 2.0f};
  w.add("t", {2}, v.data());
  w.write(locked.string());
  std::filesystem::permissions(locked, std::filesystem::perms::none);
  if (!std::ifstream(locked, std::ios::binary)) {
    CHECK_THROWS_AS(st::File::read(locked.string()), dchag::error);
    CHECK_THROWS_WITH(st::File::read(locked.string()),
                      Contains(locked.string()) && Contains("cannot be opened for reading"));
  }
  std::filesystem::permissions(locked, std::filesystem::perms::owner_all);
  CHECK(st::File::read(locked.string()).values<float>("t") == v);
  std::filesystem::remove(locked);
}

// ----------------------------------------------------------------------------------------------
// Malformed files: each is a dchag::error naming the file and the problem
// ----------------------------------------------------------------------------------------------

TEST_CASE("safetensors: file shorter than 8 bytes", "[safetensors]") {
  CHECK_THAT(parse_error(std::vector<unsigned char>{}),
             Contains("bad.safetensors") && Contains("0 bytes") && Contains("too short"));
  CHECK_THAT(parse_error(std::vector<unsigned char>(7, 0)), Contains("7 bytes"));
}

TEST_CASE("safetensors: header length larger than the file", "[safetensors]") {
  auto b = make_file(one_tensor, 8);
  b.resize(8 + one_tensor.size() - 1);  // header cut short
  CHECK_THAT(parse_error(b),
             Contains("bad.safetensors") && Contains("header length") && Contains("larger than"));
  auto c = make_file(one_tensor, 8);
  c[7] = 0x01;  // 2^56 + ...
  CHECK_THAT(parse_error(c), Contains("header length"));
}

TEST_CASE("safetensors: header length over 100 MB", "[safetensors]") {
  auto b = make_file(one_tensor, 8);
  const std::uint64_t n = 100'000'001;
  for (int i = 0; i < 8; ++i)
    b[static_cast<std::size_t>(i)] = static_cast<unsigned char>(n >> (8 * i));
  CHECK_THAT(parse_error(b),
             Contains("bad.safetensors") && Contains("100000001") && Contains("exceeds the limit"));
}

TEST_CASE("safetensors: header is not valid JSON", "[safetensors]") {
  const std::vector<std::string> bad = {
      "",                                                            // empty
      "{",                                                           // truncated
      R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},})",  // trailing comma
      R"({"t" {"dtype":"F32"}})",                                    // missing colon
      R"({'t':1})",                                                  // single quotes
      R"({"t":"\x"})",                                               // bad escape
      R"({"t":"\u12G4"})",                                           // bad hex
      R"({"t":"\ud800"})",                                           // lone high surrogate
      R"({"t":"\udc00"})",                                           // lone low surrogate
      R"({"t":"abc)",                                                // unterminated string
      "{\"t\":\"a\nb\"}",                                            // raw control character
      "{\"t\":\"\xC3\"}",                                            // truncated UTF-8
      "{\"t\":\"\xC0\xAF\"}",                                        // overlong UTF-8
      "{\"t\":\"\xED\xA0\x80\"}",                                    // UTF-8 encoded surrogate
      "{\"t\":\"\xFF\"}",                                            // invalid byte
      R"({"t":01})",                                                 // leading zero
      R"({"t":1.})",                                                 // bad fraction
      R"({"t":-})",                                                  // bad number
      R"({"t":tru})",                                                // bad literal
      R"({} {})",                                                    // text after the value
      std::string("{\"t\":1}\0", 8),                                 // NUL after the value
      std::string(100000, '[') + std::string(100000, ']'),  // deep nesting: no stack overflow
  };
  for (const auto& h : bad) {
    INFO("header: " << h.substr(0, 60));
    CHECK_THAT(parse_error(h), Contains("bad.safetensors") && Contains("not valid JSON"));
  }
}

TEST_CASE("safetensors: header is not an object", "[safetensors]") {
  for (const std::string h : {"[]", "\"x\"", "1", "null", "true"}) {
    INFO("header: " << h);
    CHECK_THAT(parse_error(h), Contains("bad.safetensors") && Contains("expected a JSON object"));
  }
}

TEST_CASE("safetensors: wrong value types in the header", "[safetensors]") {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {R"({"t":[1]})", "expected an object"},
      {R"({"t":{"shape":[2],"data_offsets":[0,8]}})", "missing \"dtype\""},
      {R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", "missing \"shape\""},
      {R"({"t":{"dtype":"F32","shape":[2]}})", "missing \"data_offsets\""},
      {R"({"t":{"dtype":32,"shape":[2],"data_offsets":[0,8]}})", "\"dtype\" is a number"},
      {R"({"t":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", "\"shape\" is a string"},
      {R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", "shape[0] is not an integer"},
      {R"({"t":{"dtype":"F32","shape":[1,"2"],"data_offsets":[0,8]}})",
       "shape[1] is not an integer"},
      {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":{"b":0}}})", "data_offsets"},
      {R"({"t":{"dtype":"F32","shape":[2],"dtype":"F32","data_offsets":[0,8]}})",
       "duplicate field"},
      {R"({"__metadata__":[],"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
       "\"__metadata__\" is an array"},
      {R"({"__metadata__":{"a":"1","a":"2"}})", "duplicate metadata key 'a'"},
      {R"({"__metadata__":{},"__metadata__":{}})", "duplicate \"__metadata__\""},
  };
  for (const auto& [h, what] : bad) {
    INFO("header: " << h);
    CHECK_THAT(parse_error(h, 8), Contains("bad.safetensors") && Contains(what));
  }
}

TEST_CASE("safetensors: unsupported dtypes are named", "[safetensors]") {
  for (const std::string dt : {"I64", "I32", "BOOL", "U8", "F8_E4M3", "f32", "f64", ""}) {
    const std::string h = R"({"t":{"dtype":")" + dt + R"(","shape":[1],"data_offsets":[0,8]}})";
    INFO("dtype " << dt);
    CHECK_THAT(parse_error(h, 8), Contains("bad.safetensors") && Contains("'t'") &&
                                      Contains("\"" + dt + "\"") &&
                                      Contains("supported: F32, F64, F16, BF16"));
  }
}

TEST_CASE("safetensors: negative dimensions", "[safetensors]") {
  CHECK_THAT(parse_error(R"({"t":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,0]}})"),
             Contains("bad.safetensors") && Contains("shape[1] is negative"));
}

TEST_CASE("safetensors: shape whose size overflows", "[safetensors]") {
  CHECK_THAT(
      parse_error(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
      Contains("bad.safetensors") && Contains("overflows"));
  // numel fits in int64 but numel * 4 bytes does not
  CHECK_THAT(
      parse_error(R"({"t":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})"),
      Contains("overflows"));
  // a zero extent makes the product 0, whatever the others are
  CHECK_NOTHROW(st::File::parse(make_file(
      R"({"t":{"dtype":"F32","shape":[0,9223372036854775807,9223372036854775807],"data_offsets":[0,0]}})")));
  // an extent beyond int64
  CHECK_THAT(
      parse_error(R"({"t":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,0]}})"),
      Contains("shape[0] is not an integer"));
}

TEST_CASE("safetensors: data_offsets not two non-decreasing integers", "[safetensors]") {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"[0]", "two integers"},
      {"[0,8,16]", "two integers"},
      {"[]", "two integers"},
      {"[8,0]", "decrease"},
      {"[-8,0]", "non-negative"},
      {"[0.0,8]", "non-negative integers"},
      {"[0,\"8\"]", "non-negative integers"},
      {"[0,18446744073709551616]", "non-negative integers"},
  };
  for (const auto& [off, what] : bad) {
    const std::string h = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":)" + off + "}}";
    INFO("data_offsets " << off);
    CHECK_THAT(parse_error(h, 16),
               Contains("bad.safetensors") && Contains("'t'") && Contains(what));
  }
}

TEST_CASE("safetensors: data_offsets end beyond the data buffer", "[safetensors]") {
  CHECK_THAT(parse_error(one_tensor, 7),
             Contains("bad.safetensors") && Contains("beyond the data buffer (7 bytes)"));
  CHECK_THAT(
      parse_error(
          R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[9223372036854775800,9223372036854775807]}})",
          8),
      Contains("beyond the data buffer"));
}

TEST_CASE("safetensors: data_offsets size does not match the shape", "[safetensors]") {
  CHECK_THAT(parse_error(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 16),
             Contains("bad.safetensors") && Contains("span 8 bytes") && Contains("needs 12"));
  CHECK_THAT(parse_error(R"({"t":{"dtype":"F16","shape":[2,2],"data_offsets":[0,16]}})", 16),
             Contains("span 16 bytes") && Contains("needs 8"));
}

TEST_CASE("safetensors: overlapping tensor ranges", "[safetensors]") {
  const std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  CHECK_THAT(parse_error(h, 16), Contains("bad.safetensors") && Contains("'a'") &&
                                     Contains("'b'") && Contains("overlap"));
  const std::string same = R"({"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},)"
                           R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})";
  CHECK_THAT(parse_error(same, 4), Contains("overlap"));
  const std::string touching = R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},)"
                               R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  CHECK_NOTHROW(st::File::parse(make_file(touching, 8)));
}

TEST_CASE("safetensors: duplicate tensor names", "[safetensors]") {
  const std::string h = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  CHECK_THAT(parse_error(h, 8),
             Contains("bad.safetensors") && Contains("duplicate tensor name 'a'"));
}

TEST_CASE("safetensors: truncated and corrupted files never crash", "[safetensors]") {
  const float v[3] = {1.0f, 2.0f, 3.0f};
  st::Writer w;
  w.set_metadata("k", "v");
  w.add("a", {3}, v);
  w.add("b", {1, 2}, v, st::DType::F16);
  const auto good = w.serialize();
  std::size_t parsed = 0, rejected = 0;
  for (std::size_t len = 0; len < good.size(); ++len) {
    std::vector<unsigned char> b(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(len));
    try {
      (void)st::File::parse(b);
      ++parsed;
    } catch (const dchag::error&) {
      ++rejected;
    }
  }
  CHECK(parsed == 0);  // every prefix is missing data
  for (std::size_t i = 0; i < good.size(); ++i) {
    for (unsigned char x : {0x00, 0x01, 0x22, 0x2C, 0x5B, 0x7D, 0x80, 0xFF}) {
      auto b = good;
      b[i] = x;
      try {
        const auto f = st::File::parse(b);
        for (const auto& n : f.names()) (void)f.values<double>(n);
        ++parsed;
      } catch (const dchag::error&) {
        ++rejected;
      }
    }
  }
  CHECK(parsed + rejected == good.size() * 9);
}

// ----------------------------------------------------------------------------------------------
// File::open: the header only, values read from the file on demand
// ----------------------------------------------------------------------------------------------

namespace {

void write_bytes(const std::filesystem::path& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

/// What reading the file at `path` gives: every tensor's values, or the error's message without
/// the name of the function (File::read and File::open name themselves).
std::string outcome(const st::File& f) {
  std::string s;
  for (const auto& t : f.tensors()) {
    s += t.name + ":";
    for (double v : f.values<double>(t.name)) s += std::to_string(v) + ",";
  }
  return s;
}

template <class Open>
std::string outcome_of(Open open) {
  try {
    return outcome(open());
  } catch (const dchag::error& e) {
    std::string what = e.what();
    for (const std::string head : {"dchag::safetensors::File::read: ",
                                   "dchag::safetensors::File::open: ", "dchag::safetensors: "})
      if (what.rfind(head, 0) == 0) what.erase(0, head.size());
    return "error: " + what;
  }
}

}  // namespace

TEST_CASE("safetensors: File::open reads the same values as File::read, and slices of them",
          "[safetensors]") {
  const auto path = temp_path("open.safetensors");
  std::vector<double> a(12);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = 0.25 * static_cast<double>(i) - 1.0;
  st::Writer w;
  w.set_metadata("channels", "x,y");
  w.add("a", {3, 4}, a.data());
  w.add("h", {2, 2}, a.data(), st::DType::BF16);
  w.add("d", {12}, a.data(), st::DType::F64);
  w.add("empty", {0}, a.data());
  w.write(path.string());
  const auto read = st::File::read(path.string());
  const auto open = st::File::open(path.string());
  CHECK(open.source() == path.string());
  CHECK(open.names() == read.names());
  CHECK(open.metadata() == read.metadata());
  for (const auto& name : read.names()) {
    INFO(name);
    CHECK(open.values<double>(name) == read.values<double>(name));
    CHECK(open.info(name).shape == read.info(name).shape);
  }
  const std::vector<double> middle(a.begin() + 5, a.begin() + 9);
  CHECK(open.values<double>("a", 5, 4) == middle);
  CHECK(read.values<double>("a", 5, 4) == middle);
  CHECK(open.values<double>("d", 5, 4) == middle);
  CHECK(open.values<float>("a", 11, 1) == std::vector<float>{float(a[11])});
  CHECK(open.values<double>("a", 12, 0).empty());
  CHECK(open.values<double>("empty", 0, 0).empty());
  for (const auto& [first, count] :
       {std::pair{-1, 2}, std::pair{11, 2}, std::pair{0, 13}, std::pair{3, -1}}) {
    INFO(first << " + " << count);
    CHECK_THROWS_AS(open.values<double>("a", first, count), std::invalid_argument);
    CHECK_THROWS_WITH(read.values<double>("a", first, count),
                      Contains("tensor 'a'") && Contains("expected a range inside [0, 12)"));
  }
  CHECK_THROWS_WITH(open.values<double>("nope", 0, 1), Contains("no tensor 'nope'"));

  // Opened, then truncated or rewritten with another size: reads fail, naming the file.
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 8);
  CHECK_THROWS_AS(open.values<double>("a"), dchag::error);
  CHECK_THROWS_WITH(open.values<double>("a", 0, 1),
                    Contains(path.string()) && Contains("changed since it was opened"));
  std::filesystem::remove(path);
  CHECK_THROWS_WITH(open.values<double>("a"), Contains("cannot be opened again"));
  CHECK_THROWS_WITH(st::File::open(path.string()), Contains("File::open") &&
                                                       Contains(path.string()) &&
                                                       Contains("does not exist"));
  const auto dir = temp_path("open_dir.safetensors");
  std::filesystem::create_directory(dir);
  CHECK_THROWS_WITH(st::File::open(dir.string()), Contains("is a directory"));
  std::filesystem::remove(dir);
}

TEST_CASE("safetensors: File::open judges truncated and corrupted files as File::read does",
          "[safetensors]") {
  const float v[3] = {1.0f, 2.0f, 3.0f};
  st::Writer w;
  w.set_metadata("k", "v");
  w.add("a", {3}, v);
  w.add("b", {1, 2}, v, st::DType::F16);
  const auto good = w.serialize();
  const auto path = temp_path("open_bad.safetensors");
  const auto both = [&](const std::vector<unsigned char>& bytes) {
    write_bytes(path, bytes);
    const auto r = outcome_of([&] { return st::File::read(path.string()); });
    const auto o = outcome_of([&] { return st::File::open(path.string()); });
    CHECK(o == r);
    return r.rfind("error: ", 0) != 0;
  };
  std::size_t accepted = 0;
  for (std::size_t len = 0; len <= good.size(); ++len)
    accepted += both(std::vector<unsigned char>(good.begin(), good.begin() + std::ptrdiff_t(len)));
  CHECK(accepted == 1);  // only the whole file
  for (std::size_t i = 0; i < good.size(); ++i) {
    for (unsigned char x : {0x00, 0x22, 0x2C, 0x7D, 0xFF}) {
      auto b = good;
      b[i] = x;
      accepted += both(b);
    }
  }
  CHECK(accepted > 1);  // some corruptions only change values
  // A header length beyond the limit or the file is refused before anything more is read.
  auto huge = good;
  huge[5] = 0x10;
  CHECK_FALSE(both(huge));
  std::filesystem::remove(path);
}

// ----------------------------------------------------------------------------------------------
// The committed PyTorch golden files (tests/golden, see its README.md)
// ----------------------------------------------------------------------------------------------

#ifdef DCHAG_GOLDEN_DIR
namespace {

std::int64_t meta_int(const st::File& f, const char* key) {
  const auto v = f.metadata_value(key);
  REQUIRE(v.has_value());
  return std::stoll(*v);
}

}  // namespace

TEST_CASE("safetensors: every golden file reads and is complete", "[safetensors]") {
  const std::filesystem::path dir = DCHAG_GOLDEN_DIR;
  const std::vector<std::string> expected = {"xattn_climax_basic",
                                             "xattn_climax_nh1",
                                             "xattn_climax_d20",
                                             "xattn_climax_c1",
                                             "xattn_climax_bl1",
                                             "xattn_artifact_basic",
                                             "flat_all",
                                             "flat_subset",
                                             "dchag_linear",
                                             "dchag_xattn_tree",
                                             "dchag_linear_tree",
                                             "dchag_xattn_uneven",
                                             "flat_bf16",
                                             "flat_fp16_subset",
                                             "dchag_xattn_bf16",
                                             "dchag_linear_fp16",
                                             "init_climax",
                                             "dchag_xattn_climax_partials",
                                             "flat_lead_time",
                                             "dchag_linear_lead_time",
                                             "xattn_climax_mask",
                                             "flat_mask",
                                             "dchag_xattn_mask",
                                             "dchag_xattn_climax_mask",
                                             "dchag_linear_mask",
                                             "adamw",
                                             "flat_shared_tokenizer",
                                             "flat_coordinate_new_channels",
                                             "dchag_xattn_coordinate",
                                             "dchag_linear_shared_coordinate",
                                             "xattn_climax_queries",
                                             "xattn_artifact_queries",
                                             "flat_queries",
                                             "dchag_xattn_queries"};
  for (const auto& name : expected) {
    INFO(name);
    CHECK(std::filesystem::exists(dir / (name + ".safetensors")));
  }

  std::size_t files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".safetensors") continue;
    ++files;
    INFO(entry.path().string());
    const auto f = st::File::read(entry.path().string());
    const auto kind = f.metadata_value("kind");
    REQUIRE(kind.has_value());
    if (*kind == "adamw") {  // optimizer steps (test_optimizer.cpp): per-step gradients
      const auto steps = meta_int(f, "steps");
      CHECK(f.info("lr").shape == std::vector<std::int64_t>{steps});
      CHECK(f.contains("final.var_embed"));
      CHECK(f.contains("grad." + std::to_string(steps - 1) + ".var_embed"));
      continue;
    }
    if (*kind == "init") {  // fresh ClimaX embeddings: no model run, no gradients
      const std::int64_t C = meta_int(f, "C"), L = meta_int(f, "L"), D = meta_int(f, "D");
      CHECK(f.info("pos_embed").shape == std::vector<std::int64_t>{1, L, D});
      CHECK(f.info("var_embed").shape == std::vector<std::int64_t>{1, C, D});
      continue;
    }
    CHECK((*kind == "xattn" || *kind == "flat" || *kind == "dchag"));
    const auto conv = f.metadata_value("convention");
    CHECK((conv == "climax" || conv == "artifact"));
    const std::int64_t B = meta_int(f, "B"), L = meta_int(f, "L"), D = meta_int(f, "D");
    CHECK(D % meta_int(f, "heads") == 0);
    const auto queries = f.metadata_value("queries");  // several queries: [B, L, N_q * D]
    const std::int64_t width = D * (queries ? std::stoll(*queries) : 1);
    CHECK(f.info("out").shape == std::vector<std::int64_t>{B, L, width});
    CHECK(f.info("grad_out").shape == std::vector<std::int64_t>{B, L, width});
    if (*kind == "xattn") {
      CHECK(f.info("x").shape == std::vector<std::int64_t>{B, meta_int(f, "N"), L, D});
    } else {
      // Images carry the channels listed in channel_ids; L = (H/p)(W/p).
      const std::int64_t H = meta_int(f, "H"), W = meta_int(f, "W"), p = meta_int(f, "p");
      CHECK(L == (H / p) * (W / p));
      const auto ids = f.metadata_value("channel_ids");
      REQUIRE(ids.has_value());
      const auto cin = static_cast<std::int64_t>(std::count(ids->begin(), ids->end(), ',') + 1);
      CHECK(f.info("images").shape == std::vector<std::int64_t>{B, cin, H, W});
      if (f.metadata_value("channel_embedding") == std::optional<std::string>("coordinate")) {
        // The coordinate embedding (DESIGN 3.11): nn.Linear(F, D) instead of the table.
        const auto fourier = f.metadata_value("fourier");
        REQUIRE(fourier.has_value());
        const std::int64_t F = std::stoll(*fourier);
        CHECK(f.info("channel_embed.proj.weight").shape == std::vector<std::int64_t>{D, F});
      } else {
        CHECK(f.info("var_embed").shape == std::vector<std::int64_t>{1, meta_int(f, "C"), D});
      }
      if (*kind == "dchag") {
        for (const char* key : {"groups", "map", "tree", "partial", "channels_per_rank"}) {
          CHECK(f.metadata_value(key).has_value());
        }
      }
      const auto storage = f.metadata_value("storage");  // absent: no rounding
      CHECK((!storage || *storage == "bf16" || *storage == "fp16"));
    }
    for (const auto& t : f.tensors()) {
      INFO(t.name);
      CHECK(t.dtype == st::DType::F32);
      for (double v : f.values<double>(t.name)) REQUIRE(std::isfinite(v));
      // Every input and weight has its gradient, with the same shape; the mask [B, C] (1 valid,
      // 0 missing) is not differentiable.
      if (t.name == "mask") {
        CHECK(t.shape.size() == 2);
        CHECK(t.shape.front() == B);
        for (double v : f.values<double>(t.name)) CHECK((v == 0.0 || v == 1.0));
        continue;
      }
      if (t.name.rfind("grad", 0) != 0 && t.name != "out") {
        REQUIRE(f.contains("grad." + t.name));
        CHECK(f.info("grad." + t.name).shape == t.shape);
      }
    }
  }
  CHECK(files == expected.size());
}

TEST_CASE("safetensors: golden ClimaX cross-attention recomputed from the file", "[safetensors]") {
  // Reads xattn_climax_basic and recomputes `out` with the explicit math of DESIGN 3.2 in double.
  // The inputs are exact float32 values and `out` is the float64 result rounded to float32, so the
  // difference is that storage rounding (<= 2^-24 relative) plus float64 noise.
  const auto f = st::File::read(std::string(DCHAG_GOLDEN_DIR) + "/xattn_climax_basic.safetensors");
  const auto dim = [&](const char* key) { return static_cast<std::size_t>(meta_int(f, key)); };
  const std::size_t B = dim("B"), N = dim("N"), L = dim("L"), D = dim("D"), nh = dim("heads");
  const std::size_t hd = D / nh;
  const auto x = f.values<double>("x");                         // [B, N, L, D]
  const auto qv = f.values<double>("var_query");                // [1, 1, D]
  const auto Win = f.values<double>("var_agg.in_proj_weight");  // [3D, D] = [Wq; Wk; Wv]
  const auto bin = f.values<double>("var_agg.in_proj_bias");    // [3D]
  const auto Wo = f.values<double>("var_agg.out_proj.weight");  // [D, D]
  const auto bo = f.values<double>("var_agg.out_proj.bias");    // [D]
  const auto out = f.values<double>("out");                     // [B, L, D]
  // Row r of the [*, D] matrix W times v, plus bias[r].
  const auto affine = [&](const std::vector<double>& W, const std::vector<double>& bias,
                          std::size_t r, const double* v) {
    double s = bias[r];
    for (std::size_t k = 0; k < D; ++k) s += W[r * D + k] * v[k];
    return s;
  };

  std::vector<double> q(D);
  for (std::size_t i = 0; i < D; ++i) q[i] = affine(Win, bin, i, qv.data());
  double max_err = 0, max_out = 0;
  for (std::size_t b = 0; b < B; ++b) {
    for (std::size_t l = 0; l < L; ++l) {
      const auto token = [&](std::size_t n) { return &x[((b * N + n) * L + l) * D]; };
      std::vector<double> o(D, 0.0);
      for (std::size_t h = 0; h < nh; ++h) {
        std::vector<double> a(N);
        for (std::size_t n = 0; n < N; ++n) {
          double s = 0;
          for (std::size_t e = h * hd; e < (h + 1) * hd; ++e) {
            s += q[e] * affine(Win, bin, D + e, token(n));
          }
          a[n] = s / std::sqrt(static_cast<double>(hd));
        }
        const double m = *std::max_element(a.begin(), a.end());
        double z = 0;
        for (auto& an : a) z += (an = std::exp(an - m));
        for (std::size_t n = 0; n < N; ++n) {
          for (std::size_t e = h * hd; e < (h + 1) * hd; ++e) {
            o[e] += a[n] / z * affine(Win, bin, 2 * D + e, token(n));
          }
        }
      }
      for (std::size_t i = 0; i < D; ++i) {
        const double ref = out[(b * L + l) * D + i];
        max_err = std::max(max_err, std::abs(affine(Wo, bo, i, o.data()) - ref));
        max_out = std::max(max_out, std::abs(ref));
      }
    }
  }
  CHECK(max_out > 0.1);
  CHECK(max_err <= 1e-6 * max_out);
}
#endif  // DCHAG_GOLDEN_DIR
