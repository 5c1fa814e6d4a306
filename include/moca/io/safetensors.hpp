// safetensors files: the checkpoint format shared with PyTorch (safetensors.torch).
//
//   SafetensorsWriter out;
//   out.add("blocks.0.attn.qkv.weight", w);            // a float tensor, written as F32
//   out.add("bow.embedding", e, SafetensorsDtype::BF16);
//   out.set_metadata("format", "pt");
//   out.write("model.safetensors");                    // atomic: temp file + fsync + rename
//
//   auto f = SafetensorsFile::open("model.safetensors");  // validates the whole file
//   for (const auto& t : f.tensors()) std::cout << t.name << " " << to_string(t.dtype) << "\n";
//   Tensor<float> w2 = f.read<float>("blocks.0.attn.qkv.weight");  // F16/BF16/F64 convert
//
// Layout: an 8-byte little-endian length N, N bytes of UTF-8 JSON
//   {"__metadata__": {"k": "v"}, "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]}}
// (padded with spaces to a multiple of 8), then the little-endian, C-order data; offsets count
// from the start of the data. As the reference implementation does, tensors are written sorted
// by element size (largest first) and then by name, so each starts aligned to its element size,
// and the tensors cover the data section exactly, without gaps or overlaps.
//
// A bad file throws moca::Error naming the file and what is wrong; nothing is read past the end
// of the file and no size from the file is trusted before it was checked.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moca/core/check.hpp"
#include "moca/core/shape.hpp"
#include "moca/core/tensor.hpp"
#include "moca/io/atomic_file.hpp"

