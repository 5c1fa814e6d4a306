// The two-view augmentation of spec §8 (BYOL recipe, PIL semantics) and evaluation
// preprocessing, with two presets: ImageNet (§8, §9) and the project's `tiny` Fashion-MNIST
// recipe (§16).
//
//   TwoViewAugment aug(AugmentConfig::fashion_mnist_tiny(), /*seed=*/0);
//   AugmentScratch scratch;                               // reused buffers, one per thread
//   aug.apply(image, epoch, index, /*view=*/0, out, scratch);   // out: float [C, S, S]
//
// Pipeline of one view (each step on 8-bit HWC images, see transforms.hpp):
//   convert to the configured channels → zero padding → RandomResizedCrop (bilinear, PIL's
//   antialiased resampling) → horizontal flip → colour jitter (brightness, contrast,
//   saturation, hue in a random order; saturation and hue skipped for 1 channel) → random
//   greyscale (skipped for 1 channel) → Gaussian blur → solarisation → /255 and per-channel
//   normalisation into float CHW.
// Spec §8 lists the flip last; flipping commutes with every later step (pixelwise operations and
// a symmetric blur with symmetric padding), so the result is the same.
//
// Randomness: every decision of view v of sample i in epoch e is drawn from Philox(seed) on
// stream augment_stream(e, i, v), at a fixed counter per decision (see ViewParams). A view is
// therefore a pure function of (seed, epoch, index, view, image): independent of the thread that
// computes it, of the number of workers and of what was drawn before, so a resumed run sees the
// same data.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/core/rng.hpp"
#include "moca/data/image.hpp"
#include "moca/data/transforms.hpp"

namespace moca::data {

using transform::Interp;

/// Settings of the two-view augmentation and of the evaluation preprocessing.
struct AugmentConfig {
  int channels = 3;  ///< output channels; inputs are converted (colour → luma, grey → replicated)
  int pad = 0;       ///< zero pixels added on every side before anything else
  // RandomResizedCrop
  int crop_size = 224;                                  ///< output side
  double scale_min = 0.2, scale_max = 1.0;              ///< crop area / image area
  double ratio_min = 3.0 / 4.0, ratio_max = 4.0 / 3.0;  ///< crop width / height
  // Flip and colour
  double flip_p = 0.5;
  double jitter_p = 0.8;  ///< probability of applying the colour jitter
  double brightness = 0.4, contrast = 0.4, saturation = 0.2, hue = 0.1;  ///< 0 disables one
  double grey_p = 0.2;                                                   ///< random greyscale
  // Blur and solarisation, per view
  double blur_sigma_min = 0.1, blur_sigma_max = 2.0;
  int blur_kernel = 0;  ///< taps of the blur kernel (odd); 0: 2·ceil(3σ)+1
  std::array<double, 2> blur_p = {1.0, 0.1};
  std::array<double, 2> solarize_p = {0.0, 0.2};
  // Normalisation (the first `channels` entries are used)
  std::array<float, 3> mean = {0.485f, 0.456f, 0.406f};
  std::array<float, 3> stddev = {0.229f, 0.224f, 0.225f};
  // Evaluation: resize the shorter side to eval_resize (0: no resize), centre crop eval_crop
  int eval_resize = 256;
  int eval_crop = 224;
  Interp eval_interp = Interp::Bicubic;

  /// Spec §8 (pretraining on ImageNet, RGB 224×224) and §9 (evaluation: bicubic resize to 256,
  /// centre crop 224). The blur is a true Gaussian to 3σ in place of PIL's box approximation.
  static AugmentConfig imagenet() { return AugmentConfig{}; }

