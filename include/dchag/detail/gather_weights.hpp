#pragma once
/// The machinery of dchag/distributed_weights.hpp (not part of the API): what each rank holds of
/// each tensor (its catalog, in file-layout runs), how the root merges the catalogs of all ranks
/// into the file's tensors and checks that they fit together, and the point-to-point messages
/// that carry the values.
#include <dchag/communicator.hpp>
#include <dchag/tensor.hpp>
#include <dchag/weights.hpp>

#include <Kokkos_Core.hpp>
#include <algorithm>
#include <climits>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace dchag::detail {

/// The largest MPI message of values, in elements. A run longer than this (and any longer than
/// INT_MAX, the largest count MPI takes) goes as several messages; tests lower it to exercise
/// that.
inline std::int64_t& weights_message_elements() {
  static std::int64_t elements = std::int64_t(1) << 26;
  return elements;
}

inline constexpr int weights_tag = 0x4457;

/// Elements [offset, offset + count) of a tensor in file layout (row-major in its file shape).
struct HeldRun {
  std::int64_t offset, count;
};

/// What one rank holds of one tensor.
struct HeldTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  bool replicated = false;
  std::vector<HeldRun> runs;  // none for a replicated tensor on a rank other than the root
};

/// A rank's catalog and the values of its runs, one after the other in catalog order.
template <class Scalar>
struct Holding {
  std::vector<HeldTensor> tensors;
  std::vector<Scalar> values;
};

/// Host copies of what this rank contributes: every piece of the tensors that are not
/// `replicated`, and of the replicated ones on the root only.
template <class Scalar, class MemSpace>
Holding<Scalar> hold(const char* where, const TensorList<Scalar, MemSpace>& params,
                     const std::vector<std::string>& replicated, bool root) {
  for (std::size_t i = 0; i < params.size(); ++i) {
    for (std::size_t j = 0; j < i; ++j)
      DCHAG_EXPECT(params[j].name != params[i].name, where, "tensor '", params[i].name,
                   "' appears twice in params, expected each name once (merge its pieces)");
  }
  for (const auto& name : replicated) {
    bool found = false;
    for (const auto& t : params) found = found || t.name == name;
    DCHAG_EXPECT(found, where, "replicated names tensor '", name,
                 "', which is not in params; expected names of tensors in params");
  }
  Holding<Scalar> h;
  for (const auto& t : params) {
    HeldTensor e{t.name, t.shape, index_of(replicated, t.name) >= 0, {}};
    if (!e.replicated || root) {
      if (t.transposed_rows > 0) {
        const std::vector<Scalar> v = to_file_layout(t);
        e.runs.push_back({0, t.numel()});
        h.values.insert(h.values.end(), v.begin(), v.end());
      } else {
        for (const auto& piece : t.pieces) {
          const auto count = static_cast<std::int64_t>(piece.values.extent(0));
          if (count == 0) continue;
          auto host = Kokkos::create_mirror_view(piece.values);
          Kokkos::deep_copy(host, piece.values);
          e.runs.push_back({piece.offset, count});
          h.values.insert(h.values.end(), host.data(), host.data() + count);
        }
      }
    }
    h.tensors.push_back(std::move(e));
  }
  return h;
}

inline void put_word(std::vector<unsigned char>& out, std::int64_t v) {
  const auto u = static_cast<std::uint64_t>(v);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<unsigned char>(u >> (8 * i)));
}

inline std::vector<unsigned char> encode_catalog(const std::vector<HeldTensor>& tensors) {
  std::vector<unsigned char> out;
  put_word(out, std::int64_t(tensors.size()));
  for (const auto& t : tensors) {
    put_word(out, std::int64_t(t.name.size()));
    out.insert(out.end(), t.name.begin(), t.name.end());
    put_word(out, std::int64_t(t.shape.size()));
    for (auto d : t.shape) put_word(out, d);
    put_word(out, t.replicated ? 1 : 0);
    put_word(out, std::int64_t(t.runs.size()));
    for (const auto& r : t.runs) {
      put_word(out, r.offset);
      put_word(out, r.count);
    }
  }
  return out;
}

/// The inverse of encode_catalog. The bytes come from another rank of this program, but are
/// still read with bounds checks: a mismatch of dchag versions is a dchag::error, not a crash.
inline std::vector<HeldTensor> decode_catalog(const std::vector<unsigned char>& in, int rank) {
  std::size_t at = 0;
  const auto fail = [&] {
    throw error(concat("dchag::save_weights: the catalog of rank ", rank,
                       " is malformed (do all ranks run the same dchag?)"));
  };
  const auto word = [&] {
    if (in.size() - at < 8) fail();
    std::uint64_t u = 0;
    for (int i = 7; i >= 0; --i) u = (u << 8) | in[at + std::size_t(i)];
    at += 8;
    return static_cast<std::int64_t>(u);
  };
  // A count of items of at least `bytes` each, bounded by what is left.
  const auto count = [&](std::size_t bytes) {
    const std::int64_t n = word();
    if (n < 0 || std::uint64_t(n) > (in.size() - at) / bytes) fail();
    return static_cast<std::size_t>(n);
  };
  std::vector<HeldTensor> out;
  const std::size_t tensors = count(1);
  for (std::size_t i = 0; i < tensors; ++i) {
    HeldTensor t;
    const std::size_t chars = count(1);
    t.name.assign(reinterpret_cast<const char*>(in.data() + at), chars);
    at += chars;
    const std::size_t dims = count(8);
    for (std::size_t d = 0; d < dims; ++d) t.shape.push_back(word());
    t.replicated = word() != 0;
    const std::size_t runs = count(16);
    for (std::size_t r = 0; r < runs; ++r) {
      const std::int64_t offset = word();
      t.runs.push_back({offset, word()});
    }
    out.push_back(std::move(t));
  }
  if (at != in.size()) fail();
  return out;
}

