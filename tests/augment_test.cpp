// The two-view augmentation (spec §8, §16): PIL-semantics image operations against Pillow,
// determinism by (seed, epoch, index, view), the statistics of each random decision (view
// asymmetry, blur and solarisation rates, crop scale and ratio bounds, flips), and evaluation
// preprocessing.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <moca/data/augment.hpp>
#include <set>
#include <vector>

using namespace moca;
using namespace moca::data;

namespace {

// The test image of tests/python/augment_reference.py: (37x + 91y + 53c + 11xy) mod 256.
Image pattern(int h, int w, int c) {
  Image img(h, w, c);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int ch = 0; ch < c; ++ch)
        img.at(y, x, ch) =
            static_cast<std::uint8_t>((37 * x + 91 * y + 53 * ch + 11 * x * y) % 256);
  return img;
}

// Reference values printed by tests/python/augment_reference.py (Pillow 13.0).
// kGreyDown: 4x5x1
const std::vector<int> kGreyDown = {71,  129, 123, 143, 107, 142, 137, 130, 122, 137,
                                    111, 112, 112, 122, 172, 108, 154, 123, 147, 150};
// kGreyUp: 11x13x1
const std::vector<int> kGreyUp = {
    0,   20,  46,  71,  97,  122, 148, 174, 199, 205, 54,  20,  40,  41,  64,  93,  122, 152,
    144, 93,  122, 151, 170, 102, 99,  121, 99,  126, 154, 172, 205, 166, 39,  73,  98,  118,
    152, 185, 212, 157, 188, 183, 93,  117, 135, 125, 164, 131, 56,  94,  133, 163, 122, 156,
    162, 93,  124, 139, 118, 162, 142, 86,  129, 130, 114, 17,  55,  103, 152, 200, 170, 41,
    89,  138, 186, 235, 165, 65,  75,  117, 132, 72,  113, 138, 127, 67,  71,  124, 177, 187,
    179, 133, 141, 124, 52,  97,  133, 143, 72,  73,  126, 136, 177, 223, 191, 115, 64,  112,
    173, 165, 66,  113, 168, 213, 116, 125, 174, 109, 99,  113, 181, 163, 142, 129, 100, 125,
    183, 171, 147, 125, 34,  89,  161, 232, 146, 119, 190, 84,  77,  148, 219, 172, 90};
// kRgbDown: 3x4x3
const std::vector<int> kRgbDown = {106, 135, 146, 133, 135, 144, 130, 133, 128, 118, 112, 118,
                                   117, 144, 119, 131, 122, 111, 117, 131, 123, 152, 128, 122,
                                   118, 153, 141, 137, 119, 136, 121, 135, 152, 158, 130, 118};
// kRgbBicubic: 5x6x3
const std::vector<int> kRgbBicubic = {
    33,  92,  157, 102, 152, 149, 136, 135, 192, 139, 188, 137, 149, 94,  98,  76,  78,  98,
    170, 165, 126, 148, 134, 127, 135, 125, 112, 129, 93,  103, 88,  138, 155, 163, 142, 150,
    83,  118, 135, 127, 148, 83,  143, 102, 106, 98,  135, 138, 163, 154, 83,  145, 102, 156,
    142, 198, 117, 82,  133, 139, 137, 117, 125, 86,  136, 145, 133, 122, 128, 182, 144, 60,
    86,  147, 148, 171, 104, 172, 147, 130, 119, 103, 161, 150, 177, 107, 176, 138, 132, 133};
// kGreyBicubicUp: 10x12x1
const std::vector<int> kGreyBicubicUp = {
    0,   15,  45,  72,  98,  136, 170, 198, 237, 73,  0,   31,  41,  65,  106, 151, 187, 112,
    79,  124, 175, 125, 108, 143, 117, 152, 170, 168, 217, 105, 54,  101, 90,  133, 187, 221,
    180, 234, 176, 41,  95,  140, 193, 205, 37,  49,  110, 149, 62,  108, 132, 133, 193, 112,
    97,  161, 134, 187, 157, 66,  25,  82,  117, 123, 189, 122, 62,  69,  143, 223, 200, 112,
    109, 171, 129, 12,  84,  164, 118, 2,   73,  130, 196, 250, 202, 109, 58,  104, 197, 118,
    77,  133, 211, 121, 112, 198, 131, 85,  109, 191, 171, 129, 100, 113, 197, 173, 136, 125,
    18,  91,  195, 237, 88,  162, 144, 31,  118, 229, 199, 77};
// kGreyBright: 7x9x1
const std::vector<int> kGreyBright = {
    0,   50,  101, 152, 202, 253, 255, 4,   54,  124, 190, 255, 255, 36,  102, 168,
    234, 255, 249, 255, 60,  141, 221, 255, 32,  113, 194, 23,  119, 215, 255, 56,
    152, 247, 255, 89,  147, 255, 19,  130, 241, 1,   112, 223, 255, 255, 47,  173,
    255, 75,  201, 255, 102, 228, 46,  187, 255, 119, 255, 50,  191, 255, 123};
