// Image decoding (PNG, BMP, JPEG; grey and colour) and image folders, with small files written
// by stb_image_write into a temporary folder, and their malformed variants: truncated, corrupt,
// empty and missing files, empty and missing folders.
#include <doctest/doctest.h>
#include <unistd.h>

// This test program's one copy of the stb_image implementation (see moca/data/image.hpp).
#include <moca/data/stb_image_impl.hpp>

// The writer, private to this file.
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <moca/core/rng.hpp>
#include <moca/data/image.hpp>
#include <moca/data/image_folder.hpp>
#include <moca/data/loader.hpp>
#include <mutex>
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

// A smooth test picture (JPEG-friendly): value 40 + 3x + 5y + 30c.
Image picture(int h, int w, int c) {
  Image img(h, w, c);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int ch = 0; ch < c; ++ch)
        img.at(y, x, ch) = static_cast<std::uint8_t>(40 + 3 * x + 5 * y + 30 * ch);
  return img;
}

const std::vector<std::uint8_t> kGreyJpeg = {
    0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, 0x4A, 0x46, 0x49, 0x46, 0x00, 0x01, 0x01, 0x00, 0x00, 0x01,
    0x00, 0x01, 0x00, 0x00, 0xFF, 0xDB, 0x00, 0x43, 0x00, 0x02, 0x01, 0x01, 0x01, 0x01, 0x01, 0x02,
    0x01, 0x01, 0x01, 0x02, 0x02, 0x02, 0x02, 0x02, 0x04, 0x03, 0x02, 0x02, 0x02, 0x02, 0x05, 0x04,
    0x04, 0x03, 0x04, 0x06, 0x05, 0x06, 0x06, 0x06, 0x05, 0x06, 0x06, 0x06, 0x07, 0x09, 0x08, 0x06,
    0x07, 0x09, 0x07, 0x06, 0x06, 0x08, 0x0B, 0x08, 0x09, 0x0A, 0x0A, 0x0A, 0x0A, 0x0A, 0x06, 0x08,
    0x0B, 0x0C, 0x0B, 0x0A, 0x0C, 0x09, 0x0A, 0x0A, 0x0A, 0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x00, 0x06,
    0x00, 0x08, 0x01, 0x01, 0x11, 0x00, 0xFF, 0xC4, 0x00, 0x1F, 0x00, 0x00, 0x01, 0x05, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04,
    0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0xFF, 0xC4, 0x00, 0xB5, 0x10, 0x00, 0x02, 0x01, 0x03,
    0x03, 0x02, 0x04, 0x03, 0x05, 0x05, 0x04, 0x04, 0x00, 0x00, 0x01, 0x7D, 0x01, 0x02, 0x03, 0x00,
    0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07, 0x22, 0x71, 0x14, 0x32,
    0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52, 0xD1, 0xF0, 0x24, 0x33, 0x62, 0x72,
    0x82, 0x09, 0x0A, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A, 0x34, 0x35,
    0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4A, 0x53, 0x54, 0x55,
    0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6A, 0x73, 0x74, 0x75,
    0x76, 0x77, 0x78, 0x79, 0x7A, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x92, 0x93, 0x94,
    0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xB2,
    0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9,
    0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1, 0xE2, 0xE3, 0xE4, 0xE5, 0xE6,
    0xE7, 0xE8, 0xE9, 0xEA, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9, 0xFA, 0xFF, 0xDA,
    0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00, 0xF8, 0x1F, 0xC1, 0x1F, 0x0E, 0x34, 0xFF, 0x00,
    0x93, 0x94, 0xFC, 0xAB, 0xFF, 0xD9};

enum class Fmt { Png, Bmp, Jpg };

void write_image(const fs::path& p, const Image& img, Fmt f) {
  int ok = 0;
  const std::string name = p.string();
  switch (f) {
    case Fmt::Png:
      ok = stbi_write_png(name.c_str(), img.width, img.height, img.channels, img.data(),
                          img.width * img.channels);
      break;
    case Fmt::Bmp:
      ok = stbi_write_bmp(name.c_str(), img.width, img.height, img.channels, img.data());
      break;
    case Fmt::Jpg:
      ok = stbi_write_jpg(name.c_str(), img.width, img.height, img.channels, img.data(), 95);
      break;
  }
  REQUIRE(ok != 0);
}

