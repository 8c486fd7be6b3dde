#include "config.h"

#include <limits>

#include <pwd.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <set>

#include "estimator.h"
#include "slurm.h"

namespace memfit::daemon {
namespace {

namespace fs = std::filesystem;

constexpr double kMaxRetention = 7 * 86400.0;  // metrics.finished_retention_seconds

int64_t size_of(const std::string& text, const std::string& what) {
  try {
    return estimator::parse_size(text, what);
  } catch (const estimator::EstimateError& e) {
    throw ConfigError(e.what());
  }
}

double number(const std::string& text, const std::string& what, double lo, double hi) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(v >= lo && v <= hi)) {
    char range[96];
    std::snprintf(range, sizeof range, "[%g, %g]", lo, hi);
    throw ConfigError(what + ": expected a number in " + range + ", got '" + text + "'");
  }
  return v;
}

// "line L" of a node, for messages about nodes that have no name of their own.
std::string line_of(const YAML::Node& n) {
  const YAML::Mark m = n.Mark();
  return m.line >= 0 ? "line " + std::to_string(m.line + 1) : "a line";
}

std::string scalar(const YAML::Node& n, const std::string& key) {
  if (!n.IsScalar()) {
    throw ConfigError(key + ": expected a value, got " +
                      (n.IsMap() ? "a mapping" : n.IsSequence() ? "a list" : "nothing") + " (" + line_of(n) + ")");
  }
  return n.as<std::string>();
}

// A setting's name: a plain word, never a list or a mapping (YAML allows both as keys).
std::string key_of(const YAML::Node& k, const std::string& where) {
  if (!k.IsScalar()) throw ConfigError(where + ": a setting's name must be a word, not a list or mapping (" + line_of(k) + ")");
  return k.as<std::string>();
}

void need_map(const YAML::Node& v, const std::string& key, const std::string& expected) {
  if (!v.IsMap()) throw ConfigError(key + ": expected a mapping (" + expected + ")");
}

// A count: a whole decimal number in [lo, hi].
int whole(const std::string& text, const std::string& what, double lo, double hi) {
  const bool digits = !text.empty() && text.find_first_not_of("0123456789") == std::string::npos;
  if (!digits) throw ConfigError(what + ": expected a whole number, got '" + text + "'");
  return static_cast<int>(number(text, what, lo, hi));
}

bool boolean(const std::string& v, const std::string& key) {
  if (v == "true" || v == "yes" || v == "on" || v == "auto") return true;
  if (v == "false" || v == "no" || v == "off") return false;
  throw ConfigError(key + ": expected true/false (or auto/off), got '" + v + "'");
}

std::string placement_of(const std::string& v, const std::string& key) {
  if (v == "spread" || v == "best_fit") return v;
  throw ConfigError(key + ": expected spread or best_fit, got '" + v + "'");
}

// YAML lets a mapping name a key twice and keeps one silently: refused, naming it. An
// alias can make a node its own child (`a: &x [*x]`) or repeat a part exponentially
// (`b: &y [*x, *x]`, ...): the walk stops, naming where, past kMaxDepth levels or kMaxNodes
// values; no real configuration comes near either.
constexpr int kMaxDepth = 32;
constexpr int64_t kMaxNodes = 100000;
void no_repeats(const YAML::Node& n, const std::string& where, int depth, int64_t* nodes) {
  if (depth > kMaxDepth) throw ConfigError(where + ": nested deeper than " + std::to_string(kMaxDepth) + " levels (an alias that contains itself?)");
  if (++*nodes > kMaxNodes) throw ConfigError(where + ": the file holds more than " + std::to_string(kMaxNodes) + " values (aliases repeating a part?)");
  if (n.IsSequence()) {
    for (size_t i = 0; i < n.size(); ++i) no_repeats(n[i], where + "[" + std::to_string(i) + "]", depth + 1, nodes);
  } else if (n.IsMap()) {
    std::set<std::string> seen;
    const std::string dot = where.empty() || where.back() == ' ' ? "" : ".";
    for (const auto& kv : n) {
      if (!kv.first.IsScalar()) continue;  // refused by key_of where it is read
      const std::string k = kv.first.as<std::string>();
      if (!seen.insert(k).second) throw ConfigError(where + dot + k + ": given twice (" + line_of(kv.first) + ")");
      no_repeats(kv.second, where + dot + k, depth + 1, nodes);
    }
  }
}

