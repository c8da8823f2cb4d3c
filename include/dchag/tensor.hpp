#pragma once
/// Tensor vocabulary: every dchag tensor is a LayoutRight Kokkos View in the execution space's
/// memory space, and every parameter is reachable by its ClimaX-compatible name.
#include <Kokkos_Core.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dchag {

template <class T, class MemSpace>
using View1 = Kokkos::View<T*, Kokkos::LayoutRight, MemSpace>;
template <class T, class MemSpace>
using View2 = Kokkos::View<T**, Kokkos::LayoutRight, MemSpace>;
template <class T, class MemSpace>
using View3 = Kokkos::View<T***, Kokkos::LayoutRight, MemSpace>;
template <class T, class MemSpace>
using View4 = Kokkos::View<T****, Kokkos::LayoutRight, MemSpace>;

template <class T, class MemSpace>
using Unmanaged1 =
    Kokkos::View<T*, Kokkos::LayoutRight, MemSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
template <class T, class MemSpace>
using Unmanaged2 =
    Kokkos::View<T**, Kokkos::LayoutRight, MemSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
template <class T, class MemSpace>
using Unmanaged4 =
    Kokkos::View<T****, Kokkos::LayoutRight, MemSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;

/// One named tensor as it appears in a weight file (ClimaX state-dict names and shapes), made of
/// pieces that live in device memory. Most tensors are one piece; a tensor whose rows are spread
/// over modules (for example `var_embed`, one row per channel) has one piece per row it holds.
template <class Scalar, class MemSpace>
struct NamedTensor {
  struct Piece {
    std::int64_t offset;                  ///< first element in the file tensor (row-major)
    Unmanaged1<Scalar, MemSpace> values;  ///< device memory of these elements
  };
  std::string name;
  std::vector<std::int64_t> shape;  ///< shape in the file
  std::vector<Piece> pieces;
  /// 0: pieces hold file elements in file order. R > 0: the file tensor is a [R, numel / R]
  /// matrix held transposed in memory ([numel / R, R]), as one piece (a GEMM-friendly layout).
  std::int64_t transposed_rows = 0;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  std::int64_t held() const {
    std::int64_t n = 0;
    for (const auto& p : pieces) n += static_cast<std::int64_t>(p.values.extent(0));
    return n;
  }
};

/// Bytes a plan object holds on this rank for one training step (DESIGN 5), by kind.
struct MemoryEstimate {
  std::int64_t parameters = 0;     ///< weights
  std::int64_t gradients = 0;      ///< their gradients
  std::int64_t activations = 0;    ///< what forward keeps for backward
  std::int64_t workspace = 0;      ///< scratch reused across calls
  std::int64_t communication = 0;  ///< receive buffers of collectives
  std::int64_t total() const {
    return parameters + gradients + activations + workspace + communication;
  }
  MemoryEstimate& operator+=(const MemoryEstimate& o) {
    parameters += o.parameters;
    gradients += o.gradients;
    activations += o.activations;
    workspace += o.workspace;
    communication += o.communication;
    return *this;
  }
};

template <class Scalar, class MemSpace>
using TensorList = std::vector<NamedTensor<Scalar, MemSpace>>;

namespace detail {

/// A whole View as a one-piece named tensor with the given file shape.
template <class Scalar, class MemSpace, class V>
NamedTensor<Scalar, MemSpace> whole(std::string name, std::vector<std::int64_t> shape, const V& v) {
  return {
      std::move(name), std::move(shape), {{0, Unmanaged1<Scalar, MemSpace>(v.data(), v.span())}}};
}

/// Appends `more` to `list`, merging the pieces of tensors that share a name.
template <class Scalar, class MemSpace>
void merge_into(TensorList<Scalar, MemSpace>& list, TensorList<Scalar, MemSpace> more) {
  for (auto& t : more) {
    bool merged = false;
    for (auto& u : list) {
      if (u.name == t.name) {
        u.pieces.insert(u.pieces.end(), t.pieces.begin(), t.pieces.end());
        merged = true;
        break;
      }
    }
    if (!merged) list.push_back(std::move(t));
  }
}

}  // namespace detail
}  // namespace dchag