std::vector<std::uint8_t> read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& p, const std::vector<std::uint8_t>& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void truncate_file(const fs::path& p, std::size_t keep) {
  auto b = read_all(p);
  REQUIRE(keep < b.size());
  b.resize(keep);
  write_bytes(p, b);
}

double mean_abs_diff(const Image& a, const Image& b) {
  REQUIRE(a.size() == b.size());
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += std::abs(int{a.pixels[i]} - int{b.pixels[i]});
  return s / static_cast<double>(a.size());
}

// Collects warnings (the loader may call from worker threads, one at a time).
struct Warnings {
  std::mutex m;
  std::vector<std::string> list;
  std::function<void(const std::string&)> sink() {
    return [this](const std::string& s) {
      std::lock_guard lock(m);
      list.push_back(s);
    };
  }
};

}  // namespace

TEST_CASE("decoding PNG, BMP and JPEG, grey and colour") {
  TempDir dir("decode");
  const Image grey = picture(13, 17, 1), rgb = picture(13, 17, 3);

  SUBCASE("PNG is lossless in both colour types") {
    write_image(dir.path / "g.png", grey, Fmt::Png);
    write_image(dir.path / "c.png", rgb, Fmt::Png);
    CHECK(load_image(dir.path / "g.png") == grey);
    CHECK(load_image(dir.path / "c.png") == rgb);
    // Conversions on request.
    const Image as_rgb = load_image(dir.path / "g.png", 3);
    CHECK(as_rgb.channels == 3);
    CHECK(as_rgb.at(4, 5, 2) == grey.at(4, 5, 0));
    CHECK(load_image(dir.path / "c.png", 1).channels == 1);
  }
  SUBCASE("PNG with alpha: the alpha channel is dropped") {
    Image rgba(5, 6, 3);
    std::vector<std::uint8_t> px(5 * 6 * 4);
    for (std::size_t i = 0; i < px.size(); ++i) px[i] = static_cast<std::uint8_t>(i * 5);
    REQUIRE(stbi_write_png((dir.path / "a.png").string().c_str(), 6, 5, 4, px.data(), 24) != 0);
    const Image img = load_image(dir.path / "a.png");
    CHECK(img.channels == 3);
    CHECK(img.at(1, 2, 1) == px[(1 * 6 + 2) * 4 + 1]);
  }
  SUBCASE("BMP is lossless; stb writes grey BMPs as 24-bit colour") {
    write_image(dir.path / "c.bmp", rgb, Fmt::Bmp);
    CHECK(load_image(dir.path / "c.bmp") == rgb);
    write_image(dir.path / "g.bmp", grey, Fmt::Bmp);
    const Image g = load_image(dir.path / "g.bmp");
    CHECK(g.channels == 3);
    CHECK(g.at(7, 3, 1) == grey.at(7, 3, 0));
    CHECK(load_image(dir.path / "g.bmp", 1) == grey);
  }
  SUBCASE("JPEG decodes close to the original; a one-component JPEG stays one channel") {
    write_image(dir.path / "c.jpeg", rgb, Fmt::Jpg);
    const Image c = load_image(dir.path / "c.jpeg");
    CHECK(c.channels == 3);
    CHECK(c.height == 13);
    CHECK(c.width == 17);
    CHECK(mean_abs_diff(c, rgb) < 4.0);
    // stb_image_write stores every JPEG as three components; this one-component JPEG of
    // picture(6, 8, 1) was written by Pillow (quality 95).
    write_bytes(dir.path / "g.jpg", kGreyJpeg);
    const Image g = load_image(dir.path / "g.jpg");
    CHECK(g.channels == 1);
    CHECK(mean_abs_diff(g, picture(6, 8, 1)) < 1.5);
  }
  SUBCASE("decoding from memory") {
    write_image(dir.path / "c.png", rgb, Fmt::Png);
    const auto bytes = read_all(dir.path / "c.png");
    CHECK(decode_image(bytes, "in-memory") == rgb);
  }
}

