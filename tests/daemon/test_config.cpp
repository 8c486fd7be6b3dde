// memfitd's YAML configuration from outside: shapes YAML allows but memfitd does not (a
// list or mapping as a setting's name, a list where a section is expected, a key given
// twice) are refused with an error naming the setting, and a seeded random sweep over
// every setting, with values of every YAML shape, never gets any other exception out of
// load_config.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "config.h"

namespace {

namespace fs = std::filesystem;
using memfit::daemon::ConfigError;
using memfit::daemon::load_config;

class ConfigYaml : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/memfit-config-XXXXXX";
    dir_ = mkdtemp(tmpl);
  }
  void TearDown() override { fs::remove_all(dir_); }
  // load_config on a file holding `text`: "" when it loads, else the ConfigError's message.
  std::string load(const std::string& text) {
    const std::string path = dir_ + "/memfitd.yaml";
    std::ofstream(path, std::ios::trunc) << text;
    try {
      load_config({"--config", path}, "memfitd");
      return "";
    } catch (const ConfigError& e) {
      return e.what();
    }
  }
  std::string dir_;
};

TEST_F(ConfigYaml, ShapesYamlAllowsButMemfitdDoesNotAreNamed) {
  const struct {
    const char* yaml;
    const char* needle;
  } cases[] = {
      {"? [a, b]\n: 1\n", "(top level): a setting's name must be a word, not a list or mapping (line 1)"},
      {"scheduling:\n  ? {x: 1}\n  : 2\n", "scheduling: a setting's name must be a word"},
      {"limits: [1, 2]\n", "limits: expected a mapping"},
      {"tls: [a, b]\n", "tls: expected a mapping (cert, key)"},
      {"tls: {cert: a, bogus: b}\n", "tls.bogus: unknown setting"},
      {"devices: [cpu:0]\n", "devices[0]: expected a mapping (name, memory)"},
      {"devices: [{name: cpu:0, memory: 1GiB, speed: 3}]\n", "devices[0].speed: unknown setting"},
      {"listen: {a: 1}\n", "listen: expected a value, got a mapping (line 1)"},
      {"cpu_devices: [1]\n", "cpu_devices: expected a value, got a list"},
      {"listen: a\nlisten: b\n", "listen: given twice (line 2)"},
      {"scheduling: {margin: 0.1, margin: 5}\n", "scheduling.margin: given twice"},
      {"devices: [{name: cpu:0, name: cpu:1, memory: 1GiB}]\n", "devices[0].name: given twice"},
      {"slurm: {sbatch_args: {a: 1}}\n", "slurm.sbatch_args: expected a list of arguments"},
      {"paths: {read_roots: [[/a]]}\n", "paths.read_roots: expected a value, got a list"},
  };
  for (const auto& c : cases) {
    const std::string got = load(c.yaml);
    EXPECT_NE(got.find(c.needle), std::string::npos) << c.yaml << " -> " << got;
    EXPECT_NE(got.find("memfitd.yaml"), std::string::npos) << got;  // names the file
  }
  EXPECT_EQ(load("listen: 127.0.0.1:7999\nscheduling: {margin: 0.2, placement: best_fit}\n"), "");
}