void apply_settings(Config& c, const YAML::Node& root, const std::string& p);

void apply_yaml(Config& c, const std::string& path) {
  YAML::Node root;
  try {
    const std::vector<YAML::Node> docs = YAML::LoadAllFromFile(path);
    // A second document (after ---) would be ignored: refused rather than half read.
    if (docs.size() > 1) throw ConfigError(path + ": holds " + std::to_string(docs.size()) + " YAML documents; memfitd reads one");
    if (!docs.empty()) root = docs[0];
  } catch (const YAML::Exception& e) {
    throw ConfigError(path + ": " + e.what());
  }
  if (!root.IsMap()) throw ConfigError(path + ": expected a mapping of settings");
  const std::string p = path + ": ";
  // Everything below names the setting it rejects; a yaml-cpp error that still gets
  // through is reported with the file's name rather than escaping as another exception.
  try {
    apply_settings(c, root, p);
  } catch (const YAML::Exception& e) {
    throw ConfigError(path + ": " + e.what());
  }
}

void apply_settings(Config& c, const YAML::Node& root, const std::string& p) {
  int64_t nodes = 0;
  no_repeats(root, p, 0, &nodes);
  for (const auto& kv : root) {
    const std::string k = key_of(kv.first, p + "(top level)");
    const YAML::Node& v = kv.second;
    if (k == "listen") c.listen = scalar(v, p + k);
    else if (k == "metrics_listen") c.metrics_listen = v.IsNull() ? "" : scalar(v, p + k);
    else if (k == "state_dir") c.state_dir = scalar(v, p + k);
    else if (k == "worker") c.worker = scalar(v, p + k);
    else if (k == "gpus") c.gpus = boolean(scalar(v, p + k), p + k);
    else if (k == "cpu_devices") c.cpu_devices = static_cast<int>(number(scalar(v, p + k), p + k, 0, 64));
    else if (k == "cpu_device_memory") c.cpu_device_memory = size_of(scalar(v, p + k), p + k);
    else if (k == "worker_threads") c.worker_threads = static_cast<int>(number(scalar(v, p + k), p + k, 0, 1024));
    else if (k == "tokens_file") c.tokens_file = scalar(v, p + k);
    else if (k == "devices") {
      if (!v.IsSequence()) throw ConfigError(p + "devices: expected a list");
      for (size_t i = 0; i < v.size(); ++i) {
        const std::string f = p + "devices[" + std::to_string(i) + "]";
        need_map(v[i], f, "name, memory");
        for (const auto& dk : v[i]) {
          const std::string n = key_of(dk.first, f);
          if (n != "name" && n != "memory") throw ConfigError(f + "." + n + ": unknown setting");
        }
        if (!v[i]["name"] || !v[i]["memory"]) throw ConfigError(f + ": needs name and memory");
        DeviceConfig d{scalar(v[i]["name"], f + ".name"), size_of(scalar(v[i]["memory"], f + ".memory"), f + ".memory")};
        if (d.name.rfind("cpu:", 0) != 0 && d.name.rfind("cuda:", 0) != 0) {
          throw ConfigError(f + ".name: expected cpu:N or cuda:N, got '" + d.name + "'");
        }
        c.devices.push_back(d);
      }
    } else if (k == "tls") {
      need_map(v, p + "tls", "cert, key");
      for (const auto& t : v) {
        const std::string tk = key_of(t.first, p + "tls");
        if (tk == "cert") c.tls_cert = scalar(t.second, p + "tls.cert");
        else if (tk == "key") c.tls_key = scalar(t.second, p + "tls.key");
        else throw ConfigError(p + "tls." + tk + ": unknown setting");
      }
    } else if (k == "allowed_roots") {
      if (!v.IsSequence()) throw ConfigError(p + "allowed_roots: expected a list of folders");
      for (const auto& r : v) {
        c.read_roots.push_back(scalar(r, p + k));
        c.write_roots.push_back(c.read_roots.back());
      }
    } else if (k == "paths") {
      if (!v.IsMap()) throw ConfigError(p + "paths: expected read_roots and write_roots");
      for (const auto& l : v) {
        const std::string lk = key_of(l.first, p + "paths"), f = p + "paths." + lk;
        if (lk != "read_roots" && lk != "write_roots") throw ConfigError(f + ": unknown setting");
        if (!l.second.IsSequence()) throw ConfigError(f + ": expected a list of folders");
        for (const auto& r : l.second) (lk == "read_roots" ? c.read_roots : c.write_roots).push_back(scalar(r, f));
      }
    } else if (k == "limits") {
      if (!v.IsMap()) throw ConfigError(p + "limits: expected a mapping (max_queued_per_user, ...)");
      for (const auto& l : v) {
        const std::string lk = key_of(l.first, p + "limits"), f = p + "limits." + lk;
        if (lk == "max_queued_per_user") c.max_queued_per_user = static_cast<int64_t>(number(scalar(l.second, f), f, 1, 1e9));
        else if (lk == "max_message_bytes") c.max_message_bytes = size_of(scalar(l.second, f), f);
        else if (lk == "max_input_bytes") c.max_input_bytes = size_of(scalar(l.second, f), f);
        else if (lk == "max_weights_bytes") c.max_weights_bytes = size_of(scalar(l.second, f), f);
        else if (lk == "max_name_bytes") c.max_name_bytes = static_cast<int64_t>(number(scalar(l.second, f), f, 1, 65536));
        else if (lk == "max_user_priority") c.max_user_priority = static_cast<int>(number(scalar(l.second, f), f, 0, 2147483647));
        else throw ConfigError(f + ": unknown setting");
      }
    } else if (k == "workers") {
      if (!v.IsMap()) throw ConfigError(p + "workers: expected user, memory_allowance, cgroup");
      for (const auto& l : v) {
        const std::string lk = key_of(l.first, p + "workers"), f = p + "workers." + lk;
        if (lk == "user") c.worker_user = scalar(l.second, f);
        else if (lk == "memory_allowance") c.worker_memory_allowance = size_of(scalar(l.second, f), f);
        else if (lk == "cgroup") c.worker_cgroup = scalar(l.second, f);
        else throw ConfigError(f + ": unknown setting");
      }
    } else if (k == "scheduling") {
      if (!v.IsMap()) throw ConfigError(p + "scheduling: expected a mapping (margin, placement, ...)");
      for (const auto& s : v) {
        const std::string sk = key_of(s.first, p + "scheduling"), f = p + "scheduling." + sk;
        const std::string sv = scalar(s.second, f);
        if (sk == "margin") c.margin = number(sv, f, 0, 10);
        else if (sk == "oom_retries") c.oom_retries = static_cast<int>(number(sv, f, 0, 10));
        else if (sk == "crash_retries") c.crash_retries = static_cast<int>(number(sv, f, 0, 100));
        else if (sk == "oom_growth") c.oom_growth = number(sv, f, 1.01, 10);
        else if (sk == "starvation_minutes") c.starvation_minutes = number(sv, f, 0, 1e6);
        else if (sk == "cancel_grace_seconds") c.cancel_grace_seconds = number(sv, f, 0, 86400);
        else if (sk == "paused") c.paused = boolean(sv, f);
        else if (sk == "placement") c.placement = placement_of(sv, f);
        else throw ConfigError(f + ": unknown setting");
      }
    } else if (k == "executor") {
      c.executor = scalar(v, p + k);
      c.executor_given = true;
      if (c.executor != "local" && c.executor != "slurm") {
        throw ConfigError(p + "executor: expected local or slurm, got '" + c.executor + "'");
      }
    } else if (k == "slurm") {
      if (!v.IsMap()) throw ConfigError(p + "slurm: expected partition, shard_memory, shards_per_gpu, gpus, ...");
      c.slurm.given = true;
      for (const auto& s : v) {
        const std::string sk = key_of(s.first, p + "slurm"), f = p + "slurm." + sk;
        SlurmConfig& sc = c.slurm;
        if (sk == "sbatch_args") {
          if (!s.second.IsSequence()) throw ConfigError(f + ": expected a list of arguments");
          for (const auto& a : s.second) sc.sbatch_args.push_back(scalar(a, f));  // checked in load_config
          continue;
        }
        const std::string sv = scalar(s.second, f);
        if (sk == "partition") sc.partition = sv;
        else if (sk == "shard_memory") sc.shard_memory = size_of(sv, f);
        else if (sk == "shards_per_gpu") sc.shards_per_gpu = whole(sv, f, 1, 1e6);
        else if (sk == "gpus") sc.gpus = whole(sv, f, 1, 1e6);
        else if (sk == "device") sc.device = sv;
        else if (sk == "run_as") sc.run_as = sv;
        else if (sk == "bin_dir") sc.bin_dir = sv;
        else if (sk == "poll_seconds") sc.poll_seconds = number(sv, f, 0.05, 3600);
        else if (sk == "parallel_submissions") sc.parallel_submissions = whole(sv, f, 1, 64);
        else throw ConfigError(f + ": unknown setting");
      }
    } else if (k == "metrics") {
      if (!v.IsMap()) throw ConfigError(p + "metrics: expected finished_retention_seconds, finished_max_jobs");
      for (const auto& m : v) {
        const std::string mk = key_of(m.first, p + "metrics"), f = p + "metrics." + mk;
        const std::string mv = scalar(m.second, f);
        if (mk == "finished_retention_seconds") c.metrics_finished_retention_seconds = number(mv, f, 0, kMaxRetention);
        else if (mk == "finished_max_jobs") c.metrics_finished_max_jobs = static_cast<int64_t>(number(mv, f, 0, 1e6));
        else throw ConfigError(f + ": unknown setting");
      }
    } else {
      throw ConfigError(p + k + ": unknown setting");
    }
  }
}

