#pragma once
/// Loading and saving named parameters (a module's `parameters()`) through safetensors files with
/// ClimaX state-dict names (DESIGN 6).
///
/// Every piece of every tensor is copied through a host mirror of its device memory. A tensor held
/// transposed (`transposed_rows` R > 0) is converted to and from the file's row-major
/// [R, numel / R] layout (`to_file_layout` / `from_file_layout` of dchag/tensor.hpp). File values
/// of F32, F64, F16 and BF16 (what PyTorch writes) are converted to the model's scalar: exactly,
/// except F64 into a float model, which is rounded to nearest. A file tensor whose shape differs
/// from the model's only by dimensions of size 1 (`[]` for `[1]`, `[C, D]` for `[1, C, D]`,
/// `[L, D]` for `[1, L, D]`) holds the same row-major values and is read as it is.
///
/// Channels matched by name: when the file's metadata has the key `channels` (comma-separated
/// channel names, index = the file's channel id) and the caller gives the model's channel names,
/// model channel c is read from the file channel f of the same name: `token_embeds.{f}.proj.*`
/// into `token_embeds.{c}.proj.*` and row f of `var_embed` into row c. Otherwise channels are
/// matched by index. The linear partial weights of D-CHAG are per position in a rank's channel
/// list, not per channel, and are never remapped.
///
/// Saving writes each tensor whole: elements that no piece of the list holds are written as zero.
/// A distributed model (where a rank holds only its own channels' tokenizer weights and
/// `var_embed` rows) is saved into one file by the collective save_weights of
/// dchag/distributed_weights.hpp, which gathers the pieces of all ranks.
#include <dchag/detail/kokkos_compat.hpp>
#include <dchag/error.hpp>
#include <dchag/safetensors.hpp>
#include <dchag/tensor.hpp>

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dchag {

struct LoadOptions {
  /// Tensors (and model channels) absent from the file keep their values instead of being an error.
  bool allow_missing = false;
  /// The model's channel names (index = global channel id); empty: channels match by index.
  std::vector<std::string> channel_names;
};

namespace detail {

/// `token_embeds.{c}.rest` -> (c, ".rest"); nullopt for any other name.
inline std::optional<std::pair<int, std::string>> split_token_embed_name(std::string_view name) {
  constexpr std::string_view head = "token_embeds.";
  if (name.substr(0, head.size()) != head) return std::nullopt;
  std::size_t i = head.size();
  long long c = 0;
  const std::size_t digits = i;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9' && i - digits < 9) {
    c = 10 * c + (name[i] - '0');
    ++i;
  }
  if (i == digits || i >= name.size() || name[i] != '.') return std::nullopt;
  return std::make_pair(static_cast<int>(c), std::string(name.substr(i)));
}

inline std::string token_embed_name(int c, const std::string& rest) {
  return "token_embeds." + std::to_string(c) + rest;
}

inline std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::size_t begin = 0;
  for (;;) {
    const std::size_t end = s.find(',', begin);
    out.push_back(s.substr(begin, end == std::string::npos ? std::string::npos : end - begin));
    if (end == std::string::npos) return out;
    begin = end + 1;
  }
}

inline std::string join_names(const std::vector<std::string>& names) {
  std::string s;
  for (std::size_t i = 0; i < names.size(); ++i) s += (i ? "," : "") + names[i];
  return s;
}

/// Index of `name` in `list`, or -1.
inline int index_of(const std::vector<std::string>& list, const std::string& name) {
  for (std::size_t i = 0; i < list.size(); ++i)
    if (list[i] == name) return static_cast<int>(i);
  return -1;
}

}  // namespace detail