namespace moca {

static_assert(std::endian::native == std::endian::little,
              "SAFETENSORS_DATA_IS_LITTLE_ENDIAN_AND_READ_WITHOUT_BYTE_SWAPS");

/// Element types of safetensors files that moca reads and writes, in the reference
/// implementation's order (which sets the order of tensors in a written file).
enum class SafetensorsDtype { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

/// The dtype's name in a file header ("F32", "BF16", ...).
inline const char* to_string(SafetensorsDtype d) {
  switch (d) {
    case SafetensorsDtype::BOOL: return "BOOL";
    case SafetensorsDtype::U8: return "U8";
    case SafetensorsDtype::I8: return "I8";
    case SafetensorsDtype::I16: return "I16";
    case SafetensorsDtype::U16: return "U16";
    case SafetensorsDtype::F16: return "F16";
    case SafetensorsDtype::BF16: return "BF16";
    case SafetensorsDtype::I32: return "I32";
    case SafetensorsDtype::U32: return "U32";
    case SafetensorsDtype::F32: return "F32";
    case SafetensorsDtype::F64: return "F64";
    case SafetensorsDtype::I64: return "I64";
    case SafetensorsDtype::U64: return "U64";
  }
  return "?";
}

/// The dtype called `name` in a header, or nothing if moca does not know it.
inline std::optional<SafetensorsDtype> parse_safetensors_dtype(std::string_view name) {
  for (int i = 0; i <= static_cast<int>(SafetensorsDtype::U64); ++i) {
    const auto d = static_cast<SafetensorsDtype>(i);
    if (name == to_string(d)) return d;
  }
  return std::nullopt;
}

/// Bytes per element.
inline std::size_t element_size(SafetensorsDtype d) {
  switch (d) {
    case SafetensorsDtype::BOOL:
    case SafetensorsDtype::U8:
    case SafetensorsDtype::I8: return 1;
    case SafetensorsDtype::I16:
    case SafetensorsDtype::U16:
    case SafetensorsDtype::F16:
    case SafetensorsDtype::BF16: return 2;
    case SafetensorsDtype::I32:
    case SafetensorsDtype::U32:
    case SafetensorsDtype::F32: return 4;
    case SafetensorsDtype::F64:
    case SafetensorsDtype::I64:
    case SafetensorsDtype::U64: return 8;
  }
  return 0;
}

/// True for F16, BF16, F32 and F64.
inline bool is_floating(SafetensorsDtype d) {
  return d == SafetensorsDtype::F16 || d == SafetensorsDtype::BF16 ||
         d == SafetensorsDtype::F32 || d == SafetensorsDtype::F64;
}

/// The dtype that stores C++ type T without loss (float → F32, std::int64_t → I64, ...).
template <class T>
constexpr SafetensorsDtype safetensors_dtype_of() {
  if constexpr (std::is_same_v<T, float>) {
    return SafetensorsDtype::F32;
  } else if constexpr (std::is_same_v<T, double>) {
    return SafetensorsDtype::F64;
  } else if constexpr (std::is_same_v<T, bool>) {
    return SafetensorsDtype::BOOL;
  } else {
    static_assert(std::is_integral_v<T> && sizeof(T) <= 8, "NO_SAFETENSORS_DTYPE_FOR_THIS_TYPE");
    constexpr bool s = std::is_signed_v<T>;
    if constexpr (sizeof(T) == 1) return s ? SafetensorsDtype::I8 : SafetensorsDtype::U8;
    if constexpr (sizeof(T) == 2) return s ? SafetensorsDtype::I16 : SafetensorsDtype::U16;
    if constexpr (sizeof(T) == 4) return s ? SafetensorsDtype::I32 : SafetensorsDtype::U32;
    if constexpr (sizeof(T) == 8) return s ? SafetensorsDtype::I64 : SafetensorsDtype::U64;
  }
}

namespace detail {

/// Rounds x to the binary floating-point format with E exponent bits and M stored mantissa bits
/// (IEEE binary16: 5, 10; bfloat16: 8, 7) and returns its bits: round to nearest, ties to even,
/// overflow to infinity, gradual underflow, NaN kept (quiet). Computed from the double, so a
/// float or a double converts with a single rounding.
template <int E, int M>
std::uint16_t encode_narrow_float(double x) {
  static_assert(1 + E + M == 16);
  constexpr int bias = (1 << (E - 1)) - 1, emin = 1 - bias, emax = bias;
  constexpr std::uint32_t exp_mask = ((1u << E) - 1u) << M, one = 1u << M;
  const std::uint32_t sign = std::signbit(x) ? (1u << (E + M)) : 0u;
  if (std::isnan(x)) return static_cast<std::uint16_t>(sign | exp_mask | (one >> 1));
  const double a = std::fabs(x);
  if (std::isinf(a)) return static_cast<std::uint16_t>(sign | exp_mask);
  if (a == 0.0) return static_cast<std::uint16_t>(sign);
  int e = std::max(std::ilogb(a), emin);  // below emin the quantum stays 2^(emin - M)
  const double q = std::ldexp(a, M - e);   // exact (a power-of-two scaling), q < 2^(M + 1)
  double r = std::floor(q);
  const double frac = q - r;  // exact: q has at most 53 significant bits, r its integer part
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
  auto m = static_cast<std::uint32_t>(r);
  if (m == 2 * one) {  // rounded up to the next binade
    m = one;
    ++e;
  }
  if (e > emax) return static_cast<std::uint16_t>(sign | exp_mask);
  if (m < one) return static_cast<std::uint16_t>(sign | m);  // subnormal (or zero)
  return static_cast<std::uint16_t>(sign | (static_cast<std::uint32_t>(e + bias) << M) |
                                    (m - one));
}

/// The exact value of a binary16 (E = 5, M = 10) or bfloat16 (8, 7) bit pattern.
template <int E, int M>
double decode_narrow_float(std::uint16_t bits) {
  constexpr int bias = (1 << (E - 1)) - 1;
  constexpr std::uint32_t emask = (1u << E) - 1u;
  const std::uint32_t ef = (bits >> M) & emask, m = bits & ((1u << M) - 1u);
  double v;
  if (ef == emask) {
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (ef == 0) {
    v = std::ldexp(static_cast<double>(m), 1 - bias - M);
  } else {
    v = std::ldexp(static_cast<double>(m | (1u << M)), static_cast<int>(ef) - bias - M);
  }
  return (bits >> (E + M)) ? -v : v;
}

/// IEEE binary16 bits of x (round to nearest even).
inline std::uint16_t f16_bits(double x) { return encode_narrow_float<5, 10>(x); }
/// bfloat16 bits of x (round to nearest even).
inline std::uint16_t bf16_bits(double x) { return encode_narrow_float<8, 7>(x); }
/// The value of IEEE binary16 bits.
inline double f16_value(std::uint16_t b) { return decode_narrow_float<5, 10>(b); }
/// The value of bfloat16 bits.
inline double bf16_value(std::uint16_t b) { return decode_narrow_float<8, 7>(b); }

// Unaligned little-endian loads and stores (the host is little-endian, asserted above).
template <class S>
S load_le(const std::byte* p) {
  S v;
  std::memcpy(&v, p, sizeof(S));
  return v;
}
template <class S>
void store_le(std::byte* p, S v) {
  std::memcpy(p, &v, sizeof(S));
}

/// "[2, 3]" for a shape given as a list of sizes.
inline std::string shape_str(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

/// The Shape of a list of at most Shape::kMaxRank sizes.
inline Shape make_shape(std::span<const std::int64_t> d) {
  switch (d.size()) {
    case 0: return Shape{};
    case 1: return Shape{d[0]};
    case 2: return Shape{d[0], d[1]};
    case 3: return Shape{d[0], d[1], d[2]};
    case 4: return Shape{d[0], d[1], d[2], d[3]};
    default:
      throw Error(str("shape ", shape_str(d), " has rank ", d.size(),
                      ", more than the maximum rank ", Shape::kMaxRank, " of a moca tensor"));
  }
}

/// The sizes of a Shape as a list.
inline std::vector<std::int64_t> shape_sizes(const Shape& s) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(s.rank()));
  for (int i = 0; i < s.rank(); ++i) v[static_cast<std::size_t>(i)] = s[i];
  return v;
}

/// True if a list of sizes and a Shape have the same rank and sizes.
inline bool same_shape(std::span<const std::int64_t> a, const Shape& b) {
  if (static_cast<int>(a.size()) != b.rank()) return false;
  for (int i = 0; i < b.rank(); ++i)
    if (a[static_cast<std::size_t>(i)] != b[i]) return false;
  return true;
}

/// Converts n elements of dtype `dt` at `src` to T at `dst`. Floating data converts to floating
/// T (F16/BF16 exactly, F64 → float rounds to nearest); integer data converts to any T, checked
/// against T's range. `where` prefixes the error messages.
template <class T>
void decode_elements(SafetensorsDtype dt, const std::byte* src, std::int64_t n, T* dst,
                     const std::string& where) {
  static_assert(std::is_floating_point_v<T> || (std::is_integral_v<T> && !std::is_same_v<T, bool>),
                "SAFETENSORS_READS_INTO_FLOATING_OR_INTEGER_TENSORS");
  const auto count = static_cast<std::size_t>(n);
  if (dt == safetensors_dtype_of<T>()) {  // the same representation: one copy
    if (count) std::memcpy(dst, src, count * sizeof(T));
    return;
  }
  if constexpr (std::is_integral_v<T>) {
    if (is_floating(dt))
      throw Error(str(where, ": dtype ", to_string(dt),
                      " holds floating-point values; it cannot be read as integers"));
  }
  // Integers: checked against T's range, reported with the first offending element.
  auto from_int = [&](auto tag) {
    using S = decltype(tag);
    for (std::size_t i = 0; i < count; ++i) {
      const S v = load_le<S>(src + i * sizeof(S));
      if constexpr (std::is_integral_v<T>) {
        if (!std::in_range<T>(v))
          throw Error(str(where, ": element ", i, " (", +v, ") of dtype ", to_string(dt),
                          " does not fit the requested integer type"));
      }
      dst[i] = static_cast<T>(v);
    }
  };
  switch (dt) {
    case SafetensorsDtype::BOOL:
      for (std::size_t i = 0; i < count; ++i)
        dst[i] = static_cast<T>(load_le<std::uint8_t>(src + i) != 0 ? 1 : 0);
      return;
    case SafetensorsDtype::U8: return from_int(std::uint8_t{});
    case SafetensorsDtype::I8: return from_int(std::int8_t{});
    case SafetensorsDtype::I16: return from_int(std::int16_t{});
    case SafetensorsDtype::U16: return from_int(std::uint16_t{});
    case SafetensorsDtype::I32: return from_int(std::int32_t{});
    case SafetensorsDtype::U32: return from_int(std::uint32_t{});
    case SafetensorsDtype::I64: return from_int(std::int64_t{});
    case SafetensorsDtype::U64: return from_int(std::uint64_t{});
    default: break;
  }
  if constexpr (std::is_floating_point_v<T>) {
    switch (dt) {
      case SafetensorsDtype::F16:
        for (std::size_t i = 0; i < count; ++i)
          dst[i] = static_cast<T>(f16_value(load_le<std::uint16_t>(src + 2 * i)));
        return;
      case SafetensorsDtype::BF16:
        // bfloat16 is the top half of a float: a shift is exact and keeps NaN payloads.
        for (std::size_t i = 0; i < count; ++i)
          dst[i] = static_cast<T>(std::bit_cast<float>(
              static_cast<std::uint32_t>(load_le<std::uint16_t>(src + 2 * i)) << 16));
        return;
      case SafetensorsDtype::F32:
        for (std::size_t i = 0; i < count; ++i)
          dst[i] = static_cast<T>(load_le<float>(src + 4 * i));
        return;
      case SafetensorsDtype::F64:
        for (std::size_t i = 0; i < count; ++i)
          dst[i] = static_cast<T>(load_le<double>(src + 8 * i));
        return;
      default: break;
    }
  }
  throw Error(str(where, ": cannot convert dtype ", to_string(dt)));
}

/// Converts n elements of T at `src` to dtype `dt` at `dst` (element_size(dt) bytes each).
/// Floating T converts to floating dtypes (rounding to nearest even); integer T converts to any
/// dtype, checked against the integer dtype's range.
template <class T>
void encode_elements(const T* src, std::int64_t n, SafetensorsDtype dt, std::byte* dst,
                     const std::string& where) {
  const auto count = static_cast<std::size_t>(n);
  if (dt == safetensors_dtype_of<T>()) {
    if (count) std::memcpy(dst, src, count * sizeof(T));
    return;
  }
  if constexpr (std::is_floating_point_v<T>) {
    switch (dt) {
      case SafetensorsDtype::F16:
        for (std::size_t i = 0; i < count; ++i)
          store_le(dst + 2 * i, f16_bits(static_cast<double>(src[i])));
        return;
      case SafetensorsDtype::BF16:
        for (std::size_t i = 0; i < count; ++i)
          store_le(dst + 2 * i, bf16_bits(static_cast<double>(src[i])));
        return;
      case SafetensorsDtype::F32:
        for (std::size_t i = 0; i < count; ++i) store_le(dst + 4 * i, static_cast<float>(src[i]));
        return;
      case SafetensorsDtype::F64:
        for (std::size_t i = 0; i < count; ++i) store_le(dst + 8 * i, static_cast<double>(src[i]));
        return;
      default:
        throw Error(str(where, ": floating-point values cannot be written as dtype ",
                        to_string(dt), " (convert them to integers first)"));
    }
  } else {
    auto to_int = [&](auto tag) {
      using S = decltype(tag);
      for (std::size_t i = 0; i < count; ++i) {
        const auto v = +src[i];  // promotes bool and character types to int
        if (!std::in_range<S>(v))
          throw Error(str(where, ": element ", i, " (", v, ") does not fit dtype ",
                          to_string(dt)));
        store_le(dst + i * sizeof(S), static_cast<S>(v));
      }
    };
    switch (dt) {
      case SafetensorsDtype::BOOL:
        for (std::size_t i = 0; i < count; ++i) {
          if (src[i] != 0 && src[i] != 1)
            throw Error(str(where, ": element ", i, " (", +src[i], ") is not a boolean 0 or 1"));
          store_le(dst + i, static_cast<std::uint8_t>(src[i]));
        }
        return;
      case SafetensorsDtype::U8: return to_int(std::uint8_t{});
      case SafetensorsDtype::I8: return to_int(std::int8_t{});
      case SafetensorsDtype::I16: return to_int(std::int16_t{});
      case SafetensorsDtype::U16: return to_int(std::uint16_t{});
      case SafetensorsDtype::I32: return to_int(std::int32_t{});
      case SafetensorsDtype::U32: return to_int(std::uint32_t{});
      case SafetensorsDtype::I64: return to_int(std::int64_t{});
      case SafetensorsDtype::U64: return to_int(std::uint64_t{});
      case SafetensorsDtype::F16:
        for (std::size_t i = 0; i < count; ++i)
          store_le(dst + 2 * i, f16_bits(static_cast<double>(src[i])));
        return;
      case SafetensorsDtype::BF16:
        for (std::size_t i = 0; i < count; ++i)
          store_le(dst + 2 * i, bf16_bits(static_cast<double>(src[i])));
        return;
      case SafetensorsDtype::F32:
        for (std::size_t i = 0; i < count; ++i) store_le(dst + 4 * i, static_cast<float>(src[i]));
        return;
      case SafetensorsDtype::F64:
        for (std::size_t i = 0; i < count; ++i) store_le(dst + 8 * i, static_cast<double>(src[i]));
        return;
    }
  }
}

}  // namespace detail

/// A safetensors file read into memory and fully validated.
class SafetensorsFile {
 public:
  /// Where one tensor lies, as declared by the header (already checked against the file).
  struct TensorInfo {
    std::string name;
    SafetensorsDtype dtype = SafetensorsDtype::F32;
    std::vector<std::int64_t> shape;  ///< any rank; [] is a scalar
    std::uint64_t begin = 0;          ///< byte offset into the data section
    std::uint64_t end = 0;            ///< one past the last byte
    /// Number of elements (1 for a scalar).
    std::int64_t numel() const {
      std::int64_t n = 1;
      for (std::int64_t d : shape) n *= d;
      return n;
    }
    /// "[2, 3]".
    std::string shape_str() const { return detail::shape_str(shape); }
  };

