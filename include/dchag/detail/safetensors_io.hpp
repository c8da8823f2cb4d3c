#pragma once
/// File-system helpers of dchag/safetensors.hpp: what a path is, and reads at an offset.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

#include "dchag/error.hpp"

namespace dchag::safetensors::detail {

/// "a directory", "a symbolic link", ...: what a path that is not a regular file is.
inline std::string file_kind(std::filesystem::file_type t) {
  using ft = std::filesystem::file_type;
  switch (t) {
    case ft::directory:
      return "a directory";
    case ft::symlink:
      return "a symbolic link";
    case ft::block:
      return "a block device";
    case ft::character:
      return "a character device";
    case ft::fifo:
      return "a FIFO";
    case ft::socket:
      return "a socket";
    default:
      return "not a regular file";
  }
}

/// The size of the regular file at `path`; dchag::error "<where> does not exist, ..." otherwise.
inline std::uintmax_t regular_file_size(const std::string& where, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (st.type() == fs::file_type::not_found) {
    throw error(where + " does not exist, expected a regular file");
  }
  if (ec) throw error(where + " cannot be inspected (" + ec.message() + ")");
  if (!fs::is_regular_file(st)) {
    throw error(where + " is " + file_kind(st.type()) + ", expected a regular file");
  }
  const std::uintmax_t size = fs::file_size(path, ec);
  if (ec) throw error(where + ": cannot determine the size (" + ec.message() + ")");
  return size;
}

/// Reads n bytes at offset `at` of `in` into dst; false when fewer could be read.
inline bool read_at(std::ifstream& in, std::size_t at, unsigned char* dst, std::size_t n) {
  in.seekg(static_cast<std::streamoff>(at));
  in.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(n));
  return static_cast<bool>(in) && static_cast<std::size_t>(in.gcount()) == n;
}

}  // namespace dchag::safetensors::detail
