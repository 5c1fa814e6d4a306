// Deterministic image operations on 8-bit HWC images, with the semantics of PIL (the library
// torchvision's transforms call on PIL images), which the augmentation of spec §8 is defined by.
//
// Every operation reads and writes 8-bit values, rounding or truncating and clamping exactly
// where PIL does, so a pipeline of them reproduces PIL's quantisation step by step:
// - resize: PIL's separable resampling (bilinear = triangle filter, bicubic a = -0.5) whose
//   support widens with the downscaling factor (antialiasing), 22-bit fixed-point weights,
//   rounded to 8 bits after each pass;
// - brightness, contrast, saturation: PIL's ImageEnhance, i.e. Image.blend(degenerate, image,
//   factor), computed in float and truncated towards zero, clamped to [0, 255];
// - hue: PIL's 8-bit RGB↔HSV conversion and an integer hue shift with wrap-around;
// - greyscale: PIL's "L" conversion (ITU-R 601-2 luma in 16-bit fixed point, rounded);
// - Gaussian blur: a sampled, normalised Gaussian kernel applied separably in float with reflect
//   padding (as torchvision's GaussianBlur on tensors), rounded once at the end;
// - solarisation: PIL's ImageOps.solarize (values ≥ threshold become 255 - value).
// The functions work on any size and on 1 or 3 channels unless noted.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/data/image.hpp"