  /// Headers larger than this are refused, as the reference implementation does.
  static constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

  /// An empty file object; use open() or from_bytes().
  SafetensorsFile() = default;

  /// Reads and validates the file at `path`. Throws moca::Error naming the path and the problem:
  /// unreadable, too short, a header length beyond the file, invalid JSON, an unknown dtype, a
  /// shape that does not match its byte range, offsets out of range, overlapping or leaving gaps,
  /// a data section of the wrong size.
  static SafetensorsFile open(const std::filesystem::path& path) {
    const std::string p = path.string();
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec))
      throw Error("safetensors file '" + p + "': is a directory");
    std::ifstream in(path, std::ios::binary);
    if (!in)
      throw Error("safetensors file '" + p + "': cannot open it: " + std::strerror(errno));
    in.seekg(0, std::ios::end);
    const std::streamoff size = in.tellg();
    if (size < 0) throw Error("safetensors file '" + p + "': cannot determine its size");
    in.seekg(0, std::ios::beg);
    std::vector<std::byte> bytes(static_cast<std::size_t>(size));
    if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
      throw Error("safetensors file '" + p + "': read failed after " +
                  std::to_string(in.gcount()) + " of " + std::to_string(size) + " bytes");
    return from_bytes(std::move(bytes), p);
  }