namespace detail {

/// One tensor of a load: where it comes from in the file and, once read, the values of its
/// pieces in memory layout, one after the other.
template <class Scalar, class MemSpace>
struct LoadStep {
  const NamedTensor<Scalar, MemSpace>* tensor;
  std::string file_name;
  bool remap_rows;  // var_embed by name: model row c <- file row file_of[c]
  std::vector<Scalar> values = {};
};

template <class Scalar, class MemSpace>
struct LoadPlan {
  std::vector<LoadStep<Scalar, MemSpace>> steps;
  std::vector<int> file_of;  // by name: model channel c -> file channel (-1: not in the file)
};

/// Every check of load_weights; reads no values.
template <class Scalar, class MemSpace>
LoadPlan<Scalar, MemSpace> plan_load(const safetensors::File& file,
                                     const TensorList<Scalar, MemSpace>& params,
                                     const LoadOptions& options) {
  constexpr const char* where = "dchag::load_weights";
  using safetensors::detail::shape_string;
  LoadPlan<Scalar, MemSpace> plan;

  const auto file_channels = file.metadata_value("channels");
  const bool by_name = file_channels.has_value() && !options.channel_names.empty();
  std::vector<std::string> file_names;
  std::vector<int>& file_of = plan.file_of;
  if (by_name) {
    file_names = split_commas(*file_channels);
    for (std::size_t f = 0; f < file_names.size(); ++f) {
      if (index_of(file_names, file_names[f]) != static_cast<int>(f)) {
        throw error(concat(where, ": '", file.source(), "': channel name '", file_names[f],
                           "' appears twice in the \"channels\" metadata"));
      }
    }
    for (std::size_t c = 0; c < options.channel_names.size(); ++c) {
      DCHAG_EXPECT(index_of(options.channel_names, options.channel_names[c]) == static_cast<int>(c),
                   where, "channel_names[", c, "] = '", options.channel_names[c],
                   "' appears twice, expected unique names");
      file_of.push_back(index_of(file_names, options.channel_names[c]));
    }
  }
  const auto check_named = [&](int c) {
    DCHAG_EXPECT(c >= 0 && std::size_t(c) < options.channel_names.size(), where,
                 "the model has channel ", c, ", but options.channel_names has ",
                 options.channel_names.size(), " names, expected one per model channel");
  };
  const auto missing_channel = [&](int c, const std::string& tensor) {
    return std::invalid_argument(
        concat(where, ": model channel ", c, " '", options.channel_names[c], "' (tensor '", tensor,
               "') is not among the channels of '", file.source(), "' (", *file_channels, ")"));
  };

  for (const auto& t : params) {
    check_pieces(where, t);
    std::string file_name = t.name;
    std::vector<std::int64_t> expected = t.shape;
    bool remap_rows = false;
    if (by_name) {
      if (auto te = split_token_embed_name(t.name)) {
        const int c = te->first;
        check_named(c);
        const int f = file_of[static_cast<std::size_t>(c)];
        if (f < 0) {
          if (options.allow_missing) continue;
          throw missing_channel(c, t.name);
        }
        file_name = token_embed_name(f, te->second);
      } else if (t.name == "var_embed") {
        DCHAG_EXPECT(t.shape.size() == 3 && t.shape[0] == 1, where, "tensor 'var_embed' has shape ",
                     shape_string(t.shape), ", expected [1, C, D]");
        DCHAG_EXPECT(std::size_t(t.shape[1]) == options.channel_names.size(), where,
                     "options.channel_names has ", options.channel_names.size(),
                     " names, expected C = ", t.shape[1], " (var_embed is ", shape_string(t.shape),
                     ")");
        if (!options.allow_missing) {
          for (const auto& piece : t.pieces) {
            const std::int64_t D = t.shape[2], count = piece.values.extent(0);
            for (std::int64_t c = piece.offset / D;
                 count > 0 && c <= (piece.offset + count - 1) / D; ++c) {
              if (file_of[static_cast<std::size_t>(c)] < 0)
                throw missing_channel(static_cast<int>(c), t.name);
            }
          }
        }
        expected = {1, std::int64_t(file_names.size()), t.shape[2]};
        remap_rows = true;
      }
    }
    if (!file.contains(file_name)) {
      if (options.allow_missing) continue;
      throw std::invalid_argument(concat(
          where, ": tensor '", file_name, "'", file_name != t.name ? " (for '" + t.name + "')" : "",
          " is not in '", file.source(), "' (", file.tensors().size(),
          " tensors; LoadOptions::allow_missing is off)"));
    }
    const auto& info = file.info(file_name);
    DCHAG_THROW_IF(!safetensors::detail::same_up_to_unit_dims(info.shape, expected), where,
                   "tensor '", file_name, "' in '", file.source(), "' has shape ",
                   shape_string(info.shape), ", expected ", shape_string(expected),
                   remap_rows ? " (one row per name in the file's \"channels\" metadata)" : "",
                   " (dimensions of size 1 may be left out or added)");
    plan.steps.push_back({&t, std::move(file_name), remap_rows});
  }
  return plan;
}

/// Reads from `file` what every step's pieces hold (only their elements: a distributed model's
/// rank reads its own rows of var_embed), into step.values. Changes no parameter.
template <class Scalar, class MemSpace>
void read_load(const safetensors::File& file, LoadPlan<Scalar, MemSpace>& plan) {
  for (auto& step : plan.steps) {
    const auto& t = *step.tensor;
    const std::int64_t n = t.numel(), R = t.transposed_rows;
    auto& out = step.values;
    out.reserve(static_cast<std::size_t>(t.held()));
    if (R > 0) {  // one whole piece (check_pieces)
      const std::vector<Scalar> v = file.values<Scalar>(step.file_name);
      for (std::int64_t k = 0; k < n; ++k)
        out.push_back(v[static_cast<std::size_t>(file_index(k, R, n))]);
      continue;
    }
    for (const auto& piece : t.pieces) {
      const std::int64_t count = piece.values.extent(0);
      if (!step.remap_rows) {
        const std::vector<Scalar> v = file.values<Scalar>(step.file_name, piece.offset, count);
        out.insert(out.end(), v.begin(), v.end());
        continue;
      }
      // Rows of model channels missing from the file keep their values (allow_missing).
      auto host = Kokkos::create_mirror_view(piece.values);
      Kokkos::deep_copy(host, piece.values);
      const std::int64_t D = t.shape[2];
      for (std::int64_t k = 0; k < count;) {
        const std::int64_t i = piece.offset + k, run = std::min(count - k, D - i % D);
        const int f = plan.file_of[static_cast<std::size_t>(i / D)];
        if (f >= 0) {
          const auto v = file.values<Scalar>(step.file_name, f * D + i % D, run);
          for (std::int64_t j = 0; j < run; ++j) host(k + j) = v[static_cast<std::size_t>(j)];
        }
        k += run;
      }
      out.insert(out.end(), host.data(), host.data() + count);
    }
  }
}

/// Copies the values read_load found into the pieces.
template <class Scalar, class MemSpace>
void apply_load(const LoadPlan<Scalar, MemSpace>& plan) {
  for (const auto& step : plan.steps) {
    std::size_t at = 0;
    for (const auto& piece : step.tensor->pieces) {
      auto host = Kokkos::create_mirror_view(piece.values);
      for (std::size_t k = 0; k < host.extent(0); ++k) host(k) = step.values[at + k];
      at += host.extent(0);
      Kokkos::deep_copy(piece.values, host);
    }
  }
}

}  // namespace detail