// kRgbDark: 7x9x3
const std::vector<int> kRgbDark = {
    0,   33,  66,  23,  56,  90,  46,  80,  113, 69,  103, 136, 93,  126, 160, 116, 149, 22,  139,
    11,  45,  1,   35,  68,  25,  58,  91,  57,  90,  124, 87,  120, 154, 117, 151, 23,  148, 20,
    53,  17,  50,  83,  47,  80,  114, 77,  110, 144, 107, 141, 13,  137, 10,  43,  114, 148, 20,
    151, 23,  57,  27,  61,  94,  64,  98,  131, 102, 135, 7,   139, 11,  44,  15,  48,  81,  52,
    85,  119, 89,  122, 156, 10,  44,  77,  54,  88,  121, 98,  132, 4,   143, 15,  48,  25,  59,
    92,  69,  103, 136, 114, 147, 19,  158, 30,  63,  40,  74,  107, 68,  101, 134, 119, 152, 24,
    8,   42,  75,  59,  93,  126, 110, 144, 16,  0,   34,  67,  51,  85,  118, 102, 136, 8,   153,
    25,  59,  125, 158, 30,  22,  55,  88,  80,  113, 146, 137, 10,  43,  34,  68,  101, 92,  126,
    159, 150, 22,  56,  47,  80,  114, 105, 138, 10,  21,  54,  88,  86,  119, 153, 151, 23,  56,
    54,  88,  121, 119, 153, 25,  23,  56,  90,  88,  121, 154, 153, 25,  58,  56,  90,  123};
// kGreyContrastLow: 7x9x1
const std::vector<int> kGreyContrastLow = {
    37,  63,  89,  115, 141, 167, 193, 39,  65,  101, 135, 168, 202, 56,  90,  123,
    157, 191, 165, 206, 68,  109, 151, 192, 54,  95,  137, 49,  98,  147, 196, 66,
    115, 164, 213, 83,  113, 170, 47,  104, 161, 38,  95,  151, 208, 177, 62,  126,
    191, 76,  140, 205, 90,  154, 61,  133, 205, 98,  170, 63,  135, 207, 100};
// kRgbContrastHigh: 7x9x3
const std::vector<int> kRgbContrastHigh = {
    0,   30,  99,  9,   78,  147, 57,  126, 195, 105, 174, 243, 153, 222, 255, 201, 255, 6,   249,
    0,   54,  0,   34,  103, 13,  82,  151, 79,  148, 217, 142, 210, 255, 204, 255, 9,   255, 2,
    71,  0,   65,  134, 58,  127, 196, 121, 190, 255, 183, 252, 0,   246, 0,   51,  197, 255, 2,
    255, 10,  79,  18,  87,  156, 95,  164, 233, 171, 240, 0,   248, 0,   53,  0,   61,  130, 69,
    138, 207, 145, 214, 255, 0,   52,  121, 74,  143, 212, 165, 234, 0,   255, 0,   61,  14,  83,
    152, 105, 174, 243, 196, 255, 1,   255, 23,  92,  45,  114, 183, 101, 170, 239, 207, 255, 12,
    0,   48,  117, 84,  153, 222, 190, 255, 0,   0,   31,  100, 67,  136, 205, 173, 242, 0,   255,
    14,  83,  220, 255, 25,  6,   75,  144, 126, 195, 255, 246, 0,   51,  32,  101, 170, 152, 221,
    255, 255, 8,   77,  58,  127, 196, 178, 247, 0,   5,   74,  143, 139, 208, 255, 255, 9,   78,
    74,  143, 212, 208, 255, 13,  9,   78,  147, 143, 212, 255, 255, 13,  82,  78,  147, 216};
// kRgbSaturation: 7x9x3
const std::vector<int> kRgbSaturation = {
    8,   51,  93,  45,  88,  130, 82,  125, 167, 119, 162, 204, 156, 199, 241, 187, 230, 67,  194,
    32,  74,  11,  54,  96,  48,  91,  133, 99,  142, 184, 147, 190, 232, 189, 232, 69,  207, 45,
    87,  35,  78,  120, 83,  126, 168, 131, 174, 216, 173, 216, 53,  191, 29,  71,  184, 227, 64,
    213, 51,  93,  52,  95,  137, 111, 154, 196, 164, 207, 44,  193, 31,  73,  32,  75,  117, 91,
    134, 176, 150, 193, 235, 25,  68,  110, 95,  138, 180, 159, 202, 39,  199, 37,  79,  49,  92,
    134, 119, 162, 204, 183, 226, 63,  223, 61,  103, 73,  116, 158, 116, 159, 201, 191, 234, 71,
    22,  65,  107, 103, 146, 188, 178, 221, 58,  9,   52,  94,  90,  133, 175, 165, 208, 45,  216,
    54,  96,  201, 244, 81,  43,  86,  128, 135, 178, 220, 191, 29,  71,  63,  106, 148, 155, 198,
    240, 211, 49,  91,  83,  126, 168, 169, 212, 49,  42,  85,  127, 145, 188, 230, 212, 50,  92,
    95,  138, 180, 192, 235, 72,  45,  88,  130, 148, 191, 233, 215, 53,  95,  98,  141, 183};
