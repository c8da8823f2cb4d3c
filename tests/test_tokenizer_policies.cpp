// The tokenizer policies (DESIGN 3.11, dchag/tokenizer_policy.hpp): shared weights and the
// coordinate channel embedding against central differences (the tokenizer alone, whole and in
// chunks, B = 1 and 2; the flat front end; the D-CHAG emulation, whose groups share the
// parameters), a channel the model was not built with taken by its coordinate, names and a
// weight-file round trip, estimates, and bad input.
#include <catch2/catch.hpp>

#include <dchag/aggregate.hpp>
#include <dchag/weights.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace dchag_test;
using dchag::ChannelEmbedding;
using dchag::ChannelSelection;
using dchag::Convention;
using dchag::FrontEndConfig;
using dchag::PartialKind;
using dchag::Strategy;
using dchag::TokenizerPolicy;
using dchag::TokenizerWeights;

namespace {

constexpr double kParamSd = 0.3;  // as test_kernels.cpp: scores O(1), no saturated softmax

// Pressure levels in hPa, as Aurora's.
std::vector<double> levels(int C) {
  const double all[] = {50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000};
  return std::vector<double>(all, all + C);
}

TokenizerPolicy policy(TokenizerWeights w, ChannelEmbedding e, int C) {
  TokenizerPolicy p{w, e};
  if (e == ChannelEmbedding::coordinate) {
    p.coordinates = levels(C);
    p.fourier = {8, 10.0, 1.0e4};
  }
  return p;
}

const TokenizerPolicy kPolicies[] = {
    policy(TokenizerWeights::shared, ChannelEmbedding::table, 0),
    policy(TokenizerWeights::per_channel, ChannelEmbedding::coordinate, 0),
    policy(TokenizerWeights::shared, ChannelEmbedding::coordinate, 0)};

TokenizerPolicy with_channels(TokenizerPolicy p, int C) {
  if (p.coordinate()) p.coordinates = levels(C);
  return p;
}

std::string describe(const TokenizerPolicy& p) {
  return std::string(dchag::to_string(p.weights)) + " weights, " +
         std::string(dchag::to_string(p.embedding)) + " embedding";
}

// The tokenizer of `owned` of C channels on images [B, Cimg, H, W] read through `sel`; `chunk`
// > 0 runs prepare / project / backward per chunk of that many channels (patches extracted per
// chunk), as the fused front ends do.
void fd_tokenizer(const TokenizerPolicy& pol, int C, const std::vector<int>& owned, int Cimg,
                  const ChannelSelection& sel, int B, int chunk, std::uint64_t seed) {
  INFO(describe(pol) << ", B " << B << ", chunk " << chunk << ", J " << sel.size());
  Exec exec;
  const int p = 2, H = 4, W = 6, D = 6, L = (H / p) * (W / p), J = sel.size();
  dchag::Tokenizer<Exec, double> tok(exec, C, p, D, owned, seed, pol);
  fill_normal(tok.parameters(), seed + 1, kParamSd);
  V4<double> images("images", B, Cimg, H, W), tokens("tokens", B, J, L, D), g("g", B, J, L, D);
  fill_normal(images, seed + 2);
  fill_normal(g, seed + 3);
  auto loss = [&] {
    if (chunk == 0) {
      tok.forward(exec, images, sel, tokens);
    } else {
      tok.prepare(exec, images, sel, chunk);
      for (int j0 = 0; j0 < J; j0 += chunk) tok.project(exec, j0, std::min(J, j0 + chunk), tokens);
    }
    exec.fence();
    return dot(tokens, g);
  };
  tok.zero_gradients(exec);
  loss();
  if (chunk == 0) {
    tok.backward(exec, g);
  } else {
    for (int j0 = 0; j0 < J; j0 += chunk) {
      const int j1 = std::min(J, j0 + chunk);
      V4<double> gc("g_chunk", B, j1 - j0, L, D);
      Kokkos::deep_copy(
          gc, Kokkos::subview(g, Kokkos::ALL, std::make_pair(j0, j1), Kokkos::ALL, Kokkos::ALL));
      tok.load_patches(exec, j0, j1);
      tok.backward(exec, gc, j0, j1);
    }
  }
  exec.fence();
  const auto rs = fd_check(tok.parameters(), tok.gradients(), loss);
  if (pol.shared()) {
    require_live(rs, "token_embed.proj.weight");
    require_live(rs, "token_embed.proj.bias");
  }
  if (pol.coordinate()) {
    require_live(rs, "channel_embed.proj.weight");
    require_live(rs, "channel_embed.proj.bias");
  } else {
    require_live(rs, "var_embed");
  }
}

}  // namespace

TEST_CASE("Tokenizer policies: backward matches finite differences", "[policies][fd]") {
  std::uint64_t seed = 5000;
  for (const auto& base : kPolicies) {
    const auto pol = with_channels(base, 8);
    for (int B : {1, 2}) {
      fd_tokenizer(pol, 8, {1, 3, 4, 6}, 3, ChannelSelection::own({6, 1, 4}), B, 0, seed += 10);
      fd_tokenizer(pol, 8, {1, 3, 4, 6}, 8, ChannelSelection::from_full_image({4, 1, 6, 3}), B, 3,
                   seed += 10);
    }
  }
  SECTION("channels the model was not built with, by coordinate") {
    const auto pol = with_channels(kPolicies[2], 4);
    auto sel = ChannelSelection::at_coordinates({120.0, 500.0, 975.0});
    fd_tokenizer(pol, 4, {0, 1, 2, 3}, 3, sel, 2, 0, 5500);
    sel = ChannelSelection::own({2, -1, 0});
    sel.coordinates = {150.0, 333.0, 50.0};  // model channels keep their own coordinates
    fd_tokenizer(pol, 4, {0, 1, 2, 3}, 3, sel, 2, 2, 5510);
  }
}

TEST_CASE("Tokenizer policies: the Fourier features follow the documented formula", "[policies]") {
  // phi_k(x) = sin(x 2 pi / lambda_k), phi_{n+k} = cos(...), lambda_k = 10^(a + k (b - a) / (n -
  // 1)): with lambda from 1 to 100 and n = 3, lambda = 1, 10, 100.
  const dchag::FourierFeatures f{6, 1.0, 100.0};
  double phi[6];
  const double x = 0.3, pi = 3.14159265358979323846;
  f.evaluate(x, phi);
  const double lambda[] = {1.0, 10.0, 100.0};
  for (int k = 0; k < 3; ++k) {
    CHECK(phi[k] == Approx(std::sin(x * 2 * pi / lambda[k])).epsilon(1e-14));
    CHECK(phi[3 + k] == Approx(std::cos(x * 2 * pi / lambda[k])).epsilon(1e-14));
  }
  const dchag::FourierFeatures one{2, 4.0, 4.0};  // n = 1: lambda_0 = lambda_min
  one.evaluate(1.0, phi);
  CHECK(phi[0] == Approx(1.0).margin(1e-15));
  CHECK(phi[1] == Approx(0.0).margin(1e-15));
}
