// IDX files (plain and gzip), their validation on malformed input, and Fashion-MNIST: small files
// written by the test into a temporary folder, and the real data set when it is installed.
#include <doctest/doctest.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <moca/data/idx.hpp>
#include <string>
#include <vector>

#include "temp_files.hpp"

using namespace moca;
using namespace moca::data;
namespace fs = std::filesystem;

namespace {

using testing::contains;
using testing::error_of;
using testing::TempDir;

std::vector<std::uint8_t> idx_bytes(std::uint32_t magic, const std::vector<std::uint32_t>& dims,
                                    const std::vector<std::uint8_t>& data) {
  std::vector<std::uint8_t> out;
  auto be32 = [&](std::uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<std::uint8_t>(v >> s));
  };
  be32(magic);
  for (auto d : dims) be32(d);
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

void write_plain(const fs::path& p, const std::vector<std::uint8_t>& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void write_gz(const fs::path& p, const std::vector<std::uint8_t>& bytes) {
  gzFile f = gzopen(p.string().c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!bytes.empty()) REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) > 0);
  REQUIRE(gzclose(f) == Z_OK);
}

std::vector<std::uint8_t> read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::vector<std::uint8_t> ramp(std::size_t n) {
  std::vector<std::uint8_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint8_t>(i * 7 + 3);
  return v;
}

}  // namespace

TEST_CASE("IDX: images and labels, plain and gzip-compressed") {
  TempDir dir("idx_ok");
  const auto pixels = ramp(3 * 4 * 5);
  const std::vector<std::uint8_t> labels = {4, 0, 9};
  for (bool gz : {false, true}) {
    CAPTURE(gz);
    const fs::path ip = dir.path / (gz ? "img.gz" : "img"), lp = dir.path / (gz ? "lab.gz" : "lab");
    (gz ? write_gz : write_plain)(ip, idx_bytes(kIdxImagesMagic, {3, 4, 5}, pixels));
    (gz ? write_gz : write_plain)(lp, idx_bytes(kIdxLabelsMagic, {3}, labels));
    const IdxImages img = read_idx_images(ip);
    CHECK(img.count == 3);
    CHECK(img.rows == 4);
    CHECK(img.cols == 5);
    CHECK(img.pixels == pixels);
    CHECK(read_idx_labels(lp) == labels);
    const IdxArray any = read_idx(ip);
    CHECK(any.magic == kIdxImagesMagic);
    CHECK(any.dims == std::vector<std::int64_t>{3, 4, 5});
  }
  // Zero images is a valid (empty) file.
  write_plain(dir.path / "empty_set", idx_bytes(kIdxImagesMagic, {0, 28, 28}, {}));
  CHECK(read_idx_images(dir.path / "empty_set").count == 0);
}