  /// Spec §16 `tiny`: Fashion-MNIST 28×28 grey, zero-padded to 32×32, crop to 32 with scale
  /// 0.25–1, flip 0.5, brightness and contrast 0.4 with p 0.8, 5×5 Gaussian blur σ ∈ U(0.1, 1)
  /// with p 0.5 (view 1) / 0.1 (view 2), solarisation p 0.2 on view 2 only, mean 0.2860, std
  /// 0.3530. Evaluation: the padded 32×32 image, normalised.
  static AugmentConfig fashion_mnist_tiny() {
    AugmentConfig c;
    c.channels = 1;
    c.pad = 2;
    c.crop_size = 32;
    c.scale_min = 0.25;
    c.scale_max = 1.0;
    c.saturation = 0.0;
    c.hue = 0.0;
    c.grey_p = 0.0;
    c.blur_sigma_min = 0.1;
    c.blur_sigma_max = 1.0;
    c.blur_kernel = 5;
    c.blur_p = {0.5, 0.1};
    c.solarize_p = {0.0, 0.2};
    c.mean = {0.2860f, 0.2860f, 0.2860f};
    c.stddev = {0.3530f, 0.3530f, 0.3530f};
    c.eval_resize = 0;
    c.eval_crop = 32;
    return c;
  }