  /// Validates a file's bytes held in memory; `label` stands for the file in error messages.
  static SafetensorsFile from_bytes(std::vector<std::byte> bytes, std::string label) {
    SafetensorsFile f;
    f.path_ = std::move(label);
    f.bytes_ = std::move(bytes);
    f.parse();
    return f;
  }

  /// The path given to open() (or the label given to from_bytes()).
  const std::string& path() const { return path_; }
  /// Every tensor, in the order of their data in the file.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  /// Every tensor name, in the order of their data in the file.
  std::vector<std::string> names() const {
    std::vector<std::string> v;
    v.reserve(tensors_.size());
    for (const TensorInfo& t : tensors_) v.push_back(t.name);
    return v;
  }
  /// Number of tensors.
  std::size_t size() const { return tensors_.size(); }
  /// True if the file holds a tensor called `name`.
  bool contains(std::string_view name) const { return find(name) != nullptr; }

  /// The tensor called `name`, or nullptr.
  const TensorInfo* find(std::string_view name) const {
    const auto it = index_.find(std::string(name));
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  /// The tensor called `name`; throws moca::Error naming the file if there is none.
  const TensorInfo& info(std::string_view name) const {
    const TensorInfo* t = find(name);
    if (t == nullptr)
      throw Error(detail::str("safetensors file '", path_, "': no tensor named '", name, "'"));
    return *t;
  }
  /// The dtype of tensor `name` (throws like info()).
  SafetensorsDtype dtype(std::string_view name) const { return info(name).dtype; }
  /// The shape of tensor `name` (throws like info()).
  const std::vector<std::int64_t>& shape(std::string_view name) const { return info(name).shape; }

  /// The "__metadata__" map (empty if the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// One metadata value, or nothing.
  std::optional<std::string> metadata(const std::string& key) const {
    const auto it = metadata_.find(key);
    if (it == metadata_.end()) return std::nullopt;
    return it->second;
  }

  /// The raw little-endian bytes of one tensor.
  std::span<const std::byte> raw(std::string_view name) const {
    const TensorInfo& t = info(name);
    return {bytes_.data() + data_start_ + t.begin, static_cast<std::size_t>(t.end - t.begin)};
  }

  /// Reads one tensor (rank ≤ 4) as T: F16, BF16, F32 and F64 convert to float or double;
  /// integer dtypes to integer T (range-checked) or to float/double.
  template <class T>
  Tensor<T, Cpu> read(std::string_view name) const {
    const TensorInfo& t = info(name);
    Shape shape;
    try {
      shape = detail::make_shape(t.shape);
    } catch (const Error& e) {
      throw Error(where(t) + ": " + e.what());
    }
    Tensor<T, Cpu> out(shape);
    detail::decode_elements(t.dtype, bytes_.data() + data_start_ + t.begin, t.numel(), out.data(),
                            where(t));
    return out;
  }

  /// Reads one tensor into `dst`, whose shape must equal the tensor's (conversions as read()).
  template <class T>
  void read_into(std::string_view name, const TensorView<T, Cpu>& dst) const {
    const TensorInfo& t = info(name);
    if (!detail::same_shape(t.shape, dst.shape()))
      throw Error(where(t) + ": shape " + t.shape_str() + " does not match the destination " +
                  dst.shape().str());
    detail::decode_elements(t.dtype, bytes_.data() + data_start_ + t.begin, t.numel(), dst.data(),
                            where(t));
  }

 private:
  std::string where(const TensorInfo& t) const {
    return "safetensors file '" + path_ + "', tensor '" + t.name + "'";
  }

  template <class... Args>
  [[noreturn]] void fail(const Args&... args) const {
    throw Error(detail::str("safetensors file '", path_, "': ", args...));
  }

  // Reads a non-negative JSON integer of the header.
  std::uint64_t header_uint(const nlohmann::json& v, const std::string& tensor,
                            const char* what) const {
    if (!v.is_number_unsigned())
      fail("tensor '", tensor, "': ", what, " holds ", v.dump(),
           ", not a non-negative integer");
    return v.get<std::uint64_t>();
  }

  void parse() {
    const std::uint64_t file_size = bytes_.size();
    if (file_size < 8)
      fail("the file is ", file_size, " bytes long, too short for the 8-byte header length");
    const auto n = detail::load_le<std::uint64_t>(bytes_.data());
    if (n > file_size - 8)
      fail("header length ", n, " exceeds the ", file_size - 8,
           " bytes that follow it (truncated or not a safetensors file)");
    if (n > kMaxHeaderBytes) fail("header length ", n, " exceeds the limit of ", kMaxHeaderBytes);
    if (n < 2 || static_cast<char>(bytes_[8]) != '{')
      fail("the header does not start with '{' (not a safetensors file)");
    // The JSON parser would stop at a NUL byte and ignore the rest of the header.
    if (const void* nul = std::memchr(bytes_.data() + 8, 0, n))
      fail("the header is not valid JSON: a NUL byte at header offset ",
           static_cast<const std::byte*>(nul) - (bytes_.data() + 8));
    data_start_ = 8 + n;
    const std::uint64_t data_size = file_size - data_start_;

    // Duplicate names would silently replace each other in the parsed object: catch them.
    std::set<std::string> seen;
    std::string duplicate;
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(
          reinterpret_cast<const char*>(bytes_.data() + 8),
          reinterpret_cast<const char*>(bytes_.data() + 8 + n),
          [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
            if (depth == 1 && event == nlohmann::json::parse_event_t::key && duplicate.empty() &&
                !seen.insert(parsed.get<std::string>()).second)
              duplicate = parsed.get<std::string>();
            return true;
          });
    } catch (const nlohmann::json::exception& e) {
      fail("the header is not valid JSON: ", e.what());
    }
    if (!header.is_object()) fail("the header is not a JSON object");
    if (!duplicate.empty()) fail("the header names '", duplicate, "' twice");

    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& key = it.key();
      const nlohmann::json& v = it.value();
      if (key == "__metadata__") {
        if (!v.is_object()) fail("__metadata__ is not an object of strings");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string())
            fail("__metadata__ value of '", m.key(), "' is ", m.value().dump(), ", not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      if (!v.is_object()) fail("tensor '", key, "': its entry is not an object");
      TensorInfo t;
      t.name = key;
      const auto dt = v.find("dtype");
      if (dt == v.end() || !dt->is_string()) fail("tensor '", key, "': no dtype string");
      const auto parsed_dtype = parse_safetensors_dtype(dt->get<std::string>());
      if (!parsed_dtype) fail("tensor '", key, "': unsupported dtype '", dt->get<std::string>(), "'");
      t.dtype = *parsed_dtype;

      const auto sh = v.find("shape");
      if (sh == v.end() || !sh->is_array()) fail("tensor '", key, "': no shape array");
      std::uint64_t numel = 1;
      bool overflow = false;
      for (const nlohmann::json& d : *sh) {
        const std::uint64_t size = header_uint(d, key, "a shape entry");
        if (size > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          fail("tensor '", key, "': shape size ", size, " is too large");
        t.shape.push_back(static_cast<std::int64_t>(size));
        overflow = overflow || __builtin_mul_overflow(numel, size, &numel);
      }
      std::uint64_t nbytes = 0;
      overflow = overflow || __builtin_mul_overflow(numel, element_size(t.dtype), &nbytes) ||
                 numel > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
      if (overflow) fail("tensor '", key, "': shape ", t.shape_str(), " is too large");

      const auto off = v.find("data_offsets");
      if (off == v.end() || !off->is_array() || off->size() != 2)
        fail("tensor '", key, "': data_offsets is not a [begin, end] pair");
      t.begin = header_uint((*off)[0], key, "data_offsets");
      t.end = header_uint((*off)[1], key, "data_offsets");
      if (t.end < t.begin)
        fail("tensor '", key, "': data_offsets [", t.begin, ", ", t.end, "] end before they begin");
      if (t.end > data_size)
        fail("tensor '", key, "': data_offsets [", t.begin, ", ", t.end,
             "] lie outside the data section of ", data_size, " bytes");
      if (t.end - t.begin != nbytes)
        fail("tensor '", key, "': shape ", t.shape_str(), " of dtype ", to_string(t.dtype),
             " needs ", nbytes, " bytes but data_offsets [", t.begin, ", ", t.end, "] hold ",
             t.end - t.begin);
      tensors_.push_back(std::move(t));
    }

    // The tensors must tile the data section: sorted by offsets, each starts where the last ended.
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return std::pair(a.begin, a.end) < std::pair(b.begin, b.end);
    });
    std::uint64_t pos = 0;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const TensorInfo& t = tensors_[i];
      if (t.begin < pos)
        fail("tensor '", t.name, "': data_offsets [", t.begin, ", ", t.end, "] overlap tensor '",
             tensors_[i - 1].name, "' [", tensors_[i - 1].begin, ", ", tensors_[i - 1].end, "]");
      if (t.begin > pos)
        fail("tensor '", t.name, "': data_offsets [", t.begin, ", ", t.end, "] leave ",
             t.begin - pos, " unused bytes before it");
      pos = t.end;
    }
    if (pos != data_size)
      fail("the data section is ", data_size, " bytes but its tensors cover ", pos,
           " (truncated file or trailing bytes)");
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  std::string path_;
  std::vector<std::byte> bytes_;
  std::uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Collects named tensors and metadata, then writes them as one safetensors file. Data is
