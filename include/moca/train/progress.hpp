// A progress bar for long loops: fraction done, rate, elapsed and remaining time, and a line of
// caller-supplied details (losses, learning rate, throughput).
//
//   ProgressBar bar("pretrain", total_steps, /*start=*/resumed_step);
//   for (...) { ...; bar.update(step + 1, "loss 6.93  lr 2.1e-04  41.7 pairs/s"); }
//   bar.finish("done");
//
// On a terminal the bar redraws in place at most every `redraw_s` seconds. When the stream is
// not a terminal (a log file, CI), it prints one plain line every `plain_every_s` seconds
// instead, so logs stay readable. The rate and ETA count only the work done since construction
// (a resumed run does not claim the steps it inherited).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <utility>

namespace moca::train {

/// "1:02:03" for an hour or more, "02:03" below; "--:--" for an unknown duration.
inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  const auto s = static_cast<long long>(std::llround(seconds));
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", s / 3600, (s / 60) % 60, s % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", s / 60, s % 60);
  }
  return buf;
}

class ProgressBar {
 public:
  struct Options {
    std::FILE* out = stderr;
    int width = 24;              ///< characters of the bar itself
    double redraw_s = 0.25;      ///< terminal: least time between redraws
    double plain_every_s = 30;   ///< not a terminal: time between printed lines
    int terminal = -1;           ///< 1 terminal, 0 plain lines, -1 detect from `out`
  };

  ProgressBar(std::string label, std::int64_t total, std::int64_t start = 0)
      : ProgressBar(std::move(label), total, start, Options{}) {}
  ProgressBar(std::string label, std::int64_t total, std::int64_t start, Options options)
      : label_(std::move(label)),
        total_(std::max<std::int64_t>(total, 0)),
        start_(start),
        done_(start),
        opt_(options),
        begin_(Clock::now()),
        last_draw_(begin_) {
    tty_ = opt_.terminal >= 0 ? opt_.terminal == 1 : ::isatty(::fileno(opt_.out)) == 1;
  }

  /// Records that `done` units of `total` are complete; redraws when due.
  void update(std::int64_t done, std::string_view details = {}) {
    done_ = done;
    const auto now = Clock::now();
    const double since = seconds(last_draw_, now);
    if (drawn_ && since < (tty_ ? opt_.redraw_s : opt_.plain_every_s) && done_ < total_) return;
    draw(details, now);
  }

  /// Draws the final state (unless it is already shown) and ends the line.
  void finish(std::string_view details = {}) {
    if (!drawn_ || drawn_done_ != done_) draw(details, Clock::now());
    if (tty_) std::fputc('\n', opt_.out);
    std::fflush(opt_.out);
  }

  /// Units per second since construction.
  double rate() const {
    const double t = seconds(begin_, Clock::now());
    return t > 0 ? static_cast<double>(done_ - start_) / t : 0.0;
  }
  /// Seconds since construction.
  double elapsed() const { return seconds(begin_, Clock::now()); }

  /// The text of the bar for `done` of `total` after `elapsed` seconds at `rate` units/s.
  static std::string render(std::string_view label, std::int64_t done, std::int64_t total,
                            double elapsed, double rate, int width, std::string_view details) {
    const double frac =
        total > 0 ? std::clamp(static_cast<double>(done) / static_cast<double>(total), 0.0, 1.0)
                  : 1.0;
    const int filled = static_cast<int>(frac * width);
    std::string bar(static_cast<std::size_t>(width), ' ');
    for (int i = 0; i < filled; ++i) bar[static_cast<std::size_t>(i)] = '=';
    if (filled < width) bar[static_cast<std::size_t>(filled)] = '>';
    const double eta = rate > 0 ? static_cast<double>(total - done) / rate : -1.0;
    char head[256];
    std::snprintf(head, sizeof head, "%.*s %3d%% [%s] %lld/%lld [%s<%s, %.2f it/s]",
                  static_cast<int>(label.size()), label.data(),
                  static_cast<int>(std::floor(frac * 100)), bar.c_str(),
                  static_cast<long long>(done), static_cast<long long>(total),
                  format_duration(elapsed).c_str(), format_duration(eta).c_str(), rate);
    std::string line(head);
    if (!details.empty()) line.append(" ").append(details);
    return line;
  }

 private:
  using Clock = std::chrono::steady_clock;
  static double seconds(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  }

  void draw(std::string_view details, Clock::time_point now) {
    const double elapsed = seconds(begin_, now);
    const double r = elapsed > 0 ? static_cast<double>(done_ - start_) / elapsed : 0.0;
    const std::string line = render(label_, done_, total_, elapsed, r, opt_.width, details);
    if (tty_) {
      // Clear what a longer previous line left behind.
      std::fprintf(opt_.out, "\r%s\x1b[K", line.c_str());
    } else {
      std::fprintf(opt_.out, "%s\n", line.c_str());
    }
    std::fflush(opt_.out);
    last_draw_ = now;
    drawn_ = true;
    drawn_done_ = done_;
  }

  std::string label_;
  std::int64_t total_, start_, done_;
  std::int64_t drawn_done_ = -1;
  Options opt_;
  Clock::time_point begin_, last_draw_;
  bool tty_ = false;
  bool drawn_ = false;
};

}  // namespace moca::train