  /// Throws moca::Error naming the first invalid setting.
  void validate() const {
    auto prob = [](double p) { return p >= 0.0 && p <= 1.0; };
    MOCA_CHECK(channels == 1 || channels == 3, "AugmentConfig: channels must be 1 or 3, got ",
               channels);
    MOCA_CHECK(pad >= 0 && crop_size > 0, "AugmentConfig: pad ", pad, " crop_size ", crop_size);
    MOCA_CHECK(0 < scale_min && scale_min <= scale_max && scale_max <= 1.0,
               "AugmentConfig: crop scale range [", scale_min, ", ", scale_max, "]");
    MOCA_CHECK(0 < ratio_min && ratio_min <= ratio_max, "AugmentConfig: crop ratio range [",
               ratio_min, ", ", ratio_max, "]");
    MOCA_CHECK(prob(flip_p) && prob(jitter_p) && prob(grey_p) && prob(blur_p[0]) &&
                   prob(blur_p[1]) && prob(solarize_p[0]) && prob(solarize_p[1]),
               "AugmentConfig: a probability lies outside [0, 1]");
    MOCA_CHECK(brightness >= 0 && contrast >= 0 && saturation >= 0 && hue >= 0 && hue <= 0.5,
               "AugmentConfig: jitter strengths brightness ", brightness, " contrast ", contrast,
               " saturation ", saturation, " hue ", hue);
    MOCA_CHECK(0 < blur_sigma_min && blur_sigma_min <= blur_sigma_max,
               "AugmentConfig: blur sigma range [", blur_sigma_min, ", ", blur_sigma_max, "]");
    MOCA_CHECK(blur_kernel == 0 || (blur_kernel > 0 && blur_kernel % 2 == 1),
               "AugmentConfig: blur_kernel must be 0 or odd, got ", blur_kernel);
    for (int c = 0; c < channels; ++c)
      MOCA_CHECK(stddev[c] > 0, "AugmentConfig: stddev of channel ", c, " is ", stddev[c]);
    MOCA_CHECK(eval_resize >= 0 && eval_crop > 0, "AugmentConfig: eval_resize ", eval_resize,
               " eval_crop ", eval_crop);
  }
};

/// The random decisions of one view, drawn by TwoViewAugment::draw.
struct ViewParams {
  int crop_top = 0, crop_left = 0, crop_height = 0, crop_width = 0;  ///< in the padded image
  bool crop_fallback = false;  ///< no try succeeded: the central crop was used
  bool flip = false;
  bool jitter = false;
  std::array<int, 4> jitter_order = {0, 1, 2, 3};  ///< 0 brightness 1 contrast 2 saturation 3 hue
  double brightness = 1.0, contrast = 1.0, saturation = 1.0, hue = 0.0;  ///< factors
  bool grey = false;
  bool blur = false;
  double sigma = 0.0;
  bool solarize = false;
};

/// Per-thread working buffers of the augmentation (so a steady state allocates nothing).
struct AugmentScratch {
  Image a, b;
};

namespace detail {

// Counters within a view's stream, one per decision, fixed so that no decision depends on
// another's outcome (e.g. on how many crop tries were needed).
enum AugmentCounter : std::uint64_t {
  kCropTries = 0,  // 4 per try: scale, log-ratio, top, left (tries 0..9 → 0..39)
  kFlip = 40,
  kJitterApply = 41,
  kJitterOrder = 42,   // 42..44: Fisher-Yates swaps
  kJitterFactor = 46,  // 46..49: brightness, contrast, saturation, hue
  kGrey = 50,
  kBlurApply = 51,
  kBlurSigma = 52,
  kSolarize = 53,
};

constexpr std::uint64_t kAugmentTag = 0xA;
constexpr std::uint64_t kShuffleTag = 0xB;
constexpr int kEpochBits = 19;
constexpr int kIndexBits = 40;

}  // namespace detail

/// The Philox stream of view `view` (0 or 1) of sample `index` in `epoch`: tag 0xA in the top 4
/// bits, then the view (1 bit), the epoch (19 bits) and the index (40 bits), so distinct keys
/// never share a stream.
inline std::uint64_t augment_stream(std::int64_t epoch, std::int64_t index, int view) {
  MOCA_CHECK(epoch >= 0 && epoch < (std::int64_t{1} << detail::kEpochBits) && index >= 0 &&
                 index < (std::int64_t{1} << detail::kIndexBits) && (view == 0 || view == 1),
             "augment_stream: epoch ", epoch, " index ", index, " view ", view, " out of range");
  return (detail::kAugmentTag << 60) | (static_cast<std::uint64_t>(view) << 59) |
         (static_cast<std::uint64_t>(epoch) << detail::kIndexBits) |
         static_cast<std::uint64_t>(index);
}

/// The Philox stream of the shuffle of `epoch` (tag 0xB in the top 4 bits).
inline std::uint64_t shuffle_stream(std::int64_t epoch) {
  MOCA_CHECK(epoch >= 0 && epoch < (std::int64_t{1} << detail::kEpochBits),
             "shuffle_stream: epoch ", epoch, " out of range");
  return (detail::kShuffleTag << 60) | static_cast<std::uint64_t>(epoch);
}

/// torchvision RandomResizedCrop.get_params with Philox draws: up to 10 tries of a random area
/// fraction and log-uniform aspect ratio, else the central crop with the ratio clamped.
inline void draw_resized_crop(const AugmentConfig& cfg, const Philox& rng, std::uint64_t stream,
                              int height, int width, ViewParams& p) {
  const double area = static_cast<double>(height) * width;
  const double log_lo = std::log(cfg.ratio_min), log_hi = std::log(cfg.ratio_max);
  for (int t = 0; t < 10; ++t) {
    const std::uint64_t c = detail::kCropTries + 4 * static_cast<std::uint64_t>(t);
    const double target =
        area * (cfg.scale_min + (cfg.scale_max - cfg.scale_min) * rng.uniform_double(stream, c));
    const double aspect = std::exp(log_lo + (log_hi - log_lo) * rng.uniform_double(stream, c + 1));
    const int w = static_cast<int>(std::nearbyint(std::sqrt(target * aspect)));  // half to even
    const int h = static_cast<int>(std::nearbyint(std::sqrt(target / aspect)));
    if (0 < w && w <= width && 0 < h && h <= height) {
      p.crop_top =
          static_cast<int>(rng.below(static_cast<std::uint64_t>(height - h + 1), stream, c + 2));
      p.crop_left =
          static_cast<int>(rng.below(static_cast<std::uint64_t>(width - w + 1), stream, c + 3));
      p.crop_height = h;
      p.crop_width = w;
      p.crop_fallback = false;
      return;
    }
  }
  const double in_ratio = static_cast<double>(width) / height;
  int w = width, h = height;
  if (in_ratio < cfg.ratio_min) {
    h = static_cast<int>(std::nearbyint(w / cfg.ratio_min));
  } else if (in_ratio > cfg.ratio_max) {
    w = static_cast<int>(std::nearbyint(h * cfg.ratio_max));
  }
  p.crop_top = (height - h) / 2;
  p.crop_left = (width - w) / 2;
  p.crop_height = h;
  p.crop_width = w;
  p.crop_fallback = true;
}

/// The two-view augmentation: a pure function of (seed, epoch, index, view, image).
class TwoViewAugment {
 public:
  explicit TwoViewAugment(AugmentConfig config, std::uint64_t seed = 0) : cfg_(config), rng_(seed) {
    cfg_.validate();
  }

