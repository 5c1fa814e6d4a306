// Line charts as a standalone SVG file: panels side by side, each with axes, ticks, a legend and
// any number of series. Enough to watch a training run in a browser without Python.
//
//   Panel loss{"loss", "step", "", {{"loss", xs, ys}, {"L_IMG", xs, img}}};
//   Panel knn{"k-NN top-1 (%)", "step", "", {{"teacher", steps, acc}}};
//   write_svg_plot("run/curves.svg", {loss, knn});
//
// Points with a non-finite coordinate are skipped; a series with one point is drawn as a dot.
// The file is replaced atomically.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "moca/io/atomic_file.hpp"

namespace moca::train {

struct Series {
  std::string name;
  std::vector<double> x, y;
};

struct Panel {
  std::string title, xlabel, ylabel;
  std::vector<Series> series;
};

namespace detail {

inline std::string svg_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

inline std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// About five round tick values covering [lo, hi].
inline std::vector<double> nice_ticks(double lo, double hi) {
  const double span = hi - lo;
  const double raw = span / 5.0;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    step = m * mag;
    if (span / step <= 6.0) break;
  }
  std::vector<double> out;
  if (!std::isfinite(step) || step <= 0) return out;
  // Ticks as first + i·step (a bounded count): adding a step too small to change a large value
  // would never reach `hi`.
  const double first = std::ceil(lo / step) * step;
  for (int i = 0; i < 12; ++i) {
    const double t = first + i * step;
    if (t > hi + 1e-9 * span) break;
    out.push_back(std::abs(t) < 1e-12 * span ? 0.0 : t);
  }
  return out;
}

inline std::string tick_label(double v) {
  const double a = std::abs(v);
  if (a != 0 && (a >= 1e5 || a < 1e-3)) return fmt("%.1e", v);
  std::string s = fmt("%.4f", v);
  while (!s.empty() && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

}  // namespace detail

/// The SVG text of the panels.
inline std::string svg_plot(const std::vector<Panel>& panels, int panel_width = 480,
                            int height = 340) {
  static const char* const kColours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e",
                                         "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
  const int W = panel_width * std::max<int>(1, static_cast<int>(panels.size()));
  std::string s;
  s += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + std::to_string(W) +
       "\" height=\"" + std::to_string(height) + "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  const double ml = 62, mr = 14, mt = 28, mb = 40;
  for (std::size_t p = 0; p < panels.size(); ++p) {
    const Panel& panel = panels[p];
    const double x0 = static_cast<double>(p) * panel_width + ml, x1 = (p + 1.0) * panel_width - mr;
    const double y0 = mt, y1 = height - mb;
    double xlo = std::numeric_limits<double>::infinity(), xhi = -xlo, ylo = xlo, yhi = -xlo;
    for (const Series& se : panel.series)
      for (std::size_t i = 0; i < std::min(se.x.size(), se.y.size()); ++i) {
        if (!std::isfinite(se.x[i]) || !std::isfinite(se.y[i])) continue;
        xlo = std::min(xlo, se.x[i]);
        xhi = std::max(xhi, se.x[i]);
        ylo = std::min(ylo, se.y[i]);
        yhi = std::max(yhi, se.y[i]);
      }
    s += "<text x=\"" + detail::fmt("%.1f", (x0 + x1) / 2) + "\" y=\"18\" text-anchor=\"middle\" "
         "font-size=\"13\">" + detail::svg_escape(panel.title) + "</text>\n";
    s += "<rect x=\"" + detail::fmt("%.1f", x0) + "\" y=\"" + detail::fmt("%.1f", y0) +
         "\" width=\"" + detail::fmt("%.1f", x1 - x0) + "\" height=\"" +
         detail::fmt("%.1f", y1 - y0) + "\" fill=\"none\" stroke=\"#444\"/>\n";
    if (!std::isfinite(xlo)) {
      s += "<text x=\"" + detail::fmt("%.1f", (x0 + x1) / 2) + "\" y=\"" +
           detail::fmt("%.1f", (y0 + y1) / 2) + "\" text-anchor=\"middle\" fill=\"#888\">"
           "no data yet</text>\n";
      continue;
    }
    if (xhi == xlo) { xlo -= 1; xhi += 1; }
    if (yhi == ylo) {
      const double d = std::max(std::abs(ylo) * 0.05, 1e-6);
      ylo -= d;
      yhi += d;
    } else {
      const double pad = (yhi - ylo) * 0.05;
      ylo -= pad;
      yhi += pad;
    }
    auto X = [&](double v) { return x0 + (v - xlo) / (xhi - xlo) * (x1 - x0); };
    auto Y = [&](double v) { return y1 - (v - ylo) / (yhi - ylo) * (y1 - y0); };
    for (double t : detail::nice_ticks(xlo, xhi)) {
      s += "<line x1=\"" + detail::fmt("%.1f", X(t)) + "\" y1=\"" + detail::fmt("%.1f", y1) +
           "\" x2=\"" + detail::fmt("%.1f", X(t)) + "\" y2=\"" + detail::fmt("%.1f", y0) +
           "\" stroke=\"#eee\"/>\n";
      s += "<text x=\"" + detail::fmt("%.1f", X(t)) + "\" y=\"" + detail::fmt("%.1f", y1 + 14) +
           "\" text-anchor=\"middle\">" + detail::tick_label(t) + "</text>\n";
    }
    for (double t : detail::nice_ticks(ylo, yhi)) {
      s += "<line x1=\"" + detail::fmt("%.1f", x0) + "\" y1=\"" + detail::fmt("%.1f", Y(t)) +
           "\" x2=\"" + detail::fmt("%.1f", x1) + "\" y2=\"" + detail::fmt("%.1f", Y(t)) +
           "\" stroke=\"#eee\"/>\n";
      s += "<text x=\"" + detail::fmt("%.1f", x0 - 5) + "\" y=\"" + detail::fmt("%.1f", Y(t) + 4) +
           "\" text-anchor=\"end\">" + detail::tick_label(t) + "</text>\n";
    }
    s += "<text x=\"" + detail::fmt("%.1f", (x0 + x1) / 2) + "\" y=\"" +
         detail::fmt("%.1f", static_cast<double>(height) - 6) + "\" text-anchor=\"middle\">" +
         detail::svg_escape(panel.xlabel) + "</text>\n";
    if (!panel.ylabel.empty())
      s += "<text transform=\"translate(" + detail::fmt("%.1f", x0 - 48) + "," +
           detail::fmt("%.1f", (y0 + y1) / 2) + ") rotate(-90)\" text-anchor=\"middle\">" +
           detail::svg_escape(panel.ylabel) + "</text>\n";
    for (std::size_t k = 0; k < panel.series.size(); ++k) {
      const Series& se = panel.series[k];
      const char* colour = kColours[k % 8];
      std::string pts;
      std::size_t count = 0;
      double lx = 0, ly = 0;
      for (std::size_t i = 0; i < std::min(se.x.size(), se.y.size()); ++i) {
        if (!std::isfinite(se.x[i]) || !std::isfinite(se.y[i])) continue;
        lx = X(se.x[i]);
        ly = Y(se.y[i]);
        pts += detail::fmt("%.1f", lx) + "," + detail::fmt("%.1f", ly) + " ";
        ++count;
      }
      if (count == 1) {
        s += "<circle cx=\"" + detail::fmt("%.1f", lx) + "\" cy=\"" + detail::fmt("%.1f", ly) +
             "\" r=\"3\" fill=\"" + colour + "\"/>\n";
      } else if (count > 1) {
        s += "<polyline fill=\"none\" stroke=\"" + std::string(colour) +
             "\" stroke-width=\"1.5\" points=\"" + pts + "\"/>\n";
        if (se.x.size() <= 40) {  // sparse series (evaluations): mark the points
          for (std::size_t i = 0; i < std::min(se.x.size(), se.y.size()); ++i)
            if (std::isfinite(se.x[i]) && std::isfinite(se.y[i]))
              s += "<circle cx=\"" + detail::fmt("%.1f", X(se.x[i])) + "\" cy=\"" +
                   detail::fmt("%.1f", Y(se.y[i])) + "\" r=\"2.5\" fill=\"" + colour + "\"/>\n";
        }
      }
      const double ly0 = y0 + 14 + 14.0 * static_cast<double>(k);
      s += "<line x1=\"" + detail::fmt("%.1f", x1 - 110) + "\" y1=\"" + detail::fmt("%.1f", ly0 - 4) +
           "\" x2=\"" + detail::fmt("%.1f", x1 - 92) + "\" y2=\"" + detail::fmt("%.1f", ly0 - 4) +
           "\" stroke=\"" + colour + "\" stroke-width=\"2\"/>\n";
      s += "<text x=\"" + detail::fmt("%.1f", x1 - 88) + "\" y=\"" + detail::fmt("%.1f", ly0) +
           "\">" + detail::svg_escape(se.name) + "</text>\n";
    }
  }
  s += "</svg>\n";
  return s;
}

/// Writes svg_plot(panels) to `path` atomically.
inline void write_svg_plot(const std::filesystem::path& path, const std::vector<Panel>& panels) {
  const std::string text = svg_plot(panels);
  AtomicFileWriter out(path);
  out.write(text.data(), text.size());
  out.commit();
}

}  // namespace moca::train
