#pragma once
/// Reading and writing safetensors files (host only; no Kokkos).
///
/// Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
///   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
///    "__metadata__": {"key": "value", ...}}
/// then the data buffer; offsets are relative to its start, values are little-endian.
///
/// Files are untrusted input: File::parse validates the whole header (JSON syntax, dtypes, shapes,
/// offsets inside the buffer, sizes, overlaps, duplicate names) before anything is read, and every
/// problem is a dchag::error naming the file and what is wrong. Looking up a tensor that is not
/// there, or expecting another shape, is the caller's mistake: std::invalid_argument.
///
/// Supported dtypes are F32, F64, F16 and BF16 (detail/safetensors_dtypes.hpp); any other dtype is
/// an error naming the tensor and these four. Values are read as float or double (widening is
/// exact; F64 read as float is rounded to nearest) and written with round-to-nearest-even.
/// Non-string values inside "__metadata__" are accepted and ignored (the format only defines
/// string values there).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "dchag/detail/json_lite.hpp"
#include "dchag/detail/safetensors_dtypes.hpp"
#include "dchag/detail/safetensors_io.hpp"
#include "dchag/error.hpp"

namespace dchag::safetensors {

/// Largest header accepted when reading (the reference implementation uses the same limit).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  // byte range in the data buffer

  /// Product of the extents (1 for a scalar, shape []).
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

/// A parsed, validated safetensors file held in memory.
class File {
 public:
  /// Reads the whole file at `path` and validates it. Throws dchag::error naming the path when it
  /// is not a regular readable file (missing, a directory, a device, unreadable) or reading fails.
  static File read(const std::string& path) {
    const std::string where = "dchag::safetensors::File::read: '" + path + "'";
    const std::uintmax_t expected = detail::regular_file_size(where, path);
    if (expected > std::numeric_limits<std::size_t>::max() / 2) {
      throw error(where + " holds " + std::to_string(expected) + " bytes, more than fit in memory");
    }
    std::ifstream in(path, std::ios::binary);
    if (!in) throw error(where + " cannot be opened for reading");
    std::vector<unsigned char> bytes(static_cast<std::size_t>(expected));
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (in.bad() || static_cast<std::uintmax_t>(in.gcount()) != expected) {
      throw error(where + ": error reading: got " + std::to_string(in.gcount()) + " of " +
                  std::to_string(expected) + " bytes");
    }
    // A file that grew since file_size is read as it was; one byte more tells.
    if (in.peek() != std::ifstream::traits_type::eof()) {
      throw error(where + " changed while it was read (longer than its size " +
                  std::to_string(expected) + ")");
    }
    return parse(std::move(bytes), path);
  }

  /// Reads and validates only the header of the file at `path` (its 8-byte length and JSON, the
  /// offsets against the file's size); values() and copy_to() then read just the bytes of what
  /// they are asked for. The file must not change while the File is used: a read finding another
  /// size or too few bytes throws dchag::error. Throws as read() does.
  static File open(const std::string& path) {
    const std::string where = "dchag::safetensors::File::open: '" + path + "'";
    const std::uintmax_t size = detail::regular_file_size(where, path);
    std::ifstream in(path, std::ios::binary);
    if (!in) throw error(where + " cannot be opened for reading");
    File f;
    f.source_ = path;
    f.path_ = path;
    f.file_size_ = size;
    f.bytes_.resize(static_cast<std::size_t>(std::min<std::uintmax_t>(size, 8)));
    f.read_exactly(in, 0, f.bytes_.data(), f.bytes_.size());
    if (f.bytes_.size() == 8) {
      std::uint64_t n = 0;
      for (int i = 7; i >= 0; --i) n = (n << 8) | f.bytes_[static_cast<std::size_t>(i)];
      // validate() names a length beyond the limit or the file; only a fitting one is read.
      if (n <= max_header_bytes && n <= size - 8) {
        f.bytes_.resize(8 + static_cast<std::size_t>(n));
        f.read_exactly(in, 8, f.bytes_.data() + 8, static_cast<std::size_t>(n));
      }
    }
    f.validate();
    return f;
  }

