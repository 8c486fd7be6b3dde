// SentencePiece BPE models (LLaMA's tokenizer.model) without libsentencepiece: Debian's
// libsentencepiece carries its own protobuf 3.14 runtime, which cannot share a process
// with the system protobuf 3.21 that memfit's job spec uses (it aborts at load). The
// .model file is a serialized sentencepiece.ModelProto; this reads the fields encoding
// needs straight from the protobuf wire format:
//   ModelProto     1: pieces {1: piece, 2: score, 3: type}  2: trainer_spec  3: normalizer_spec
//   TrainerSpec    3: model_type (2 = BPE)  35: byte_fallback  40-43: unk/bos/eos/pad ids
//   NormalizerSpec 1: name  3: add_dummy_prefix  4: remove_extra_whitespaces  5: escape_whitespaces
// Encoding follows SentencePiece's BPE: identity normalisation, a dummy-prefix space,
// spaces as U+2581, then repeatedly merge the adjacent pair whose concatenation is the
// highest-scoring piece; characters outside the vocabulary fall back to <0xXX> bytes.
#include <unicode/utf8.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "confined.h"
#include "tokenizer.h"

namespace memfit::data {
namespace {

const std::string kSpace = "\xE2\x96\x81";  // U+2581

struct Wire {
  const uint8_t* p;
  const uint8_t* end;
  const std::string& path;

  [[noreturn]] void bad(const char* what) const { throw TokenizerError(path + ": not a SentencePiece model (" + what + ")"); }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) bad("truncated varint");
      const uint8_t b = *p++;
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    bad("varint too long");
  }
  // Visits each field: fn(number, wire_type, value, bytes, length).
  template <typename Fn>
  void fields(Fn&& fn) {
    while (p < end) {
      const uint64_t key = varint();
      const int num = static_cast<int>(key >> 3), type = static_cast<int>(key & 7);
      switch (type) {
        case 0: fn(num, type, varint(), nullptr, 0); break;
        case 1:
          if (end - p < 8) bad("truncated fixed64");
          p += 8;
          break;
        case 2: {
          const uint64_t n = varint();
          if (n > static_cast<uint64_t>(end - p)) bad("field runs past the end");
          fn(num, type, 0, p, static_cast<size_t>(n));
          p += n;
          break;
        }
        case 5: {
          if (end - p < 4) bad("truncated fixed32");
          uint32_t v;
          std::memcpy(&v, p, 4);
          p += 4;
          fn(num, type, v, nullptr, 0);
          break;
        }
        default: bad("unknown wire type");
      }
    }
  }
};

class SentencePieceBpe final : public Tokenizer {
 public:
  explicit SentencePieceBpe(const std::string& path) {
    std::string data;
    try {
      data = fsx::InputFile(path).read_all(int64_t{1} << 30);
    } catch (const fsx::FsError& e) {
      throw TokenizerError(std::string("cannot read the tokenizer: ") + e.what());
    }
    const auto* b = reinterpret_cast<const uint8_t*>(data.data());
    Wire w{b, b + data.size(), path};
    int model_type = 1;  // UNIGRAM unless the trainer spec says otherwise
    bool byte_fallback = false;
    int64_t unk = 0, bos_id = 1, eos_id = 2, pad_id = -1;
    w.fields([&](int num, int type, uint64_t v, const uint8_t* bytes, size_t n) {
      (void)v;
      if (num == 1 && type == 2) {  // a piece
        Wire pw{bytes, bytes + n, path};
        std::string piece;
        float score = 0.0f;
        int ptype = 1;
        pw.fields([&](int f, int t, uint64_t val, const uint8_t* pb, size_t pn) {
          if (f == 1 && t == 2) piece.assign(reinterpret_cast<const char*>(pb), pn);
          if (f == 2 && t == 5) {
            const uint32_t u = static_cast<uint32_t>(val);
            std::memcpy(&score, &u, 4);
          }
          if (f == 3 && t == 0) ptype = static_cast<int>(val);
        });
        const int64_t id = static_cast<int64_t>(pieces_.size());
        pieces_.push_back(piece);
        if (ptype == 1 || ptype == 4) scores_.emplace(piece, std::make_pair(score, id));  // NORMAL, USER_DEFINED
        if (ptype == 6 && piece.size() == 6) bytes_[std::stoi(piece.substr(3, 2), nullptr, 16)] = id;  // <0xXX>
      } else if (num == 2 && type == 2) {  // trainer spec
        Wire tw{bytes, bytes + n, path};
        tw.fields([&](int f, int t, uint64_t val, const uint8_t*, size_t) {
          if (t != 0) return;
          if (f == 3) model_type = static_cast<int>(val);
          if (f == 35) byte_fallback = val != 0;
          if (f == 40) unk = static_cast<int64_t>(val);
          if (f == 41) bos_id = static_cast<int32_t>(val);
          if (f == 42) eos_id = static_cast<int32_t>(val);
          if (f == 43) pad_id = static_cast<int32_t>(val);
        });
      } else if (num == 3 && type == 2) {  // normalizer spec
        Wire nw{bytes, bytes + n, path};
        nw.fields([&](int f, int t, uint64_t val, const uint8_t* nb, size_t nn) {
          if (f == 1 && t == 2) normalizer_.assign(reinterpret_cast<const char*>(nb), nn);
          if (f == 3 && t == 0) dummy_prefix_ = val != 0;
          if (f == 4 && t == 0) remove_extra_ws_ = val != 0;
          if (f == 5 && t == 0) escape_ws_ = val != 0;
        });
      }
    });
    if (pieces_.empty()) throw TokenizerError(path + ": not a SentencePiece model (no pieces)");
    if (model_type != 2) {
      throw TokenizerError(path + ": SentencePiece model type " + std::to_string(model_type) +
                           " is not supported (only BPE models, like LLaMA's)");
    }
    if (!normalizer_.empty() && normalizer_ != "identity") {
      throw TokenizerError(path + ": SentencePiece normalizer '" + normalizer_ + "' is not supported (only identity)");
    }
    byte_fallback_ = byte_fallback && bytes_.size() == 256;
    unk_ = unk;
    kind = "sentencepiece";
    bos = bos_id;
    eos = eos_id;
    pad = pad_id >= 0 ? pad_id : eos_id;
    cls = bos;
    sep = eos;
    // Pieces never join a non-space character to a following U+2581 (true of models
    // trained with split_by_whitespace): then text can be merged segment by segment.
    for (const auto& [piece, s] : scores_) {
      const size_t at = piece.find(kSpace, 1);
      if (at != std::string::npos && piece.compare(at - 3 < piece.size() ? at - 3 : 0, 3, kSpace) != 0) {
        segmentable_ = false;
        break;
      }
    }
  }