/// A tensor of the file, as the root assembles it: its values, and who holds which elements.
template <class Scalar>
struct FileTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  bool replicated = false;
  int first_rank = 0;                            // the rank that listed it first
  std::vector<std::pair<HeldRun, int>> held_by;  // runs with their rank
  std::vector<Scalar> values = {};
};

/// The tensors of the file, in the order rank 0 lists them followed by those each further rank
/// adds (in rank order), and for each rank the index of each of its catalog entries. Throws
/// dchag::error naming the tensor and the ranks when the ranks disagree on a shape or on being
/// replicated, when two ranks hold the same element, or when no rank holds one.
template <class Scalar>
std::vector<FileTensor<Scalar>> merge_catalogs(const std::vector<std::vector<HeldTensor>>& catalogs,
                                               std::vector<std::vector<std::size_t>>& index) {
  constexpr const char* where = "dchag::save_weights";
  std::vector<FileTensor<Scalar>> files;
  std::vector<std::pair<std::string, std::size_t>> by_name;  // sorted
  index.assign(catalogs.size(), {});
  for (std::size_t r = 0; r < catalogs.size(); ++r) {
    for (const auto& t : catalogs[r]) {
      auto it = std::lower_bound(by_name.begin(), by_name.end(), t.name,
                                 [](const std::pair<std::string, std::size_t>& e,
                                    const std::string& n) { return e.first < n; });
      if (it == by_name.end() || it->first != t.name) {
        it = by_name.insert(it, {t.name, files.size()});
        files.push_back({t.name, t.shape, t.replicated, int(r), {}});
      }
      auto& f = files[it->second];
      if (f.shape != t.shape || f.replicated != t.replicated) {
        throw error(concat(where, ": ranks ", f.first_rank, " and ", r, " disagree on tensor '",
                           t.name, "': ", shape_text(f.shape),
                           f.replicated ? " replicated" : " distributed", " against ",
                           shape_text(t.shape), t.replicated ? " replicated" : " distributed"));
      }
      for (const auto& run : t.runs) f.held_by.push_back({run, int(r)});
      index[r].push_back(it->second);
    }
  }
  for (auto& f : files) {
    std::int64_t n = 1;
    for (auto d : f.shape) n *= d;
    auto runs = f.held_by;
    std::sort(runs.begin(), runs.end(),
              [](const auto& a, const auto& b) { return a.first.offset < b.first.offset; });
    std::int64_t next = 0;
    int last_rank = -1;
    for (const auto& [run, r] : runs) {
      if (run.offset > next) break;
      if (run.offset < next || run.offset < 0 || run.count < 0 || run.count > n - run.offset) {
        throw error(concat(where, ": elements [", run.offset, ", ", run.offset + run.count,
                           ") of tensor '", f.name, "' ", shape_text(f.shape),
                           run.offset < next ? concat(" are held by ranks ", last_rank, " and ", r)
                                             : concat(" (rank ", r, ") are outside it")));
      }
      next = run.offset + run.count;
      last_rank = r;
    }
    if (next < n) {
      std::int64_t end = n;
      for (const auto& [run, r] : runs)
        if (run.offset > next) end = std::min(end, run.offset);
      throw error(concat(where, ": elements [", next, ", ", end, ") of tensor '", f.name, "' ",
                         shape_text(f.shape), " are held by no rank",
                         f.replicated ? " (a replicated tensor is written from rank 0)" : ""));
    }
  }
  return files;
}

/// Sends (or receives) `count` values in messages of at most weights_message_elements() (and
/// INT_MAX) elements each.
template <class T>
void send_values(const Communicator& comm, const T* data, std::int64_t count, MPI_Datatype type,
                 int to) {
  const std::int64_t chunk = std::clamp<std::int64_t>(weights_message_elements(), 1, INT_MAX);
  for (std::int64_t i = 0; i < count; i += chunk) {
    DCHAG_MPI_CHECK("dchag::save_weights", MPI_Send, data + i, int(std::min(chunk, count - i)),
                    type, to, weights_tag, comm.comm());
  }
}
template <class T>
void receive_values(const Communicator& comm, T* data, std::int64_t count, MPI_Datatype type,
                    int from) {
  const std::int64_t chunk = std::clamp<std::int64_t>(weights_message_elements(), 1, INT_MAX);
  for (std::int64_t i = 0; i < count; i += chunk) {
    DCHAG_MPI_CHECK("dchag::save_weights", MPI_Recv, data + i, int(std::min(chunk, count - i)),
                    type, from, weights_tag, comm.comm(), MPI_STATUS_IGNORE);
  }
}

/// Runs `f`, rethrowing what it throws with "<where> on rank r of P: " in front (of the same
/// type: std::invalid_argument stays one; anything else becomes a dchag::error).
template <class F>
void naming_rank(const Communicator& comm, const char* where, F&& f) {
  const auto prefixed = [&](const std::exception& e) {
    std::string what = e.what();
    const std::string head = concat(where, ": ");
    if (what.compare(0, head.size(), head) == 0) what.erase(0, head.size());
    return concat(where, " on rank ", comm.rank(), " of ", comm.size(), ": ", what);
  };
  try {
    f();
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(prefixed(e));
  } catch (const std::exception& e) {
    throw error(prefixed(e));
  }
}

}  // namespace dchag::detail