// Slurm settings an operator can get wrong without noticing: each is refused naming the
// setting, and the good section loads.
TEST_F(ConfigYaml, CarelessSlurmSettingsAreNamed) {
  const std::string head = "executor: slurm\nslurm:\n  partition: gpu\n  shards_per_gpu: 8\n  gpus: 4\n";
  const std::string good = head + "  shard_memory: 10GiB\n";
  EXPECT_EQ(load(good + "  sbatch_args: [--account=ml, -t120, --mem=64G]\n  parallel_submissions: 64\n"), "");
  // Kept beside an explicit executor: local (switching back and forth): unused, accepted.
  EXPECT_EQ(load("executor: local\nslurm: {partition: gpu}\n"), "");
  const struct {
    std::string yaml;
    const char* needle;
  } cases[] = {
      {"slurm: {partition: gpu, shard_memory: 10GiB, shards_per_gpu: 8, gpus: 4}\n",
       "slurm: this section is read only with executor: slurm"},

      {head + "  shard_memory: 10\n", "slurm.shard_memory: 10 bytes is under 1 MiB; give a unit"},
      {head + "  shard_memory: 10TiB\n", "over 16 TiB; check the unit of shard_memory"},
      {"executor: slurm\nslurm: {partition: 'gpu,debug', shard_memory: 1GiB, shards_per_gpu: 8, gpus: 1}\n",
       "slurm.partition: 'gpu,debug' is not one partition's name"},
      {"executor: slurm\nslurm: {partition: \"gpu\\nx\", shard_memory: 1GiB, shards_per_gpu: 8, gpus: 1}\n",
       "slurm.partition: "},
      {"executor: slurm\nslurm: {partition: gpu shared, shard_memory: 1GiB, shards_per_gpu: 8, gpus: 1}\n",
       "is not one partition's name"},
      {good + "  run_as: submitter\n", "slurm.run_as: submitter needs tokens_file"},
      {good + "  parallel_submissions: 0\n", "slurm.parallel_submissions"},
      {good + "  parallel_submissions: 65\n", "slurm.parallel_submissions"},
      {good + "  parallel_submissions: 2.5\n", "slurm.parallel_submissions"},
      {good + "  sbatch_args: [\"--account ml\"]\n", "slurm.sbatch_args: '--account ml' holds an option and its value"},
      {good + "  sbatch_args: [--account, ml]\n", "slurm.sbatch_args: '--account' has no '=value'"},
      {good + "  sbatch_args: [--gpus=1]\n", "slurm.sbatch_args: '--gpus=1' would change how many nodes or GPUs"},
      {good + "  sbatch_args: [--depend=afterok:7]\n", "(--dependency=afterok:7)"},
      {good + "  sbatch_args: [-vH]\n", "(--hold)"},
      {good + "  sbatch_args: [--mem=4G]\n  device: cpu\n", "slurm.sbatch_args: '--mem=4G' would replace the host memory"},
  };
  for (const auto& c : cases) {
    const std::string got = load(c.yaml);
    EXPECT_NE(got.find(c.needle), std::string::npos) << c.yaml << " -> " << got;
  }
  // A control character in a refused item never reaches the terminal raw, and the reason
  // is not cut short at a NUL.
  const std::string nul = load(good + "  sbatch_args: [\"--account=ml\\0x\"]\n");
  EXPECT_NE(nul.find("'--account=ml?x' holds a control character"), std::string::npos) << nul;
}

// Aliases that make a node its own child, or repeat a part exponentially, and a second
// document: refused by name, never a crash, a hang or a setting silently dropped.
TEST_F(ConfigYaml, AliasBombsAndSecondDocumentsAreRefused) {
  EXPECT_NE(load("junk: &a [*a]\n").find("nested deeper than 32 levels"), std::string::npos);
  std::string bomb = "a0: &a0 {k: x}\n";
  for (int i = 1; i <= 40; ++i) {
    bomb += "a" + std::to_string(i) + ": &a" + std::to_string(i) + " [*a" + std::to_string(i - 1) + ", *a" +
            std::to_string(i - 1) + "]\n";
  }
  const std::string got = load(bomb);
  EXPECT_TRUE(got.find("more than 100000 values") != std::string::npos ||
              got.find("nested deeper") != std::string::npos)
      << got;
  EXPECT_NE(load("executor: local\n---\nexecutor: slurm\n").find("holds 2 YAML documents"), std::string::npos);
}

