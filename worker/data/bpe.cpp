// GPT-2 byte-level BPE: the pre-tokenizer splits text as GPT-2's regular expression
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// does (Unicode letter and number classes from ICU), each piece's UTF-8 bytes map to
// printable code points, and the merges apply in rank order.
#include <unicode/uchar.h>
#include <unicode/utf8.h>

#include <climits>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "confined.h"
#include "tokenizer.h"

namespace memfit::data {
namespace {

namespace fs = std::filesystem;

std::string utf8(UChar32 c) {
  char buf[4];
  int32_t n = 0;
  UBool err = false;
  U8_APPEND(buf, n, 4, c, err);
  (void)err;
  return std::string(buf, static_cast<size_t>(n));
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + k.
std::vector<std::string> byte_symbols() {
  std::vector<std::string> out(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    out[b] = utf8(printable ? b : 256 + n++);
  }
  return out;
}

bool is_letter(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }
bool is_number(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }
bool is_space(UChar32 c) { return u_isUWhiteSpace(c) != 0; }

struct Cp {
  UChar32 c;
  size_t begin, end;  // byte range in the text
};

std::vector<Cp> code_points(const std::string& s) {
  std::vector<Cp> out;
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const int32_t len = static_cast<int32_t>(s.size());
  int32_t i = 0;
  while (i < len) {
    const int32_t start = i;
    UChar32 c;
    U8_NEXT(p, i, len, c);
    if (c < 0) c = 0xFFFD;  // invalid UTF-8: its bytes still get encoded below
    out.push_back({c, static_cast<size_t>(start), static_cast<size_t>(i)});
  }
  return out;
}

// Byte ranges of the pre-tokens of s.
std::vector<std::pair<size_t, size_t>> pretokenize(const std::string& s) {
  const std::vector<Cp> cp = code_points(s);
  std::vector<std::pair<size_t, size_t>> out;
  const size_t n = cp.size();
  size_t i = 0;
  auto run = [&](size_t j, bool (*pred)(UChar32)) {
    while (j < n && pred(cp[j].c)) ++j;
    return j;
  };
  auto other = [](UChar32 c) { return !is_space(c) && !is_letter(c) && !is_number(c); };
  while (i < n) {
    const UChar32 c = cp[i].c;
    // Contractions: 's 't 're 've 'm 'll 'd
    if (c == '\'' && i + 1 < n) {
      const UChar32 a = cp[i + 1].c, b = i + 2 < n ? cp[i + 2].c : 0;
      size_t len = 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') len = 2;
      else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) len = 3;
      if (len) {
        out.emplace_back(cp[i].begin, cp[i + len - 1].end);
        i += len;
        continue;
      }
    }
    // ' ?' + letters / numbers / others
    const size_t j0 = (c == ' ' && i + 1 < n) ? i + 1 : i;
    const UChar32 d = cp[j0].c;
    size_t j = j0;
    if (is_letter(d)) j = run(j0, is_letter);
    else if (is_number(d)) j = run(j0, is_number);
    else if (other(d)) j = run(j0, +[](UChar32 x) { return !is_space(x) && !is_letter(x) && !is_number(x); });
    if (j > j0) {
      out.emplace_back(cp[i].begin, cp[j - 1].end);
      i = j;
      continue;
    }
    // Whitespace: \s+(?!\S) leaves the last space of a run to the next word; \s+ else.
    j = run(i, is_space);
    if (j < n && j - i >= 2) j -= 1;
    out.emplace_back(cp[i].begin, cp[j - 1].end);
    i = j;
  }
  return out;
}

class Gpt2Bpe final : public Tokenizer {
 public:
  Gpt2Bpe(std::unordered_map<std::string, int64_t> vocab, std::map<std::pair<std::string, std::string>, int> ranks)
      : vocab_(std::move(vocab)), ranks_(std::move(ranks)), bytes_(byte_symbols()) {
    for (const auto& [tok, id] : vocab_) {
      if (static_cast<size_t>(id) >= inverse_.size()) inverse_.resize(static_cast<size_t>(id) + 1);
      inverse_[static_cast<size_t>(id)] = tok;
    }
    for (int b = 0; b < 256; ++b) byte_of_[bytes_[b]] = static_cast<uint8_t>(b);
    kind = "gpt2_bpe";
    auto special = [&](const char* t) {
      const auto it = vocab_.find(t);
      return it == vocab_.end() ? int64_t{-1} : it->second;
    };
    eos = special("<|endoftext|>");
    if (eos < 0) eos = special("</s>");
    bos = special("<s>");
    if (bos < 0) bos = eos;
    pad = special("<pad>");
    if (pad < 0) pad = eos;
    cls = bos;
    sep = eos;
  }

  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids;
    for (const auto& [b, e] : pretokenize(text)) {
      std::string word;
      for (size_t k = b; k < e; ++k) word += bytes_[static_cast<uint8_t>(text[k])];
      for (int64_t id : bpe(word)) ids.push_back(id);
    }
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string out;
    for (int64_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= inverse_.size()) continue;
      for (const Cp& c : code_points(inverse_[static_cast<size_t>(id)])) {
        const auto it = byte_of_.find(utf8(c.c));
        if (it != byte_of_.end()) out.push_back(static_cast<char>(it->second));
      }
    }
    return out;
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(inverse_.size()); }