// kRgbSaturationHigh: 7x9x3
const std::vector<int> kRgbSaturationHigh = {
    0,   55,  118, 28,  92,  155, 65,  129, 192, 102, 166, 229, 139, 203, 255, 182, 245, 2,   249,
    5,   69,  0,   58,  121, 31,  95,  158, 82,  146, 209, 130, 194, 255, 184, 247, 4,   255, 18,
    82,  18,  82,  145, 66,  130, 193, 114, 178, 241, 168, 231, 0,   246, 2,   66,  179, 242, 0,
    255, 24,  88,  35,  99,  162, 94,  158, 221, 159, 222, 0,   248, 4,   68,  15,  79,  142, 74,
    138, 201, 133, 197, 255, 8,   72,  135, 78,  142, 205, 154, 217, 0,   254, 10,  74,  32,  96,
    159, 102, 166, 229, 178, 241, 0,   255, 34,  98,  56,  120, 183, 99,  163, 226, 186, 249, 6,
    5,   69,  132, 86,  150, 213, 173, 236, 0,   0,   56,  119, 73,  137, 200, 160, 223, 0,   255,
    27,  91,  196, 255, 16,  26,  90,  153, 118, 182, 245, 246, 2,   66,  46,  110, 173, 138, 202,
    255, 255, 22,  86,  66,  130, 193, 164, 227, 0,   25,  89,  152, 128, 192, 255, 255, 23,  87,
    78,  142, 205, 187, 250, 7,   28,  92,  155, 131, 195, 255, 255, 26,  90,  81,  145, 208};
// kRgbHuePos: 7x9x3
const std::vector<int> kRgbHuePos = {
    0,   12,  106, 37,  49,  143, 74,  87,  180, 111, 124, 217, 148, 161, 254, 107, 238, 35,  222,
    38,  19,  3,   16,  109, 40,  53,  146, 91,  104, 197, 139, 152, 245, 109, 240, 38,  235, 51,
    32,  27,  40,  133, 75,  88,  181, 123, 135, 229, 93,  224, 21,  219, 35,  16,  104, 235, 32,
    241, 58,  39,  44,  57,  150, 103, 116, 209, 84,  215, 13,  221, 37,  18,  24,  37,  130, 83,
    95,  189, 143, 155, 248, 17,  30,  123, 87,  100, 193, 79,  210, 7,   227, 43,  24,  42,  54,
    147, 111, 124, 217, 103, 234, 31,  251, 67,  48,  65,  78,  171, 108, 121, 214, 111, 242, 40,
    14,  27,  120, 95,  108, 201, 98,  229, 26,  1,   14,  107, 83,  95,  188, 85,  216, 14,  244,
    60,  41,  121, 252, 49,  35,  48,  141, 127, 139, 233, 219, 35,  16,  56,  68,  161, 148, 160,
    253, 239, 56,  37,  75,  88,  181, 89,  220, 17,  34,  47,  140, 137, 150, 243, 240, 57,  38,
    87,  100, 193, 112, 243, 40,  37,  49,  143, 141, 153, 246, 243, 59,  40,  91,  103, 196};
// kRgbHueNeg: 7x9x3
const std::vector<int> kRgbHueNeg = {
    0,   106, 102, 37,  143, 139, 74,  180, 176, 111, 217, 213, 148, 254, 250, 238, 183, 35,  222,
    19,  181, 3,   109, 105, 40,  146, 142, 91,  197, 193, 139, 245, 241, 240, 185, 38,  235, 32,
    194, 27,  133, 129, 75,  181, 177, 123, 229, 225, 224, 169, 21,  219, 16,  178, 235, 180, 32,
    241, 39,  201, 44,  150, 146, 103, 209, 205, 215, 160, 13,  221, 18,  180, 24,  130, 126, 83,
    189, 185, 143, 248, 244, 17,  123, 119, 87,  193, 189, 210, 155, 7,   227, 24,  186, 42,  147,
    143, 111, 217, 213, 234, 179, 31,  251, 48,  210, 65,  171, 167, 108, 214, 210, 242, 187, 40,
    14,  120, 116, 95,  201, 197, 229, 174, 26,  1,   107, 103, 83,  188, 184, 216, 161, 14,  244,
    41,  203, 252, 197, 49,  35,  141, 137, 127, 233, 229, 219, 16,  178, 56,  161, 157, 148, 253,
    249, 239, 37,  199, 75,  181, 177, 220, 165, 17,  34,  140, 136, 137, 243, 239, 240, 38,  200,
    87,  193, 189, 243, 188, 40,  37,  143, 139, 141, 246, 242, 243, 40,  202, 91,  196, 192};
// kRgbLuma: 7x9x1
const std::vector<int> kRgbLuma = {43,  80,  117, 154, 191, 199, 86,  46,  83,  134, 182, 201, 99,
                                   70,  118, 166, 185, 83,  196, 105, 87,  146, 176, 85,  67,  126,
                                   185, 60,  130, 171, 91,  84,  154, 195, 115, 108, 151, 203, 57,
                                   138, 190, 44,  125, 177, 108, 213, 78,  170, 83,  98,  190, 103,
                                   118, 181, 77,  180, 104, 130, 204, 80,  183, 107, 133};
