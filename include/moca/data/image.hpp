// 8-bit images and their decoding from JPEG, PNG and BMP files (grey or colour) with stb_image.
//
//   moca::data::Image img = moca::data::load_image("n01440764/cat.jpg");  // H×W×C, C = 1 or 3
//
// stb_image is a single-file library: <stb/stb_image.h> gives its declarations, and its
// implementation has to be compiled exactly once in a program. This header includes only the
// declarations. A program that decodes images includes <moca/data/stb_image_impl.hpp> in exactly
// one of its .cpp files (forgetting it gives a link error that names that header). A program
// that already links a compiled stb_image (Debian's libstb, or its own) defines
// MOCA_STB_IMAGE_EXTERNAL for all its sources instead.
//
// Why not give every translation unit its own static copy of stb_image (STB_IMAGE_STATIC): the
// inline functions of this header have external linkage and one definition program-wide, and
// each translation unit's copy of them would call a different internal-linkage stb function,
// which the one-definition rule forbids (undiagnosed, and it silently picks one copy). One
// extern implementation keeps the program well-formed and compiles the decoder once.
//
// Files are read whole and decoded from memory. Before stb sees the bytes, the container is
// checked for truncation (a JPEG without its end-of-image marker, a PNG whose chunks run past the
// end of the file, an uncompressed BMP shorter than its pixel array), because stb pads missing
// data with zeros and would return a partly black image without complaint. JPEG Huffman tables
// of more than 256 symbols are refused as well: the stb_image of Debian 12 (2.27) writes past its
// tables on them. Every error names the file.
#pragma once

#include <stb/stb_image.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "moca/core/check.hpp"

namespace moca::data {

/// An 8-bit image: height × width × channels, row-major, channels interleaved (HWC), with
/// 1 (grey) or 3 (RGB) channels.
struct Image {
  int height = 0;
  int width = 0;
  int channels = 0;
  std::vector<std::uint8_t> pixels;  ///< height · width · channels values

  Image() = default;
  /// A zero-filled image.
  Image(int h, int w, int c) : height(h), width(w), channels(c) {
    MOCA_CHECK(h >= 0 && w >= 0 && (c == 1 || c == 3), "Image: invalid size ", h, "×", w, "×", c);
    pixels.assign(static_cast<std::size_t>(h) * static_cast<std::size_t>(w) * c, 0);
  }

  /// Resizes to h × w × c without initialising the values; reuses the storage when it fits.
  void reshape(int h, int w, int c) {
    height = h;
    width = w;
    channels = c;
    pixels.resize(static_cast<std::size_t>(h) * static_cast<std::size_t>(w) * c);
  }

  bool empty() const { return pixels.empty(); }
  std::size_t size() const { return pixels.size(); }
  std::uint8_t* data() { return pixels.data(); }
  const std::uint8_t* data() const { return pixels.data(); }
  std::uint8_t& at(int y, int x, int c) {
    return pixels[(static_cast<std::size_t>(y) * width + x) * channels + c];
  }
  std::uint8_t at(int y, int x, int c) const {
    return pixels[(static_cast<std::size_t>(y) * width + x) * channels + c];
  }
  friend bool operator==(const Image&, const Image&) = default;
};

namespace detail {

#ifndef MOCA_STB_IMAGE_EXTERNAL
// Defined by <moca/data/stb_image_impl.hpp>; its name is the link error's explanation.
void stb_image_missing_include_moca_data_stb_image_impl_hpp_in_one_source_file();
#endif

/// stb's reason for its last failure on this thread.
inline const char* stb_reason() {
  const char* why = stbi_failure_reason();
  return why != nullptr ? why : "unknown decoder error";
}

inline std::uint32_t read_be32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
         std::uint32_t{p[3]};
}
inline std::uint32_t read_le32(const std::uint8_t* p) {
  return std::uint32_t{p[0]} | (std::uint32_t{p[1]} << 8) | (std::uint32_t{p[2]} << 16) |
         (std::uint32_t{p[3]} << 24);
}
inline std::uint16_t read_le16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}

enum class ImageFormat { Unknown, Jpeg, Png, Bmp };

