// A folder of image files as a data set (torchvision's ImageFolder layout).
//
//   root/n01440764/a.jpg, root/n01443537/b.png, ...  → classes in sorted folder-name order
//   root/a.jpg, root/b.bmp, ...                       → one flat, unlabelled set
//
//   ImageFolder train("/data/imagenet/train");         // decodes lazily, per get()
//   ImageFolder strict(dir, {.strict = true});         // any unreadable image is an error
//
// Images are the files with extension jpg, jpeg, png or bmp (any case), found recursively under
// each class folder (or under the root for a flat set) and sorted by path. A missing root, a
// root with no images, or a class folder with no images is an error naming the folder. An image
// that cannot be decoded is, by default, reported once through the warning callback (stderr if
// none) and replaced by the next readable sample in index order, so batches keep their size
// and a rerun sees the same replacement; in strict mode it is an error naming the file.
// `verify` decodes every image when the folder is opened, dropping the bad ones from the set up
// front (with a warning, or an error in strict mode); it reads the whole data set once.
//
// Programs that decode images include <moca/data/stb_image_impl.hpp> in one source file (see
// image.hpp).
#pragma once

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <iostream>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/data/dataset.hpp"
#include "moca/data/image.hpp"

namespace moca::data {

/// How an ImageFolder treats its root.
enum class FolderLayout {
  Auto,     ///< class sub-folders if the root has sub-folders, else flat
  Classes,  ///< one sub-folder per class
  Flat,     ///< every image under the root, unlabelled
};

/// Settings of an ImageFolder.
struct ImageFolderOptions {
  FolderLayout layout = FolderLayout::Auto;
  bool strict = false;  ///< an unreadable image is an error instead of a skipped sample
  bool verify = false;  ///< decode every image when opening (slow: reads the whole set)
  int channels = 0;     ///< decoded channels: 0 as in the file (1 or 3), or 1, or 3
  /// Receives warnings (skipped images, ignored files); nullptr prints them to stderr. It may be
  /// called from the loader's worker threads, one call at a time.
  std::function<void(const std::string&)> warn;
};

/// Whether a path has one of the image extensions (jpg, jpeg, png, bmp; any case).
inline bool is_image_file(const std::filesystem::path& path) {
  std::string ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext == ".jpg" || ext == ".jpeg" || ext == ".png" || ext == ".bmp";
}

/// Image files in a folder tree, sorted.
class ImageFolder : public Dataset {
 public:
  explicit ImageFolder(const std::filesystem::path& root, ImageFolderOptions options = {})
      : root_(root), opt_(std::move(options)) {
    namespace fs = std::filesystem;
    std::error_code ec;
    MOCA_CHECK(fs::exists(root_, ec), "image folder ", root_.string(), " does not exist");
    MOCA_CHECK(fs::is_directory(root_, ec), "image folder ", root_.string(), " is not a directory");
    MOCA_CHECK(opt_.channels == 0 || opt_.channels == 1 || opt_.channels == 3,
               "ImageFolder: channels must be 0, 1 or 3, got ", opt_.channels);

    std::vector<fs::path> subdirs, top_images;
    for (auto it = fs::directory_iterator(root_, ec); !ec && it != fs::directory_iterator();
         it.increment(ec)) {
      std::error_code type_ec;
      if (it->is_directory(type_ec)) {
        subdirs.push_back(it->path());
      } else if (is_image_file(it->path()) && it->is_regular_file(type_ec)) {
        top_images.push_back(it->path());
      }
    }
    MOCA_CHECK(!ec, "cannot list image folder ", root_.string(), ": ", ec.message());
    std::sort(subdirs.begin(), subdirs.end());

    FolderLayout layout = opt_.layout;
    if (layout == FolderLayout::Auto)
      layout = subdirs.empty() ? FolderLayout::Flat : FolderLayout::Classes;
    if (layout == FolderLayout::Flat) {
      files_ = list_images(root_);
      MOCA_CHECK(!files_.empty(), "image folder ", root_.string(),
                 " contains no images (jpg, jpeg, png, bmp)");
      labels_.assign(files_.size(), -1);
    } else {
      MOCA_CHECK(!subdirs.empty(), "image folder ", root_.string(), " has no class sub-folders",
                 top_images.empty() ? "" : " (only loose images: use the flat layout)");
      if (!top_images.empty())
        warning(::moca::detail::str(
            "image folder ", root_.string(), ": ", top_images.size(),
            " images directly in the root are ignored (not in a class folder)"));
      for (const auto& dir : subdirs) {
        std::vector<fs::path> images = list_images(dir);
        MOCA_CHECK(!images.empty(), "class folder ", dir.string(),
                   " contains no images (jpg, jpeg, png, bmp)");
        const auto label = static_cast<std::int32_t>(classes_.size());
        classes_.push_back(dir.filename().string());
        for (auto& f : images) {
          files_.push_back(std::move(f));
          labels_.push_back(label);
        }
      }
    }
    if (opt_.verify) verify_all();
  }