// Random documents: every setting memfitd knows (and some it does not), each given a value
// of a random shape (a word, a number, a size, a boolean, null, a list, a mapping, nested),
// sometimes with a list or mapping as a key, sometimes twice. load_config must either load
// the file or throw ConfigError; a yaml-cpp exception or any other escaping is a failure.
TEST_F(ConfigYaml, RandomDocumentsLoadOrAreRefusedByName) {
  const std::vector<std::string> top = {
      "listen", "metrics_listen", "state_dir", "worker", "gpus", "cpu_devices", "cpu_device_memory", "worker_threads",
      "tokens_file", "devices", "tls", "allowed_roots", "paths", "limits", "workers", "scheduling", "executor", "slurm",
      "metrics", "bogus"};
  const std::vector<std::string> inner = {
      "name", "memory", "cert", "key", "read_roots", "write_roots", "max_queued_per_user", "max_message_bytes",
      "max_input_bytes", "max_weights_bytes", "max_name_bytes", "max_user_priority", "user", "memory_allowance",
      "cgroup", "margin", "oom_retries", "crash_retries", "oom_growth", "starvation_minutes", "cancel_grace_seconds",
      "paused", "placement", "partition", "shard_memory", "shards_per_gpu", "device", "run_as", "bin_dir",
      "poll_seconds", "sbatch_args", "finished_retention_seconds", "finished_max_jobs", "other"};
  const std::vector<std::string> words = {
      "0", "1", "-1", "7", "0.5", "1e999", "nan", "3GiB", "12MiB", "-5GiB", "99999999999999999999", "true", "off",
      "auto", "spread", "best_fit", "slurm", "local", "cuda", "cpu", "service", "submitter", "cpu:0", "cuda:1", "gpu0",
      "/tmp", "/tmp/{user}", "relative/dir", "''", "~", "\"a: b\"", "--partition=x", "-p", "--mem=1G", "x"};
  std::mt19937_64 rng(20261204);
  auto pick = [&](const std::vector<std::string>& v) { return v[rng() % v.size()]; };
  std::function<std::string(int)> value = [&](int depth) -> std::string {
    const int kind = static_cast<int>(rng() % (depth > 2 ? 2 : 6));
    if (kind == 0) return pick(words);
    if (kind == 1) return rng() % 4 == 0 ? "null" : pick(words);
    std::string o;
    const int n = static_cast<int>(rng() % 4);
    if (kind <= 3) {  // a list
      o = "[";
      for (int i = 0; i < n; ++i) o += (i ? ", " : "") + value(depth + 1);
      return o + "]";
    }
    o = "{";  // a mapping, maybe with a list or mapping as a key, maybe a key twice
    for (int i = 0; i < n; ++i) {
      std::string k = rng() % 10 == 0 ? "? [" + pick(inner) + "]" : pick(inner);
      o += (i ? ", " : "") + k + ": " + value(depth + 1);
    }
    return o + "}";
  };
  int loaded = 0, refused = 0;
  for (int doc = 0; doc < 3000; ++doc) {
    std::string text;
    const int n = 1 + static_cast<int>(rng() % 5);
    for (int i = 0; i < n; ++i) {
      if (rng() % 25 == 0) text += "? {" + pick(top) + ": 1}\n: " + value(1) + "\n";
      else text += pick(top) + ": " + value(0) + "\n";
    }
    const std::string path = dir_ + "/memfitd.yaml";
    std::ofstream(path, std::ios::trunc) << text;
    try {
      load_config({"--config", path}, "memfitd");
      ++loaded;
    } catch (const ConfigError& e) {
      ++refused;
      // Named: the file and the setting, or (checks after the file is read) the setting.
      EXPECT_NE(std::string(e.what()).find(": "), std::string::npos) << text << " -> " << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not a ConfigError: " << e.what() << "\n" << text;
    }
  }
  // The sweep reached both outcomes often enough to mean something.
  EXPECT_GT(loaded, 50);
  EXPECT_GT(refused, 1000);
}

}  // namespace
