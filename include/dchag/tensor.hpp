#pragma once
/// Tensor vocabulary: every dchag tensor is a LayoutRight Kokkos View in the execution space's
/// memory space, and every parameter is reachable by its ClimaX-compatible name.
#include <dchag/error.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
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

/// Memory layout against file layout (the contract of `transposed_rows`). A weight file holds a
/// tensor row-major in its file shape. In memory, a tensor with transposed_rows = 0 holds file
/// element offset + k at element k of the piece at `offset`. A tensor with transposed_rows = R > 0
/// is one piece holding the file's row-major [R, K] matrix (K = numel / R) transposed, as a
/// row-major [K, R] matrix: memory element k holds file element file_index(k, R, numel) =
/// (k % R) * K + k / R. The tokenizer weights are such: file [D, 1, p, p] (R = D), memory
/// [p * p, D].
///
/// `file_index` and `memory_index` are inverse permutations of [0, numel). They expect R >= 0, a
/// multiple numel of R when R > 0, and an index in [0, numel); they do not check it (the
/// functions below do).
inline std::int64_t file_index(std::int64_t k, std::int64_t transposed_rows, std::int64_t numel) {
  const std::int64_t R = transposed_rows;
  return R > 0 ? (k % R) * (numel / R) + k / R : k;
}
inline std::int64_t memory_index(std::int64_t i, std::int64_t transposed_rows, std::int64_t numel) {
  const std::int64_t R = transposed_rows;
  if (R <= 0) return i;
  const std::int64_t K = numel / R;
  return (i % K) * R + i / K;
}

namespace detail {

inline void check_layout(const char* where, std::size_t from, std::size_t to, std::int64_t R) {
  DCHAG_EXPECT(R >= 0, where, "transposed_rows is ", R, ", expected >= 0");
  DCHAG_EXPECT(from == to, where, "the output holds ", to, " elements, expected ", from,
               " (as many as the input)");
  DCHAG_EXPECT(R == 0 || from % static_cast<std::size_t>(R) == 0, where, "the tensor holds ", from,
               " elements, expected a multiple of transposed_rows = ", R);
}

}  // namespace detail

/// file[file_index(k, R, n)] = memory[k] for every k: a whole tensor from memory layout to file
/// layout (host data; T is deduced from `file`). Throws std::invalid_argument when the sizes
/// differ, R < 0, or R > 0 does not divide the size.
template <class T>
void to_file_layout(std::span<const std::type_identity_t<T>> memory, std::int64_t transposed_rows,
                    std::span<T> file) {
  detail::check_layout("dchag::to_file_layout", memory.size(), file.size(), transposed_rows);
  const auto n = static_cast<std::int64_t>(memory.size());
  for (std::int64_t k = 0; k < n; ++k)
    file[static_cast<std::size_t>(file_index(k, transposed_rows, n))] =
        memory[static_cast<std::size_t>(k)];
}

/// memory[k] = file[file_index(k, R, n)] for every k: the inverse of to_file_layout (T is deduced
/// from `memory`). Throws as to_file_layout does.
template <class T>
void from_file_layout(std::span<const std::type_identity_t<T>> file, std::int64_t transposed_rows,
                      std::span<T> memory) {
  detail::check_layout("dchag::from_file_layout", file.size(), memory.size(), transposed_rows);
  const auto n = static_cast<std::int64_t>(file.size());
  for (std::int64_t k = 0; k < n; ++k)
    memory[static_cast<std::size_t>(k)] =
        file[static_cast<std::size_t>(file_index(k, transposed_rows, n))];
}

