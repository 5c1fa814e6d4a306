// Data sets named on the command line, and the augmentation that fits a model.
//
// A data set argument is one of
//   fashion-mnist            Fashion-MNIST from Debian's dataset-fashion-mnist package
//   DIR with IDX files       a folder holding train-images-idx3-ubyte(.gz) and the other three
//                            MNIST-format files (Fashion-MNIST, MNIST, ...)
//   DIR with train/          an image folder split into DIR/train and DIR/val (or DIR/test)
//   DIR                      an image folder: one sub-folder per class, or a flat unlabelled set
//   FILE-idx3-ubyte[.gz]     one IDX images file (labels from the matching idx1 file if present)
// For commands that read one split, `fashion-mnist` and IDX folders take a `:train` or `:test`
// suffix (default train).
#pragma once

#include <memory>
#include <string>

#include <moca/data/augment.hpp>
#include <moca/data/dataset.hpp>
#include <moca/models/vit.hpp>

namespace moca::cli {

/// The images of a run: `train` for pretraining and as the k-NN memory bank, `test` (possibly
/// null) as the k-NN queries.
struct RunData {
  std::string description;  ///< for the printed configuration
  std::unique_ptr<data::Dataset> train, test;
  bool fashion_mnist_like = false;  ///< 28×28 grey images from IDX files
};

/// Opens the data of `spec`; `strict` makes an unreadable image an error rather than a skip.
RunData open_run_data(const std::string& spec, bool strict);

/// Opens one split: the train or test part of `spec` (see the top of this header).
std::unique_ptr<data::Dataset> open_dataset(const std::string& spec, bool strict,
                                            std::string* description = nullptr);

/// Whether `ds` holds 28×28 grey images in memory (Fashion-MNIST, MNIST, other IDX files): the
/// images that the tiny preset's preprocessing pads to 32×32.
bool is_fashion_mnist_like(const data::Dataset& ds);

/// The augmentation and evaluation preprocessing of an encoder: spec §16 for 32×32 grey models on
/// 28×28 IDX images, spec §8/§9 (scaled to the image size) otherwise.
data::AugmentConfig augment_for(const VitConfig& encoder, bool fashion_mnist_like);

}  // namespace moca::cli