  const AugmentConfig& config() const { return cfg_; }
  std::uint64_t seed() const { return rng_.seed(); }
  /// Channels of a view.
  int channels() const { return cfg_.channels; }
  /// Side of a (square) view.
  int size() const { return cfg_.crop_size; }
  /// Floats written per view: channels · size · size.
  std::int64_t view_numel() const {
    return static_cast<std::int64_t>(cfg_.channels) * cfg_.crop_size * cfg_.crop_size;
  }

  /// The random decisions of a view, for an input of height × width pixels before padding.
  ViewParams draw(std::int64_t epoch, std::int64_t index, int view, int height, int width) const {
    const std::uint64_t s = augment_stream(epoch, index, view);
    const Philox& r = rng_;
    ViewParams p;
    draw_resized_crop(cfg_, r, s, height + 2 * cfg_.pad, width + 2 * cfg_.pad, p);
    p.flip = r.uniform_double(s, detail::kFlip) < cfg_.flip_p;
    p.jitter = r.uniform_double(s, detail::kJitterApply) < cfg_.jitter_p;
    for (int i = 3; i > 0; --i) {  // Fisher-Yates, as torch.randperm(4)
      const auto j =
          static_cast<int>(r.below(static_cast<std::uint64_t>(i + 1), s,
                                   detail::kJitterOrder + static_cast<std::uint64_t>(i - 1)));
      std::swap(p.jitter_order[i], p.jitter_order[j]);
    }
    auto factor = [&](double strength, std::uint64_t c) {
      const double lo = std::max(0.0, 1.0 - strength), hi = 1.0 + strength;
      return lo + (hi - lo) * r.uniform_double(s, c);
    };
    p.brightness = factor(cfg_.brightness, detail::kJitterFactor + 0);
    p.contrast = factor(cfg_.contrast, detail::kJitterFactor + 1);
    p.saturation = factor(cfg_.saturation, detail::kJitterFactor + 2);
    p.hue = cfg_.hue * (2.0 * r.uniform_double(s, detail::kJitterFactor + 3) - 1.0);
    p.grey = r.uniform_double(s, detail::kGrey) < cfg_.grey_p;
    p.blur = r.uniform_double(s, detail::kBlurApply) < cfg_.blur_p[view];
    p.sigma = cfg_.blur_sigma_min +
              (cfg_.blur_sigma_max - cfg_.blur_sigma_min) * r.uniform_double(s, detail::kBlurSigma);
    p.solarize = r.uniform_double(s, detail::kSolarize) < cfg_.solarize_p[view];
    return p;
  }