inline ImageFormat sniff_format(std::span<const std::uint8_t> b) {
  static constexpr std::uint8_t kPng[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
  if (b.size() >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF) return ImageFormat::Jpeg;
  if (b.size() >= 8 && std::memcmp(b.data(), kPng, 8) == 0) return ImageFormat::Png;
  if (b.size() >= 2 && b[0] == 'B' && b[1] == 'M') return ImageFormat::Bmp;
  return ImageFormat::Unknown;
}

// Reads a JPEG the way stb_image's parser does (a byte past the end reads as 0; a marker is FF
// followed by any number of FF fill bytes), to find what the decoder will see.
class JpegWalk {
 public:
  explicit JpegWalk(std::span<const std::uint8_t> b) : b_(b) {}

  std::string problem() {
    if (marker() != 0xD8) return {};  // not a JPEG after all: the decoder says so
    // Header: marker segments up to the frame header; garbage between segments is skipped.
    int m = marker();
    while (m != 0xC0 && m != 0xC1 && m != 0xC2) {
      const Step step = segment(m);
      if (step != Step::Ok) return verdict(step);
      m = marker();
      while (m == kNone) {
        if (pos_ >= b_.size()) return truncated("before the frame header");
        m = marker();
      }
    }
    const std::size_t lf = get16();
    skip(5);  // precision, height, width
    const auto c = static_cast<std::size_t>(get8());
    if (lf != 8 + 3 * c) return {};  // the decoder rejects the frame header
    skip(3 * c);
    if (pos_ > b_.size()) return truncated("inside the frame header");
    // Segments up to the first scan, without skipping garbage.
    for (m = marker(); m != 0xDA; m = marker()) {
      if (m == 0xD9) return "no image data before the end-of-image marker";
      const Step step = m == 0xDC ? (skip(4), Step::Ok) : segment(m);
      if (step != Step::Ok) return verdict(step);
    }
    const std::size_t ls = get16();
    if (ls < 2) return {};  // the decoder rejects the scan header
    skip(ls - 2);
    if (pos_ > b_.size()) return truncated("inside the scan header");
    // From the first scan on, the decoder finds markers by decoding, which cannot be followed
    // here: check every FF C4 (a Huffman table marker, never valid inside coded data) and look
    // for the end-of-image marker.
    bool eoi = false;
    for (std::size_t i = pos_; i + 1 < b_.size(); ++i) {
      if (b_[i] != 0xFF) continue;
      if (b_[i + 1] == 0xD9) eoi = true;
      if (b_[i + 1] == 0xC4) {
        pos_ = i + 2;
        if (segment(0xC4) == Step::Unsafe) return verdict(Step::Unsafe);
      }
    }
    if (!eoi) return "truncated JPEG: no end-of-image marker after the image data";
    return {};
  }

 private:
  enum class Step { Ok, Fails, Unsafe };
  static constexpr int kNone = 0xFF;  // stb's STBI__MARKER_none

  std::string verdict(Step step) const {
    if (step == Step::Unsafe)
      return ::moca::detail::str("corrupt JPEG: a Huffman table declares ", symbols_,
                                 " symbols (at most 256)");
    if (pos_ > b_.size()) return truncated("inside a marker segment");
    return {};  // the decoder rejects the file and says why
  }
  std::string truncated(const char* where) const {
    return ::moca::detail::str("truncated JPEG: the file (", b_.size(), " bytes) ends ", where);
  }

  int get8() {
    const int v = pos_ < b_.size() ? b_[pos_] : 0;
    ++pos_;
    return v;
  }
  std::size_t get16() {
    const int hi = get8();
    return static_cast<std::size_t>((hi << 8) | get8());
  }
  void skip(std::size_t n) { pos_ += n; }
  int marker() {
    int x = get8();
    if (x != 0xFF) return kNone;
    while (x == 0xFF) x = get8();  // ends: past the end get8() gives 0
    return x;
  }

  // One marker segment as stbi__process_marker reads it. Unsafe: a Huffman table of more than
  // 256 symbols, which overruns the decoder's tables in the stb_image versions Debian ships.
  Step segment(int m) {
    if (m == 0xDD) {
      if (get16() != 4) return Step::Fails;
      skip(2);
      return Step::Ok;
    }
    if (m == 0xDB || m == 0xC4) {
      long left = static_cast<long>(get16()) - 2;
      while (left > 0) {
        if (pos_ > b_.size()) return Step::Fails;
        const int q = get8();
        if (m == 0xDB) {
          if ((q >> 4) > 1 || (q & 15) > 3) return Step::Fails;
          skip((q >> 4) ? 128 : 64);
          left -= (q >> 4) ? 129 : 65;
        } else {
          if ((q >> 4) > 1 || (q & 15) > 3) return Step::Fails;
          std::size_t n = 0;
          for (int i = 0; i < 16; ++i) n += static_cast<std::size_t>(get8());
          if (n > 256) {
            symbols_ = n;
            return Step::Unsafe;
          }
          skip(n);
          left -= 17 + static_cast<long>(n);
        }
      }
      return left == 0 ? Step::Ok : Step::Fails;
    }
    if ((m >= 0xE0 && m <= 0xEF) || m == 0xFE) {
      const std::size_t len = get16();
      if (len < 2) return Step::Fails;
      skip(len - 2);
      return Step::Ok;
    }
    return Step::Fails;
  }

  std::span<const std::uint8_t> b_;
  std::size_t pos_ = 0;
  std::size_t symbols_ = 0;
};

inline std::string jpeg_problem(std::span<const std::uint8_t> b) { return JpegWalk(b).problem(); }

/// Empty when the container looks complete, else why it does not.
inline std::string truncation_problem(std::span<const std::uint8_t> b, ImageFormat format) {
  const std::size_t n = b.size();
  switch (format) {
    case ImageFormat::Jpeg:
      return jpeg_problem(b);
    case ImageFormat::Png: {
      std::size_t pos = 8;
      while (true) {
        if (pos + 8 > n)
          return ::moca::detail::str("truncated PNG: the file ends inside a chunk header at byte ",
                                     pos, " (", n, " bytes, no IEND chunk)");
        const std::size_t len = read_be32(&b[pos]);
        const bool iend = std::memcmp(&b[pos + 4], "IEND", 4) == 0;
        const std::size_t end = pos + 12 + len;
        if (end > n)
          return ::moca::detail::str("truncated PNG: a chunk needs bytes up to ", end,
                                     ", the file has ", n);
        if (iend) return {};
        pos = end;
      }
    }
    case ImageFormat::Bmp: {
      if (n < 26)
        return ::moca::detail::str("truncated BMP: ", n, " bytes, shorter than its header");
      const std::uint32_t offset = read_le32(&b[10]);
      const std::uint32_t dib = read_le32(&b[14]);
      std::int64_t w = 0, h = 0, bpp = 0, compression = 0;
      if (dib == 12) {
        w = read_le16(&b[18]);
        h = read_le16(&b[20]);
        bpp = read_le16(&b[24]);
      } else if (dib >= 40 && n >= 34) {
        w = static_cast<std::int32_t>(read_le32(&b[18]));
        h = static_cast<std::int32_t>(read_le32(&b[22]));
        bpp = read_le16(&b[28]);
        compression = read_le32(&b[30]);
      } else {
        return {};  // unusual header: let the decoder judge
      }
      if (h < 0) h = -h;
      // Only uncompressed layouts (BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS) have a known size.
      if ((compression != 0 && compression != 3 && compression != 6) || w <= 0 || bpp <= 0 ||
          w > (1 << 24) || h > (1 << 24))
        return {};
      const std::int64_t stride = (w * bpp + 31) / 32 * 4;
      const std::int64_t need = static_cast<std::int64_t>(offset) + stride * h;
      if (static_cast<std::int64_t>(n) < need)
        return ::moca::detail::str("truncated BMP: its pixel array needs ", need,
                                   " bytes, the file has ", n);
      return {};
    }
    default:
      return {};
  }
}

}  // namespace detail

