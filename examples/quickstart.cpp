// The README's example: the ClimaX front end on one process, forward and backward.
#include <dchag/aggregate.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  Kokkos::initialize(argc, argv);
  {
    using Exec = Kokkos::DefaultExecutionSpace;
    using Mem = Exec::memory_space;
    Exec exec;
    dchag::FrontEndConfig cfg;  // 64 channels of 32x32 images, 4x4 patches, D = 128, 8 heads
    cfg.channels = 64;
    cfg.height = cfg.width = 32;
    cfg.patch = 4;
    cfg.dim = 128;
    cfg.heads = 8;
    dchag::FlatFrontEnd<Exec, float> front_end(exec, cfg);  // validates and allocates once
    // dchag::load_weights("climax.safetensors", front_end.parameters());  // PyTorch weights

    dchag::View4<float, Mem> images("images", 2, cfg.channels, cfg.height, cfg.width);
    dchag::View3<float, Mem> tokens("tokens", 2, cfg.patches(), cfg.dim);  // [B, L, D]
    Kokkos::deep_copy(images, 1.0f);
    front_end.forward(exec, images, tokens);
    front_end.zero_gradients(exec);
    front_end.backward(exec, tokens);  // d(loss)/d(tokens) -> every parameter gradient
    exec.fence();
    std::printf("tokens [%zu, %zu, %zu], %zu parameter tensors\n", tokens.extent(0),
                tokens.extent(1), tokens.extent(2), front_end.parameters().size());
  }
  Kokkos::finalize();
}