std::string default_state_dir() {
  if (const char* s = std::getenv("MEMFIT_STATE_DIR"); s && *s) return s;
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.local/state/memfit";
  return "memfit-state";
}

}  // namespace

std::string usage() {
  return "usage: memfitd [--config FILE] [--listen HOST:PORT] [--metrics-listen HOST:PORT|off]\n"
         "               [--state-dir DIR] [--worker PATH] [--gpus auto|off] [--cpu-devices N]\n"
         "               [--cpu-device-memory SIZE] [--device NAME=SIZE]... [--worker-threads N]\n"
         "               [--tokens FILE] [--tls-cert FILE --tls-key FILE] [--allowed-root DIR]...\n"
         "               [--read-root DIR]... [--write-root DIR]... [--worker-user NAME]\n"
         "               [--worker-memory-allowance SIZE] [--worker-cgroup DIR] [--crash-retries N]\n"
         "               [--max-queued-per-user N] [--margin F] [--starvation-minutes M]\n"
         "               [--placement spread|best_fit]\n"
         "               [--cancel-grace-seconds S] [--metrics-finished-retention-seconds S]\n"
         "               [--paused] [--check-config]\n"
         "--check-config reads the configuration, prints it as memfitd will use it, and exits.\n";
}

std::string describe(const Config& c) {
  auto q = [](const std::string& s) { return "\"" + s + "\""; };
  std::string o;
  o += "listen: " + q(c.listen) + "\n";
  o += "metrics_listen: " + (c.metrics_listen.empty() ? std::string("off") : q(c.metrics_listen)) + "\n";
  o += "state_dir: " + q(c.state_dir) + "\n";
  o += "worker: " + q(c.worker) + "\n";
  o += std::string("gpus: ") + (c.gpus ? "auto" : "off") + "\n";
  if (c.devices.empty()) {
    o += "cpu_devices: " + std::to_string(c.cpu_devices) + "\n";
    o += "cpu_device_memory: " + std::to_string(c.cpu_device_memory) + "\n";
  } else {
    o += "devices:\n";
    for (const auto& d : c.devices) o += "  - {name: " + q(d.name) + ", memory: " + std::to_string(d.memory_bytes) + "}\n";
  }
  o += "worker_threads: " + std::to_string(c.worker_threads) + "\n";
  if (!c.tokens_file.empty()) o += "tokens_file: " + q(c.tokens_file) + "\n";
  if (!c.tls_cert.empty()) o += "tls: {cert: " + q(c.tls_cert) + ", key: " + q(c.tls_key) + "}\n";
  o += "paths:\n  read_roots: [";
  for (size_t i = 0; i < c.read_roots.size(); ++i) o += (i ? ", " : "") + q(c.read_roots[i]);
  o += "]\n  write_roots: [";
  for (size_t i = 0; i < c.write_roots.size(); ++i) o += (i ? ", " : "") + q(c.write_roots[i]);
  o += "]\n";
  o += "limits: {max_queued_per_user: " + std::to_string(c.max_queued_per_user) +
       ", max_message_bytes: " + std::to_string(c.max_message_bytes) +
       ", max_input_bytes: " + std::to_string(c.max_input_bytes) +
       ", max_weights_bytes: " + std::to_string(c.max_weights_bytes) +
       ", max_name_bytes: " + std::to_string(c.max_name_bytes) +
       ", max_user_priority: " + std::to_string(c.max_user_priority) + "}\n";
  o += "workers: {user: " + q(c.worker_user) + ", memory_allowance: " + std::to_string(c.worker_memory_allowance) +
       ", cgroup: " + q(c.worker_cgroup) + "}\n";
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "scheduling: {margin: %g, oom_retries: %d, crash_retries: %d, oom_growth: %g, starvation_minutes: %g, "
                "cancel_grace_seconds: %g, paused: %s, placement: %s}\n",
                c.margin, c.oom_retries, c.crash_retries, c.oom_growth, c.starvation_minutes, c.cancel_grace_seconds,
                c.paused ? "true" : "false", c.placement.c_str());
  o += buf;
  std::snprintf(buf, sizeof buf, "metrics: {finished_retention_seconds: %g, finished_max_jobs: %lld}\n",
                c.metrics_finished_retention_seconds, static_cast<long long>(c.metrics_finished_max_jobs));
  o += buf;
  o += "executor: " + c.executor + "\n";
  if (c.executor == "slurm") {
    const SlurmConfig& s = c.slurm;
    std::string args;
    for (const auto& a : s.sbatch_args) args += (args.empty() ? "" : ", ") + q(a);
    std::snprintf(buf, sizeof buf, "shard_memory: %lld, shards_per_gpu: %d, gpus: %d, poll_seconds: %g, parallel_submissions: %d",
                  static_cast<long long>(s.shard_memory), s.shards_per_gpu, s.gpus, s.poll_seconds,
                  s.parallel_submissions);
    o += "slurm: {partition: " + q(s.partition) + ", " + buf + ", device: " + s.device + ", run_as: " + s.run_as +
         ", bin_dir: " + q(s.bin_dir) + ", sbatch_args: [" + args + "]}\n";
  }
  return o;
}