// kRgbSolarize: 7x9x3
const std::vector<int> kRgbSolarize = {
    0,   53,  106, 37,  90,  112, 74,  127, 75,  111, 91, 38,  107, 54,  1,  70,  17,  35,  33,
    19,  72,  3,   56,  109, 40,  93,  109, 91,  111, 58, 116, 63,  10,  68, 15,  37,  20,  32,
    85,  27,  80,  122, 75,  127, 74,  123, 79,  26,  84, 31,  21,  36,  16, 69,  73,  20,  32,
    14,  38,  91,  44,  97,  105, 103, 99,  46,  93,  40, 12,  34,  18,  71, 24,  77,  125, 83,
    119, 66,  113, 60,  7,   17,  70,  123, 87,  115, 62, 98,  45,  7,   28, 24,  77,  41,  94,
    108, 111, 91,  38,  74,  21,  31,  4,   48,  101, 65, 118, 84,  108, 94, 41,  66,  13,  39,
    14,  67,  120, 95,  107, 54,  79,  26,  26,  1,   54, 107, 82,  120, 67, 92,  39,  13,  11,
    41,  94,  56,  3,   49,  35,  88,  114, 127, 75,  22, 36,  16,  69,  55, 108, 94,  108, 55,
    2,   16,  36,  89,  75,  127, 74,  88,  35,  17,  34, 87,  115, 118, 65, 12,  15,  37,  90,
    87,  115, 62,  65,  12,  40,  37,  90,  112, 115, 62, 9,   12,  40,  93, 90,  112, 59};

void check_equal(const Image& got, int h, int w, int c, const std::vector<int>& want) {
  REQUIRE(got.height == h);
  REQUIRE(got.width == w);
  REQUIRE(got.channels == c);
  REQUIRE(got.size() == want.size());
  int mismatches = 0;
  for (std::size_t i = 0; i < want.size(); ++i)
    if (int{got.pixels[i]} != want[i]) {
      if (mismatches < 5)
        MESSAGE("value ", i, ": got ", int{got.pixels[i]}, ", Pillow gives ", want[i]);
      ++mismatches;
    }
  CHECK(mismatches == 0);
}

Image from_values(int h, int w, int c, std::initializer_list<int> v) {
  Image img(h, w, c);
  std::size_t i = 0;
  for (int x : v) img.pixels[i++] = static_cast<std::uint8_t>(x);
  return img;
}

}  // namespace

TEST_CASE("resize matches Pillow's bilinear and bicubic resampling, down and up") {
  using transform::Interp;
  Image out;
  transform::resize(pattern(7, 9, 1), 4, 5, Interp::Bilinear, out);
  check_equal(out, 4, 5, 1, kGreyDown);
  transform::resize(pattern(7, 9, 1), 11, 13, Interp::Bilinear, out);
  check_equal(out, 11, 13, 1, kGreyUp);
  transform::resize(pattern(7, 9, 3), 3, 4, Interp::Bilinear, out);
  check_equal(out, 3, 4, 3, kRgbDown);
  transform::resize(pattern(7, 9, 3), 5, 6, Interp::Bicubic, out);
  check_equal(out, 5, 6, 3, kRgbBicubic);
  transform::resize(pattern(7, 9, 1), 10, 12, Interp::Bicubic, out);
  check_equal(out, 10, 12, 1, kGreyBicubicUp);
  // Same size: unchanged.
  transform::resize(pattern(7, 9, 3), 7, 9, Interp::Bilinear, out);
  CHECK(out == pattern(7, 9, 3));
}

TEST_CASE("colour operations match Pillow's ImageEnhance, hue shift, L conversion, solarize") {
  Image img = pattern(7, 9, 1);
  transform::adjust_brightness(img, 1.37);
  check_equal(img, 7, 9, 1, kGreyBright);
  img = pattern(7, 9, 3);
  transform::adjust_brightness(img, 0.63);
  check_equal(img, 7, 9, 3, kRgbDark);
  img = pattern(7, 9, 1);
  transform::adjust_contrast(img, 0.7);
  check_equal(img, 7, 9, 1, kGreyContrastLow);
  img = pattern(7, 9, 3);
  transform::adjust_contrast(img, 1.3);
  check_equal(img, 7, 9, 3, kRgbContrastHigh);
  img = pattern(7, 9, 3);
  transform::adjust_saturation(img, 0.8);
  check_equal(img, 7, 9, 3, kRgbSaturation);
  img = pattern(7, 9, 3);
  transform::adjust_saturation(img, 1.2);
  check_equal(img, 7, 9, 3, kRgbSaturationHigh);
  img = pattern(7, 9, 3);
  transform::adjust_hue(img, 0.07);
  check_equal(img, 7, 9, 3, kRgbHuePos);
  img = pattern(7, 9, 3);
  transform::adjust_hue(img, -0.09);
  check_equal(img, 7, 9, 3, kRgbHueNeg);
  Image grey;
  transform::convert_channels(pattern(7, 9, 3), 1, grey);
  check_equal(grey, 7, 9, 1, kRgbLuma);
  img = pattern(7, 9, 3);
  transform::solarize(img);
  check_equal(img, 7, 9, 3, kRgbSolarize);
}

