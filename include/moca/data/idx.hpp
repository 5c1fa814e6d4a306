// The IDX format of MNIST and Fashion-MNIST, plain or gzip-compressed, and the Fashion-MNIST
// splits as data sets.
//
//   auto train = moca::data::FashionMnist::load(moca::data::Split::Train);  // 60000 × 28×28×1
//   auto images = moca::data::read_idx_images("t10k-images-idx3-ubyte.gz");
//
// An IDX file is a 4-byte magic (0, 0, element type, number of dimensions), one big-endian
// 32-bit size per dimension, then the elements. Only unsigned bytes (type 0x08) are read: images
// are 0x00000803 [N, rows, cols], labels 0x00000801 [N]. Files are read through zlib, which
// reads plain files unchanged, so both forms work. A wrong magic, an implausible size, a file
// shorter or longer than its header says, or a corrupt gzip stream raises moca::Error naming the
// file (and, for a size mismatch, the expected and found byte counts).
#pragma once

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/data/dataset.hpp"

namespace moca::data {

/// The magic number of an IDX file of unsigned bytes with 3 dimensions (images).
inline constexpr std::uint32_t kIdxImagesMagic = 0x00000803;
/// The magic number of an IDX file of unsigned bytes with 1 dimension (labels).
inline constexpr std::uint32_t kIdxLabelsMagic = 0x00000801;

/// The contents of an IDX file of unsigned bytes.
struct IdxArray {
  std::uint32_t magic = 0;
  std::vector<std::int64_t> dims;  ///< sizes, outermost first
  std::vector<std::uint8_t> data;  ///< the elements, row-major
};

namespace detail {

/// A zlib file handle closed on scope exit.
class GzFile {
 public:
  explicit GzFile(const std::filesystem::path& path) : name_(path.string()) {
    std::error_code ec;
    MOCA_CHECK(std::filesystem::exists(path, ec), "IDX file ", name_, " does not exist");
    MOCA_CHECK(!std::filesystem::is_directory(path, ec), "IDX file ", name_,
               " is a directory, not a file");
    errno = 0;
    file_ = gzopen(name_.c_str(), "rb");
    MOCA_CHECK(file_ != nullptr, "cannot open IDX file ", name_, ": ",
               errno ? std::strerror(errno) : "zlib could not allocate its state");
    gzbuffer(file_, 1 << 17);
  }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;
  ~GzFile() {
    if (file_ != nullptr) gzclose(file_);
  }

  /// Reads up to n bytes; returns how many were read (fewer only at the end of the data).
  std::size_t read(std::uint8_t* dst, std::size_t n) {
    std::size_t total = 0;
    while (total < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(n - total, 1u << 30));
      const int got = gzread(file_, dst + total, chunk);
      MOCA_CHECK(got >= 0, "cannot read IDX file ", name_, ": corrupt or unreadable data",
                 zlib_note());
      if (got == 0) break;
      total += static_cast<std::size_t>(got);
    }
    return total;
  }

  /// " (zlib: <message>)" when zlib has complained about the stream (e.g. a cut-off .gz
  /// file), else an empty string.
  std::string zlib_note() const {
    int code = Z_OK;
    const char* msg = gzerror(file_, &code);
    if (code == Z_OK || msg == nullptr || *msg == '\0') return {};
    return std::string(" (zlib: ") + msg + ")";
  }

  const std::string& name() const { return name_; }

 private:
  std::string name_;
  gzFile file_ = nullptr;
};

inline std::string hex_magic(std::uint32_t magic) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08X", magic);
  return buf;
}

}  // namespace detail