 private:
  std::vector<int64_t> bpe(const std::string& word) const {
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto hit = cache_.find(word);
      if (hit != cache_.end()) return hit->second;
    }
    std::vector<std::string> parts;
    for (const Cp& c : code_points(word)) parts.push_back(word.substr(c.begin, c.end - c.begin));
    while (parts.size() > 1) {
      int best = INT_MAX;
      size_t at = 0;
      for (size_t i = 0; i + 1 < parts.size(); ++i) {
        const auto r = ranks_.find({parts[i], parts[i + 1]});
        if (r != ranks_.end() && r->second < best) {
          best = r->second;
          at = i;
        }
      }
      if (best == INT_MAX) break;
      const std::string a = parts[at], b = parts[at + 1];
      std::vector<std::string> merged;
      for (size_t i = 0; i < parts.size(); ++i) {
        if (i + 1 < parts.size() && parts[i] == a && parts[i + 1] == b) {
          merged.push_back(a + b);
          ++i;
        } else {
          merged.push_back(parts[i]);
        }
      }
      parts.swap(merged);
    }
    std::vector<int64_t> ids;
    for (const auto& p : parts) {
      const auto it = vocab_.find(p);
      if (it != vocab_.end()) {
        ids.push_back(it->second);
      } else {  // a symbol missing from a trimmed vocabulary: fall back to its bytes
        for (const Cp& c : code_points(p)) {
          const auto b = vocab_.find(p.substr(c.begin, c.end - c.begin));
          if (b != vocab_.end()) ids.push_back(b->second);
        }
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (cache_.size() < 500000) cache_.emplace(word, ids);
    return ids;
  }

  std::unordered_map<std::string, int64_t> vocab_;
  std::map<std::pair<std::string, std::string>, int> ranks_;
  std::vector<std::string> bytes_;
  std::unordered_map<std::string, uint8_t> byte_of_;
  std::vector<std::string> inverse_;
  mutable std::mutex mu_;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_gpt2_bpe(const std::string& dir) {
  const fs::path d(dir);
  fs::path vocab = d / "vocab.json", merges = d / "merges.txt";
  if (!fs::exists(vocab)) {
    vocab = d / "encoder.json";
    merges = d / "vocab.bpe";
  }
  if (!fs::exists(vocab)) throw TokenizerError(dir + ": no vocab.json or encoder.json");
  if (!fs::exists(merges)) throw TokenizerError(dir + ": no " + merges.filename().string() + " next to " + vocab.filename().string());
  std::unordered_map<std::string, int64_t> v;
  {
    const fsx::InputFile vf(vocab.string());
    std::ifstream in(vf.proc_path());
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw TokenizerError(vocab.string() + ": not valid JSON: " + e.what());
    }
    if (!j.is_object() || j.empty()) throw TokenizerError(vocab.string() + ": expected a non-empty object token -> id");
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0) {
        throw TokenizerError(vocab.string() + ": id of token '" + it.key() + "' is not a non-negative integer");
      }
      v[it.key()] = it.value().get<int64_t>();
    }
  }
  std::map<std::pair<std::string, std::string>, int> ranks;
  {
    const fsx::InputFile mf(merges.string());
    std::ifstream in(mf.proc_path());
    if (!in) throw TokenizerError(merges.string() + ": cannot read");
    std::string line;
    int rank = 0, lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || line.rfind("#version", 0) == 0) continue;
      const auto sp = line.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 >= line.size()) {
        throw TokenizerError(merges.string() + ":" + std::to_string(lineno) + ": expected 'a b', got '" + line + "'");
      }
      ranks.emplace(std::make_pair(line.substr(0, sp), line.substr(sp + 1)), rank++);
    }
    if (ranks.empty()) throw TokenizerError(merges.string() + ": no merges");
  }
  return std::make_unique<Gpt2Bpe>(std::move(v), std::move(ranks));
}

}  // namespace memfit::data
