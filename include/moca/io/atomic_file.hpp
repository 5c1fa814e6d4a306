// AtomicFileWriter: writes a file so that its final name only ever holds a complete file.
//
//   AtomicFileWriter out("run/model.safetensors");  // opens run/model.safetensors.tmp
//   out.write(header.data(), header.size());
//   out.write(data, bytes);
//   out.commit();   // flush + fsync, then rename over run/model.safetensors
//
// Until commit() succeeds the target is untouched: a crash, a full disk or an exception leaves the
// previous file (or none) under the final name, and the destructor removes the temporary.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "moca/core/check.hpp"

namespace moca {

/// Writes `path` through the temporary `path + ".tmp"` in the same directory, renamed over the
/// target only once all bytes are on disk (POSIX).
class AtomicFileWriter {
 public:
  /// Creates (or truncates) the temporary file. Throws moca::Error naming it on failure.
  explicit AtomicFileWriter(const std::filesystem::path& path)
      : path_(path.string()), tmp_(path.string() + ".tmp") {
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) fail("cannot create the temporary file '" + tmp_ + "'");
  }

  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  /// Removes the temporary unless commit() succeeded.
  ~AtomicFileWriter() { abandon(); }

  /// Appends `bytes` bytes.
  void write(const void* data, std::size_t bytes) {
    MOCA_CHECK(fd_ >= 0, "AtomicFileWriter: write to '", path_, "' after commit or failure");
    const char* p = static_cast<const char*>(data);
    while (bytes > 0) {
      // Large writes go in pieces: Linux transfers at most about 2 GiB per call.
      const ssize_t n = ::write(fd_, p, std::min<std::size_t>(bytes, std::size_t{1} << 30));
      if (n < 0) {
        if (errno == EINTR) continue;
        fail_and_abandon("cannot write '" + tmp_ + "'");
      }
      p += n;
      bytes -= static_cast<std::size_t>(n);
    }
  }

  /// Flushes the data to disk and renames the temporary over the target.
  void commit() {
    MOCA_CHECK(fd_ >= 0, "AtomicFileWriter: '", path_, "' committed twice or after a failure");
    if (::fsync(fd_) != 0) fail_and_abandon("cannot flush '" + tmp_ + "' to disk");
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) {
      const int err = errno;
      std::remove(tmp_.c_str());
      errno = err;
      fail("cannot close '" + tmp_ + "'");
    }
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      std::remove(tmp_.c_str());
      errno = err;
      fail("cannot rename '" + tmp_ + "' to '" + path_ + "'");
    }
    committed_ = true;
    sync_directory();
  }

  /// The target path.
  const std::string& path() const { return path_; }

 private:
  [[noreturn]] static void fail(const std::string& what) {
    const int err = errno;
    throw Error(what + ": " + std::strerror(err));
  }
  [[noreturn]] void fail_and_abandon(const std::string& what) {
    const int err = errno;
    abandon();
    errno = err;
    fail(what);
  }
  void abandon() noexcept {
    if (committed_) return;
    if (fd_ >= 0) {
      ::close(fd_);
      fd_ = -1;
    }
    if (!tmp_.empty()) std::remove(tmp_.c_str());
  }
  // Makes the rename itself durable. Best effort: some file systems refuse fsync on a directory,
  // and the file is complete under its final name either way.
  void sync_directory() const noexcept {
    std::filesystem::path dir = std::filesystem::path(path_).parent_path();
    if (dir.empty()) dir = ".";
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    (void)::fsync(fd);
    ::close(fd);
  }

  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace moca
