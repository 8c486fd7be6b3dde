#include "metrics_view.h"

#include <algorithm>
#include <cctype>

namespace memfit::daemon {
namespace {

// The length of the valid UTF-8 sequence at s[i], or 0 when it is not one (overlong
// forms, surrogates and code points above U+10FFFF are not).
size_t utf8_length(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  size_t n = 0;
  uint32_t cp = 0;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
    cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    cp = c & 0x0F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b(i + k) & 0x3F);
  }
  if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

}  // namespace

std::string LabelValue(std::string_view v, size_t max_bytes) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD
  std::string out;
  out.reserve(std::min(v.size(), max_bytes));
  for (size_t i = 0; i < v.size();) {
    const size_t n = utf8_length(v, i);
    const unsigned char c = static_cast<unsigned char>(v[i]);
    std::string_view piece = n == 0 || (n == 1 && (c < 0x20 || c == 0x7f)) ? kReplacement : v.substr(i, n);
    if (out.size() + piece.size() > max_bytes) break;
    out.append(piece);
    i += n == 0 ? 1 : n;
  }
  return out;
}

std::string ValidUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_length(s, i);
    if (n == 0) {
      out.append("\xEF\xBF\xBD");
      ++i;
    } else {
      out.append(s.substr(i, n));
      i += n;
    }
  }
  return out;
}

std::string StateLabel(v1::JobState s) {
  std::string n = v1::JobState_Name(s);
  if (n.empty()) return "unknown";
  for (char& ch : n) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return n;
}

JobSeries GaugeOf(const v1::Job& j) {
  JobSeries g;
  g.id = LabelValue(j.id());
  g.owner = LabelValue(j.owner());
  g.device = LabelValue(j.device());
  g.state = StateLabel(j.state());
  g.name = LabelValue(j.name());
  g.model = LabelValue(j.spec().model().architecture());
  g.method = LabelValue(j.spec().method().kind().empty() ? std::string("lora") : j.spec().method().kind());
  const std::string& preset = j.spec().memory().preset();
  g.preset = LabelValue(!j.plan().level().empty() ? std::string("auto") : preset.empty() ? std::string("custom") : preset);
  g.estimated = j.plan().estimated_peak_bytes();
  g.reserved = j.plan().reserved_bytes();
  g.measured_peak = j.progress().peak_memory_bytes();
  g.activation_bytes = j.progress().activation_bytes() > 0 ? j.progress().activation_bytes() : j.plan().activation_bytes();
  g.activation_saved = std::max<int64_t>(0, j.plan().exact_activation_bytes() - j.plan().activation_bytes());
  g.step = j.progress().step();
  g.total_steps = j.progress().total_steps();
  g.loss = j.progress().loss();
  return g;
}

FinishedChoice ChooseFinished(const std::map<std::string, int64_t>& finished_ms, int64_t now_ms, int64_t retention_ms,
                              size_t max_jobs) {
  std::vector<std::pair<int64_t, std::string>> young;
  FinishedChoice c;
  for (const auto& [id, t] : finished_ms) {
    const int64_t age = std::max<int64_t>(0, now_ms - t);
    if (age < retention_ms) {
      young.emplace_back(t, id);
    } else {
      c.drop.push_back(id);
    }
  }
  std::sort(young.begin(), young.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  for (size_t i = 0; i < young.size(); ++i) (i < max_jobs ? c.keep : c.drop).push_back(young[i].second);
  return c;
}

void PeakWindow::observe(const std::string& device, int64_t bytes) {
  auto [it, fresh] = peak_.try_emplace(device, bytes);
  if (!fresh) it->second = std::max(it->second, bytes);
}

int64_t PeakWindow::take(const std::string& device, int64_t current) {
  const auto it = peak_.find(device);
  int64_t p = current;
  if (it != peak_.end()) {
    p = std::max(p, it->second);
    peak_.erase(it);
  }
  return std::max<int64_t>(0, p);
}

}  // namespace memfit::daemon
