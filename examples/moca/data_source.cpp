#include "data_source.hpp"

#include <cmath>
#include <filesystem>
#include <moca/core/check.hpp>
#include <moca/data/idx.hpp>
#include <moca/data/image_folder.hpp>

// The program's one copy of the stb_image decoders (no other source file of `moca` includes it).
#include <moca/data/stb_image_impl.hpp>

namespace moca::cli {

namespace fs = std::filesystem;

namespace {

// Splits "NAME:train" into NAME and the split; no suffix means train.
std::pair<std::string, data::Split> split_suffix(const std::string& spec, bool* had_suffix) {
  for (const auto& [suffix, split] :
       {std::pair<std::string, data::Split>{":train", data::Split::Train},
        std::pair<std::string, data::Split>{":test", data::Split::Test}}) {
    if (spec.size() > suffix.size() &&
        spec.compare(spec.size() - suffix.size(), suffix.size(), suffix) == 0) {
      *had_suffix = true;
      return {spec.substr(0, spec.size() - suffix.size()), split};
    }
  }
  *had_suffix = false;
  return {spec, data::Split::Train};
}

bool is_idx_images_file(const fs::path& p) {
  const std::string n = p.filename().string();
  return n.find("idx3-ubyte") != std::string::npos;
}

// One IDX images file, with labels from the idx1 file beside it when there is one.
std::unique_ptr<data::Dataset> open_idx_file(const fs::path& images_path, std::string* desc) {
  data::IdxImages images = data::read_idx_images(images_path);
  std::string labels_name = images_path.filename().string();
  labels_name.replace(labels_name.find("idx3-ubyte"), 10, "idx1-ubyte");
  const std::size_t at = labels_name.find("images");
  if (at != std::string::npos) labels_name.replace(at, 6, "labels");
  const fs::path labels_path = images_path.parent_path() / labels_name;
  std::vector<std::int32_t> labels;
  int classes = 0;
  std::error_code ec;
  if (labels_name != images_path.filename().string() && fs::is_regular_file(labels_path, ec)) {
    const std::vector<std::uint8_t> raw = data::read_idx_labels(labels_path);
    MOCA_CHECK(static_cast<std::int64_t>(raw.size()) == images.count, images_path.string(),
               " holds ", images.count, " images but ", labels_path.string(), " holds ",
               raw.size(), " labels");
    for (std::uint8_t l : raw) {
      labels.push_back(l);
      classes = std::max(classes, l + 1);
    }
  }
  if (desc)
    *desc = detail::str("IDX ", images_path.string(), " (", images.count, " images of ",
                        images.rows, "×", images.cols, labels.empty() ? ", unlabelled" : "", ")");
  return std::make_unique<data::ArrayDataset>(std::move(images.pixels), images.count, images.rows,
                                              images.cols, 1, std::move(labels), classes);
}

std::unique_ptr<data::ImageFolder> open_folder(const fs::path& dir, bool strict,
                                               std::string* desc) {
  data::ImageFolderOptions opt;
  opt.strict = strict;
  auto f = std::make_unique<data::ImageFolder>(dir, opt);
  if (desc)
    *desc = detail::str("image folder ", dir.string(), " (", f->size(), " images, ",
                        f->num_classes() == 0 ? std::string("unlabelled")
                                              : detail::str(f->num_classes(), " classes"),
                        ")");
  return f;
}

}  // namespace

std::unique_ptr<data::Dataset> open_dataset(const std::string& spec, bool strict,
                                            std::string* description) {
  MOCA_CHECK(!spec.empty(), "no data set given");
  bool suffix = false;
  const auto [name, split] = split_suffix(spec, &suffix);
  const char* split_name = split == data::Split::Train ? "train" : "test";
  std::error_code ec;
  if (name == "fashion-mnist" || (fs::is_directory(name, ec) &&
                                  data::FashionMnist::available(data::Split::Train, name))) {
    const fs::path dir = name == "fashion-mnist" ? fs::path(data::FashionMnist::kDefaultDir)
                                                 : fs::path(name);
    auto ds = std::make_unique<data::ArrayDataset>(data::FashionMnist::load(split, dir));
    if (description)
      *description = detail::str("Fashion-MNIST ", split_name, " split (", ds->size(),
                                 " images, ", dir.string(), ")");
    return ds;
  }
  MOCA_CHECK(fs::exists(name, ec), "data set '", name, "' does not exist (expected fashion-mnist, "
             "an image folder or an IDX images file)");
  MOCA_CHECK(!suffix, "data set '", spec, "': a :train or :test suffix applies only to "
             "fashion-mnist and to folders of IDX files");
  if (fs::is_regular_file(name, ec)) {
    MOCA_CHECK(is_idx_images_file(name), "data set file '", name,
               "' is not an IDX images file (*-idx3-ubyte or *-idx3-ubyte.gz)");
    return open_idx_file(name, description);
  }
  return open_folder(name, strict, description);
}

RunData open_run_data(const std::string& spec, bool strict) {
  RunData d;
  std::error_code ec;
  bool suffix = false;
  (void)split_suffix(spec, &suffix);
  MOCA_CHECK(!suffix, "--data '", spec, "': give the data set without a split suffix (the train "
             "split is used for pretraining and the test split for evaluation)");
  if (spec == "fashion-mnist" ||
      (fs::is_directory(spec, ec) && data::FashionMnist::available(data::Split::Train, spec))) {
    std::string a, b;
    d.train = open_dataset(spec + ":train", strict, &a);
    const fs::path dir = spec == "fashion-mnist" ? fs::path(data::FashionMnist::kDefaultDir)
                                                 : fs::path(spec);
    if (data::FashionMnist::available(data::Split::Test, dir))
      d.test = open_dataset(spec + ":test", strict, &b);
    d.description = a + (d.test ? "; k-NN queries: " + b : "; no test split for k-NN");
    d.fashion_mnist_like = true;
    return d;
  }
  const fs::path root(spec);
  if (fs::is_directory(root / "train", ec)) {
    std::string a, b;
    auto train = open_folder(root / "train", strict, &a);
    std::unique_ptr<data::ImageFolder> test;
    for (const char* name : {"val", "test"})
      if (fs::is_directory(root / name, ec)) {
        test = open_folder(root / name, strict, &b);
        break;
      }
    if (test) {
      MOCA_CHECK(test->classes() == train->classes(), "data set ", spec,
                 ": the evaluation folder's classes differ from train/'s (", test->num_classes(),
                 " vs ", train->num_classes(), " class folders with different names)");
    }
    d.description = a + (test ? "; k-NN queries: " + b : "; no val/ or test/ folder for k-NN");
    d.train = std::move(train);
    d.test = std::move(test);
    return d;
  }
  std::string a;
  d.train = open_dataset(spec, strict, &a);
  d.fashion_mnist_like = is_fashion_mnist_like(*d.train);
  d.description = a + "; no test split for k-NN";
  return d;
}

bool is_fashion_mnist_like(const data::Dataset& ds) {
  const auto* a = dynamic_cast<const data::ArrayDataset*>(&ds);
  return a != nullptr && a->height() == data::FashionMnist::kSize &&
         a->width() == data::FashionMnist::kSize && a->channels() == 1;
}

data::AugmentConfig augment_for(const VitConfig& enc, bool fashion_mnist_like) {
  const int img = static_cast<int>(enc.img_size);
  if (enc.in_chans == 1 && img == 32) {
    data::AugmentConfig c = data::AugmentConfig::fashion_mnist_tiny();
    if (!fashion_mnist_like) {  // arbitrary images: no 28 → 32 padding, resize for evaluation
      c.pad = 0;
      c.eval_resize = img;
    }
    return c;
  }
  data::AugmentConfig c = data::AugmentConfig::imagenet();
  c.channels = static_cast<int>(enc.in_chans);
  c.crop_size = img;
  c.eval_crop = img;
  // Spec §9 resizes to 256 for a 224 crop: the same ratio at other sizes.
  c.eval_resize = static_cast<int>(std::lround(img * 256.0 / 224.0));
  if (c.channels == 1) {
    c.saturation = c.hue = c.grey_p = 0.0;
    c.mean = {0.449f, 0.449f, 0.449f};  // the ImageNet statistics of the luma channel
    c.stddev = {0.226f, 0.226f, 0.226f};
  }
  c.validate();
  return c;
}

}  // namespace moca::cli
