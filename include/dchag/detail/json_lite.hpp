#pragma once
/// A small strict JSON reader for safetensors headers (host only).
///
/// Parses RFC 8259 JSON into a tree. Objects keep their members in file order (duplicate keys are
/// kept; the caller decides whether they are an error). Numbers keep their source text so integers
/// can be range-checked exactly. Nesting is limited so hostile input cannot exhaust the stack.
/// Every syntax error throws json_error with the byte offset and what was expected.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dchag::detail::json {

class json_error : public std::runtime_error {
 public:
  json_error(std::size_t offset, const std::string& what)
      : std::runtime_error("invalid JSON at byte " + std::to_string(offset) + ": " + what),
        offset_(offset) {}
  std::size_t offset() const noexcept { return offset_; }

 private:
  std::size_t offset_;
};

enum class Kind { null, boolean, number, string, array, object };

inline const char* kind_name(Kind k) {
  switch (k) {
    case Kind::null:
      return "null";
    case Kind::boolean:
      return "a boolean";
    case Kind::number:
      return "a number";
    case Kind::string:
      return "a string";
    case Kind::array:
      return "an array";
    case Kind::object:
      return "an object";
  }
  return "?";
}

struct Value {
  Kind kind = Kind::null;
  bool boolean = false;
  std::string text;               // string contents (UTF-8), or the number's source text
  std::vector<Value> items;       // array elements
  std::vector<std::string> keys;  // object member names, in order
  std::vector<Value> members;     // object member values, parallel to keys

  /// The value as a signed 64-bit integer, or nullopt when it is not an integer number in range
  /// (fractions and exponents are not integers here, even "2.0").
  std::optional<std::int64_t> as_int64() const {
    if (kind != Kind::number) return std::nullopt;
    std::string_view s = text;
    bool neg = false;
    if (!s.empty() && s.front() == '-') {
      neg = true;
      s.remove_prefix(1);
    }
    if (s.empty()) return std::nullopt;
    // Accumulate the magnitude as unsigned so INT64_MIN is representable.
    std::uint64_t mag = 0;
    for (char c : s) {
      if (c < '0' || c > '9') return std::nullopt;
      const auto d = static_cast<std::uint64_t>(c - '0');
      if (mag > (std::numeric_limits<std::uint64_t>::max() - d) / 10) return std::nullopt;
      mag = mag * 10 + d;
    }
    constexpr auto max_pos = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    if (!neg) {
      if (mag > max_pos) return std::nullopt;
      return static_cast<std::int64_t>(mag);
    }
    if (mag > max_pos + 1) return std::nullopt;
    if (mag == max_pos + 1) return std::numeric_limits<std::int64_t>::min();
    return -static_cast<std::int64_t>(mag);
  }
};

namespace impl {

class Parser {
 public:
  static constexpr int max_depth = 64;