/// Reads an IDX file of unsigned bytes (plain or .gz). `expected_magic` 0 accepts any number
/// of dimensions; otherwise the magic must match exactly.
inline IdxArray read_idx(const std::filesystem::path& path, std::uint32_t expected_magic = 0) {
  detail::GzFile file(path);
  const std::string& name = file.name();
  std::array<std::uint8_t, 4> head{};
  const std::size_t got_head = file.read(head.data(), 4);
  MOCA_CHECK(got_head == 4, "IDX file ", name, " is truncated: expected a 4-byte header, found ",
             got_head, " bytes", file.zlib_note());
  IdxArray out;
  out.magic = detail::read_be32(head.data());
  if (expected_magic != 0) {
    MOCA_CHECK(out.magic == expected_magic, "IDX file ", name, " has magic ",
               detail::hex_magic(out.magic), ", expected ", detail::hex_magic(expected_magic),
               expected_magic == kIdxImagesMagic   ? " (unsigned-byte images [N, rows, cols])"
               : expected_magic == kIdxLabelsMagic ? " (unsigned-byte labels [N])"
                                                   : "");
  }
  MOCA_CHECK(head[0] == 0 && head[1] == 0, "IDX file ", name, " has magic ",
             detail::hex_magic(out.magic), ": not an IDX file (the first two bytes must be 0)");
  MOCA_CHECK(head[2] == 0x08, "IDX file ", name, " has element type 0x", std::hex, int{head[2]},
             std::dec, ": only unsigned bytes (0x08) are supported");
  const int rank = head[3];
  MOCA_CHECK(rank >= 1 && rank <= 8, "IDX file ", name, " declares ", rank,
             " dimensions; expected 1 to 8");

  std::vector<std::uint8_t> dims_raw(static_cast<std::size_t>(rank) * 4);
  const std::size_t got_dims = file.read(dims_raw.data(), dims_raw.size());
  MOCA_CHECK(got_dims == dims_raw.size(), "IDX file ", name, " is truncated: expected ",
             4 + dims_raw.size(), " header bytes, found ", 4 + got_dims, file.zlib_note());
  // The elements may not exceed 2^40 bytes: a larger size is a corrupt header, not data.
  constexpr std::int64_t kMaxBytes = std::int64_t{1} << 40;
  std::int64_t count = 1;
  for (int d = 0; d < rank; ++d) {
    const std::int64_t n = detail::read_be32(&dims_raw[static_cast<std::size_t>(d) * 4]);
    out.dims.push_back(n);
    MOCA_CHECK(n == 0 || count <= kMaxBytes / n, "IDX file ", name,
               " declares an implausible size (more than 2^40 elements)");
    count *= n;
  }

  // Grown chunk by chunk so that a corrupt header cannot make us allocate what is not there.
  constexpr std::size_t kChunk = std::size_t{64} << 20;
  const auto expected = static_cast<std::size_t>(count);
  std::size_t have = 0;
  while (have < expected) {
    const std::size_t want = std::min(kChunk, expected - have);
    out.data.resize(have + want);
    const std::size_t got = file.read(out.data.data() + have, want);
    have += got;
    if (got < want) break;
  }
  MOCA_CHECK(have == expected, "IDX file ", name, " is truncated: its header announces ", expected,
             " bytes of data, found ", have, file.zlib_note());
  std::uint8_t extra[4096];
  std::size_t trailing = 0;
  for (std::size_t got; (got = file.read(extra, sizeof extra)) > 0;) trailing += got;
  MOCA_CHECK(trailing == 0, "IDX file ", name, " has the wrong size: its header announces ",
             expected, " bytes of data, found ", expected + trailing);
  // A .gz file cut inside its trailer, or with a wrong checksum, ends with a zlib complaint.
  const std::string note = file.zlib_note();
  MOCA_CHECK(note.empty(), "IDX file ", name, " is damaged: the compressed stream is incomplete",
             note);
  return out;
}

/// Unsigned-byte images of an IDX file (magic 0x00000803).
struct IdxImages {
  std::int64_t count = 0;
  int rows = 0;
  int cols = 0;
  std::vector<std::uint8_t> pixels;  ///< count · rows · cols values, image after image
};

/// Reads an images file (magic 0x00000803, [N, rows, cols]), plain or .gz.
inline IdxImages read_idx_images(const std::filesystem::path& path) {
  IdxArray a = read_idx(path, kIdxImagesMagic);
  MOCA_CHECK(a.dims[1] > 0 && a.dims[2] > 0 && a.dims[1] <= (1 << 20) && a.dims[2] <= (1 << 20),
             "IDX file ", path.string(), " declares images of ", a.dims[1], "×", a.dims[2],
             " pixels");
  IdxImages out;
  out.count = a.dims[0];
  out.rows = static_cast<int>(a.dims[1]);
  out.cols = static_cast<int>(a.dims[2]);
  out.pixels = std::move(a.data);
  return out;
}