namespace moca::data::transform {

/// Resampling filters of resize().
enum class Interp { Bilinear, Bicubic };

namespace detail {

inline std::uint8_t clamp_truncate(float v) {
  if (v <= 0.0f) return 0;
  if (v >= 255.0f) return 255;
  return static_cast<std::uint8_t>(v);
}

// PIL ImagingBlend: out = in1 + alpha · (in2 - in1), in float, truncated and clamped.
inline std::uint8_t blend(std::uint8_t degenerate, std::uint8_t value, float alpha) {
  return clamp_truncate(static_cast<float>(degenerate) +
                        alpha * (static_cast<float>(value) - static_cast<float>(degenerate)));
}

inline double filter_weight(Interp f, double x) {
  if (x < 0.0) x = -x;
  if (f == Interp::Bilinear) return x < 1.0 ? 1.0 - x : 0.0;
  constexpr double a = -0.5;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

inline double filter_support(Interp f) { return f == Interp::Bilinear ? 1.0 : 2.0; }

constexpr int kPrecisionBits = 32 - 8 - 2;  // PIL's fixed-point weights

// The taps of one output pixel: input range [first, first + count) and 22-bit weights.
struct ResampleTaps {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<std::int32_t> weights;  // ksize per output pixel
};

// PIL precompute_coeffs + normalize_coeffs_8bpc for the input range [0, in_size).
inline ResampleTaps resample_taps(int in_size, int out_size, Interp f) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = filter_support(f) * filterscale;
  ResampleTaps t;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.weights.assign(static_cast<std::size_t>(out_size) * t.ksize, 0);
  std::vector<double> k(t.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);  // truncation, as in C
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = filter_weight(f, (x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double w = ww != 0.0 ? k[x] / ww : k[x];
      t.weights[static_cast<std::size_t>(xx) * t.ksize + x] = static_cast<std::int32_t>(
          w < 0 ? -0.5 + w * (1 << kPrecisionBits) : 0.5 + w * (1 << kPrecisionBits));
    }
    t.first[xx] = xmin;
    t.count[xx] = xmax;
  }
  return t;
}

inline std::uint8_t clip8(std::int64_t v) {
  if (v >= (std::int64_t{1} << kPrecisionBits) << 8) return 255;
  if (v <= 0) return 0;
  return static_cast<std::uint8_t>(v >> kPrecisionBits);
}

// Mirror index without repeating the edge (torch "reflect"), for any distance.
inline int reflect(int i, int n) {
  if (n == 1) return 0;
  const int period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

}  // namespace detail

/// PIL's "L" value of an RGB pixel: (19595 R + 38470 G + 7471 B + 2^15) >> 16.
inline std::uint8_t luma(std::uint8_t r, std::uint8_t g, std::uint8_t b) {
  return static_cast<std::uint8_t>((r * 19595u + g * 38470u + b * 7471u + 0x8000u) >> 16);
}

/// Converts to `channels` (1 or 3): colour to grey by luma(), grey to colour by replication.
inline void convert_channels(const Image& in, int channels, Image& out) {
  MOCA_CHECK(channels == 1 || channels == 3, "convert_channels: channels must be 1 or 3, got ",
             channels);
  out.reshape(in.height, in.width, channels);
  const std::size_t n = static_cast<std::size_t>(in.height) * in.width;
  const std::uint8_t* s = in.data();
  std::uint8_t* d = out.data();
  if (in.channels == channels) {
    std::copy(s, s + n * channels, d);
  } else if (channels == 1) {
    for (std::size_t i = 0; i < n; ++i) d[i] = luma(s[3 * i], s[3 * i + 1], s[3 * i + 2]);
  } else {
    for (std::size_t i = 0; i < n; ++i) d[3 * i] = d[3 * i + 1] = d[3 * i + 2] = s[i];
  }
}

/// Adds a border of `p` zero pixels on every side.
inline void pad(const Image& in, int p, Image& out) {
  MOCA_CHECK(p >= 0, "pad: negative padding ", p);
  const int c = in.channels;
  out.reshape(in.height + 2 * p, in.width + 2 * p, c);
  std::fill(out.pixels.begin(), out.pixels.end(), std::uint8_t{0});
  for (int y = 0; y < in.height; ++y)
    std::copy_n(&in.pixels[static_cast<std::size_t>(y) * in.width * c],
                static_cast<std::size_t>(in.width) * c, &out.at(y + p, p, 0));
}

/// The region [top, top + h) × [left, left + w); pixels outside the image are zero (as PIL's
/// crop and torchvision's padding centre crop).
inline void crop(const Image& in, int top, int left, int h, int w, Image& out) {
  MOCA_CHECK(h > 0 && w > 0, "crop: empty region ", h, "×", w);
  const int c = in.channels;
  out.reshape(h, w, c);
  for (int y = 0; y < h; ++y) {
    const int sy = top + y;
    for (int x = 0; x < w; ++x) {
      const int sx = left + x;
      const bool inside = sy >= 0 && sy < in.height && sx >= 0 && sx < in.width;
      for (int ch = 0; ch < c; ++ch) out.at(y, x, ch) = inside ? in.at(sy, sx, ch) : 0;
    }
  }
}

/// Resizes to out_h × out_w with PIL's resampling (Image.resize): horizontal pass, then
/// vertical, each only when that dimension changes, 8-bit rounding after each.
inline void resize(const Image& in, int out_h, int out_w, Interp f, Image& out) {
  MOCA_CHECK(out_h > 0 && out_w > 0 && in.height > 0 && in.width > 0, "resize: ", in.height, "×",
             in.width, " to ", out_h, "×", out_w);
  const int c = in.channels;
  const bool horizontal = out_w != in.width;
  const bool vertical = out_h != in.height;
  Image tmp;
  const Image* src = &in;
  if (horizontal) {
    const detail::ResampleTaps t = detail::resample_taps(in.width, out_w, f);
    Image& dst = vertical ? tmp : out;
    dst.reshape(in.height, out_w, c);
    for (int y = 0; y < in.height; ++y)
      for (int xx = 0; xx < out_w; ++xx) {
        const std::int32_t* k = &t.weights[static_cast<std::size_t>(xx) * t.ksize];
        for (int ch = 0; ch < c; ++ch) {
          std::int64_t ss = std::int64_t{1} << (detail::kPrecisionBits - 1);
          for (int x = 0; x < t.count[xx]; ++x)
            ss += std::int64_t{in.at(y, t.first[xx] + x, ch)} * k[x];
          dst.at(y, xx, ch) = detail::clip8(ss);
        }
      }
    src = &dst;
  }
  if (vertical) {
    const detail::ResampleTaps t = detail::resample_taps(src->height, out_h, f);
    const Image& s = *src;
    out.reshape(out_h, s.width, c);
    for (int yy = 0; yy < out_h; ++yy) {
      const std::int32_t* k = &t.weights[static_cast<std::size_t>(yy) * t.ksize];
      for (int x = 0; x < s.width; ++x)
        for (int ch = 0; ch < c; ++ch) {
          std::int64_t ss = std::int64_t{1} << (detail::kPrecisionBits - 1);
          for (int y = 0; y < t.count[yy]; ++y)
            ss += std::int64_t{s.at(t.first[yy] + y, x, ch)} * k[y];
          out.at(yy, x, ch) = detail::clip8(ss);
        }
    }
  }
  if (!horizontal && !vertical) out = in;
}

/// Mirrors left to right, in place.
inline void hflip(Image& img) {
  const int c = img.channels;
  for (int y = 0; y < img.height; ++y)
    for (int x = 0; x < img.width / 2; ++x)
      for (int ch = 0; ch < c; ++ch) std::swap(img.at(y, x, ch), img.at(y, img.width - 1 - x, ch));
}

/// PIL ImageEnhance.Brightness: value · factor (truncated, clamped).
inline void adjust_brightness(Image& img, double factor) {
  const auto a = static_cast<float>(factor);
  for (auto& v : img.pixels) v = detail::blend(0, v, a);
}

/// The rounded mean grey level PIL's contrast blends with: int(mean(L) + 0.5).
inline int mean_grey(const Image& img) {
  const std::size_t n = static_cast<std::size_t>(img.height) * img.width;
  if (n == 0) return 0;
  std::uint64_t sum = 0;
  const std::uint8_t* p = img.data();
  if (img.channels == 1) {
    for (std::size_t i = 0; i < n; ++i) sum += p[i];
  } else {
    for (std::size_t i = 0; i < n; ++i) sum += luma(p[3 * i], p[3 * i + 1], p[3 * i + 2]);
  }
  return static_cast<int>(static_cast<double>(sum) / static_cast<double>(n) + 0.5);
}

/// PIL ImageEnhance.Contrast: m + factor · (value - m), m = mean_grey(img).
inline void adjust_contrast(Image& img, double factor) {
  const auto m = static_cast<std::uint8_t>(mean_grey(img));
  const auto a = static_cast<float>(factor);
  for (auto& v : img.pixels) v = detail::blend(m, v, a);
}

/// PIL ImageEnhance.Color: grey + factor · (value - grey) per pixel (3 channels only).
inline void adjust_saturation(Image& img, double factor) {
  MOCA_CHECK(img.channels == 3, "adjust_saturation: needs 3 channels, got ", img.channels);
  const auto a = static_cast<float>(factor);
  const std::size_t n = static_cast<std::size_t>(img.height) * img.width;
  std::uint8_t* p = img.data();
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint8_t g = luma(p[3 * i], p[3 * i + 1], p[3 * i + 2]);
    for (int ch = 0; ch < 3; ++ch) p[3 * i + ch] = detail::blend(g, p[3 * i + ch], a);
  }
}

/// torchvision's adjust_hue on PIL images: to 8-bit HSV, H += int(factor · 255) modulo 256,
/// back to RGB (3 channels only; factor in [-0.5, 0.5]).
inline void adjust_hue(Image& img, double factor) {
  MOCA_CHECK(img.channels == 3, "adjust_hue: needs 3 channels, got ", img.channels);
  MOCA_CHECK(factor >= -0.5 && factor <= 0.5, "adjust_hue: factor ", factor,
             " outside [-0.5, 0.5]");
  const int shift = static_cast<int>(factor * 255.0);
  const std::size_t n = static_cast<std::size_t>(img.height) * img.width;
  std::uint8_t* p = img.data();
  auto clip = [](int v) { return static_cast<std::uint8_t>(std::clamp(v, 0, 255)); };
  for (std::size_t i = 0; i < n; ++i) {
    std::uint8_t* px = p + 3 * i;
    const std::uint8_t r = px[0], g = px[1], b = px[2];
    // PIL rgb2hsv (float arithmetic as in Convert.c).
    const std::uint8_t maxc = std::max({r, g, b}), minc = std::min({r, g, b});
    std::uint8_t uh = 0, us = 0;
    const std::uint8_t uv = maxc;
    if (minc != maxc) {
      const float cr = static_cast<float>(maxc - minc);
      const float s = cr / static_cast<float>(maxc);
      const float rc = static_cast<float>(maxc - r) / cr;
      const float gc = static_cast<float>(maxc - g) / cr;
      const float bc = static_cast<float>(maxc - b) / cr;
      float h;
      if (r == maxc)
        h = bc - gc;
      else if (g == maxc)
        h = 2.0f + rc - bc;
      else
        h = 4.0f + gc - rc;
      h = static_cast<float>(std::fmod(h / 6.0 + 1.0, 1.0));
      uh = clip(static_cast<int>(h * 255.0));
      us = clip(static_cast<int>(s * 255.0));
    }
    const auto hh = static_cast<std::uint8_t>((uh + shift) & 0xFF);
    // PIL hsv2rgb.
    if (us == 0) {
      px[0] = px[1] = px[2] = uv;
      continue;
    }
    const int sector = static_cast<int>(std::floor(static_cast<float>(hh) * 6.0 / 255.0));
    const float fr = static_cast<float>(static_cast<float>(hh) * 6.0 / 255.0 - sector);
    const float fs = static_cast<float>(us) / 255.0f;
    const std::uint8_t up = clip(static_cast<int>(std::round(uv * (1.0 - fs))));
    const std::uint8_t uq = clip(static_cast<int>(std::round(uv * (1.0 - fs * fr))));
    const std::uint8_t ut = clip(static_cast<int>(std::round(uv * (1.0 - fs * (1.0 - fr)))));
    switch (sector % 6) {
      case 0:
        px[0] = uv, px[1] = ut, px[2] = up;
        break;
      case 1:
        px[0] = uq, px[1] = uv, px[2] = up;
        break;
      case 2:
        px[0] = up, px[1] = uv, px[2] = ut;
        break;
      case 3:
        px[0] = up, px[1] = uq, px[2] = uv;
        break;
      case 4:
        px[0] = ut, px[1] = up, px[2] = uv;
        break;
      default:
        px[0] = uv, px[1] = up, px[2] = uq;
        break;
    }
  }
}

/// Replaces every pixel by its luma, kept on all channels (torchvision RandomGrayscale).
inline void to_greyscale(Image& img) {
  if (img.channels == 1) return;
  const std::size_t n = static_cast<std::size_t>(img.height) * img.width;
  std::uint8_t* p = img.data();
  for (std::size_t i = 0; i < n; ++i)
    p[3 * i] = p[3 * i + 1] = p[3 * i + 2] = luma(p[3 * i], p[3 * i + 1], p[3 * i + 2]);
}

/// The normalised 1-D Gaussian kernel of `size` taps (odd) for sigma, as torchvision's
/// _get_gaussian_kernel1d.
inline std::vector<float> gaussian_kernel(int size, double sigma) {
  MOCA_CHECK(size >= 1 && size % 2 == 1 && sigma > 0, "gaussian_kernel: size ", size,
             " (must be odd) sigma ", sigma);
  std::vector<float> k(static_cast<std::size_t>(size));
  const int r = size / 2;
  float sum = 0.0f;
  for (int i = 0; i < size; ++i) {
    const double x = (i - r) / sigma;
    k[i] = static_cast<float>(std::exp(-0.5 * x * x));
    sum += k[i];
  }
  for (float& v : k) v /= sum;
  return k;
}

/// The kernel size used when none is given: 2·ceil(3σ) + 1 taps (a true Gaussian to 3σ).
inline int gaussian_kernel_size(double sigma) {
  return 2 * static_cast<int>(std::ceil(3.0 * sigma)) + 1;
}

/// Separable Gaussian blur with reflect padding, in float, rounded to 8 bits at the end.
/// `kernel_size` 0 picks gaussian_kernel_size(sigma).
inline void gaussian_blur(Image& img, double sigma, int kernel_size = 0) {
  if (kernel_size == 0) kernel_size = gaussian_kernel_size(sigma);
  const std::vector<float> k = gaussian_kernel(kernel_size, sigma);
  const int r = kernel_size / 2, H = img.height, W = img.width, C = img.channels;
  std::vector<float> tmp(static_cast<std::size_t>(H) * W * C);
  for (int y = 0; y < H; ++y)  // horizontal
    for (int x = 0; x < W; ++x)
      for (int ch = 0; ch < C; ++ch) {
        float s = 0.0f;
        for (int i = -r; i <= r; ++i) s += k[i + r] * img.at(y, detail::reflect(x + i, W), ch);
        tmp[(static_cast<std::size_t>(y) * W + x) * C + ch] = s;
      }
  for (int y = 0; y < H; ++y)  // vertical
    for (int x = 0; x < W; ++x)
      for (int ch = 0; ch < C; ++ch) {
        float s = 0.0f;
        for (int i = -r; i <= r; ++i)
          s += k[i + r] *
               tmp[(static_cast<std::size_t>(detail::reflect(y + i, H)) * W + x) * C + ch];
        img.at(y, x, ch) = static_cast<std::uint8_t>(std::clamp(std::nearbyint(s), 0.0f, 255.0f));
      }
}

/// PIL ImageOps.solarize: every value ≥ threshold becomes 255 - value.
inline void solarize(Image& img, int threshold = 128) {
  for (auto& v : img.pixels)
    if (v >= threshold) v = static_cast<std::uint8_t>(255 - v);
}

/// Writes (value / 255 - mean[c]) / std[c] as float, channel-major (CHW), to out.
inline void normalize_to_chw(const Image& img, std::span<const float> mean,
                             std::span<const float> std, float* out) {
  const int C = img.channels;
  MOCA_CHECK(static_cast<int>(mean.size()) >= C && static_cast<int>(std.size()) >= C,
             "normalize_to_chw: ", mean.size(), " means and ", std.size(), " stds for ", C,
             " channels");
  const std::size_t plane = static_cast<std::size_t>(img.height) * img.width;
  for (int ch = 0; ch < C; ++ch) {
    const float m = mean[ch], inv = std[ch];
    float* o = out + ch * plane;
    for (std::size_t i = 0; i < plane; ++i)
      o[i] = (static_cast<float>(img.pixels[i * C + ch]) / 255.0f - m) / inv;
  }
}

}  // namespace moca::data::transform