Config load_config(const std::vector<std::string>& args, const std::string& argv0) {
  Config c;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--config") {
      if (i + 1 >= args.size()) throw ConfigError("--config: needs a file");
      apply_yaml(c, args[i + 1]);
    }
  }
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& f = args[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) throw ConfigError(f + ": needs a value");
      return args[++i];
    };
    if (f == "--config") ++i;
    else if (f == "--listen") c.listen = value();
    else if (f == "--metrics-listen") {
      c.metrics_listen = value();
      if (c.metrics_listen == "off") c.metrics_listen.clear();
    } else if (f == "--state-dir") c.state_dir = value();
    else if (f == "--worker") c.worker = value();
    else if (f == "--gpus") c.gpus = boolean(value(), "--gpus");
    else if (f == "--cpu-devices") c.cpu_devices = static_cast<int>(number(value(), f, 0, 64));
    else if (f == "--cpu-device-memory") c.cpu_device_memory = size_of(value(), f);
    else if (f == "--device") {
      const std::string v = value();
      const size_t eq = v.find('=');
      if (eq == std::string::npos) throw ConfigError("--device: expected NAME=SIZE, got '" + v + "'");
      DeviceConfig d{v.substr(0, eq), size_of(v.substr(eq + 1), "--device " + v.substr(0, eq))};
      if (d.name.rfind("cpu:", 0) != 0 && d.name.rfind("cuda:", 0) != 0) {
        throw ConfigError("--device: expected cpu:N or cuda:N, got '" + d.name + "'");
      }
      c.devices.push_back(d);
    } else if (f == "--worker-threads") c.worker_threads = static_cast<int>(number(value(), f, 0, 1024));
    else if (f == "--tokens") c.tokens_file = value();
    else if (f == "--tls-cert") c.tls_cert = value();
    else if (f == "--tls-key") c.tls_key = value();
    else if (f == "--allowed-root") {
      c.read_roots.push_back(value());
      c.write_roots.push_back(c.read_roots.back());
    } else if (f == "--read-root") c.read_roots.push_back(value());
    else if (f == "--write-root") c.write_roots.push_back(value());
    else if (f == "--worker-user") c.worker_user = value();
    else if (f == "--worker-memory-allowance") c.worker_memory_allowance = size_of(value(), f);
    else if (f == "--worker-cgroup") c.worker_cgroup = value();
    else if (f == "--crash-retries") c.crash_retries = static_cast<int>(number(value(), f, 0, 100));
    else if (f == "--max-user-priority") c.max_user_priority = static_cast<int>(number(value(), f, 0, 2147483647));
    else if (f == "--max-queued-per-user") c.max_queued_per_user = static_cast<int64_t>(number(value(), f, 1, 1e9));
    else if (f == "--margin") c.margin = number(value(), f, 0, 10);
    else if (f == "--starvation-minutes") c.starvation_minutes = number(value(), f, 0, 1e6);
    else if (f == "--placement") c.placement = placement_of(value(), f);
    else if (f == "--cancel-grace-seconds") c.cancel_grace_seconds = number(value(), f, 0, 86400);
    else if (f == "--metrics-finished-retention-seconds") {
      c.metrics_finished_retention_seconds = number(value(), "metrics.finished_retention_seconds (" + f + ")", 0, kMaxRetention);
    } else if (f == "--paused") c.paused = true;
    else throw ConfigError("unknown option '" + f + "'\n" + usage());
  }
  if (c.state_dir.empty()) c.state_dir = default_state_dir();
  if (c.worker.empty()) {
    std::error_code ec;
    fs::path self = fs::read_symlink("/proc/self/exe", ec);
    if (ec) self = fs::absolute(argv0);
    c.worker = (self.parent_path() / "memfit-worker").string();
  }
  if (c.tls_cert.empty() != c.tls_key.empty()) throw ConfigError("tls: give both a certificate and a key");
  // A slurm section with no executor named is a forgotten line; one kept beside an
  // explicit `executor: local` (switching back and forth) is the operator's choice.
  if (c.slurm.given && !c.executor_given) {
    throw ConfigError("slurm: this section is read only with executor: slurm (memfitd would run every job on this "
                      "machine); add 'executor: slurm', or 'executor: local' to keep the section unused");
  }
  if (c.executor == "slurm") {
    const SlurmConfig& s = c.slurm;
    if (s.partition.empty()) throw ConfigError("slurm.partition: required with executor: slurm");
    // Slurm's partition names are words; a comma would name several partitions (the job
    // could land where shards are not the only jobs), and a space or newline would break
    // the device name memfitd shows.
    for (char ch : s.partition) {
      if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_' && ch != '-' && ch != '.') {
        throw ConfigError("slurm.partition: '" + s.partition +
                          "' is not one partition's name (letters, digits, '_', '-', '.')");
      }
    }
    if (s.shard_memory <= 0) throw ConfigError("slurm.shard_memory: required with executor: slurm (the bytes of one shard)");
    if (s.shards_per_gpu <= 0) throw ConfigError("slurm.shards_per_gpu: required with executor: slurm");
    if (s.gpus <= 0) throw ConfigError("slurm.gpus: required with executor: slurm (the partition's GPUs)");
    // The partition is one device of gpus x shards_per_gpu x shard_memory bytes: past
    // int64 that product wraps (undefined; a negative or tiny device).
    if (s.shard_memory > std::numeric_limits<int64_t>::max() / s.shards_per_gpu / s.gpus) {
      throw ConfigError("slurm: gpus x shards_per_gpu x shard_memory is over 8 EiB");
    }
    // Bounds that catch a missing unit (shard_memory: 10 is ten bytes) or a slip of the
    // keyboard, not real hardware: a shard of at least 1 MiB, a GPU of at most 16 TiB.
    if (s.shard_memory < (int64_t{1} << 20)) {
      throw ConfigError("slurm.shard_memory: " + std::to_string(s.shard_memory) +
                        " bytes is under 1 MiB; give a unit (e.g. 10GiB for an 80 GiB GPU in 8 shards)");
    }
    if (s.shard_memory > (int64_t{16} << 40) / s.shards_per_gpu) {
      throw ConfigError("slurm: shards_per_gpu x shard_memory is one GPU's memory, and " +
                        std::to_string(s.shards_per_gpu) + " x " + std::to_string(s.shard_memory) +
                        " bytes is over 16 TiB; check the unit of shard_memory");
    }
    if (s.device != "cuda" && s.device != "cpu") throw ConfigError("slurm.device: expected cuda or cpu, got '" + s.device + "'");
    if (s.run_as != "service" && s.run_as != "submitter") {
      throw ConfigError("slurm.run_as: expected service or submitter, got '" + s.run_as + "'");
    }
    if (s.run_as == "submitter" && c.tokens_file.empty()) {
      throw ConfigError("slurm.run_as: submitter needs tokens_file (without tokens every caller is 'local', and no "
                        "job could run as its submitter)");
    }
    if (s.run_as == "submitter" && ::geteuid() != 0) {
      throw ConfigError("slurm.run_as: submitter needs memfitd to run as root (sbatch --uid)");
    }
    for (const auto& a : s.sbatch_args) {
      const std::string why = SbatchArgProblem(a, s.device);
      if (!why.empty()) {
        std::string shown;  // control characters (a NUL, an escape) never reach the terminal raw
        for (char ch : a.substr(0, 200)) shown += static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f ? '?' : ch;
        if (a.size() > 200) shown += "...";
        throw ConfigError("slurm.sbatch_args: '" + shown + "' " + why);
      }
    }
    if (!s.bin_dir.empty() && s.bin_dir.front() != '/') throw ConfigError("slurm.bin_dir: must be absolute, got '" + s.bin_dir + "'");
  }
  // Roots: absolute, canonical up to a {user} part (an administrator's links are resolved
  // once here; below a root nothing is followed out of it).
  for (auto* roots : {&c.read_roots, &c.write_roots}) {
    for (auto& r : *roots) {
      if (r.empty() || r.front() != '/') throw ConfigError("paths: roots must be absolute folders, got '" + r + "'");
      const size_t u = r.find("{user}");
      const std::string fixed = u == std::string::npos ? r : r.substr(0, r.rfind('/', u));
      const std::string rest = u == std::string::npos ? "" : r.substr(fixed.size());
      r = fs::weakly_canonical(fixed.empty() ? "/" : fixed).string() + rest;
      if (r.size() > 1 && r.back() == '/') r.pop_back();
    }
  }
  if (!c.worker_user.empty()) {
    const passwd* pw = ::getpwnam(c.worker_user.c_str());
    if (pw == nullptr) throw ConfigError("workers.user: no user '" + c.worker_user + "' on this machine");
    if (pw->pw_uid == 0) throw ConfigError("workers.user: '" + c.worker_user + "' is root; name an unprivileged user");
    c.worker_uid = pw->pw_uid;
    c.worker_gid = pw->pw_gid;
    if (::geteuid() != 0) throw ConfigError("workers.user: memfitd must run as root to start workers as another user");
  }
  return c;
}

}  // namespace memfit::daemon