/// converted and copied when added, so the source tensors may change or die afterwards.
class SafetensorsWriter {
 public:
  /// Adds `t` under `name`, stored as `as` (default: T's own dtype, e.g. float → F32, double →
  /// F64). Floating data may be stored as F16, BF16, F32 or F64 (rounding to nearest even);
  /// integer data as any dtype (range-checked). Throws moca::Error for a repeated or reserved
  /// name, a name that is not UTF-8, or a value that does not fit.
  template <class T>
  void add(const std::string& name, const TensorView<T, Cpu>& t,
           std::optional<SafetensorsDtype> as = std::nullopt) {
    const SafetensorsDtype dt = as.value_or(safetensors_dtype_of<T>());
    check_name(name);
    Entry e{name, dt, detail::shape_sizes(t.shape()), {}};
    e.bytes.resize(static_cast<std::size_t>(t.numel()) * element_size(dt));
    detail::encode_elements(t.data(), t.numel(), dt, e.bytes.data(),
                            "safetensors writer, tensor '" + name + "'");
    entries_.push_back(std::move(e));
  }

  /// Adds already-encoded little-endian bytes (e.g. a tensor copied from another file, of any
  /// rank). The byte count must match the shape and dtype.
  void add_raw(const std::string& name, SafetensorsDtype dtype, std::vector<std::int64_t> shape,
               std::span<const std::byte> data) {
    check_name(name);
    std::int64_t numel = 1;
    for (std::int64_t d : shape) {
      MOCA_CHECK(d >= 0, "safetensors writer, tensor '", name, "': negative size in shape ",
                 detail::shape_str(shape));
      numel *= d;
    }
    MOCA_CHECK(static_cast<std::size_t>(numel) * element_size(dtype) == data.size(),
               "safetensors writer, tensor '", name, "': shape ", detail::shape_str(shape),
               " of dtype ", to_string(dtype), " needs ",
               static_cast<std::size_t>(numel) * element_size(dtype), " bytes, got ",
               data.size());
    entries_.push_back({name, dtype, std::move(shape), {data.begin(), data.end()}});
  }