  /// Validates `bytes` as a safetensors file; `source` names it in error messages.
  static File parse(std::vector<unsigned char> bytes, std::string source = "<memory>") {
    File f;
    f.source_ = std::move(source);
    f.bytes_ = std::move(bytes);
    f.validate();
    return f;
  }

  /// Where the file came from (its path, or "<memory>").
  const std::string& source() const { return source_; }

  bool contains(std::string_view name) const { return find(name) != nullptr; }

  /// Throws std::invalid_argument naming the tensor and the file when it is absent.
  const TensorInfo& info(std::string_view name) const {
    const TensorInfo* t = find(name);
    DCHAG_THROW_IF(t == nullptr, "dchag::safetensors::File::info", "no tensor '", name, "' in '",
                   source_, "' (", tensors_.size(), " tensors)");
    return *t;
  }

  /// Tensor names in file order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& t : tensors_) out.push_back(t.name);
    return out;
  }

  /// All tensors in file order.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  /// String entries of "__metadata__" in file order.
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }

  std::optional<std::string> metadata_value(std::string_view key) const {
    for (const auto& [k, v] : metadata_) {
      if (k == key) return v;
    }
    return std::nullopt;
  }

  /// The tensor's values in row-major order, converted to T (float or double).
  template <class T>
  std::vector<T> values(std::string_view name) const {
    static_assert(detail::is_value_type_v<T>, "dchag::safetensors: T must be float or double");
    const TensorInfo& t = info(name);
    std::vector<T> out(static_cast<std::size_t>(t.numel()));
    convert(t, out.data(), 0, out.size());
    return out;
  }

  /// Elements [first, first + count) of the tensor in row-major order, converted to T. Throws
  /// std::invalid_argument when the range is not inside the tensor.
  template <class T>
  std::vector<T> values(std::string_view name, std::int64_t first, std::int64_t count) const {
    static_assert(detail::is_value_type_v<T>, "dchag::safetensors: T must be float or double");
    const TensorInfo& t = info(name);
    DCHAG_THROW_IF(first < 0 || count < 0 || count > t.numel() - first,
                   "dchag::safetensors::File::values", "elements [", first, ", ", first, " + ",
                   count, ") of tensor '", name, "' in '", source_,
                   "', expected a range inside [0, ", t.numel(), ")");
    std::vector<T> out(static_cast<std::size_t>(count));
    convert(t, out.data(), static_cast<std::size_t>(first), static_cast<std::size_t>(count));
    return out;
  }

  /// Copies the tensor into dst[0 .. numel) after checking that its shape is `expected_shape`.
  template <class T>
  void copy_to(std::string_view name, T* dst, std::span<const std::int64_t> expected_shape) const {
    static_assert(detail::is_value_type_v<T>, "dchag::safetensors: T must be float or double");
    const TensorInfo& t = info(name);
    DCHAG_THROW_IF(
        !std::equal(t.shape.begin(), t.shape.end(), expected_shape.begin(), expected_shape.end()),
        "dchag::safetensors::File::copy_to", "tensor '", name, "' in '", source_, "' has shape ",
        detail::shape_string(t.shape), ", expected ", detail::shape_string(expected_shape));
    convert(t, dst, 0, static_cast<std::size_t>(t.numel()));
  }

 private:
  std::string source_;
  std::vector<unsigned char> bytes_;
  std::size_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::vector<std::size_t> by_name_;  // indices into tensors_, sorted by name
  std::vector<std::pair<std::string, std::string>> metadata_;

  File() = default;

  std::string path_;              // File::open: values are read from here
  std::uintmax_t file_size_ = 0;  // File::open: the size validated

  template <class T>
  void convert(const TensorInfo& t, T* dst, std::size_t first, std::size_t count) const {
    const std::size_t es = dtype_size(t.dtype);
    const unsigned char* p = nullptr;
    std::vector<unsigned char> read;
    if (path_.empty()) {
      p = bytes_.data() + data_start_ + t.begin + first * es;
    } else {
      read.resize(count * es);
      std::ifstream in(path_, std::ios::binary);
      std::error_code ec;
      const std::uintmax_t size = std::filesystem::file_size(path_, ec);
      if (!in || ec) fail("cannot read tensor '", t.name, "': the file cannot be opened again");
      if (size != file_size_) {
        fail("cannot read tensor '", t.name, "': the file changed since it was opened (", size,
             " bytes, was ", file_size_, ")");
      }
      read_exactly(in, data_start_ + t.begin + first * es, read.data(), read.size());
      p = read.data();
    }
    for (std::size_t i = 0; i < count; ++i) dst[i] = detail::load_as<T>(p + i * es, t.dtype);
  }

  void read_exactly(std::ifstream& in, std::size_t at, unsigned char* dst, std::size_t n) const {
    if (!detail::read_at(in, at, dst, n)) {
      fail("error reading ", n, " bytes at offset ", at, ": got ", in.gcount());
    }
  }

  const TensorInfo* find(std::string_view name) const {
    auto it =
        std::lower_bound(by_name_.begin(), by_name_.end(), name,
                         [&](std::size_t i, std::string_view n) { return tensors_[i].name < n; });
    if (it == by_name_.end() || tensors_[*it].name != name) return nullptr;
    return &tensors_[*it];
  }

  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    throw error(::dchag::detail::concat("dchag::safetensors: '", source_, "': ", parts...));
  }

  void validate() {
    namespace json = ::dchag::detail::json;
    if (bytes_.size() < 8) {
      fail("file is ", bytes_.size(), " bytes, too short for the 8-byte header length");
    }
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes_[static_cast<std::size_t>(i)];
    if (n > max_header_bytes) {
      fail("header length ", n, " exceeds the limit of ", max_header_bytes, " bytes");
    }
    const std::uintmax_t size = path_.empty() ? bytes_.size() : file_size_;
    if (n > size - 8) {
      fail("header length ", n, " is larger than the ", size - 8,
           " bytes that follow it in the file");
    }
    data_start_ = 8 + static_cast<std::size_t>(n);
    const auto data_size = static_cast<std::size_t>(size - data_start_);

    json::Value root;
    try {
      root = json::parse(std::string_view(reinterpret_cast<const char*>(bytes_.data() + 8),
                                          static_cast<std::size_t>(n)));
    } catch (const json::json_error& e) {
      fail("header is not valid JSON: ", e.what());
    }
    if (root.kind != json::Kind::object)
      fail("header is ", json::kind_name(root.kind), ", expected a JSON object");

    bool seen_metadata = false;
    for (std::size_t m = 0; m < root.keys.size(); ++m) {
      const std::string& key = root.keys[m];
      const json::Value& v = root.members[m];
      if (key == "__metadata__") {
        if (seen_metadata) fail("duplicate \"__metadata__\" entry");
        seen_metadata = true;
        read_metadata(v);
      } else {
        tensors_.push_back(read_tensor(key, v, data_size));
      }
    }

    by_name_.resize(tensors_.size());
    for (std::size_t i = 0; i < by_name_.size(); ++i) by_name_[i] = i;
    std::sort(by_name_.begin(), by_name_.end(),
              [&](std::size_t a, std::size_t b) { return tensors_[a].name < tensors_[b].name; });
    for (std::size_t i = 1; i < by_name_.size(); ++i) {
      if (tensors_[by_name_[i]].name == tensors_[by_name_[i - 1]].name) {
        fail("duplicate tensor name '", tensors_[by_name_[i]].name, "'");
      }
    }

    // Non-empty byte ranges must not overlap (gaps are tolerated).
    std::vector<std::size_t> by_begin;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      if (tensors_[i].end > tensors_[i].begin) by_begin.push_back(i);
    }
    std::sort(by_begin.begin(), by_begin.end(),
              [&](std::size_t a, std::size_t b) { return tensors_[a].begin < tensors_[b].begin; });
    for (std::size_t i = 1; i < by_begin.size(); ++i) {
      const TensorInfo& prev = tensors_[by_begin[i - 1]];
      const TensorInfo& cur = tensors_[by_begin[i]];
      if (cur.begin < prev.end) {
        fail("data ranges of tensors '", prev.name, "' [", prev.begin, ", ", prev.end, ") and '",
             cur.name, "' [", cur.begin, ", ", cur.end, ") overlap");
      }
    }
  }

  void read_metadata(const ::dchag::detail::json::Value& v) {
    namespace json = ::dchag::detail::json;
    if (v.kind != json::Kind::object)
      fail("\"__metadata__\" is ", json::kind_name(v.kind), ", expected an object");
    for (std::size_t i = 0; i < v.keys.size(); ++i) {
      for (const auto& kv : metadata_) {
        if (kv.first == v.keys[i]) fail("duplicate metadata key '", v.keys[i], "'");
      }
      if (v.members[i].kind == json::Kind::string)
        metadata_.emplace_back(v.keys[i], v.members[i].text);
    }
  }

  TensorInfo read_tensor(const std::string& name, const ::dchag::detail::json::Value& v,
                         std::size_t data_size) const {
    namespace json = ::dchag::detail::json;
    if (v.kind != json::Kind::object)
      fail("tensor '", name, "': entry is ", json::kind_name(v.kind), ", expected an object");
    const json::Value* dtype = nullptr;
    const json::Value* shape = nullptr;
    const json::Value* offsets = nullptr;
    for (std::size_t i = 0; i < v.keys.size(); ++i) {
      const json::Value** slot = v.keys[i] == "dtype"          ? &dtype
                                 : v.keys[i] == "shape"        ? &shape
                                 : v.keys[i] == "data_offsets" ? &offsets
                                                               : nullptr;
      if (slot == nullptr) continue;  // unknown fields are ignored, as the reference reader does
      if (*slot != nullptr) fail("tensor '", name, "': duplicate field \"", v.keys[i], "\"");
      *slot = &v.members[i];
    }
    if (!dtype) fail("tensor '", name, "': missing \"dtype\"");
    if (!shape) fail("tensor '", name, "': missing \"shape\"");
    if (!offsets) fail("tensor '", name, "': missing \"data_offsets\"");

    TensorInfo t;
    t.name = name;
    if (dtype->kind != json::Kind::string)
      fail("tensor '", name, "': \"dtype\" is ", json::kind_name(dtype->kind),
           ", expected a string");
    const auto parsed = dtype_from_name(dtype->text);
    if (!parsed)
      fail("tensor '", name, "': unsupported dtype \"", dtype->text,
           "\" (supported: ", supported_dtypes, ")");
    t.dtype = *parsed;

    if (shape->kind != json::Kind::array)
      fail("tensor '", name, "': \"shape\" is ", json::kind_name(shape->kind),
           ", expected an array of integers");
    for (std::size_t i = 0; i < shape->items.size(); ++i) {
      const auto d = shape->items[i].as_int64();
      if (!d) fail("tensor '", name, "': shape[", i, "] is not an integer");
      if (*d < 0) fail("tensor '", name, "': shape[", i, "] is negative (", *d, ")");
      t.shape.push_back(*d);
    }
    const std::size_t es = dtype_size(t.dtype);
    const auto numel = detail::checked_numel(t.shape, es);
    if (!numel)
      fail("tensor '", name, "': the number of bytes of shape ", detail::shape_string(t.shape),
           " overflows");

    if (offsets->kind != json::Kind::array || offsets->items.size() != 2) {
      fail("tensor '", name, "': \"data_offsets\" must be an array of two integers [begin, end]");
    }
    const auto b = offsets->items[0].as_int64();
    const auto e = offsets->items[1].as_int64();
    if (!b || !e || *b < 0 || *e < 0)
      fail("tensor '", name, "': \"data_offsets\" must be two non-negative integers");
    if (*b > *e) fail("tensor '", name, "': data_offsets [", *b, ", ", *e, "] decrease");
    if (static_cast<std::uint64_t>(*e) > data_size) {
      fail("tensor '", name, "': data_offsets end ", *e, " is beyond the data buffer (", data_size,
           " bytes)");
    }
    t.begin = static_cast<std::size_t>(*b);
    t.end = static_cast<std::size_t>(*e);
    const std::size_t expected = static_cast<std::size_t>(*numel) * es;
    if (t.end - t.begin != expected) {
      fail("tensor '", name, "': data_offsets span ", t.end - t.begin, " bytes, but ",
           dtype_name(t.dtype), " shape ", detail::shape_string(t.shape), " needs ", expected);
    }
    return t;
  }
};