  std::vector<int64_t> encode(const std::string& text) const override {
    std::string norm = text;
    if (remove_extra_ws_) {
      std::string t;
      bool space = true;
      for (char c : norm) {
        if (c == ' ') {
          if (!space) t.push_back(' ');
          space = true;
        } else {
          t.push_back(c);
          space = false;
        }
      }
      while (!t.empty() && t.back() == ' ') t.pop_back();
      norm = t;
    }
    if (dummy_prefix_ && !norm.empty()) norm = " " + norm;
    if (escape_ws_) {
      std::string t;
      for (char c : norm) t += c == ' ' ? kSpace : std::string(1, c);
      norm = t;
    }
    std::vector<int64_t> ids;
    if (!segmentable_) {
      merge(norm, &ids);
      return ids;
    }
    // Segments: a run of U+2581 followed by other characters.
    size_t i = 0;
    while (i < norm.size()) {
      size_t j = i;
      while (norm.compare(j, 3, kSpace) == 0) j += 3;
      while (j < norm.size() && norm.compare(j, 3, kSpace) != 0) ++j;
      merge(norm.substr(i, j - i), &ids);
      i = j;
    }
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string out;
    for (int64_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= pieces_.size()) continue;
      const std::string& p = pieces_[static_cast<size_t>(id)];
      if (p.size() == 6 && p.rfind("<0x", 0) == 0 && p.back() == '>') {
        out.push_back(static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16)));
      } else if (id == bos || id == eos || id == unk_) {
        continue;
      } else {
        out += p;
      }
    }
    std::string text;
    for (size_t i = 0; i < out.size();) {
      if (out.compare(i, 3, kSpace) == 0) {
        text.push_back(' ');
        i += 3;
      } else {
        text.push_back(out[i++]);
      }
    }
    if (dummy_prefix_ && !text.empty() && text[0] == ' ') text.erase(0, 1);
    return text;
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(pieces_.size()); }

 private:
  void merge(const std::string& seg, std::vector<int64_t>* ids) const {
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto hit = cache_.find(seg);
      if (hit != cache_.end()) {
        ids->insert(ids->end(), hit->second.begin(), hit->second.end());
        return;
      }
    }
    std::vector<std::string> sym;
    const auto* p = reinterpret_cast<const uint8_t*>(seg.data());
    const int32_t len = static_cast<int32_t>(seg.size());
    for (int32_t i = 0; i < len;) {
      const int32_t start = i;
      UChar32 c;
      U8_NEXT(p, i, len, c);
      (void)c;
      sym.push_back(seg.substr(static_cast<size_t>(start), static_cast<size_t>(i - start)));
    }
    while (sym.size() > 1) {
      float best = -INFINITY;
      size_t at = sym.size();
      for (size_t k = 0; k + 1 < sym.size(); ++k) {
        const auto it = scores_.find(sym[k] + sym[k + 1]);
        if (it != scores_.end() && it->second.first > best) {
          best = it->second.first;
          at = k;
        }
      }
      if (at == sym.size()) break;
      sym[at] += sym[at + 1];
      sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    }
    std::vector<int64_t> out;
    for (const std::string& s : sym) {
      const auto it = scores_.find(s);
      if (it != scores_.end()) {
        out.push_back(it->second.second);
      } else if (byte_fallback_) {
        for (unsigned char ch : s) out.push_back(bytes_.at(ch));
      } else {
        out.push_back(unk_);
      }
    }
    ids->insert(ids->end(), out.begin(), out.end());
    std::lock_guard<std::mutex> lock(mu_);
    if (cache_.size() < 500000) cache_.emplace(seg, std::move(out));
  }

  std::vector<std::string> pieces_;
  std::unordered_map<std::string, std::pair<float, int64_t>> scores_;
  std::unordered_map<int, int64_t> bytes_;
  std::string normalizer_;
  bool dummy_prefix_ = true, remove_extra_ws_ = true, escape_ws_ = true;
  bool byte_fallback_ = false, segmentable_ = true;
  int64_t unk_ = 0;
  mutable std::mutex mu_;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_file) {
  return std::make_unique<SentencePieceBpe>(model_file);
}

}  // namespace memfit::data