  /// Applies decisions `p` to `src` and writes the normalised view, float [C, S, S], to out.
  void apply(const Image& src, const ViewParams& p, float* out, AugmentScratch& scratch) const {
    MOCA_CHECK(src.height > 0 && src.width > 0 && (src.channels == 1 || src.channels == 3),
               "TwoViewAugment: invalid input image ", src.height, "×", src.width, "×",
               src.channels);
    Image& a = scratch.a;
    Image& b = scratch.b;
    transform::convert_channels(src, cfg_.channels, a);
    if (cfg_.pad > 0) {
      transform::pad(a, cfg_.pad, b);
      std::swap(a, b);
    }
    transform::crop(a, p.crop_top, p.crop_left, p.crop_height, p.crop_width, b);
    transform::resize(b, cfg_.crop_size, cfg_.crop_size, Interp::Bilinear, a);
    if (p.flip) transform::hflip(a);
    if (p.jitter) {
      const bool colour = cfg_.channels == 3;
      for (int op : p.jitter_order) {
        if (op == 0 && cfg_.brightness > 0) transform::adjust_brightness(a, p.brightness);
        if (op == 1 && cfg_.contrast > 0) transform::adjust_contrast(a, p.contrast);
        if (op == 2 && cfg_.saturation > 0 && colour) transform::adjust_saturation(a, p.saturation);
        if (op == 3 && cfg_.hue > 0 && colour) transform::adjust_hue(a, p.hue);
      }
    }
    if (p.grey && cfg_.channels == 3) transform::to_greyscale(a);
    if (p.blur) transform::gaussian_blur(a, p.sigma, cfg_.blur_kernel);
    if (p.solarize) transform::solarize(a);
    transform::normalize_to_chw(a, std::span<const float>(cfg_.mean.data(), 3),
                                std::span<const float>(cfg_.stddev.data(), 3), out);
  }

  /// View `view` (0 or 1) of sample `index` in `epoch`: draw() then apply().
  void apply(const Image& src, std::int64_t epoch, std::int64_t index, int view, float* out,
             AugmentScratch& scratch) const {
    apply(src, draw(epoch, index, view, src.height, src.width), out, scratch);
  }

 private:
  AugmentConfig cfg_;
  Philox rng_;
};

/// Evaluation preprocessing: channel conversion, padding, resize of the shorter side to
/// eval_resize (torchvision Resize(int): the longer side scales to int(eval_resize · long /
/// short)), centre crop eval_crop (zero-padded if the image is smaller), normalisation.
class EvalTransform {
 public:
  explicit EvalTransform(AugmentConfig config) : cfg_(config) { cfg_.validate(); }

  const AugmentConfig& config() const { return cfg_; }
  int channels() const { return cfg_.channels; }
  int size() const { return cfg_.eval_crop; }
  std::int64_t numel() const {
    return static_cast<std::int64_t>(cfg_.channels) * cfg_.eval_crop * cfg_.eval_crop;
  }

  /// Writes the preprocessed image, float [C, S, S], to out.
  void apply(const Image& src, float* out, AugmentScratch& scratch) const {
    MOCA_CHECK(src.height > 0 && src.width > 0 && (src.channels == 1 || src.channels == 3),
               "EvalTransform: invalid input image ", src.height, "×", src.width, "×",
               src.channels);
    Image& a = scratch.a;
    Image& b = scratch.b;
    transform::convert_channels(src, cfg_.channels, a);
    if (cfg_.pad > 0) {
      transform::pad(a, cfg_.pad, b);
      std::swap(a, b);
    }
    if (cfg_.eval_resize > 0) {
      const int h = a.height, w = a.width;
      int nh = cfg_.eval_resize, nw = cfg_.eval_resize;
      if (w <= h) {
        nh = static_cast<int>(static_cast<std::int64_t>(cfg_.eval_resize) * h / w);
      } else {
        nw = static_cast<int>(static_cast<std::int64_t>(cfg_.eval_resize) * w / h);
      }
      transform::resize(a, nh, nw, cfg_.eval_interp, b);
      std::swap(a, b);
    }
    const int s = cfg_.eval_crop;
    // torchvision CenterCrop: offset int(round((size - crop) / 2)) (half to even); a smaller
    // image is first zero-padded by (crop - size) // 2 before it.
    auto offset = [s](int size) {
      return size >= s ? static_cast<int>(std::nearbyint((size - s) / 2.0)) : -((s - size) / 2);
    };
    const int top = offset(a.height);
    const int left = offset(a.width);
    if (top != 0 || left != 0 || a.height != s || a.width != s) {
      transform::crop(a, top, left, s, s, b);
      std::swap(a, b);
    }
    transform::normalize_to_chw(a, std::span<const float>(cfg_.mean.data(), 3),
                                std::span<const float>(cfg_.stddev.data(), 3), out);
  }

 private:
  AugmentConfig cfg_;
};

}  // namespace moca::data