TEST_CASE("unreadable images: errors name the file and the reason") {
  TempDir dir("bad_images");
  const Image rgb = picture(40, 50, 3);
  auto expect = [](const fs::path& p, const std::string& why) {
    const std::string e = error_of([&] { load_image(p); });
    CHECK(contains(e, p.string()));
    CHECK(contains(e, why));
    return e;
  };

  SUBCASE("missing and empty files") {
    expect(dir.path / "missing.png", "cannot open");
    write_bytes(dir.path / "empty.jpg", {});
    expect(dir.path / "empty.jpg", "the file is empty");
  }
  SUBCASE("not an image at all") {
    write_bytes(dir.path / "text.png",
                {'n', 'o', 't', ' ', 'a', 'n', ' ', 'i', 'm', 'a', 'g', 'e'});
    expect(dir.path / "text.png", "unrecognised signature");
  }
  SUBCASE("truncated PNG") {
    write_image(dir.path / "t.png", rgb, Fmt::Png);
    truncate_file(dir.path / "t.png", read_all(dir.path / "t.png").size() / 2);
    expect(dir.path / "t.png", "truncated PNG");
    truncate_file(dir.path / "t.png", 12);  // inside the first chunk header
    expect(dir.path / "t.png", "truncated PNG");
  }
  SUBCASE("truncated JPEG") {
    write_image(dir.path / "t.jpg", rgb, Fmt::Jpg);
    const std::size_t size = read_all(dir.path / "t.jpg").size();
    truncate_file(dir.path / "t.jpg", size * 2 / 3);  // inside the image data
    expect(dir.path / "t.jpg", "truncated JPEG");
    truncate_file(dir.path / "t.jpg", 100);  // inside the headers
    expect(dir.path / "t.jpg", "truncated JPEG");
  }
  SUBCASE("truncated BMP") {
    write_image(dir.path / "t.bmp", rgb, Fmt::Bmp);
    truncate_file(dir.path / "t.bmp", read_all(dir.path / "t.bmp").size() - 300);
    expect(dir.path / "t.bmp", "truncated BMP");
    truncate_file(dir.path / "t.bmp", 20);
    expect(dir.path / "t.bmp", "truncated BMP");
  }
  SUBCASE("corrupt data behind a valid signature: stb's reason") {
    write_image(dir.path / "c.png", rgb, Fmt::Png);
    auto b = read_all(dir.path / "c.png");
    for (std::size_t i = 40; i < b.size() - 20; ++i) b[i] = static_cast<std::uint8_t>(b[i] ^ 0xA5);
    write_bytes(dir.path / "c.png", b);
    const std::string e = error_of([&] { load_image(dir.path / "c.png"); });
    CHECK(contains(e, (dir.path / "c.png").string()));
    // A JPEG whose headers are garbage.
    std::vector<std::uint8_t> j = {0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00,
                                   0xFF, 0xDA, 0x00, 0x02, 0x12, 0x34, 0xFF, 0xD9};
    write_bytes(dir.path / "g.jpg", j);
    const std::string e2 = error_of([&] { load_image(dir.path / "g.jpg"); });
    CHECK(contains(e2, (dir.path / "g.jpg").string()));
  }
  SUBCASE("a JPEG Huffman table of more than 256 symbols is refused before decoding") {
    auto j = kGreyJpeg;
    std::size_t dht = 0;
    while (!(j[dht] == 0xFF && j[dht + 1] == 0xC4)) ++dht;
    j[dht + 5] = 0xFF;  // the first count of the first table
    write_bytes(dir.path / "huff.jpg", j);
    expect(dir.path / "huff.jpg", "Huffman table declares");
  }
}

TEST_CASE("damaged files never crash the decoder: each decodes or throws moca::Error") {
  TempDir dir("mutants");
  const Image rgb = picture(24, 31, 3);
  const Philox rng(17);
  std::uint64_t draw = 0;
  int decoded = 0, rejected = 0;
  for (Fmt f : {Fmt::Png, Fmt::Jpg, Fmt::Bmp}) {
    write_image(dir.path / "x", rgb, f);
    const auto good = read_all(dir.path / "x");
    for (int m = 0; m < 150; ++m) {
      auto b = good;
      // A few random byte changes, sometimes a cut as well.
      const int changes = 1 + static_cast<int>(rng.below(8, 1, draw++));
      for (int c = 0; c < changes; ++c) {
        const std::size_t at = rng.below(b.size(), 1, draw++);
        b[at] = static_cast<std::uint8_t>(rng.bits(1, draw++));
      }
      if (rng.below(4, 1, draw++) == 0) b.resize(1 + rng.below(b.size() - 1, 1, draw++));
      try {
        const Image img = decode_image(b, "mutant");
        CHECK(img.size() == static_cast<std::size_t>(img.height) * img.width * img.channels);
        ++decoded;
      } catch (const Error& e) {
        CHECK(contains(e.what(), "mutant"));
        ++rejected;
      }
    }
  }
  CHECK(decoded + rejected == 450);
  CHECK(rejected > 0);
}