TEST_CASE("IDX: malformed files fail with a message naming the file") {
  TempDir dir("idx_bad");
  const auto pixels = ramp(2 * 3 * 3);
  auto path = [&](const char* name) { return dir.path / name; };

  SUBCASE("missing file and directory") {
    const std::string e = error_of([&] { read_idx_images(path("nope.gz")); });
    CHECK(contains(e, (dir.path / "nope.gz").string()));
    CHECK(contains(e, "does not exist"));
    CHECK(contains(error_of([&] { read_idx_images(dir.path); }), "is a directory"));
  }
  SUBCASE("wrong magic: labels read as images and the reverse") {
    for (bool gz : {false, true}) {
      const fs::path p = path(gz ? "labels.gz" : "labels");
      (gz ? write_gz : write_plain)(p, idx_bytes(kIdxLabelsMagic, {2}, {1, 2}));
      const std::string e = error_of([&] { read_idx_images(p); });
      CHECK(contains(e, p.string()));
      CHECK(contains(e, "0x00000801"));
      CHECK(contains(e, "expected 0x00000803"));
    }
    write_plain(path("images"), idx_bytes(kIdxImagesMagic, {2, 3, 3}, pixels));
    const std::string e = error_of([&] { read_idx_labels(path("images")); });
    CHECK(contains(e, "expected 0x00000801"));
  }
  SUBCASE("not an IDX file, another element type, absurd rank") {
    write_plain(path("text"), {'h', 'e', 'l', 'l', 'o', '!', '!', '!'});
    CHECK(contains(error_of([&] { read_idx(path("text")); }), "not an IDX file"));
    write_plain(path("floats"), idx_bytes(0x00000D01, {1}, {0, 0, 0, 0}));
    CHECK(contains(error_of([&] { read_idx(path("floats")); }), "only unsigned bytes"));
    write_plain(path("rank0"), idx_bytes(0x00000800, {}, {}));
    CHECK(contains(error_of([&] { read_idx(path("rank0")); }), "declares 0 dimensions"));
  }
  SUBCASE("truncated data: expected and found byte counts, plain and gzip") {
    auto bytes = idx_bytes(kIdxImagesMagic, {2, 3, 3}, pixels);
    bytes.resize(bytes.size() - 5);
    for (bool gz : {false, true}) {
      const fs::path p = path(gz ? "short.gz" : "short");
      (gz ? write_gz : write_plain)(p, bytes);
      const std::string e = error_of([&] { read_idx_images(p); });
      CHECK(contains(e, p.string()));
      CHECK(contains(e, "truncated"));
      CHECK(contains(e, "announces 18 bytes of data, found 13"));
    }
  }
  SUBCASE("truncated header and empty files") {
    write_plain(path("two_bytes"), {0, 0});
    CHECK(contains(error_of([&] { read_idx_images(path("two_bytes")); }),
                   "expected a 4-byte header, found 2 bytes"));
    write_plain(path("empty"), {});
    CHECK(contains(error_of([&] { read_idx_images(path("empty")); }), "found 0 bytes"));
    write_gz(path("empty.gz"), {});
    CHECK(contains(error_of([&] { read_idx_images(path("empty.gz")); }), "found 0 bytes"));
    auto bytes = idx_bytes(kIdxImagesMagic, {2, 3, 3}, {});
    bytes.resize(10);  // cut inside the dimensions
    write_plain(path("cut_dims"), bytes);
    CHECK(contains(error_of([&] { read_idx_images(path("cut_dims")); }),
                   "expected 16 header bytes, found 10"));
  }
  SUBCASE("extra bytes after the data") {
    auto bytes = idx_bytes(kIdxImagesMagic, {2, 3, 3}, pixels);
    bytes.push_back(1);
    bytes.push_back(2);
    write_gz(path("long.gz"), bytes);
    const std::string e = error_of([&] { read_idx_images(path("long.gz")); });
    CHECK(contains(e, "wrong size"));
    CHECK(contains(e, "announces 18 bytes of data, found 20"));
  }
  SUBCASE("a cut or corrupted .gz stream") {
    write_gz(path("full.gz"), idx_bytes(kIdxImagesMagic, {50, 20, 20}, ramp(50 * 20 * 20)));
    const auto gz = read_all(path("full.gz"));
    REQUIRE(gz.size() > 40);
    // Cut in the middle of the compressed data.
    write_plain(path("cut.gz"),
                std::vector<std::uint8_t>(gz.begin(),
                                          gz.begin() + static_cast<std::ptrdiff_t>(gz.size() / 2)));
    std::string e = error_of([&] { read_idx_images(path("cut.gz")); });
    CHECK(contains(e, (dir.path / "cut.gz").string()));
    CHECK(contains(e, "truncated"));
    // Cut inside the 8-byte trailer: all data present, but the stream is incomplete.
    write_plain(path("no_trailer.gz"), std::vector<std::uint8_t>(gz.begin(), gz.end() - 3));
    e = error_of([&] { read_idx_images(path("no_trailer.gz")); });
    CHECK(contains(e, (dir.path / "no_trailer.gz").string()));
    // Corrupted compressed bytes: zlib's complaint, no crash.
    auto bad = gz;
    for (std::size_t i = 20; i < bad.size() - 10; i += 3) bad[i] ^= 0x5A;
    write_plain(path("corrupt.gz"), bad);
    e = error_of([&] { read_idx_images(path("corrupt.gz")); });
    CHECK(contains(e, (dir.path / "corrupt.gz").string()));
  }
  SUBCASE("zero-sized images") {
    write_plain(path("flat"), idx_bytes(kIdxImagesMagic, {2, 0, 3}, {}));
    CHECK(contains(error_of([&] { read_idx_images(path("flat")); }), "declares images of 0×3"));
  }
}