TEST_CASE("simple operations on small images: hand-computed values") {
  SUBCASE("brightness scales and truncates, clamps at 255") {
    Image img = from_values(1, 5, 1, {10, 100, 200, 250, 7});
    transform::adjust_brightness(img, 0.3);
    CHECK(img == from_values(1, 5, 1, {3, 30, 60, 75, 2}));  // 7 · 0.3 = 2.1 → 2
    img = from_values(1, 5, 1, {10, 100, 200, 250, 7});
    transform::adjust_brightness(img, 1.5);
    CHECK(img == from_values(1, 5, 1, {15, 150, 255, 255, 10}));
  }
  SUBCASE("contrast blends with the rounded mean grey level") {
    Image img = from_values(1, 4, 1, {0, 50, 100, 250});  // mean 100
    CHECK(transform::mean_grey(img) == 100);
    transform::adjust_contrast(img, 0.5);
    CHECK(img == from_values(1, 4, 1, {50, 75, 100, 175}));
    img = from_values(1, 4, 1, {0, 50, 100, 250});
    transform::adjust_contrast(img, 2.0);
    CHECK(img == from_values(1, 4, 1, {0, 0, 100, 255}));
    CHECK(transform::mean_grey(from_values(1, 2, 1, {0, 1})) == 1);  // 0.5 rounds up
  }
  SUBCASE("solarisation inverts values from 128 up") {
    Image img = from_values(1, 4, 1, {0, 127, 128, 255});
    transform::solarize(img);
    CHECK(img == from_values(1, 4, 1, {0, 127, 127, 0}));
  }
  SUBCASE("horizontal flip mirrors each row, twice is the identity") {
    Image img = from_values(2, 3, 1, {1, 2, 3, 4, 5, 6});
    transform::hflip(img);
    CHECK(img == from_values(2, 3, 1, {3, 2, 1, 6, 5, 4}));
    Image rgb = pattern(3, 4, 3);
    transform::hflip(rgb);
    CHECK(rgb.at(1, 0, 2) == pattern(3, 4, 3).at(1, 3, 2));
    transform::hflip(rgb);
    CHECK(rgb == pattern(3, 4, 3));
  }
  SUBCASE("luma of the primaries as PIL's L conversion") {
    CHECK(transform::luma(255, 0, 0) == 76);
    CHECK(transform::luma(0, 255, 0) == 150);
    CHECK(transform::luma(0, 0, 255) == 29);
    CHECK(transform::luma(255, 255, 255) == 255);
  }
  SUBCASE("a hue shift of a third turns red into green") {
    Image img = from_values(1, 1, 3, {255, 0, 0});
    transform::adjust_hue(img, 1.0 / 3.0);
    CHECK(img == from_values(1, 1, 3, {0, 255, 0}));
  }
  SUBCASE("saturation 0 gives the luma on every channel; greyscale is the same") {
    Image img = pattern(3, 4, 3), grey = pattern(3, 4, 3);
    transform::adjust_saturation(img, 0.0);
    transform::to_greyscale(grey);
    CHECK(img == grey);
    CHECK(grey.at(2, 1, 0) == grey.at(2, 1, 2));
  }
  SUBCASE("zero padding and cropping with zeros outside") {
    Image img = from_values(1, 2, 1, {5, 6}), out;
    transform::pad(img, 1, out);
    CHECK(out == from_values(3, 4, 1, {0, 0, 0, 0, 0, 5, 6, 0, 0, 0, 0, 0}));
    Image c;
    transform::crop(out, 1, 2, 2, 3, c);
    CHECK(c == from_values(2, 3, 1, {6, 0, 0, 0, 0, 0}));
  }
}

TEST_CASE(
    "Gaussian blur: normalised symmetric kernel, reflect padding, constant images unchanged") {
  const std::vector<float> k = transform::gaussian_kernel(5, 1.0);
  double sum = 0;
  for (float v : k) sum += v;
  CHECK(sum == doctest::Approx(1.0).epsilon(1e-6));
  CHECK(k[0] == k[4]);
  CHECK(k[1] == k[3]);
  CHECK(k[2] / k[1] == doctest::Approx(std::exp(0.5)).epsilon(1e-5));
  CHECK(transform::gaussian_kernel_size(0.3) == 3);
  CHECK(transform::gaussian_kernel_size(0.5) == 5);
  CHECK(transform::gaussian_kernel_size(2.0) == 13);

  Image flat(6, 7, 3);
  std::fill(flat.pixels.begin(), flat.pixels.end(), std::uint8_t{77});
  transform::gaussian_blur(flat, 1.7, 5);
  for (auto v : flat.pixels) CHECK(v == 77);

  // A single bright pixel spreads as the outer product of the kernel.
  Image dot(9, 9, 1);
  dot.at(4, 4, 0) = 255;
  transform::gaussian_blur(dot, 1.0, 5);
  CHECK(int{dot.at(4, 4, 0)} == static_cast<int>(std::nearbyint(255.0 * k[2] * k[2])));
  CHECK(int{dot.at(4, 6, 0)} == static_cast<int>(std::nearbyint(255.0 * k[2] * k[4])));
  CHECK(dot.at(4, 7, 0) == 0);
  CHECK(dot.at(3, 4, 0) == dot.at(5, 4, 0));

  // Reflect padding mirrors without repeating the edge pixel (x = -1 reads x = 1), so a bright
  // pixel at x = 0 is counted once, by the centre tap at x = 0 and the next tap at x = 1.
  Image edge(1, 5, 1);
  edge.at(0, 0, 0) = 200;
  transform::gaussian_blur(edge, 1.0, 5);  // vertical pass: a single row reflects onto itself
  CHECK(int{edge.at(0, 0, 0)} == static_cast<int>(std::nearbyint(200.0f * k[2])));
  CHECK(int{edge.at(0, 1, 0)} == static_cast<int>(std::nearbyint(200.0f * k[1])));
}