/// Copies every tensor of `params` from `file` (see the file comment for names and channels).
/// Throws std::invalid_argument when a tensor or model channel is absent (unless
/// `options.allow_missing`) or a shape differs from the file's. Everything is checked and read
/// before the first value is copied, so a load that throws (a File::open whose file changed, too)
/// leaves the parameters as they were.
template <class Scalar, class MemSpace>
void load_weights(const safetensors::File& file, const TensorList<Scalar, MemSpace>& params,
                  const LoadOptions& options = {}) {
  detail::ScopedRegion region("dchag::load_weights");
  auto plan = detail::plan_load(file, params, options);
  detail::read_load(file, plan);
  detail::apply_load(plan);
}

namespace detail {

/// save_weights' checks of `channel_names` (one per channel of var_embed, non-empty, unique, no
/// commas) and of the pieces.
template <class Scalar, class MemSpace>
void check_save(const char* where, const TensorList<Scalar, MemSpace>& params,
                const std::vector<std::string>& channel_names) {
  for (std::size_t c = 0; c < channel_names.size(); ++c) {
    DCHAG_EXPECT(!channel_names[c].empty() && channel_names[c].find(',') == std::string::npos,
                 where, "channel_names[", c, "] is '", channel_names[c],
                 "', expected a non-empty name without commas");
    DCHAG_EXPECT(index_of(channel_names, channel_names[c]) == static_cast<int>(c), where,
                 "channel_names[", c, "] = '", channel_names[c],
                 "' appears twice, expected unique names");
  }
  for (const auto& t : params) check_pieces(where, t);
  if (channel_names.empty()) return;
  for (const auto& t : params) {
    if (t.name == "var_embed" && t.shape.size() == 3) {
      DCHAG_EXPECT(std::size_t(t.shape[1]) == channel_names.size(), where, "channel_names has ",
                   channel_names.size(), " names, expected C = ", t.shape[1], " (var_embed is ",
                   safetensors::detail::shape_string(t.shape), ")");
    }
  }
}

}  // namespace detail

/// Adds every tensor of `params` to `writer` as F32 in file layout, elements no piece holds as
/// zero. With `channel_names` (one per model channel, no commas), also writes the `channels`
/// metadata so that loading can match channels by name.
template <class Scalar, class MemSpace>
void save_weights(safetensors::Writer& writer, const TensorList<Scalar, MemSpace>& params,
                  const std::vector<std::string>& channel_names = {}) {
  detail::check_save("dchag::save_weights", params, channel_names);
  if (!channel_names.empty()) writer.set_metadata("channels", detail::join_names(channel_names));
  detail::ScopedRegion region("dchag::save_weights");
  for (const auto& t : params) {
    const std::vector<Scalar> values = to_file_layout(t);
    writer.add(t.name, t.shape, values.data());
  }
}

/// load_weights from the file at `path`.
template <class Scalar, class MemSpace>
void load_weights(const std::string& path, const TensorList<Scalar, MemSpace>& params,
                  const LoadOptions& options = {}) {
  load_weights(safetensors::File::read(path), params, options);
}

/// save_weights into a new file at `path`.
template <class Scalar, class MemSpace>
void save_weights(const std::string& path, const TensorList<Scalar, MemSpace>& params,
                  const std::vector<std::string>& channel_names = {}) {
  safetensors::Writer writer;
  save_weights(writer, params, channel_names);
  writer.write(path);
}

}  // namespace dchag
