// A small hand-written SVG line chart: losses on the left axis, and optionally
// an accuracy in [0, 1] on the right axis.
#pragma once

#include <string>
#include <vector>

namespace colt5 {
namespace app {

struct Series {
  std::string name;
  std::string color;
  std::vector<std::pair<double, double>> points;  // (step, value)
  bool right_axis = false;                        // plotted against [0, 1]
};

// printf-style formatting of one number.
std::string fmt(double v, const char* f = "%.4g");

// An SVG line chart of the series against the step.
std::string render_svg(const std::string& title, const std::vector<Series>& series);

}  // namespace app
}  // namespace colt5