TEST_CASE("ImageFolder: class sub-folders, sorted, recursive, extensions in any case") {
  TempDir dir("folder");
  const fs::path root = dir.path / "train";
  fs::create_directories(root / "b_cat");
  fs::create_directories(root / "a_dog" / "more");
  write_image(root / "b_cat" / "x.png", picture(8, 9, 3), Fmt::Png);
  write_image(root / "a_dog" / "y.PNG", picture(8, 9, 1), Fmt::Png);
  write_image(root / "a_dog" / "z.JpEg", picture(8, 9, 3), Fmt::Jpg);
  write_image(root / "a_dog" / "more" / "w.bmp", picture(4, 5, 3), Fmt::Bmp);
  write_bytes(root / "a_dog" / "notes.txt", {'h', 'i'});  // not an image extension: ignored

  const ImageFolder f(root);
  CHECK(f.size() == 4);
  CHECK(f.num_classes() == 2);
  CHECK(f.classes() == std::vector<std::string>{"a_dog", "b_cat"});
  CHECK(f.file(0).filename() == "w.bmp");  // a_dog/more/w.bmp sorts first
  CHECK(f.file(1).filename() == "y.PNG");
  CHECK(f.file(2).filename() == "z.JpEg");
  CHECK(f.file(3).filename() == "x.png");
  CHECK(f.label(0) == 0);
  CHECK(f.label(2) == 0);
  CHECK(f.label(3) == 1);
  const Sample s = f.get(1);
  CHECK(s.label == 0);
  CHECK(s.image == picture(8, 9, 1));
  CHECK(f.get(0).image.height == 4);
  CHECK_THROWS_AS(f.get(4), Error);

  // Decoding converted to a fixed channel count on request.
  ImageFolderOptions grey;
  grey.channels = 1;
  CHECK(ImageFolder(root, grey).get(3).image.channels == 1);

  // Loose images next to class folders are ignored with a warning.
  write_image(root / "loose.png", picture(8, 9, 1), Fmt::Png);
  Warnings w;
  ImageFolderOptions opt;
  opt.warn = w.sink();
  CHECK(ImageFolder(root, opt).size() == 4);
  REQUIRE(w.list.size() == 1);
  CHECK(contains(w.list[0], "1 images directly in the root are ignored"));
}

TEST_CASE("ImageFolder: a flat folder is an unlabelled set") {
  TempDir dir("flat");
  write_image(dir.path / "2.jpeg", picture(8, 9, 3), Fmt::Jpg);
  write_image(dir.path / "1.png", picture(8, 9, 1), Fmt::Png);
  const ImageFolder f(dir.path);
  CHECK(f.size() == 2);
  CHECK(f.num_classes() == 0);
  CHECK(f.classes().empty());
  CHECK(f.label(0) == -1);
  CHECK(f.get(0).label == -1);
  CHECK(f.get(0).image == picture(8, 9, 1));
  // Forcing the flat layout on a tree collects every image under the root.
  fs::create_directories(dir.path / "sub");
  write_image(dir.path / "sub" / "3.bmp", picture(3, 3, 3), Fmt::Bmp);
  ImageFolderOptions flat;
  flat.layout = FolderLayout::Flat;
  CHECK(ImageFolder(dir.path, flat).size() == 3);
}