  explicit Parser(std::string_view in) : in_(in) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != in_.size()) fail("unexpected text after the top-level value");
    return v;
  }

 private:
  std::string_view in_;
  std::size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const { throw json_error(pos_, what); }

  bool at_end() const { return pos_ >= in_.size(); }
  char peek() const { return in_[pos_]; }

  void skip_ws() {
    while (!at_end()) {
      const char c = peek();
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  void expect(char c) {
    if (at_end() || peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }

  void expect_word(std::string_view w) {
    if (in_.substr(pos_, w.size()) != w) fail("unexpected character");
    pos_ += w.size();
  }

  Value parse_value(int depth) {
    if (depth >= max_depth) fail("nesting deeper than " + std::to_string(max_depth) + " levels");
    if (at_end()) fail("unexpected end of input, expected a value");
    Value v;
    switch (peek()) {
      case '{':
        parse_object(v, depth);
        break;
      case '[':
        parse_array(v, depth);
        break;
      case '"':
        v.kind = Kind::string;
        v.text = parse_string();
        break;
      case 't':
        expect_word("true");
        v.kind = Kind::boolean;
        v.boolean = true;
        break;
      case 'f':
        expect_word("false");
        v.kind = Kind::boolean;
        break;
      case 'n':
        expect_word("null");
        v.kind = Kind::null;
        break;
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) {
          v.kind = Kind::number;
          v.text = parse_number();
        } else {
          fail("unexpected character, expected a value");
        }
    }
    return v;
  }

  void parse_object(Value& v, int depth) {
    v.kind = Kind::object;
    expect('{');
    skip_ws();
    if (!at_end() && peek() == '}') {
      ++pos_;
      return;
    }
    for (;;) {
      skip_ws();
      if (at_end() || peek() != '"') fail("expected a string key");
      v.keys.push_back(parse_string());
      skip_ws();
      expect(':');
      skip_ws();
      v.members.push_back(parse_value(depth + 1));
      skip_ws();
      if (at_end()) fail("unexpected end of input inside an object");
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      expect('}');
      return;
    }
  }

  void parse_array(Value& v, int depth) {
    v.kind = Kind::array;
    expect('[');
    skip_ws();
    if (!at_end() && peek() == ']') {
      ++pos_;
      return;
    }
    for (;;) {
      skip_ws();
      v.items.push_back(parse_value(depth + 1));
      skip_ws();
      if (at_end()) fail("unexpected end of input inside an array");
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      expect(']');
      return;
    }
  }

  static bool is_digit(char c) { return c >= '0' && c <= '9'; }

  std::string parse_number() {
    const std::size_t start = pos_;
    if (peek() == '-') ++pos_;
    if (at_end() || !is_digit(peek())) fail("expected a digit");
    if (peek() == '0') {
      ++pos_;
    } else {
      while (!at_end() && is_digit(peek())) ++pos_;
    }
    if (!at_end() && peek() == '.') {
      ++pos_;
      if (at_end() || !is_digit(peek())) fail("expected a digit after '.'");
      while (!at_end() && is_digit(peek())) ++pos_;
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (at_end() || !is_digit(peek())) fail("expected a digit in the exponent");
      while (!at_end() && is_digit(peek())) ++pos_;
    }
    return std::string(in_.substr(start, pos_ - start));
  }

  unsigned hex4() {
    if (in_.size() - pos_ < 4) fail("truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = in_[pos_];
      unsigned d;
      if (c >= '0' && c <= '9')
        d = static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f')
        d = static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        d = static_cast<unsigned>(c - 'A' + 10);
      else
        fail("invalid hex digit in \\u escape");
      v = v * 16 + d;
      ++pos_;
    }
    return v;
  }

  static void append_utf8(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  // Copies one raw (unescaped) UTF-8 sequence, rejecting overlong forms, surrogates and
  // code points beyond U+10FFFF.
  void copy_utf8(std::string& out) {
    const auto b0 = static_cast<unsigned char>(in_[pos_]);
    int len;
    std::uint32_t cp;
    if (b0 < 0x80) {
      out += static_cast<char>(b0);
      ++pos_;
      return;
    } else if ((b0 & 0xE0) == 0xC0) {
      len = 2;
      cp = b0 & 0x1F;
    } else if ((b0 & 0xF0) == 0xE0) {
      len = 3;
      cp = b0 & 0x0F;
    } else if ((b0 & 0xF8) == 0xF0) {
      len = 4;
      cp = b0 & 0x07;
    } else {
      fail("invalid UTF-8 byte in string");
    }
    if (in_.size() - pos_ < static_cast<std::size_t>(len)) fail("truncated UTF-8 sequence");
    for (int i = 1; i < len; ++i) {
      const auto b = static_cast<unsigned char>(in_[pos_ + static_cast<std::size_t>(i)]);
      if ((b & 0xC0) != 0x80) fail("invalid UTF-8 continuation byte");
      cp = (cp << 6) | (b & 0x3F);
    }
    static constexpr std::uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      fail("invalid UTF-8 sequence in string");
    }
    out.append(in_.substr(pos_, static_cast<std::size_t>(len)));
    pos_ += static_cast<std::size_t>(len);
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string");
      const char c = peek();
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("unescaped control character in string");
      if (c != '\\') {
        copy_utf8(out);
        continue;
      }
      ++pos_;
      if (at_end()) fail("unterminated escape");
      const char e = peek();
      ++pos_;
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired low surrogate in \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (in_.substr(pos_, 2) != "\\u") fail("unpaired high surrogate in \\u escape");
            pos_ += 2;
            const std::uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("high surrogate not followed by a low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default:
          --pos_;
          fail("invalid escape character");
      }
    }
  }
};

}  // namespace impl

/// Parses a complete JSON document (surrounding whitespace allowed). Throws json_error.
inline Value parse(std::string_view text) { return impl::Parser(text).parse_document(); }

/// Appends `s` as a JSON string literal (quotes included). Bytes >= 0x80 pass through unchanged.
inline void append_quoted(std::string& out, std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  out += '"';
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (u < 0x20) {
          out += "\\u00";
          out += hex[u >> 4];
          out += hex[u & 0xF];
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

}  // namespace dchag::detail::json
