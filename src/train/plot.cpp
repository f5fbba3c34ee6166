// Loss curves: CSV and a small self-contained SVG line plot (no plotting library).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "mamba/train.h"

namespace mamba::train {

std::string history_csv(const std::vector<StepLog>& h) {
  std::string out = "step,loss,lr,grad_norm,accuracy,tokens,seconds\n";
  char buf[256];
  for (const StepLog& l : h) {
    std::snprintf(buf, sizeof buf, "%lld,%.9g,%.9g,%.9g,%.6f,%lld,%.6f\n",
                  static_cast<long long>(l.step), l.loss, l.lr, l.grad_norm, l.accuracy,
                  static_cast<long long>(l.tokens), l.seconds);
    out += buf;
  }
  return out;
}

namespace {
std::string xml_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '<':
        o += "&lt;";
        break;
      case '>':
        o += "&gt;";
        break;
      case '&':
        o += "&amp;";
        break;
      case '"':
        o += "&quot;";
        break;
      default:
        o += c;
    }
  }
  return o;
}

// Round tick spacing (1, 2 or 5 times a power of ten) giving about `n` intervals over [lo, hi].
double nice_step(double lo, double hi, int n) {
  const double raw = (hi - lo) / n;
  if (!(raw > 0)) return 1;
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / p;
  return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

std::string fmt(double v) {
  char buf[64];
  if (v != 0 && (std::fabs(v) >= 1e5 || std::fabs(v) < 1e-3))
    std::snprintf(buf, sizeof buf, "%.0e", v);
  else
    std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}
}  // namespace

std::string svg_line_plot(const std::vector<Series>& series, const std::string& title,
                          const std::string& xlabel, const std::string& ylabel, bool log_y) {
  const double W = 760, H = 440, ml = 78, mr = 24, mt = 40, mb = 56;
  const double pw = W - ml - mr, ph = H - mt - mb;
  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  auto ty = [&](double y) { return log_y ? std::log10(y) : y; };
  for (const Series& s : series)
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i]) || (log_y && s.y[i] <= 0)) continue;
      x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]);
      y0 = std::min(y0, ty(s.y[i])), y1 = std::max(y1, ty(s.y[i]));
    }
  if (!(x0 <= x1)) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) y0 -= 0.5, y1 += 0.5;
  const double pad = 0.04 * (y1 - y0);
  y0 -= pad, y1 += pad;
  auto px = [&](double x) { return ml + (x - x0) / (x1 - x0) * pw; };
  auto py = [&](double y) { return mt + (1 - (y - y0) / (y1 - y0)) * ph; };
  std::string o;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
                "viewBox=\"0 0 %.0f %.0f\" "
                "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%%\" "
                "height=\"100%%\" fill=\"white\"/>\n",
                W, H, W, H);
  o += buf;
  std::snprintf(buf, sizeof buf,
                "<text x=\"%.1f\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">", W / 2);
  o += buf + xml_escape(title) + "</text>\n";
  // grid and ticks
  const double xs = nice_step(x0, x1, 8);
  for (double x = std::ceil(x0 / xs) * xs; x <= x1 + 1e-9 * xs; x += xs) {
    std::snprintf(buf, sizeof buf,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>\n"
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n",
                  px(x), mt, px(x), mt + ph, px(x), mt + ph + 16, fmt(x).c_str());
    o += buf;
  }
  // y ticks: round values; on a log axis 1-2-5 per decade (only powers of ten past 3 decades).
  std::vector<double> yt;  // positions in plot units (log10 when log_y)
  if (log_y) {
    const bool dense = y1 - y0 <= 3;
    for (int e = static_cast<int>(std::floor(y0)); e <= static_cast<int>(std::ceil(y1)); ++e)
      for (double m : {1.0, 2.0, 5.0}) {
        if (!dense && m != 1.0) continue;
        const double v = std::log10(m) + e;
        if (v >= y0 && v <= y1) yt.push_back(v);
      }
  } else {
    const double ys = nice_step(y0, y1, 6);
    for (double y = std::ceil(y0 / ys) * ys; y <= y1 + 1e-9 * ys; y += ys) yt.push_back(y);
  }
  for (double y : yt) {
    std::snprintf(buf, sizeof buf,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>\n"
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
                  ml, py(y), ml + pw, py(y), ml - 6, py(y) + 4,
                  fmt(log_y ? std::pow(10.0, y) : y).c_str());
    o += buf;
  }
  std::snprintf(buf, sizeof buf,
                "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
                "stroke=\"#444\"/>\n",
                ml, mt, pw, ph);
  o += buf;
  std::snprintf(buf, sizeof buf, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">", ml + pw / 2,
                H - 14);
  o += buf + xml_escape(xlabel) + "</text>\n";
  std::snprintf(buf, sizeof buf,
                "<text transform=\"translate(18,%.1f) rotate(-90)\" text-anchor=\"middle\">",
                mt + ph / 2);
  o += buf + xml_escape(ylabel + (log_y ? " (log scale)" : "")) + "</text>\n";
  static const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"};
  for (size_t k = 0; k < series.size(); ++k) {
    const Series& s = series[k];
    const char* c = colors[k % 6];
    o += "<polyline fill=\"none\" stroke-width=\"1.5\" stroke=\"";
    o += c;
    o += "\" points=\"";
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i]) || (log_y && s.y[i] <= 0)) continue;
      std::snprintf(buf, sizeof buf, "%.1f,%.1f ", px(s.x[i]), py(ty(s.y[i])));
      o += buf;
    }
    o += "\"/>\n";
    const double ly = mt + 14 + 18 * static_cast<double>(k);
    std::snprintf(
        buf, sizeof buf,
        "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"/>\n"
        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">",
        ml + pw - 34, ly, ml + pw - 10, ly, c, ml + pw - 40, ly + 4);
    o += buf + xml_escape(s.label) + "</text>\n";
  }
  o += "</svg>\n";
  return o;
}

}  // namespace mamba::train
