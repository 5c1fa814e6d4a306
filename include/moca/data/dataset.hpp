// Data sets: indexed collections of 8-bit images with optional class labels.
//
//   const moca::data::Dataset& ds = ...;      // ArrayDataset, ImageFolder, your own subclass
//   moca::data::Sample s = ds.get(17);         // s.image (H×W×C u8), s.label (-1 if unlabelled)
//
// The loaders call get() from several background threads at once, so get() must be safe to call
// concurrently (const and free of unsynchronised state). A data set is a plain virtual interface:
// the cost of one virtual call per image is nothing next to decoding and augmenting it.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/data/image.hpp"

namespace moca::data {

/// One example: its image and its class (-1 when the data set has no labels).
struct Sample {
  Image image;
  std::int32_t label = -1;
};

/// An indexed, read-only collection of images.
class Dataset {
 public:
  virtual ~Dataset() = default;
  /// Number of samples.
  virtual std::int64_t size() const = 0;
  /// Sample i (0 ≤ i < size()). Safe to call from several threads at once.
  virtual Sample get(std::int64_t i) const = 0;
  /// The label of sample i without loading its image (-1 when unlabelled).
  virtual std::int32_t label(std::int64_t i) const = 0;
  /// Number of classes (labels are 0 .. num_classes()-1); 0 for an unlabelled data set.
  virtual int num_classes() const = 0;
};

/// Equally sized images held in memory as one array [N, H, W, C] (e.g. an IDX file).
class ArrayDataset : public Dataset {
 public:
  ArrayDataset() = default;
  /// `pixels` holds count · height · width · channels values; `labels` is empty (unlabelled) or
  /// holds one label in [0, num_classes) per image.
  ArrayDataset(std::vector<std::uint8_t> pixels, std::int64_t count, int height, int width,
               int channels, std::vector<std::int32_t> labels, int num_classes)
      : pixels_(std::move(pixels)),
        labels_(std::move(labels)),
        count_(count),
        height_(height),
        width_(width),
        channels_(channels),
        num_classes_(labels_.empty() ? 0 : num_classes) {
    MOCA_CHECK(count >= 0 && height > 0 && width > 0 && (channels == 1 || channels == 3),
               "ArrayDataset: invalid geometry ", count, "×", height, "×", width, "×", channels);
    MOCA_CHECK(static_cast<std::int64_t>(pixels_.size()) == count * height * width * channels,
               "ArrayDataset: ", pixels_.size(), " pixel values for ", count, " images of ", height,
               "×", width, "×", channels);
    MOCA_CHECK(labels_.empty() || static_cast<std::int64_t>(labels_.size()) == count,
               "ArrayDataset: ", labels_.size(), " labels for ", count, " images");
    for (std::int32_t l : labels_)
      MOCA_CHECK(l >= 0 && l < num_classes, "ArrayDataset: label ", l, " outside [0, ", num_classes,
                 ")");
  }

  std::int64_t size() const override { return count_; }
  Sample get(std::int64_t i) const override {
    MOCA_CHECK(i >= 0 && i < count_, "ArrayDataset: index ", i, " out of range [0, ", count_, ")");
    Sample s;
    s.image.height = height_;
    s.image.width = width_;
    s.image.channels = channels_;
    const std::size_t n = image_bytes();
    const auto* first = pixels_.data() + static_cast<std::size_t>(i) * n;
    s.image.pixels.assign(first, first + n);
    s.label = labels_.empty() ? -1 : labels_[static_cast<std::size_t>(i)];
    return s;
  }
  std::int32_t label(std::int64_t i) const override {
    MOCA_CHECK(i >= 0 && i < count_, "ArrayDataset: index ", i, " out of range [0, ", count_, ")");
    return labels_.empty() ? -1 : labels_[static_cast<std::size_t>(i)];
  }
  int num_classes() const override { return num_classes_; }

  int height() const { return height_; }
  int width() const { return width_; }
  int channels() const { return channels_; }
  /// All pixels, image after image.
  const std::vector<std::uint8_t>& pixels() const { return pixels_; }
  /// All labels (empty when unlabelled).
  const std::vector<std::int32_t>& labels() const { return labels_; }

 private:
  std::size_t image_bytes() const {
    return static_cast<std::size_t>(height_) * static_cast<std::size_t>(width_) * channels_;
  }

  std::vector<std::uint8_t> pixels_;
  std::vector<std::int32_t> labels_;
  std::int64_t count_ = 0;
  int height_ = 1, width_ = 1, channels_ = 1;
  int num_classes_ = 0;
};

}  // namespace moca::data
