// Tokenizers for text jobs, behind one interface:
//   - GPT-2 byte-level BPE: a folder with vocab.json + merges.txt (Hugging Face) or
//     encoder.json + vocab.bpe (OpenAI's originals); also RoBERTa's.
//   - SentencePiece BPE: a .model file (LLaMA), read by memfit itself (sentencepiece.cpp).
//   - WordPiece: a folder with vocab.txt (BERT, uncased or cased per tokenizer_config).
// No LibTorch. Errors (missing files, malformed vocabularies) are TokenizerError and
// name the file.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace memfit::data {

class TokenizerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Token ids of `text`, without special tokens.
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  // Special tokens, -1 when the vocabulary has none.
  int64_t bos = -1, eos = -1, pad = -1, cls = -1, sep = -1;
  std::string kind;  // "gpt2_bpe", "sentencepiece", "wordpiece"

  // Loads by what `path` holds: a .model file (SentencePiece), or a folder with
  // vocab.json/encoder.json (BPE) or vocab.txt (WordPiece).
  static std::unique_ptr<Tokenizer> load(const std::string& path);
};

std::unique_ptr<Tokenizer> load_gpt2_bpe(const std::string& dir);
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_file);
std::unique_ptr<Tokenizer> load_wordpiece(const std::string& dir);

}  // namespace memfit::data