namespace detail {

inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// Checks that a tensor's pieces lie inside it and that a transposed tensor is one whole piece.
template <class Scalar, class MemSpace>
void check_pieces(const char* where, const NamedTensor<Scalar, MemSpace>& t) {
  for (auto s : t.shape)
    DCHAG_EXPECT(s >= 0, where, "tensor '", t.name, "' has shape ", shape_text(t.shape),
                 ", expected no negative extent");
  const std::int64_t n = t.numel();
  if (t.transposed_rows != 0) {
    DCHAG_EXPECT(t.transposed_rows > 0 && t.pieces.size() == 1 && t.pieces[0].offset == 0 &&
                     std::int64_t(t.pieces[0].values.extent(0)) == n && n % t.transposed_rows == 0,
                 where, "tensor '", t.name, "' has transposed_rows = ", t.transposed_rows,
                 ", expected one piece holding all ", n, " elements, a multiple of it");
  }
  for (const auto& p : t.pieces) {
    DCHAG_EXPECT(p.offset >= 0 && p.offset + std::int64_t(p.values.extent(0)) <= n, where,
                 "tensor '", t.name, "' has a piece of ", p.values.extent(0),
                 " elements at offset ", p.offset, ", expected it inside the ", n,
                 " elements of shape ", shape_text(t.shape));
  }
}

}  // namespace detail

/// The whole tensor `t` in file layout (row-major in t.shape), copied to the host from its
/// pieces; elements that no piece holds are zero. Throws std::invalid_argument when a piece lies
/// outside the tensor or a transposed tensor is not one whole piece.
template <class Scalar, class MemSpace>
std::vector<Scalar> to_file_layout(const NamedTensor<Scalar, MemSpace>& t) {
  detail::check_pieces("dchag::to_file_layout", t);
  const std::int64_t n = t.numel(), R = t.transposed_rows;
  std::vector<Scalar> file(static_cast<std::size_t>(n), Scalar(0));
  for (const auto& piece : t.pieces) {
    auto host = Kokkos::create_mirror_view(piece.values);
    Kokkos::deep_copy(host, piece.values);
    const std::int64_t count = piece.values.extent(0);
    for (std::int64_t k = 0; k < count; ++k)
      file[static_cast<std::size_t>(R > 0 ? file_index(k, R, n) : piece.offset + k)] = host(k);
  }
  return file;
}

/// Copies the file-layout values `file` (numel of them, row-major in t.shape) into every piece of
/// `t`: the inverse of to_file_layout for the elements `t` holds. Throws std::invalid_argument,
/// before copying anything, when `file` has another size or the pieces are malformed.
template <class Scalar, class MemSpace>
void from_file_layout(std::span<const std::type_identity_t<Scalar>> file,
                      const NamedTensor<Scalar, MemSpace>& t) {
  constexpr const char* where = "dchag::from_file_layout";
  detail::check_pieces(where, t);
  const std::int64_t n = t.numel(), R = t.transposed_rows;
  DCHAG_EXPECT(std::int64_t(file.size()) == n, where, "file holds ", file.size(),
               " values, expected numel = ", n, " of tensor '", t.name, "' ",
               detail::shape_text(t.shape));
  for (const auto& piece : t.pieces) {
    auto host = Kokkos::create_mirror_view(piece.values);
    const std::int64_t count = piece.values.extent(0);
    for (std::int64_t k = 0; k < count; ++k)
      host(k) = file[static_cast<std::size_t>(R > 0 ? file_index(k, R, n) : piece.offset + k)];
    Kokkos::deep_copy(piece.values, host);
  }
}

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

/// Appends `more` to `list`, merging the pieces of tensors that share a name. A piece that is
/// already there (the same memory at the same offset: a tensor modules share) is listed once.
template <class Scalar, class MemSpace>
void merge_into(TensorList<Scalar, MemSpace>& list, TensorList<Scalar, MemSpace> more) {
  for (auto& t : more) {
    bool merged = false;
    for (auto& u : list) {
      if (u.name == t.name) {
        for (const auto& p : t.pieces) {
          bool listed = false;
          for (const auto& q : u.pieces) {
            listed = listed || (q.offset == p.offset && q.values.data() == p.values.data() &&
                                q.values.extent(0) == p.values.extent(0));
          }
          if (!listed) u.pieces.push_back(p);
        }
        merged = true;
        break;
      }
    }
    if (!merged) list.push_back(std::move(t));
  }
}

}  // namespace detail
}  // namespace dchag
