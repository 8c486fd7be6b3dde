// Tokenizers on the real vocabularies fetched by scripts/fetch_data.sh; skipped when the
// data is absent.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "tokenizer.h"

namespace {

namespace fs = std::filesystem;

std::string data_dir() {
  const char* env = std::getenv("MEMFIT_DATA_DIR");
  return env ? env : MEMFIT_DEFAULT_DATA_DIR;
}

#define REQUIRE_DATA(path)                                                                  \
  if (!fs::exists(path)) GTEST_SKIP() << path << " missing: run scripts/fetch_data.sh first"

TEST(Gpt2Bpe, ReproducesTheReferenceIds) {
  const std::string dir = data_dir() + "/gpt2";
  REQUIRE_DATA(dir);
  const auto tok = memfit::data::Tokenizer::load(dir);
  EXPECT_EQ(tok->kind, "gpt2_bpe");
  EXPECT_EQ(tok->vocab_size(), 50257);
  EXPECT_EQ(tok->eos, 50256);
  const std::string text = "Call me Ishmael. Some years ago\xE2\x80\x94never mind how long";
  const std::vector<int64_t> expect = {14134, 502, 1148, 21720, 417, 13, 2773, 812, 2084, 960, 12081, 2000, 703, 890};
  EXPECT_EQ(tok->encode(text), expect);
  EXPECT_EQ(tok->decode(expect), text);
  // Whitespace runs, contractions, digits and non-ASCII letters round-trip.
  const std::string tricky = "It's  3 o'clock,\n\n  na\xC3\xAFve caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC   end ";
  EXPECT_EQ(tok->decode(tok->encode(tricky)), tricky);
}

TEST(SentencePiece, ReproducesLlamaIds) {
  const std::string model = data_dir() + "/llama/tokenizer.model";
  REQUIRE_DATA(model);
  const auto tok = memfit::data::Tokenizer::load(model);
  EXPECT_EQ(tok->vocab_size(), 32000);
  EXPECT_EQ(tok->bos, 1);
  EXPECT_EQ(tok->encode("Hello world!"), (std::vector<int64_t>{15043, 3186, 29991}));
}

TEST(Tokenizers, BadPathsAreClearErrors) {
  try {
    memfit::data::Tokenizer::load("/nonexistent/tok");
    ADD_FAILURE();
  } catch (const memfit::data::TokenizerError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/tok"), std::string::npos);
  }
  const fs::path d = fs::temp_directory_path() / "memfit-tok-test";
  fs::create_directories(d);
  std::ofstream(d / "vocab.json") << "{\"a\": 0}";
  try {
    memfit::data::Tokenizer::load(d.string());
    ADD_FAILURE();
  } catch (const memfit::data::TokenizerError& e) {
    EXPECT_NE(std::string(e.what()).find("merges.txt"), std::string::npos);
  }
  std::ofstream(d / "bad.model") << "not a model";
  EXPECT_THROW(memfit::data::Tokenizer::load((d / "bad.model").string()), memfit::data::TokenizerError);
}

TEST(WordPiece, SplitsPunctuationAndSubwords) {
  const fs::path d = fs::temp_directory_path() / "memfit-wp-test";
  fs::create_directories(d);
  std::ofstream(d / "vocab.txt") << "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nworld\n!\nun\n##aff\n##able\ncafe\n";
  const auto tok = memfit::data::Tokenizer::load(d.string());
  EXPECT_EQ(tok->kind, "wordpiece");
  EXPECT_EQ(tok->cls, 2);
  EXPECT_EQ(tok->encode("Hello, WORLD! unaffable Caf\xC3\xA9 xyz"),
            (std::vector<int64_t>{4, 1, 5, 6, 7, 8, 9, 10, 1}));
}

}  // namespace