TEST_CASE("ImageFolder: a corrupt image is skipped with a warning, or an error in strict mode") {
  TempDir dir("corrupt");
  const fs::path root = dir.path;
  fs::create_directories(root / "a");
  fs::create_directories(root / "b");
  write_image(root / "a" / "0.png", picture(8, 8, 1), Fmt::Png);
  write_image(root / "a" / "1.png", picture(8, 8, 1), Fmt::Png);
  write_image(root / "b" / "2.png", picture(6, 6, 1), Fmt::Png);
  write_image(root / "b" / "3.png", picture(7, 7, 1), Fmt::Png);
  truncate_file(root / "a" / "1.png", 30);
  const std::string bad = (root / "a" / "1.png").string();

  SUBCASE("lazily: the next readable sample replaces it, reported once") {
    Warnings w;
    ImageFolderOptions opt;
    opt.warn = w.sink();
    const ImageFolder f(root, opt);
    CHECK(f.size() == 4);
    const Sample s = f.get(1);
    CHECK(s.image == picture(6, 6, 1));  // sample 2
    CHECK(s.label == 1);
    CHECK(f.get(1).image == picture(6, 6, 1));
    REQUIRE(w.list.size() == 1);
    CHECK(contains(w.list[0], bad));
    CHECK(contains(w.list[0], "skipping"));
    CHECK(f.skipped() == 1);
    CHECK(f.get(0).image == picture(8, 8, 1));
  }
  SUBCASE("strict: the error names the file") {
    ImageFolderOptions opt;
    opt.strict = true;
    const ImageFolder f(root, opt);
    const std::string e = error_of([&] { f.get(1); });
    CHECK(contains(e, bad));
    CHECK(contains(e, "truncated PNG"));
  }
  SUBCASE("verify on opening: dropped with a warning, or an error in strict mode") {
    Warnings w;
    ImageFolderOptions opt;
    opt.verify = true;
    opt.warn = w.sink();
    const ImageFolder f(root, opt);
    CHECK(f.size() == 3);
    CHECK(f.skipped() == 1);
    REQUIRE(w.list.size() == 1);
    CHECK(contains(w.list[0], bad));
    CHECK(f.get(1).image == picture(6, 6, 1));
    opt.strict = true;
    CHECK(contains(error_of([&] { ImageFolder g(root, opt); }), bad));
  }
  SUBCASE("every image unreadable") {
    for (const char* n : {"a/0.png", "b/2.png", "b/3.png"}) truncate_file(root / n, 30);
    Warnings w;
    ImageFolderOptions opt;
    opt.warn = w.sink();
    const ImageFolder f(root, opt);
    CHECK(contains(error_of([&] { f.get(0); }), "none of its 4 images can be decoded"));
    CHECK(w.list.size() == 4);
  }
  SUBCASE("the loader keeps full batches across a skipped image, with worker threads") {
    Warnings w;
    ImageFolderOptions opt;
    opt.warn = w.sink();
    const ImageFolder f(root, opt);
    AugmentConfig cfg = AugmentConfig::fashion_mnist_tiny();
    LoaderOptions lo;
    lo.batch_size = 2;
    lo.workers = 2;
    TwoViewLoader loader(f, cfg, lo);
    for (int i = 0; i < 6; ++i) {
      const TwoViewBatch& b = loader.next();
      CHECK(b.size() == 2);
      CHECK(b.view1.shape() == Shape{2, 1, 32, 32});
    }
    CHECK(w.list.size() == 1);
    // Strict mode: the batch holding the bad image rethrows its error from next().
    opt.strict = true;
    const ImageFolder strict(root, opt);
    lo.shuffle = false;
    TwoViewLoader strict_loader(strict, cfg, lo);
    CHECK(contains(error_of([&] { strict_loader.next(); }), bad));
  }
}

TEST_CASE("ImageFolder: missing, empty and malformed folders") {
  TempDir dir("folders");
  auto expect = [](const fs::path& p, const std::string& why) {
    const std::string e = error_of([&] { ImageFolder f(p); });
    CHECK(contains(e, p.string()));
    CHECK(contains(e, why));
  };
  expect(dir.path / "absent", "does not exist");
  fs::create_directories(dir.path / "empty");
  expect(dir.path / "empty", "contains no images");
  write_bytes(dir.path / "file.png", {1, 2, 3});
  expect(dir.path / "file.png", "is not a directory");
  // A folder of non-images.
  fs::create_directories(dir.path / "texts");
  write_bytes(dir.path / "texts" / "a.txt", {'a'});
  expect(dir.path / "texts", "contains no images");
  // A class folder without images.
  fs::create_directories(dir.path / "classes" / "full");
  fs::create_directories(dir.path / "classes" / "hollow");
  write_image(dir.path / "classes" / "full" / "x.png", picture(4, 4, 1), Fmt::Png);
  expect(dir.path / "classes", (dir.path / "classes" / "hollow").string());
  // Class layout forced on a folder without sub-folders.
  fs::create_directories(dir.path / "only_files");
  write_image(dir.path / "only_files" / "x.png", picture(4, 4, 1), Fmt::Png);
  ImageFolderOptions opt;
  opt.layout = FolderLayout::Classes;
  CHECK(contains(error_of([&] { ImageFolder f(dir.path / "only_files", opt); }),
                 "has no class sub-folders"));
}