TEST_CASE("presets: spec §8 and §16 constants") {
  const AugmentConfig in = AugmentConfig::imagenet();
  CHECK(in.channels == 3);
  CHECK(in.crop_size == 224);
  CHECK(in.scale_min == 0.2);
  CHECK(in.scale_max == 1.0);
  CHECK(in.jitter_p == 0.8);
  CHECK(in.brightness == 0.4);
  CHECK(in.contrast == 0.4);
  CHECK(in.saturation == 0.2);
  CHECK(in.hue == 0.1);
  CHECK(in.grey_p == 0.2);
  CHECK(in.blur_p[0] == 1.0);
  CHECK(in.blur_p[1] == 0.1);
  CHECK(in.solarize_p[0] == 0.0);
  CHECK(in.solarize_p[1] == 0.2);
  CHECK(in.blur_sigma_min == 0.1);
  CHECK(in.blur_sigma_max == 2.0);
  CHECK(in.mean[0] == 0.485f);
  CHECK(in.stddev[2] == 0.225f);
  CHECK(in.eval_resize == 256);
  CHECK(in.eval_crop == 224);

  const AugmentConfig t = AugmentConfig::fashion_mnist_tiny();
  CHECK(t.channels == 1);
  CHECK(t.pad == 2);
  CHECK(t.crop_size == 32);
  CHECK(t.scale_min == 0.25);
  CHECK(t.ratio_min == doctest::Approx(0.75));
  CHECK(t.ratio_max == doctest::Approx(4.0 / 3.0));
  CHECK(t.flip_p == 0.5);
  CHECK(t.jitter_p == 0.8);
  CHECK(t.brightness == 0.4);
  CHECK(t.contrast == 0.4);
  CHECK(t.blur_kernel == 5);
  CHECK(t.blur_sigma_max == 1.0);
  CHECK(t.blur_p[0] == 0.5);
  CHECK(t.blur_p[1] == 0.1);
  CHECK(t.solarize_p[0] == 0.0);
  CHECK(t.solarize_p[1] == 0.2);
  CHECK(t.mean[0] == 0.2860f);
  CHECK(t.stddev[0] == 0.3530f);

  AugmentConfig bad = t;
  bad.blur_kernel = 4;
  CHECK_THROWS_AS(bad.validate(), Error);
  bad = t;
  bad.scale_min = 0.0;
  CHECK_THROWS_AS(bad.validate(), Error);
}

TEST_CASE("a view is a pure function of (seed, epoch, index, view)") {
  const Image img = pattern(28, 28, 1);
  TwoViewAugment a(AugmentConfig::fashion_mnist_tiny(), 7),
      b(AugmentConfig::fashion_mnist_tiny(), 7), other_seed(AugmentConfig::fashion_mnist_tiny(), 8);
  const std::int64_t n = a.view_numel();
  CHECK(n == 32 * 32);
  std::vector<float> x(n), y(n);
  AugmentScratch s1, s2;
  auto same = [&](const TwoViewAugment& p, std::int64_t e1, std::int64_t i1, int v1,
                  const TwoViewAugment& q, std::int64_t e2, std::int64_t i2, int v2) {
    p.apply(img, e1, i1, v1, x.data(), s1);
    q.apply(img, e2, i2, v2, y.data(), s2);
    return std::memcmp(x.data(), y.data(), sizeof(float) * static_cast<std::size_t>(n)) == 0;
  };
  CHECK(same(a, 3, 41, 0, b, 3, 41, 0));
  CHECK(same(a, 3, 41, 1, b, 3, 41, 1));
  // Scratch buffers carry nothing over: recomputing after other work gives the same bits.
  a.apply(pattern(20, 30, 3), 0, 0, 0, x.data(), s1);
  CHECK(same(a, 3, 41, 1, a, 3, 41, 1));
  CHECK_FALSE(same(a, 3, 41, 0, a, 3, 41, 1));
  CHECK_FALSE(same(a, 3, 41, 0, a, 4, 41, 0));
  CHECK_FALSE(same(a, 3, 41, 0, a, 3, 42, 0));
  CHECK_FALSE(same(a, 3, 41, 0, other_seed, 3, 41, 0));

  // Streams never collide across the key.
  std::set<std::uint64_t> streams;
  for (int e = 0; e < 3; ++e)
    for (int i = 0; i < 5; ++i)
      for (int v = 0; v < 2; ++v) streams.insert(augment_stream(e, i, v));
  CHECK(streams.size() == 30);
  CHECK(streams.count(shuffle_stream(0)) == 0);
  CHECK_THROWS_AS(augment_stream(-1, 0, 0), Error);
  CHECK_THROWS_AS(augment_stream(0, 0, 2), Error);
}