/// Reads a labels file (magic 0x00000801, [N]), plain or .gz.
inline std::vector<std::uint8_t> read_idx_labels(const std::filesystem::path& path) {
  return read_idx(path, kIdxLabelsMagic).data;
}

/// Which part of a data set.
enum class Split { Train, Test };

/// Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test images, 28×28 grey, ten
/// classes. Debian's dataset-fashion-mnist package installs it in kDefaultDir.
struct FashionMnist {
  /// Where Debian's dataset-fashion-mnist puts the files.
  static constexpr const char* kDefaultDir = "/usr/share/datasets/fashion-mnist";
  static constexpr int kClasses = 10;
  static constexpr int kSize = 28;
  /// The class names, by label.
  static constexpr std::array<const char*, 10> kClassNames = {
      "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
      "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

  /// The images and labels files of a split: the .gz names, or the same without .gz when only
  /// those exist.
  static std::array<std::filesystem::path, 2> files(Split split, const std::filesystem::path& dir) {
    const char* stem = split == Split::Train ? "train" : "t10k";
    std::array<std::filesystem::path, 2> out = {
        dir / (std::string(stem) + "-images-idx3-ubyte.gz"),
        dir / (std::string(stem) + "-labels-idx1-ubyte.gz")};
    for (auto& p : out) {
      std::error_code ec;
      if (!std::filesystem::exists(p, ec)) {
        std::filesystem::path plain = p;
        plain.replace_extension();
        if (std::filesystem::exists(plain, ec)) p = plain;
      }
    }
    return out;
  }

  /// Whether both files of the split are present in `dir`.
  static bool available(Split split, const std::filesystem::path& dir = kDefaultDir) {
    std::error_code ec;
    for (const auto& p : files(split, dir))
      if (!std::filesystem::is_regular_file(p, ec)) return false;
    return true;
  }

  /// Loads a split as a data set of 28×28×1 images with labels 0..9.
  static ArrayDataset load(Split split, const std::filesystem::path& dir = kDefaultDir) {
    std::error_code ec;
    MOCA_CHECK(std::filesystem::is_directory(dir, ec), "Fashion-MNIST directory ", dir.string(),
               " does not exist (install Debian's dataset-fashion-mnist package or give the "
               "directory holding train-images-idx3-ubyte.gz and the other files)");
    const auto [images_path, labels_path] = files(split, dir);
    for (const auto& p : {images_path, labels_path})
      MOCA_CHECK(std::filesystem::is_regular_file(p, ec), "Fashion-MNIST file ", p.string(),
                 " is missing (install Debian's dataset-fashion-mnist package or give the "
                 "directory that holds it)");
    IdxImages images = read_idx_images(images_path);
    const std::vector<std::uint8_t> raw_labels = read_idx_labels(labels_path);
    MOCA_CHECK(static_cast<std::int64_t>(raw_labels.size()) == images.count,
               "Fashion-MNIST: ", images_path.string(), " holds ", images.count, " images but ",
               labels_path.string(), " holds ", raw_labels.size(), " labels");
    MOCA_CHECK(images.rows == kSize && images.cols == kSize,
               "Fashion-MNIST: ", images_path.string(), " holds ", images.rows, "×", images.cols,
               " images, expected 28×28");
    std::vector<std::int32_t> labels(raw_labels.size());
    for (std::size_t i = 0; i < raw_labels.size(); ++i) {
      MOCA_CHECK(raw_labels[i] < kClasses, "Fashion-MNIST: label ", int{raw_labels[i]},
                 " of sample ", i, " in ", labels_path.string(), " is outside 0..9");
      labels[i] = raw_labels[i];
    }
    return ArrayDataset(std::move(images.pixels), images.count, images.rows, images.cols, 1,
                        std::move(labels), kClasses);
  }
};

}  // namespace moca::data