  /// Sets one "__metadata__" entry (string to string); a key set twice keeps the last value.
  void set_metadata(const std::string& key, const std::string& value) {
    check_utf8(key, "metadata key");
    check_utf8(value, "metadata value of '" + key + "'");
    metadata_[key] = value;
  }
  /// Sets several metadata entries.
  void set_metadata(const std::map<std::string, std::string>& entries) {
    for (const auto& [k, v] : entries) set_metadata(k, v);
  }
  /// The metadata set so far.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// True if a tensor called `name` was added.
  bool contains(std::string_view name) const {
    return std::any_of(entries_.begin(), entries_.end(),
                       [&](const Entry& e) { return e.name == name; });
  }
  /// Number of tensors added.
  std::size_t size() const { return entries_.size(); }

  /// The 8-byte length and the padded JSON header of the file, in the reference layout.
  std::string header() const {
    const std::vector<std::size_t> order = data_order();
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      nlohmann::ordered_json m = nlohmann::ordered_json::object();
      for (const auto& [k, v] : metadata_) m[k] = v;
      h["__metadata__"] = std::move(m);
    }
    std::uint64_t offset = 0;
    for (std::size_t i : order) {
      const Entry& e = entries_[i];
      nlohmann::ordered_json info = nlohmann::ordered_json::object();
      info["dtype"] = to_string(e.dtype);
      info["shape"] = e.shape;
      info["data_offsets"] = {offset, offset + e.bytes.size()};
      offset += e.bytes.size();
      h[e.name] = std::move(info);
    }
    std::string json = h.dump();
    json.append((8 - json.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
    std::string out(8, '\0');
    detail::store_le(reinterpret_cast<std::byte*>(out.data()),
                     static_cast<std::uint64_t>(json.size()));
    return out + json;
  }

  /// The whole file as bytes.
  std::vector<std::byte> serialize() const {
    const std::string h = header();
    std::vector<std::byte> out(reinterpret_cast<const std::byte*>(h.data()),
                               reinterpret_cast<const std::byte*>(h.data()) + h.size());
    for (std::size_t i : data_order())
      out.insert(out.end(), entries_[i].bytes.begin(), entries_[i].bytes.end());
    return out;
  }

  /// Writes the file atomically: into `path + ".tmp"`, flushed to disk, then renamed over
  /// `path`. On failure the temporary is removed and a file already at `path` is left as it was.
  void write(const std::filesystem::path& path) const {
    const std::string h = header();
    AtomicFileWriter out(path);
    out.write(h.data(), h.size());
    for (std::size_t i : data_order()) out.write(entries_[i].bytes.data(), entries_[i].bytes.size());
    out.commit();
  }

 private:
  struct Entry {
    std::string name;
    SafetensorsDtype dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> bytes;
  };

  static void check_utf8(const std::string& s, const std::string& what) {
    try {
      (void)nlohmann::json(s).dump();
    } catch (const nlohmann::json::exception&) {
      throw Error("safetensors writer: " + what + " is not valid UTF-8");
    }
  }
  void check_name(const std::string& name) const {
    MOCA_CHECK(name != "__metadata__", "safetensors writer: '__metadata__' is reserved");
    MOCA_CHECK(!contains(name), "safetensors writer: tensor '", name, "' added twice");
    check_utf8(name, "tensor name '" + name + "'");
  }
  // The reference order: larger element types first (so every tensor starts aligned to its
  // element size), then by name.
  std::vector<std::size_t> data_order() const {
    std::vector<std::size_t> order(entries_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      const Entry &x = entries_[a], &y = entries_[b];
      if (x.dtype != y.dtype) return x.dtype > y.dtype;
      return x.name < y.name;
    });
    return order;
  }

  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moca