TEST_CASE("statistics of the random decisions: view asymmetry, rates, crop bounds") {
  constexpr int kSamples = 6000;
  struct Rates {
    int blur[2] = {0, 0}, solarize[2] = {0, 0}, flip = 0, jitter = 0, grey = 0, fallback = 0;
  };
  auto run = [&](const AugmentConfig& cfg, int h, int w) {
    TwoViewAugment aug(cfg, 123);
    Rates r;
    std::set<std::array<int, 4>> orders;
    const double area = static_cast<double>(h + 2 * cfg.pad) * (w + 2 * cfg.pad);
    for (int i = 0; i < kSamples; ++i)
      for (int v = 0; v < 2; ++v) {
        const ViewParams p = aug.draw(i / 1000, i, v, h, w);
        r.blur[v] += p.blur;
        r.solarize[v] += p.solarize;
        if (v == 1) continue;
        r.flip += p.flip;
        r.jitter += p.jitter;
        r.grey += p.grey;
        r.fallback += p.crop_fallback;
        orders.insert(p.jitter_order);
        // Crop inside the (padded) image, area and aspect within bounds up to rounding.
        CHECK(p.crop_top >= 0);
        CHECK(p.crop_left >= 0);
        CHECK(p.crop_top + p.crop_height <= h + 2 * cfg.pad);
        CHECK(p.crop_left + p.crop_width <= w + 2 * cfg.pad);
        if (!p.crop_fallback) {
          const double frac = p.crop_height * p.crop_width / area;
          const double slack = (p.crop_height + p.crop_width + 1) / area;  // ±½ pixel per side
          CHECK(frac >= cfg.scale_min - slack);
          CHECK(frac <= cfg.scale_max + slack);
          const double ratio = static_cast<double>(p.crop_width) / p.crop_height;
          CHECK(ratio >= cfg.ratio_min * (1 - 1.0 / p.crop_height) - 1.0 / p.crop_height);
          CHECK(ratio <= cfg.ratio_max * (1 + 1.0 / p.crop_height) + 1.0 / p.crop_height);
        }
        CHECK(p.brightness >= 1 - cfg.brightness);
        CHECK(p.brightness <= 1 + cfg.brightness);
        CHECK(p.contrast >= 1 - cfg.contrast);
        CHECK(p.contrast <= 1 + cfg.contrast);
        CHECK(std::abs(p.hue) <= cfg.hue);
        CHECK(p.sigma >= cfg.blur_sigma_min);
        CHECK(p.sigma <= cfg.blur_sigma_max);
      }
    CHECK(orders.size() == 24);  // every order of the four jitter operations occurs
    return r;
  };
  // 4.5 standard deviations of a binomial proportion over kSamples.
  auto near = [](int count, double p) {
    const double tol = 4.5 * std::sqrt(p * (1 - p) / kSamples) + 1e-12;
    return std::abs(static_cast<double>(count) / kSamples - p) <= tol;
  };

  const AugmentConfig tiny = AugmentConfig::fashion_mnist_tiny();
  const Rates t = run(tiny, 28, 28);
  CHECK(t.solarize[0] == 0);  // never on view 1
  CHECK(near(t.solarize[1], 0.2));
  CHECK(near(t.blur[0], 0.5));
  CHECK(near(t.blur[1], 0.1));
  CHECK(near(t.flip, 0.5));
  CHECK(near(t.jitter, 0.8));
  CHECK(t.grey == 0);
  CHECK(t.fallback < kSamples / 100);

  const AugmentConfig in = AugmentConfig::imagenet();
  const Rates r = run(in, 300, 400);
  CHECK(r.solarize[0] == 0);
  CHECK(near(r.solarize[1], 0.2));
  CHECK(r.blur[0] == kSamples);  // always on view 1
  CHECK(near(r.blur[1], 0.1));
  CHECK(near(r.flip, 0.5));
  CHECK(near(r.jitter, 0.8));
  CHECK(near(r.grey, 0.2));
}

TEST_CASE("RandomResizedCrop fallback: the central crop with the ratio clamped") {
  AugmentConfig cfg = AugmentConfig::imagenet();
  cfg.scale_min = cfg.scale_max = 1.0;  // a whole-image crop of a wide image never fits the ratio
  ViewParams p;
  draw_resized_crop(cfg, Philox(1), 5, 100, 400, p);
  CHECK(p.crop_fallback);
  CHECK(p.crop_height == 100);
  CHECK(p.crop_width == 133);  // round(100 · 4/3)
  CHECK(p.crop_top == 0);
  CHECK(p.crop_left == (400 - 133) / 2);
  draw_resized_crop(cfg, Philox(1), 5, 400, 100, p);
  CHECK(p.crop_width == 100);
  CHECK(p.crop_height == 133);
}