  std::int64_t size() const override { return static_cast<std::int64_t>(files_.size()); }

  /// Decodes sample i. An unreadable image is an error in strict mode; otherwise it is reported
  /// once and the next readable sample (in index order, wrapping around) is returned instead.
  Sample get(std::int64_t i) const override {
    check_index(i);
    const std::int64_t n = size();
    for (std::int64_t k = 0; k < n; ++k) {
      const std::int64_t j = (i + k) % n;
      if (!opt_.strict && known_bad(j)) continue;
      try {
        return Sample{load_image(files_[static_cast<std::size_t>(j)], opt_.channels),
                      labels_[static_cast<std::size_t>(j)]};
      } catch (const Error& e) {
        if (opt_.strict) throw;
        mark_bad(j, e.what());
      }
    }
    ::moca::detail::throw_check_failure(__FILE__, __LINE__, "a readable image", "image folder ",
                                        root_.string(), ": none of its ", n,
                                        " images can be decoded");
  }

  std::int32_t label(std::int64_t i) const override {
    check_index(i);
    return labels_[static_cast<std::size_t>(i)];
  }
  int num_classes() const override { return static_cast<int>(classes_.size()); }

  /// Class names (sub-folder names) by label; empty for a flat folder.
  const std::vector<std::string>& classes() const { return classes_; }
  /// The file of sample i.
  const std::filesystem::path& file(std::int64_t i) const {
    check_index(i);
    return files_[static_cast<std::size_t>(i)];
  }
  const std::filesystem::path& root() const { return root_; }
  /// Images found unreadable so far (dropped by verify, or skipped by get()).
  std::int64_t skipped() const {
    std::lock_guard lock(mutex_);
    return dropped_ + static_cast<std::int64_t>(bad_.size());
  }

 private:
  static std::vector<std::filesystem::path> list_images(const std::filesystem::path& dir) {
    namespace fs = std::filesystem;
    std::vector<fs::path> out;
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(
             dir, fs::directory_options::follow_directory_symlink, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      std::error_code type_ec;
      if (is_image_file(it->path()) && it->is_regular_file(type_ec)) out.push_back(it->path());
    }
    MOCA_CHECK(!ec, "cannot list folder ", dir.string(), ": ", ec.message());
    std::sort(out.begin(), out.end());
    return out;
  }

  void check_index(std::int64_t i) const {
    MOCA_CHECK(i >= 0 && i < size(), "ImageFolder ", root_.string(), ": index ", i,
               " out of range [0, ", size(), ")");
  }

  void warning(const std::string& message) const {
    if (opt_.warn) {
      opt_.warn(message);
    } else {
      std::cerr << "moca: warning: " << message << '\n';
    }
  }

  bool known_bad(std::int64_t i) const {
    std::lock_guard lock(mutex_);
    return bad_.count(i) != 0;
  }

  void mark_bad(std::int64_t i, const std::string& why) const {
    std::lock_guard lock(mutex_);
    if (!bad_.insert(i).second) return;  // reported already
    warning(::moca::detail::str("skipping unreadable image (", why, ")"));
  }

  void verify_all() {
    std::vector<std::filesystem::path> files;
    std::vector<std::int32_t> labels;
    for (std::size_t i = 0; i < files_.size(); ++i) {
      try {
        (void)load_image(files_[i], opt_.channels);
        files.push_back(std::move(files_[i]));
        labels.push_back(labels_[i]);
      } catch (const Error& e) {
        if (opt_.strict) throw;
        ++dropped_;
        warning(::moca::detail::str("dropping unreadable image (", e.what(), ")"));
      }
    }
    MOCA_CHECK(!files.empty(), "image folder ", root_.string(), ": none of its ", files_.size(),
               " images can be decoded");
    files_ = std::move(files);
    labels_ = std::move(labels);
  }

  std::filesystem::path root_;
  ImageFolderOptions opt_;
  std::vector<std::filesystem::path> files_;
  std::vector<std::int32_t> labels_;
  std::vector<std::string> classes_;
  mutable std::mutex mutex_;  // guards bad_ and serialises warnings
  mutable std::set<std::int64_t> bad_;
  std::int64_t dropped_ = 0;
};

}  // namespace moca::data