/// Builds a safetensors file in memory. Output is deterministic: "__metadata__" first (if any),
/// then tensors in insertion order, data contiguous in the same order, header padded with spaces so
/// the data buffer starts at a multiple of 8 bytes.
class Writer {
 public:
  /// Adds a tensor with `shape` from data[0 .. numel), stored as `dtype` (F32, F16 and BF16
  /// rounded to nearest even; F64 exact). Throws std::invalid_argument on an empty, reserved or
  /// repeated name or a bad shape.
  template <class T>
  void add(std::string name, std::vector<std::int64_t> shape, const T* data,
           DType dtype = DType::F32) {
    static_assert(detail::is_value_type_v<T>, "dchag::safetensors: T must be float or double");
    constexpr const char* where = "dchag::safetensors::Writer::add";
    DCHAG_THROW_IF(name.empty(), where, "empty tensor name");
    DCHAG_THROW_IF(name == "__metadata__", where, "\"__metadata__\" is reserved");
    for (const auto& e : entries_)
      DCHAG_THROW_IF(e.info.name == name, where, "duplicate tensor name '", name, "'");
    const std::size_t es = dtype_size(dtype);
    const auto numel = detail::checked_numel(shape, es);
    DCHAG_THROW_IF(!numel, where, "tensor '", name, "': invalid shape ",
                   detail::shape_string(shape));
    DCHAG_THROW_IF(*numel > 0 && data == nullptr, where, "tensor '", name, "': data is null");
    Entry e;
    e.bytes.resize(static_cast<std::size_t>(*numel) * es);
    for (std::size_t i = 0; i < static_cast<std::size_t>(*numel); ++i) {
      detail::store_from_double(e.bytes.data() + i * es, static_cast<double>(data[i]), dtype);
    }
    e.info.name = std::move(name);
    e.info.dtype = dtype;
    e.info.shape = std::move(shape);
    entries_.push_back(std::move(e));
  }