TEST_CASE("applying decisions: flip symmetry, solarisation, normalisation constants") {
  TwoViewAugment aug(AugmentConfig::fashion_mnist_tiny(), 0);
  const Image img = pattern(28, 28, 1);
  AugmentScratch s;
  ViewParams p = aug.draw(0, 5, 0, 28, 28);
  p.jitter = p.blur = p.solarize = false;
  p.flip = false;
  std::vector<float> a(32 * 32), b(32 * 32);
  aug.apply(img, p, a.data(), s);
  p.flip = true;
  aug.apply(img, p, b.data(), s);
  for (int y = 0; y < 32; ++y)
    for (int x = 0; x < 32; ++x) CHECK(a[y * 32 + x] == b[y * 32 + 31 - x]);

  // The whole padded image, no colour change: exactly pad + normalise.
  p = ViewParams{};
  p.crop_height = p.crop_width = 32;
  aug.apply(img, p, a.data(), s);
  const float m = 0.2860f, sd = 0.3530f;
  CHECK(a[0] == (0.0f / 255.0f - m) / sd);
  CHECK(a[2 * 32 + 2] == (static_cast<float>(img.at(0, 0, 0)) / 255.0f - m) / sd);
  CHECK(a[10 * 32 + 7] == (static_cast<float>(img.at(8, 5, 0)) / 255.0f - m) / sd);
  p.solarize = true;
  aug.apply(img, p, b.data(), s);
  const std::uint8_t v = img.at(8, 5, 0);
  const float sol = static_cast<float>(v >= 128 ? 255 - v : v);
  CHECK(b[10 * 32 + 7] == (sol / 255.0f - m) / sd);
  CHECK(b[0] == a[0]);  // black stays black

  // Colour inputs are converted to the preset's single channel by luma.
  const Image rgb = pattern(28, 28, 3);
  p.solarize = false;
  aug.apply(rgb, p, b.data(), s);
  CHECK(b[2 * 32 + 2] ==
        (static_cast<float>(transform::luma(rgb.at(0, 0, 0), rgb.at(0, 0, 1), rgb.at(0, 0, 2))) /
             255.0f -
         m) /
            sd);
}

TEST_CASE("a colour view (ImageNet preset) is finite, normalised per channel, of the right size") {
  AugmentConfig cfg = AugmentConfig::imagenet();
  cfg.crop_size = 48;  // keeps the test quick; the pipeline is the same
  TwoViewAugment aug(cfg, 3);
  AugmentScratch s;
  std::vector<float> out(aug.view_numel());
  CHECK(out.size() == 3u * 48 * 48);
  for (int i = 0; i < 20; ++i) {
    aug.apply(pattern(60, 80, 3), 0, i, i % 2, out.data(), s);
    for (int c = 0; c < 3; ++c) {
      const float lo = (0.0f - cfg.mean[c]) / cfg.stddev[c],
                  hi = (1.0f - cfg.mean[c]) / cfg.stddev[c];
      for (int k = 0; k < 48 * 48; ++k) {
        const float v = out[c * 48 * 48 + k];
        CHECK(std::isfinite(v));
        CHECK(v >= lo - 1e-6f);
        CHECK(v <= hi + 1e-6f);
      }
    }
  }
  // A grey input is replicated onto three channels.
  aug.apply(pattern(60, 80, 1), 1, 1, 0, out.data(), s);
  CHECK(std::isfinite(out[0]));
}

TEST_CASE("evaluation preprocessing") {
  SUBCASE("tiny: pad 28 to 32 and normalise") {
    EvalTransform t(AugmentConfig::fashion_mnist_tiny());
    CHECK(t.size() == 32);
    CHECK(t.numel() == 32 * 32);
    const Image img = pattern(28, 28, 1);
    AugmentScratch s;
    std::vector<float> out(t.numel());
    t.apply(img, out.data(), s);
    const float m = 0.2860f, sd = 0.3530f;
    for (int y = 0; y < 32; ++y)
      for (int x = 0; x < 32; ++x) {
        const bool inside = y >= 2 && y < 30 && x >= 2 && x < 30;
        const float v = inside ? static_cast<float>(img.at(y - 2, x - 2, 0)) : 0.0f;
        CHECK(out[y * 32 + x] == (v / 255.0f - m) / sd);
      }
  }
  SUBCASE("ImageNet: shorter side to 256 (bicubic), centre crop 224") {
    EvalTransform t(AugmentConfig::imagenet());
    AugmentScratch s;
    std::vector<float> out(t.numel());
    CHECK(out.size() == 3u * 224 * 224);
    Image flat(300, 400, 3);
    for (int y = 0; y < 300; ++y)
      for (int x = 0; x < 400; ++x)
        for (int c = 0; c < 3; ++c) flat.at(y, x, c) = static_cast<std::uint8_t>(40 + 50 * c);
    t.apply(flat, out.data(), s);
    for (int c = 0; c < 3; ++c) {
      const float want =
          (static_cast<float>(40 + 50 * c) / 255.0f - t.config().mean[c]) / t.config().stddev[c];
      CHECK(out[c * 224 * 224] == want);
      CHECK(out[c * 224 * 224 + 224 * 224 - 1] == want);
    }
    // Matches resize + crop done by hand.
    const Image img = pattern(300, 260, 3);
    t.apply(img, out.data(), s);
    Image resized, cropped;
    transform::resize(img, 295, 256, transform::Interp::Bicubic, resized);  // int(256·300/260)
    transform::crop(resized, 36, 16, 224, 224, cropped);  // round(71/2) = 36 (half to even), 16
    std::vector<float> want(t.numel());
    transform::normalize_to_chw(cropped, t.config().mean, t.config().stddev, want.data());
    CHECK(out == want);
  }
}