/// Reads a whole file; the error names the file and the system's reason.
inline std::vector<std::uint8_t> read_file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  MOCA_CHECK(in.is_open(), "cannot open ", path.string(), ": ", std::strerror(errno));
  const std::streamoff size = in.tellg();
  MOCA_CHECK(size >= 0, "cannot read ", path.string(), ": cannot determine its size");
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(bytes.data()), size);
  MOCA_CHECK(in.gcount() == size, "cannot read ", path.string(), ": read ", in.gcount(), " of ",
             size, " bytes");
  return bytes;
}

/// Decodes a JPEG, PNG or BMP image held in memory. `channels` 0 keeps the file's colour type
/// (grey and grey+alpha give 1 channel, colour and colour+alpha 3; alpha is dropped), 1 or 3
/// converts (stb's conversion). `name` (usually the file) appears in every error message.
/// Safe to call from several threads at once.
inline Image decode_image(std::span<const std::uint8_t> bytes, const std::string& name,
                          int channels = 0) {
#ifndef MOCA_STB_IMAGE_EXTERNAL
  detail::stb_image_missing_include_moca_data_stb_image_impl_hpp_in_one_source_file();
#endif
  MOCA_CHECK(channels == 0 || channels == 1 || channels == 3,
             "decode_image: channels must be 0, 1 or 3, got ", channels);
  MOCA_CHECK(!bytes.empty(), "cannot decode image ", name, ": the file is empty");
  MOCA_CHECK(bytes.size() <= static_cast<std::size_t>(INT_MAX), "cannot decode image ", name, ": ",
             bytes.size(), " bytes is more than the decoder accepts");
  const detail::ImageFormat format = detail::sniff_format(bytes);
  MOCA_CHECK(format != detail::ImageFormat::Unknown, "cannot decode image ", name,
             ": not a JPEG, PNG or BMP file (unrecognised signature)");
  const std::string problem = detail::truncation_problem(bytes, format);
  MOCA_CHECK(problem.empty(), "cannot decode image ", name, ": ", problem);

  const int len = static_cast<int>(bytes.size());
  int w = 0, h = 0, comp = 0;
  MOCA_CHECK(stbi_info_from_memory(bytes.data(), len, &w, &h, &comp), "cannot decode image ", name,
             ": ", detail::stb_reason());
  const int want = channels != 0 ? channels : (comp <= 2 ? 1 : 3);
  int got_w = 0, got_h = 0, in_file = 0;
  stbi_uc* pixels = stbi_load_from_memory(bytes.data(), len, &got_w, &got_h, &in_file, want);
  MOCA_CHECK(pixels != nullptr, "cannot decode image ", name, ": ", detail::stb_reason());
  Image img;
  img.height = got_h;
  img.width = got_w;
  img.channels = want;
  img.pixels.assign(pixels, pixels + static_cast<std::size_t>(got_w) * got_h * want);
  stbi_image_free(pixels);
  return img;
}

/// Reads and decodes an image file (see decode_image).
inline Image load_image(const std::filesystem::path& path, int channels = 0) {
  const std::vector<std::uint8_t> bytes = read_file_bytes(path);
  return decode_image(bytes, path.string(), channels);
}

}  // namespace moca::data