  /// Sets a metadata entry (replacing the value if the key exists; first-set order is kept).
  void set_metadata(std::string key, std::string value) {
    for (auto& kv : metadata_) {
      if (kv.first == key) {
        kv.second = std::move(value);
        return;
      }
    }
    metadata_.emplace_back(std::move(key), std::move(value));
  }

  std::vector<unsigned char> serialize() const {
    namespace json = ::dchag::detail::json;
    std::string h = "{";
    bool first = true;
    if (!metadata_.empty()) {
      h += "\"__metadata__\":{";
      for (std::size_t i = 0; i < metadata_.size(); ++i) {
        if (i) h += ',';
        json::append_quoted(h, metadata_[i].first);
        h += ':';
        json::append_quoted(h, metadata_[i].second);
      }
      h += '}';
      first = false;
    }
    std::size_t offset = 0;
    for (const auto& e : entries_) {
      if (!first) h += ',';
      first = false;
      json::append_quoted(h, e.info.name);
      h += ":{\"dtype\":\"";
      h += dtype_name(e.info.dtype);
      h += "\",\"shape\":[";
      for (std::size_t i = 0; i < e.info.shape.size(); ++i) {
        if (i) h += ',';
        h += std::to_string(e.info.shape[i]);
      }
      h += "],\"data_offsets\":[";
      h += std::to_string(offset) + "," + std::to_string(offset + e.bytes.size()) + "]}";
      offset += e.bytes.size();
    }
    h += '}';
    while (h.size() % 8 != 0) h += ' ';

    std::vector<unsigned char> out;
    out.reserve(8 + h.size() + offset);
    const auto n = static_cast<std::uint64_t>(h.size());
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<unsigned char>(n >> (8 * i)));
    out.insert(out.end(), h.begin(), h.end());
    for (const auto& e : entries_) out.insert(out.end(), e.bytes.begin(), e.bytes.end());
    return out;
  }

  /// Writes serialize() to `path`. Throws dchag::error on I/O failure.
  void write(const std::string& path) const {
    const auto bytes = serialize();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out)
      throw error("dchag::safetensors::Writer::write: cannot open '" + path + "' for writing");
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) throw error("dchag::safetensors::Writer::write: error writing '" + path + "'");
  }

 private:
  struct Entry {
    TensorInfo info;
    std::vector<unsigned char> bytes;
  };
  std::vector<Entry> entries_;
  std::vector<std::pair<std::string, std::string>> metadata_;
};

}  // namespace dchag::safetensors
