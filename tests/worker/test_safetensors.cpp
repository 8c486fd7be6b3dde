// Safetensors: round trip, and every way a header can lie is a clear error.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "safetensors.h"

namespace {

namespace fs = std::filesystem;
using memfit::io::IoError;
using memfit::io::SafetensorsFile;
using memfit::io::StDType;

fs::path tmp(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / "memfit-st-test";
  fs::create_directories(d);
  return d / name;
}

void write_raw(const fs::path& p, const std::string& header, size_t data_bytes, int64_t header_len = -1) {
  std::ofstream f(p, std::ios::binary);
  const uint64_t n = header_len >= 0 ? static_cast<uint64_t>(header_len) : header.size();
  for (int i = 0; i < 8; ++i) f.put(static_cast<char>((n >> (8 * i)) & 0xFF));
  f << header << std::string(data_bytes, '\0');
}

std::string error_of(const fs::path& p) {
  try {
    SafetensorsFile::open(p.string());
  } catch (const IoError& e) {
    return e.what();
  }
  return "";
}

TEST(Safetensors, RoundTripKeepsNamesShapesDtypesAndBytes) {
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, 8.0f};
  const std::vector<int64_t> b = {1, 2, 3};
  const std::vector<uint16_t> c = {0x3F80, 0x4000};  // bf16 1.0, 2.0
  const fs::path p = tmp("rt.safetensors");
  memfit::io::write_safetensors(p.string(),
                                {{"a", StDType::kF32, {2, 3}, a.data(), a.size() * 4},
                                 {"b.ids", StDType::kI64, {3}, b.data(), b.size() * 8},
                                 {"c", StDType::kBF16, {2}, c.data(), c.size() * 2}},
                                {{"format", "pt"}});
  EXPECT_FALSE(fs::exists(p.string() + ".tmp"));
  const SafetensorsFile f = SafetensorsFile::open(p.string());
  ASSERT_EQ(f.tensors().size(), 3u);
  const auto* ta = f.find("a");
  ASSERT_NE(ta, nullptr);
  EXPECT_EQ(ta->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(std::memcmp(f.data(*ta), a.data(), 24), 0);
  EXPECT_EQ(f.find("b.ids")->dtype, StDType::kI64);
  EXPECT_EQ(std::memcmp(f.data(*f.find("c")), c.data(), 4), 0);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  // The header is padded so that the data section starts 8-byte aligned.
  std::ifstream in(p, std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ(n % 8, 0u);
}

TEST(Safetensors, LyingOrTruncatedFilesAreRejectedWithTheReason) {
  const fs::path p = tmp("bad.safetensors");
  write_raw(p, "{}", 0, 1000);
  EXPECT_NE(error_of(p).find("runs past the end"), std::string::npos);
  write_raw(p, "{not json", 0);
  EXPECT_NE(error_of(p).find("not valid JSON"), std::string::npos);
  write_raw(p, R"({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}})", 8);
  EXPECT_NE(error_of(p).find("tensor 'w': unknown dtype 'F33'"), std::string::npos);
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}})", 8);
  EXPECT_NE(error_of(p).find("out of range"), std::string::npos);
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8);
  EXPECT_NE(error_of(p).find("8 bytes but shape and dtype need 12"), std::string::npos);
  write_raw(p, R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12);
  EXPECT_NE(error_of(p).find("overlap"), std::string::npos);
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4);
  EXPECT_NE(error_of(p).find("negative"), std::string::npos);
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 4]}})", 4);
  EXPECT_NE(error_of(p).find("tensor 'w'"), std::string::npos);
  std::ofstream(p, std::ios::binary) << "abc";
  EXPECT_NE(error_of(p).find("truncated"), std::string::npos);
  EXPECT_NE(error_of(tmp("does-not-exist.safetensors")).find("cannot open"), std::string::npos);
}

TEST(Safetensors, ShardedCheckpointsResolveThroughTheIndex) {
  const std::vector<float> a = {1, 2}, b = {3, 4, 5};
  memfit::io::write_safetensors(tmp("s1.safetensors").string(), {{"x.a", StDType::kF32, {2}, a.data(), 8}});
  memfit::io::write_safetensors(tmp("s2.safetensors").string(), {{"x.b", StDType::kF32, {3}, b.data(), 12}});
  std::ofstream(tmp("model.safetensors.index.json"))
      << R"({"metadata": {}, "weight_map": {"x.a": "s1.safetensors", "x.b": "s2.safetensors"}})";
  const auto ck = memfit::io::Checkpoint::open(tmp("model.safetensors.index.json").string());
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"x.a", "x.b"}));
  const auto [file, info] = ck.find("x.b");
  ASSERT_NE(info, nullptr);
  EXPECT_EQ(reinterpret_cast<const float*>(file->data(*info))[2], 5.0f);
  std::ofstream(tmp("bad.index.json")) << R"({"weight_map": {"x.c": "s1.safetensors"}})";
  try {
    memfit::io::Checkpoint::open(tmp("bad.index.json").string());
    ADD_FAILURE();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("does not hold it"), std::string::npos);
  }
}

}  // namespace
