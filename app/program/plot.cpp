#include "program/plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

namespace colt5 {
namespace app {

std::string fmt(double v, const char* f) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

std::string render_svg(const std::string& title, const std::vector<Series>& series) {
  const double W = 720, H = 420, L = 70, R = 70, T = 40, B = 50;
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
  bool any_right = false;
  for (const auto& s : series)
    for (const auto& p : s.points) {
      if (!std::isfinite(p.second)) continue;
      xmin = std::min(xmin, p.first);
      xmax = std::max(xmax, p.first);
      if (s.right_axis) {
        any_right = true;
      } else {
        ymin = std::min(ymin, p.second);
        ymax = std::max(ymax, p.second);
      }
    }
  if (!std::isfinite(xmin)) xmin = 0, xmax = 1;
  if (xmax <= xmin) xmax = xmin + 1;
  if (!std::isfinite(ymin)) ymin = 0, ymax = 1;
  if (ymax <= ymin) ymax = ymin + 1;
  const double pad = 0.05 * (ymax - ymin);
  ymin = std::max(0.0, ymin - pad);
  ymax += pad;
  auto X = [&](double x) { return L + (x - xmin) / (xmax - xmin) * (W - L - R); };
  auto Y = [&](double y) { return T + (1 - (y - ymin) / (ymax - ymin)) * (H - T - B); };
  auto Y2 = [&](double y) { return T + (1 - y) * (H - T - B); };

  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
    << " " << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n";
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o << "<text x=\"" << W / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">" << title << "</text>\n";
  o << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << W - L - R << "\" height=\"" << H - T - B
    << "\" fill=\"none\" stroke=\"#444\"/>\n";
  for (int i = 0; i <= 5; ++i) {
    const double fy = ymin + (ymax - ymin) * i / 5.0, y = Y(fy);
    o << "<line x1=\"" << L << "\" y1=\"" << y << "\" x2=\"" << W - R << "\" y2=\"" << y
      << "\" stroke=\"#ddd\"/><text x=\"" << L - 6 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">" << fmt(fy)
      << "</text>\n";
    if (any_right)
      o << "<text x=\"" << W - R + 6 << "\" y=\"" << Y2(i / 5.0) + 4 << "\">" << fmt(i / 5.0, "%.1f") << "</text>\n";
    const double fx = xmin + (xmax - xmin) * i / 5.0;
    o << "<text x=\"" << X(fx) << "\" y=\"" << H - B + 18 << "\" text-anchor=\"middle\">" << fmt(fx, "%.0f")
      << "</text>\n";
  }
  o << "<text x=\"" << W / 2 << "\" y=\"" << H - 10 << "\" text-anchor=\"middle\">step</text>\n";
  o << "<text x=\"16\" y=\"" << H / 2 << "\" transform=\"rotate(-90 16 " << H / 2
    << ")\" text-anchor=\"middle\">loss (nats)</text>\n";
  if (any_right)
    o << "<text x=\"" << W - 14 << "\" y=\"" << H / 2 << "\" transform=\"rotate(90 " << W - 14 << " " << H / 2
      << ")\" text-anchor=\"middle\">accuracy</text>\n";
  int legend = 0;
  for (const auto& s : series) {
    std::ostringstream pts;
    int n = 0;
    for (const auto& p : s.points) {
      if (!std::isfinite(p.second)) continue;
      pts << fmt(X(p.first), "%.1f") << "," << fmt(s.right_axis ? Y2(p.second) : Y(p.second), "%.1f") << " ";
      ++n;
    }
    if (n == 0) continue;
    if (n == 1) {
      auto p = s.points.front();
      o << "<circle cx=\"" << X(p.first) << "\" cy=\"" << (s.right_axis ? Y2(p.second) : Y(p.second))
        << "\" r=\"3\" fill=\"" << s.color << "\"/>\n";
    } else {
      o << "<polyline fill=\"none\" stroke=\"" << s.color << "\" stroke-width=\"1.6\" points=\"" << pts.str()
        << "\"/>\n";
    }
    const double ly = T + 16 + 16 * legend++;
    o << "<line x1=\"" << W - R - 150 << "\" y1=\"" << ly - 4 << "\" x2=\"" << W - R - 130 << "\" y2=\"" << ly - 4
      << "\" stroke=\"" << s.color << "\" stroke-width=\"2\"/><text x=\"" << W - R - 124 << "\" y=\"" << ly << "\">"
      << s.name << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

}  // namespace app
}  // namespace colt5