TEST_CASE("FashionMnist::load on a small folder of the same layout") {
  TempDir dir("fmnist");
  const int n = 5;
  const auto pixels = ramp(static_cast<std::size_t>(n) * 28 * 28);
  const std::vector<std::uint8_t> labels = {9, 0, 3, 3, 7};
  write_gz(dir.path / "train-images-idx3-ubyte.gz",
           idx_bytes(kIdxImagesMagic, {n, 28, 28}, pixels));
  write_gz(dir.path / "train-labels-idx1-ubyte.gz", idx_bytes(kIdxLabelsMagic, {n}, labels));
  // The test split uncompressed: the loader falls back to the names without .gz.
  write_plain(dir.path / "t10k-images-idx3-ubyte",
              idx_bytes(kIdxImagesMagic, {2, 28, 28}, ramp(2 * 784)));
  write_plain(dir.path / "t10k-labels-idx1-ubyte", idx_bytes(kIdxLabelsMagic, {2}, {1, 2}));

  CHECK(FashionMnist::available(Split::Train, dir.path));
  const ArrayDataset train = FashionMnist::load(Split::Train, dir.path);
  CHECK(train.size() == n);
  CHECK(train.num_classes() == 10);
  CHECK(train.height() == 28);
  CHECK(train.channels() == 1);
  const Sample s = train.get(3);
  CHECK(s.label == 3);
  CHECK(s.image.height == 28);
  CHECK(s.image.width == 28);
  CHECK(s.image.channels == 1);
  CHECK(s.image.at(0, 5, 0) == pixels[3 * 784 + 5]);
  CHECK(train.label(4) == 7);
  CHECK_THROWS_AS(train.get(5), Error);
  CHECK(FashionMnist::load(Split::Test, dir.path).size() == 2);

  SUBCASE("a label outside 0..9") {
    write_gz(dir.path / "train-labels-idx1-ubyte.gz",
             idx_bytes(kIdxLabelsMagic, {n}, {9, 0, 10, 3, 7}));
    CHECK(contains(error_of([&] { FashionMnist::load(Split::Train, dir.path); }),
                   "label 10 of sample 2"));
  }
  SUBCASE("images and labels disagree in count") {
    write_gz(dir.path / "train-labels-idx1-ubyte.gz",
             idx_bytes(kIdxLabelsMagic, {4}, {9, 0, 3, 3}));
    CHECK(contains(error_of([&] { FashionMnist::load(Split::Train, dir.path); }),
                   "holds 5 images but"));
  }
  SUBCASE("missing file and missing folder") {
    fs::remove(dir.path / "t10k-labels-idx1-ubyte");
    CHECK_FALSE(FashionMnist::available(Split::Test, dir.path));
    const std::string e = error_of([&] { FashionMnist::load(Split::Test, dir.path); });
    CHECK(contains(e, "t10k-labels-idx1-ubyte.gz is missing"));
    const std::string e2 = error_of([&] { FashionMnist::load(Split::Train, dir.path / "absent"); });
    CHECK(contains(e2, (dir.path / "absent").string()));
    CHECK(contains(e2, "dataset-fashion-mnist"));
  }
}

TEST_CASE("the installed Fashion-MNIST (Debian's dataset-fashion-mnist)") {
  if (!FashionMnist::available(Split::Train) || !FashionMnist::available(Split::Test)) {
    MESSAGE("skipped: Fashion-MNIST is not installed in ", FashionMnist::kDefaultDir);
    return;
  }
  const ArrayDataset train = FashionMnist::load(Split::Train);
  const ArrayDataset test = FashionMnist::load(Split::Test);
  CHECK(train.size() == 60000);
  CHECK(test.size() == 10000);
  CHECK(train.height() == 28);
  CHECK(train.width() == 28);
  std::vector<int> counts(10, 0);
  for (std::int32_t l : train.labels()) {
    REQUIRE(l >= 0);
    REQUIRE(l <= 9);
    ++counts[static_cast<std::size_t>(l)];
  }
  for (int c : counts) CHECK(c == 6000);  // balanced classes
  // The first labels of each split, and the pixel mean the `tiny` preset normalises with.
  CHECK(std::vector<std::int32_t>(train.labels().begin(), train.labels().begin() + 5) ==
        std::vector<std::int32_t>{9, 0, 0, 3, 0});
  CHECK(std::vector<std::int32_t>(test.labels().begin(), test.labels().begin() + 5) ==
        std::vector<std::int32_t>{9, 2, 1, 1, 6});
  double sum = 0;
  for (std::uint8_t v : train.pixels()) sum += v;
  CHECK(sum / static_cast<double>(train.pixels().size()) / 255.0 ==
        doctest::Approx(0.2860).epsilon(1e-3));
}
