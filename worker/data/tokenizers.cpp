// WordPiece, and Tokenizer::load.
#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>
#include <unicode/utf8.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "confined.h"
#include "tokenizer.h"

namespace memfit::data {
namespace {

namespace fs = std::filesystem;

// BERT's WordPiece: basic tokenization (whitespace, punctuation and CJK split; lower
// case and accents stripped when uncased), then greedy longest-match with "##" pieces.
class WordPiece final : public Tokenizer {
 public:
  WordPiece(std::unordered_map<std::string, int64_t> vocab, bool lower) : vocab_(std::move(vocab)), lower_(lower) {
    kind = "wordpiece";
    auto special = [&](const char* t) {
      const auto it = vocab_.find(t);
      return it == vocab_.end() ? int64_t{-1} : it->second;
    };
    cls = special("[CLS]");
    sep = special("[SEP]");
    pad = special("[PAD]");
    unk_ = special("[UNK]");
    bos = cls;
    eos = sep;
    for (const auto& [t, id] : vocab_) {
      if (static_cast<size_t>(id) >= inverse_.size()) inverse_.resize(static_cast<size_t>(id) + 1);
      inverse_[static_cast<size_t>(id)] = t;
    }
  }

  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids;
    for (const std::string& w : basic(text)) {
      if (w.size() > 200) {
        ids.push_back(unk_);
        continue;
      }
      std::vector<int64_t> pieces;
      size_t start = 0;
      bool bad = false;
      while (start < w.size()) {
        size_t end = w.size();
        int64_t found = -1;
        while (end > start) {
          std::string sub = w.substr(start, end - start);
          if (start > 0) sub = "##" + sub;
          const auto it = vocab_.find(sub);
          if (it != vocab_.end()) {
            found = it->second;
            break;
          }
          // step back one UTF-8 character
          do {
            --end;
          } while (end > start && (static_cast<uint8_t>(w[end]) & 0xC0) == 0x80);
        }
        if (found < 0) {
          bad = true;
          break;
        }
        pieces.push_back(found);
        start = end;
      }
      if (bad) {
        ids.push_back(unk_);
      } else {
        ids.insert(ids.end(), pieces.begin(), pieces.end());
      }
    }
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string out;
    for (int64_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= inverse_.size()) continue;
      const std::string& t = inverse_[static_cast<size_t>(id)];
      if (t.rfind("##", 0) == 0) {
        out += t.substr(2);
      } else {
        if (!out.empty()) out += ' ';
        out += t;
      }
    }
    return out;
  }
  int64_t vocab_size() const override { return static_cast<int64_t>(inverse_.size()); }

 private:
  static bool is_punct(UChar32 c) {
    if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126)) return true;
    return (U_GET_GC_MASK(c) & U_GC_P_MASK) != 0;
  }
  static bool is_cjk(UChar32 c) {
    return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
           (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
  }

  std::vector<std::string> basic(const std::string& text) const {
    // Decode, drop control characters, map whitespace, lower case + strip accents (NFD,
    // drop Mn) when uncased, and split around punctuation and CJK characters.
    std::vector<std::string> words;
    std::string cur;
    auto flush = [&] {
      if (!cur.empty()) words.push_back(cur);
      cur.clear();
    };
    auto append = [](std::string& s, UChar32 c) {
      char buf[4];
      int32_t n = 0;
      UBool err = false;
      U8_APPEND(buf, n, 4, c, err);
      (void)err;
      s.append(buf, static_cast<size_t>(n));
    };
    const auto* p = reinterpret_cast<const uint8_t*>(text.data());
    const int32_t len = static_cast<int32_t>(text.size());
    UErrorCode status = U_ZERO_ERROR;
    const UNormalizer2* nfd = unorm2_getNFDInstance(&status);
    int32_t i = 0;
    while (i < len) {
      UChar32 c;
      U8_NEXT(p, i, len, c);
      if (c <= 0 || c == 0xFFFD || (u_iscntrl(c) && c != '\t' && c != '\n' && c != '\r')) continue;
      if (u_isUWhiteSpace(c)) {
        flush();
        continue;
      }
      std::vector<UChar32> chars{c};
      if (lower_) {
        c = u_tolower(c);
        chars = {c};
        if (U_SUCCESS(status)) {
          UChar src[2], dst[8];
          int32_t sl = 0;
          U16_APPEND_UNSAFE(src, sl, c);
          UErrorCode e = U_ZERO_ERROR;
          const int32_t dl = unorm2_normalize(nfd, src, sl, dst, 8, &e);
          if (U_SUCCESS(e)) {
            chars.clear();
            for (int32_t k = 0; k < dl;) {
              UChar32 d;
              U16_NEXT(dst, k, dl, d);
              if (u_charType(d) != U_NON_SPACING_MARK) chars.push_back(d);
            }
          }
        }
      }
      for (UChar32 d : chars) {
        if (is_punct(d) || is_cjk(d)) {
          flush();
          std::string s;
          append(s, d);
          words.push_back(s);
        } else {
          append(cur, d);
        }
      }
    }
    flush();
    return words;
  }

  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> inverse_;
  bool lower_ = true;
  int64_t unk_ = -1;
};

}  // namespace

std::unique_ptr<Tokenizer> load_wordpiece(const std::string& dir) {
  const fs::path vocab = fs::path(dir) / "vocab.txt";
  const fsx::InputFile vf(vocab.string());
  std::ifstream in(vf.proc_path());
  if (!in) throw TokenizerError(vocab.string() + ": cannot read");
  std::unordered_map<std::string, int64_t> v;
  std::string line;
  int64_t id = 0;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    v.emplace(line, id++);
  }
  if (v.empty()) throw TokenizerError(vocab.string() + ": empty vocabulary");
  if (!v.count("[UNK]")) throw TokenizerError(vocab.string() + ": no [UNK] token");
  bool lower = true;
  const fs::path cfg = fs::path(dir) / "tokenizer_config.json";
  if (fs::exists(cfg)) {
    const fsx::InputFile cf(cfg.string());
    std::ifstream c(cf.proc_path());
    try {
      const auto j = nlohmann::json::parse(c);
      if (j.contains("do_lower_case") && j["do_lower_case"].is_boolean()) lower = j["do_lower_case"].get<bool>();
    } catch (const nlohmann::json::exception& e) {
      throw TokenizerError(cfg.string() + ": not valid JSON: " + e.what());
    }
  }
  return std::make_unique<WordPiece>(std::move(v), lower);
}

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& path) {
  if (path.empty()) throw TokenizerError("data.tokenizer_path: required for text data");
  if (!fs::exists(path)) throw TokenizerError(path + ": no such file or folder");
  if (fs::is_regular_file(path)) return load_sentencepiece(path);
  const fs::path d(path);
  if (fs::exists(d / "vocab.json") || fs::exists(d / "encoder.json")) return load_gpt2_bpe(path);
  if (fs::exists(d / "vocab.txt")) return load_wordpiece(path);
  if (fs::exists(d / "tokenizer.model")) return load_sentencepiece((d / "tokenizer.model").string());
  throw TokenizerError(path + ": no tokenizer found (vocab.json + merges.txt, encoder.json + vocab.bpe, "
                       "vocab.txt, or tokenizer.model)");
}

}  // namespace memfit::data
