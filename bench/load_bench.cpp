// memfitd under load: starts a real daemon with workers held back (--paused, so every
// job stays queued), then C clients (one token each, one thread each, one channel per 8
// clients) submit N jobs over gRPC on loopback while W of them also watch one of their
// jobs. Reports submit latency (p50/p99/max), throughput, ListJobs latency once the store
// holds every job, and checks that every accepted job is in the store after the daemon
// is killed with SIGKILL and started again.
//
//   memfit-bench-load --memfitd build/bin/memfitd --clients 200 --jobs 10000 --watchers 20
//
// --metrics: the time of a scrape of /metrics with 10,000 jobs in the store and 50
// running (metrics_bench below).
//
//   memfit-bench-load --metrics --jobs 10000 --running 50
#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "memfit/v1/service.grpc.pb.h"

extern char** environ;

namespace {

namespace fs = std::filesystem;
namespace v1 = memfit::v1;
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * static_cast<double>(v.size())));
  return v[i];
}

struct Daemon {
  pid_t pid = -1;
  int port = 0;
  int metrics_port = 0;  // when memfitd serves /metrics
  FILE* err = nullptr;
};

Daemon start_daemon(const std::string& memfitd, const std::vector<std::string>& args) {
  int fds[2];
  if (pipe(fds) != 0) throw std::runtime_error("pipe");
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 2);
  posix_spawn_file_actions_addclose(&fa, fds[0]);
  std::vector<std::string> all{memfitd};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  Daemon d;
  if (posix_spawn(&d.pid, memfitd.c_str(), &fa, nullptr, argv.data(), environ) != 0) {
    throw std::runtime_error("cannot start " + memfitd);
  }
  posix_spawn_file_actions_destroy(&fa);
  close(fds[1]);
  d.err = fdopen(fds[0], "r");
  char line[4096];
  std::string log;
  while (std::fgets(line, sizeof line, d.err) != nullptr) {
    log += line;
    const std::string s = line;
    const auto m = s.find("metrics on http://");
    if (m != std::string::npos) {
      const std::string addr = s.substr(m + 18);
      d.metrics_port = std::atoi(addr.substr(addr.find(':') + 1).c_str());
    }
    const auto at = s.find("listening on ");
    if (at != std::string::npos) {
      const std::string addr = s.substr(at + 13);
      d.port = std::atoi(addr.substr(addr.rfind(':') + 1).c_str());
      break;
    }
  }
  if (d.port == 0) throw std::runtime_error("memfitd did not start:\n" + log);
  // Keep reading its log so it never blocks on a full pipe.
  std::thread([f = d.err] {
    char buf[4096];
    while (std::fgets(buf, sizeof buf, f) != nullptr) {
    }
  }).detach();
  return d;
}

void stop_daemon(Daemon& d, int sig) {
  kill(d.pid, sig);
  int st = 0;
  waitpid(d.pid, &st, 0);
}

std::string arg(int argc, char** argv, const std::string& name, const std::string& def) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (name == argv[i]) return argv[i + 1];
  }
  return def;
}

std::string token_of(int client) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "load-client-token-%04d", client);
  return buf;
}

// ---- --metrics: the cost of a scrape of /metrics with a full store and running jobs ----

// GET http://127.0.0.1:PORT/PATH over HTTP/1.0; the body ("" on failure). `gzip`: ask
// for a compressed body, as Prometheus does.
std::string http_get(int port, const std::string& path, bool gzip = false) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string out;
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n" +
                            (gzip ? "Accept-Encoding: gzip\r\n" : "") + "\r\n";
    if (write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
      char buf[65536];
      ssize_t n;
      while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
    }
  }
  close(fd);
  const auto body = out.find("\r\n\r\n");
  return body == std::string::npos ? "" : out.substr(body + 4);
}

// The value of the series `series` (name and labels exactly as exposed), or -1.
double series_value(const std::string& text, const std::string& series) {
  const auto at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::atof(text.c_str() + at + series.size() + 2);
}

// CPU time (user + system) the process has used, in milliseconds.
double cpu_ms(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto close = all.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream in(all.substr(close + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; i <= 15 && in >> field; ++i) {
    if (i == 14 || i == 15) ticks += std::atof(field.c_str());
  }
  return ticks * 1000.0 / static_cast<double>(sysconf(_SC_CLK_TCK));
}

struct ScrapeStats {
  double p50_ms = 0, p90_ms = 0, max_ms = 0, cpu_ms = 0;
  size_t bytes = 0, gzip_bytes = 0, series = 0, job_series = 0, jobs = 0, running = 0, per_running_job = 0;
};

// `scrapes` timed scrapes as Prometheus makes them (gzip), 100 ms apart; memfitd's CPU
// per scrape is its CPU over them less its CPU over as long without scrapes (the loop
// ticking, 50 workers' lines). Then one plain scrape to count series.
ScrapeStats scrape_stats(pid_t daemon, int port, int scrapes) {
  ScrapeStats st;
  std::vector<double> ms;
  const double c0 = cpu_ms(daemon);
  const auto w0 = Clock::now();
  for (int i = 0; i < scrapes; ++i) {
    const auto t0 = Clock::now();
    st.gzip_bytes = http_get(port, "/metrics", /*gzip=*/true).size();
    ms.push_back(ms_since(t0));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const double busy = cpu_ms(daemon) - c0, wall = ms_since(w0);
  const double c1 = cpu_ms(daemon);
  std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<int64_t>(wall)));
  const double idle = cpu_ms(daemon) - c1;
  st.cpu_ms = std::max(0.0, busy - idle) / scrapes;
  const std::string text = http_get(port, "/metrics");
  st.p50_ms = pct(ms, 50);
  st.p90_ms = pct(ms, 90);
  st.max_ms = pct(ms, 100);
  st.bytes = text.size();
  std::string first_running;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty() || line[0] == '#') continue;
    ++st.series;
    if (line.find("job_id=\"") == std::string::npos) continue;
    ++st.job_series;
    st.jobs += line.rfind("memfit_job_info{", 0) == 0;
    if (line.rfind("memfit_job_steps{", 0) == 0 && line.find("state=\"running\"") != std::string::npos) {
      ++st.running;
      if (first_running.empty()) {
        const auto a = line.find("job_id=\"") + 8;
        first_running = line.substr(a, line.find('"', a) - a);
      }
    }
  }
  if (!first_running.empty()) {
    for (size_t at = text.find("job_id=\"" + first_running + "\""); at != std::string::npos;
         at = text.find("job_id=\"" + first_running + "\"", at + 1)) {
      ++st.per_running_job;
    }
  }
  return st;
}

// Fills a memfitd (paused) with `jobs` queued jobs, restarts it with a stand-in worker (a
// shell script that reports steps like memfit-worker and trains nothing: no LibTorch) and
// a device that fits exactly `running` of them, then times scrapes of /metrics: first
// with `running` jobs running, then again once metrics.finished_max_jobs finished jobs are
// retained (jobs told to finish, the next ones started, until the cap is full).
int metrics_bench(int argc, char** argv, const std::string& memfitd) {
  const int jobs = std::stoi(arg(argc, argv, "--jobs", "10000"));
  const int running = std::stoi(arg(argc, argv, "--running", "50"));
  const int scrapes = std::stoi(arg(argc, argv, "--scrapes", "21"));
  const int retained_cap = std::stoi(arg(argc, argv, "--retained", "1000"));
  bool json_out = false;
  for (int i = 1; i < argc; ++i) json_out |= std::string(argv[i]) == "--json";
  if (jobs <= 0 || running <= 0 || running > jobs || scrapes <= 0 || retained_cap < 0) {
    std::fprintf(stderr, "memfit-bench-load --metrics: need 0 < --running <= --jobs, --scrapes > 0\n");
    return 2;
  }
  char tmpl[] = "/tmp/memfit-metrics-XXXXXX";
  const fs::path dir = mkdtemp(tmpl);
  fs::create_directories(dir / "in" / "tok");
  std::ofstream(dir / "in" / "config.json")
      << R"({"model_type": "gpt2", "vocab_size": 1000, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64})";
  std::ofstream(dir / "in" / "train.txt") << "some text\n";
  const fs::path finish = dir / "finish";
  const fs::path worker = dir / "stand-in-worker";
  {
    std::ofstream w(worker);
    w << "#!/bin/sh\n"
         "# memfit-bench-load --metrics: reports steps like memfit-worker, trains nothing.\n"
         "echo '{\"event\":\"started\",\"total_steps\":1000000}'\n"
         "i=0\n"
         "while :; do\n"
         "  i=$((i+1))\n"
         "  echo \"{\\\"event\\\":\\\"step\\\",\\\"step\\\":$i,\\\"total_steps\\\":1000000,\\\"loss\\\":2.5,"
         "\\\"memory_bytes\\\":$((1000000+i)),\\\"peak_memory_bytes\\\":3000000}\"\n"
         "  if [ -e " << finish.string() << " ]; then\n"
         "    echo '{\"event\":\"finished\",\"peak_memory_bytes\":3000000}'\n"
         "    exit 0\n"
         "  fi\n"
         "  sleep 1\n"
         "done\n";
  }
  fs::permissions(worker, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                              fs::perms::others_read | fs::perms::others_exec);
  const std::vector<std::string> common{"--state-dir", (dir / "state").string(), "--listen", "127.0.0.1:0",
                                        "--metrics-listen", "127.0.0.1:0", "--read-root", (dir / "in").string(),
                                        "--worker", worker.string(), "--max-queued-per-user", std::to_string(jobs),
                                        "--cancel-grace-seconds", "5"};
  // 1. The store: `jobs` queued jobs (paused: nothing starts).
  std::vector<std::string> a1 = common;
  a1.insert(a1.end(), {"--paused", "--device", "cpu:0=64GiB"});
  Daemon d = start_daemon(memfitd, a1);
  v1::JobSpec spec;
  spec.set_name("metrics-bench");
  spec.mutable_model()->set_architecture("gpt2");
  spec.mutable_model()->set_config_path((dir / "in" / "config.json").string());
  spec.mutable_data()->set_train_path((dir / "in" / "train.txt").string());
  spec.mutable_data()->set_format("text");
  spec.mutable_data()->set_tokenizer_path((dir / "in" / "tok").string());
  spec.mutable_method()->set_kind("lora");
  spec.mutable_training()->set_steps(10);
  spec.mutable_training()->set_micro_batch(2);
  spec.mutable_training()->set_sequence_length(16);
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(d.port), grpc::InsecureChannelCredentials());
  std::atomic<int> next{0}, failures{0};
  std::atomic<int64_t> reservation{0};
  std::vector<std::thread> threads;
  const auto t0 = Clock::now();
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      auto stub = v1::JobService::NewStub(channel);
      for (int n = next++; n < jobs; n = next++) {
        grpc::ClientContext ctx;
        v1::SubmitJobRequest r;
        *r.mutable_spec() = spec;
        v1::Job j;
        if (!stub->SubmitJob(&ctx, r, &j).ok()) {
          ++failures;
          continue;
        }
        reservation = j.plan().reserved_bytes();
      }
    });
  }
  for (auto& t : threads) t.join();
  const double fill_s = ms_since(t0) / 1000.0;
  stop_daemon(d, SIGTERM);
  if (failures > 0 || reservation <= 0) {
    std::fprintf(stderr, "memfit-bench-load --metrics: %d submits failed\n", failures.load());
    return 1;
  }
  // 2. Unpaused with one device that fits exactly `running` reservations.
  std::vector<std::string> a2 = common;
  a2.insert(a2.end(), {"--device", "cpu:0=" + std::to_string(running * reservation + reservation / 2)});
  d = start_daemon(memfitd, a2);
  auto wait_for = [&](const std::function<bool(const std::string&)>& ok, double seconds) {
    const auto w0 = Clock::now();
    std::string text;
    while (ms_since(w0) < seconds * 1000) {
      text = http_get(d.metrics_port, "/metrics");
      if (ok(text)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
    std::fprintf(stderr, "memfit-bench-load --metrics: timed out; last scrape:\n%s\n", text.substr(0, 4000).c_str());
    return false;
  };
  auto all_running_stepped = [&](const std::string& text) {
    if (series_value(text, "memfit_jobs{state=\"running\"}") != running) return false;
    size_t stepped = 0;
    for (size_t at = text.find("\nmemfit_job_steps{"); at != std::string::npos; at = text.find("\nmemfit_job_steps{", at + 1)) {
      const auto eol = text.find('\n', at + 1);
      const std::string line = text.substr(at + 1, eol - at - 1);
      if (line.find("state=\"running\"") != std::string::npos && std::atof(line.c_str() + line.rfind(' ') + 1) >= 1) {
        ++stepped;
      }
    }
    return stepped == static_cast<size_t>(running);
  };
  int rc = 0;
  ScrapeStats base, full;
  double retained = 0;
  if (!wait_for(all_running_stepped, 120)) {
    rc = 1;
  } else {
    base = scrape_stats(d.pid, d.metrics_port, scrapes);
    // 3. Retained finished jobs up to the cap: let jobs finish, then hold `running` again.
    if (retained_cap > 0) {
      std::ofstream(finish).put('\n');
      const bool filled = wait_for(
          [&](const std::string& text) { return series_value(text, "memfit_jobs{state=\"succeeded\"}") >= retained_cap; },
          300);
      fs::remove(finish);
      if (!filled || !wait_for(all_running_stepped, 120)) {
        rc = 1;
      } else {
        full = scrape_stats(d.pid, d.metrics_port, scrapes);
        retained = static_cast<double>(full.jobs - full.running);
      }
    }
  }
  stop_daemon(d, SIGTERM);
  std::error_code ec;
  fs::remove_all(dir, ec);
  if (rc != 0) return rc;
  if (json_out) {
    std::printf("{\"jobs\": %d, \"running\": %d, \"fill_seconds\": %.1f, \"scrapes\": %d, "
                "\"scrape_p50_ms\": %.3f, \"scrape_p90_ms\": %.3f, \"scrape_max_ms\": %.3f, \"cpu_ms\": %.2f, "
                "\"bytes\": %zu, \"gzip_bytes\": %zu, \"series\": %zu, \"series_per_running_job\": %zu, "
                "\"retained\": %.0f, \"retained_scrape_p50_ms\": %.3f, \"retained_scrape_p90_ms\": %.3f, "
                "\"retained_scrape_max_ms\": %.3f, \"retained_cpu_ms\": %.2f, \"retained_bytes\": %zu, "
                "\"retained_gzip_bytes\": %zu, \"retained_series\": %zu}\n",
                jobs, running, fill_s, scrapes, base.p50_ms, base.p90_ms, base.max_ms, base.cpu_ms, base.bytes,
                base.gzip_bytes, base.series, base.per_running_job, retained, full.p50_ms, full.p90_ms, full.max_ms,
                full.cpu_ms, full.bytes, full.gzip_bytes, full.series);
  } else {
    std::printf("memfitd /metrics: %d jobs in the store (filled in %.1f s), %zu running (stand-in workers)\n", jobs,
                fill_s, base.running);
    std::printf("  scrape (%d, gzip): p50 %.2f ms, p90 %.2f ms, max %.2f ms, memfitd CPU %.2f ms; %zu bytes "
                "(%zu gzip), %zu series, %zu per running job\n",
                scrapes, base.p50_ms, base.p90_ms, base.max_ms, base.cpu_ms, base.bytes, base.gzip_bytes, base.series,
                base.per_running_job);
    if (retained_cap > 0) {
      std::printf("  with %.0f finished jobs retained and %zu running: p50 %.2f ms, p90 %.2f ms, max %.2f ms, "
                  "memfitd CPU %.2f ms; %zu bytes (%zu gzip), %zu series\n",
                  retained, full.running, full.p50_ms, full.p90_ms, full.max_ms, full.cpu_ms, full.bytes,
                  full.gzip_bytes, full.series);
    }
  }
  return base.p50_ms < 100 && (retained_cap == 0 || full.p50_ms < 100) ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::puts("usage: memfit-bench-load [--memfitd PATH] [--clients N] [--jobs N] [--watchers N]\n"
                "                         [--data DIR] [--state-dir DIR] [--json]\n"
                "       memfit-bench-load --metrics [--memfitd PATH] [--jobs N] [--running R] [--scrapes K]\n"
                "                         [--retained N] [--json]\n"
                "--metrics: time scrapes of /metrics with N jobs in the store and R running (stand-in\n"
                "workers, no LibTorch), then with N finished jobs retained as well; exit 1 over 100 ms.");
      return 0;
    }
  }
  const std::string self_dir = fs::path(argv[0]).parent_path().string();
  const std::string memfitd = arg(argc, argv, "--memfitd", (fs::path(self_dir) / "memfitd").string());
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--metrics") return metrics_bench(argc, argv, memfitd);
  }
  const int clients = std::stoi(arg(argc, argv, "--clients", "200"));
  const int jobs = std::stoi(arg(argc, argv, "--jobs", "10000"));
  const int watchers = std::min(clients, std::stoi(arg(argc, argv, "--watchers", "20")));
  const std::string data = fs::absolute(arg(argc, argv, "--data", ".memfit/data")).string();
  bool json_out = false;
  for (int i = 1; i < argc; ++i) json_out |= std::string(argv[i]) == "--json";
  if (clients <= 0 || jobs <= 0) {
    std::fprintf(stderr, "memfit-bench-load: --clients and --jobs must be positive\n");
    return 2;
  }
  if (!fs::exists(fs::path(data) / "gpt2" / "encoder.json")) {
    std::fprintf(stderr, "memfit-bench-load: no GPT-2 tokenizer in %s/gpt2 (scripts/fetch_data.sh; --data)\n", data.c_str());
    return 77;
  }
  std::string dir = arg(argc, argv, "--state-dir", "");
  if (dir.empty()) {
    char tmpl[] = "/tmp/memfit-load-XXXXXX";
    dir = mkdtemp(tmpl);
  }
  fs::create_directories(dir);
  {
    std::ofstream t(fs::path(dir) / "tokens");
    for (int c = 0; c < clients; ++c) t << token_of(c) << " user" << c << "\n";
    t << "load-admin-token-0000000 admin admin\n";
    t.close();
    fs::permissions(fs::path(dir) / "tokens", fs::perms::owner_read | fs::perms::owner_write);  // memfitd requires it
    std::ofstream cfg(fs::path(dir) / "config.json");
    cfg << R"({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 64, "n_layer": 2, "n_head": 4,
               "n_positions": 128, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"})";
  }
  v1::JobSpec spec;
  spec.set_name("load");
  spec.mutable_model()->set_architecture("gpt2");
  spec.mutable_model()->set_config_path((fs::path(dir) / "config.json").string());
  spec.mutable_data()->set_train_path((fs::path(data) / "moby-dick" / "chapter_1.txt").string());
  spec.mutable_data()->set_format("text");
  spec.mutable_data()->set_tokenizer_path((fs::path(data) / "gpt2").string());
  spec.mutable_method()->set_kind("lora");
  spec.mutable_training()->set_steps(100);
  spec.mutable_training()->set_micro_batch(4);
  spec.mutable_training()->set_sequence_length(64);

  const std::vector<std::string> dargs{"--state-dir", (fs::path(dir) / "state").string(), "--listen", "127.0.0.1:0",
                                       "--metrics-listen", "off", "--paused", "--read-root", data, "--read-root", dir, "--tokens",
                                       (fs::path(dir) / "tokens").string(), "--max-queued-per-user",
                                       std::to_string(jobs)};
  Daemon d = start_daemon(memfitd, dargs);
  const std::string target = "127.0.0.1:" + std::to_string(d.port);
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int i = 0; i < (clients + 7) / 8; ++i) {
    grpc::ChannelArguments ca;
    ca.SetInt("grpc.channel_id", i);  // distinct connections
    channels.push_back(grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), ca));
  }

  std::mutex mu;
  std::vector<double> lat;
  lat.reserve(static_cast<size_t>(jobs));
  std::set<std::string> accepted;
  std::atomic<int> failures{0}, watch_events{0}, next{0};
  std::vector<std::thread> threads, watch_threads;
  std::vector<std::unique_ptr<grpc::ClientContext>> watch_ctx(static_cast<size_t>(watchers));
  const auto t0 = Clock::now();
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      auto stub = v1::JobService::NewStub(channels[static_cast<size_t>(c / 8)]);
      bool watching = c >= watchers;
      std::vector<double> mine;
      std::vector<std::string> ids;
      for (int n = next++; n < jobs; n = next++) {
        grpc::ClientContext ctx;
        ctx.AddMetadata("authorization", "Bearer " + token_of(c));
        v1::SubmitJobRequest r;
        *r.mutable_spec() = spec;
        r.set_request_id("load-" + std::to_string(n));
        v1::Job j;
        const auto s0 = Clock::now();
        const grpc::Status st = stub->SubmitJob(&ctx, r, &j);
        mine.push_back(ms_since(s0));
        if (!st.ok()) {
          if (failures++ < 5) std::fprintf(stderr, "submit failed: %s\n", st.error_message().c_str());
          continue;
        }
        ids.push_back(j.id());
        if (!watching) {
          watching = true;
          std::lock_guard<std::mutex> lock(mu);
          watch_ctx[static_cast<size_t>(c)] = std::make_unique<grpc::ClientContext>();
          watch_ctx[static_cast<size_t>(c)]->AddMetadata("authorization", "Bearer " + token_of(c));
          grpc::ClientContext* wc = watch_ctx[static_cast<size_t>(c)].get();
          const std::string id = j.id();
          watch_threads.emplace_back([&, wc, id, c] {
            auto ws = v1::JobService::NewStub(channels[static_cast<size_t>(c / 8)]);
            v1::WatchJobRequest wr;
            wr.set_id(id);
            auto reader = ws->WatchJob(wc, wr);
            v1::JobEvent e;
            while (reader->Read(&e)) ++watch_events;
            (void)reader->Finish();
          });
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      lat.insert(lat.end(), mine.begin(), mine.end());
      accepted.insert(ids.begin(), ids.end());
    });
  }
  for (auto& t : threads) t.join();
  const double total_ms = ms_since(t0);

  // ListJobs at full size: an admin's first page, a user's own jobs, a state filter.
  auto stub = v1::JobService::NewStub(channels[0]);
  auto timed_list = [&](const std::string& token, int page_size, bool queued_only) {
    std::vector<double> v;
    for (int i = 0; i < 20; ++i) {
      grpc::ClientContext ctx;
      ctx.AddMetadata("authorization", "Bearer " + token);
      v1::ListJobsRequest r;
      r.set_page_size(page_size);
      r.set_all_users(token == "load-admin-token-0000000");
      if (queued_only) r.add_states(v1::QUEUED);
      v1::ListJobsResponse out;
      const auto s0 = Clock::now();
      if (!stub->ListJobs(&ctx, r, &out).ok()) ++failures;
      v.push_back(ms_since(s0));
    }
    return pct(v, 50);
  };
  const double list_admin_100 = timed_list("load-admin-token-0000000", 100, false);
  const double list_admin_1000 = timed_list("load-admin-token-0000000", 1000, true);
  const double list_user = timed_list(token_of(0), 100, false);
  for (auto& c : watch_ctx) {
    if (c) c->TryCancel();
  }
  for (auto& t : watch_threads) t.join();

  // SIGKILL, restart, and read every job back.
  stop_daemon(d, SIGKILL);
  Daemon d2 = start_daemon(memfitd, dargs);
  auto stub2 = v1::JobService::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(d2.port),
                                                            grpc::InsecureChannelCredentials()));
  std::set<std::string> stored;
  std::string page;
  int queued_after = 0;
  const auto p0 = Clock::now();
  do {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer load-admin-token-0000000");
    v1::ListJobsRequest r;
    r.set_page_size(1000);
    r.set_all_users(true);
    r.set_page_token(page);
    v1::ListJobsResponse out;
    const grpc::Status st = stub2->ListJobs(&ctx, r, &out);
    if (!st.ok()) {
      std::fprintf(stderr, "list after restart: %s\n", st.error_message().c_str());
      break;
    }
    for (const auto& j : out.jobs()) {
      stored.insert(j.id());
      queued_after += j.state() == v1::QUEUED;
    }
    page = out.next_page_token();
  } while (!page.empty());
  const double page_all_ms = ms_since(p0);
  stop_daemon(d2, SIGTERM);
  int missing = 0;
  for (const auto& id : accepted) missing += stored.count(id) == 0;

  const double p50 = pct(lat, 50), p99 = pct(lat, 99), mx = pct(lat, 100);
  if (json_out) {
    std::printf("{\"clients\": %d, \"jobs\": %d, \"accepted\": %zu, \"failures\": %d, \"submit_p50_ms\": %.3f, "
                "\"submit_p99_ms\": %.3f, \"submit_max_ms\": %.3f, \"jobs_per_second\": %.1f, "
                "\"list_admin_page100_ms\": %.3f, \"list_queued_page1000_ms\": %.3f, \"list_user_ms\": %.3f, "
                "\"read_all_after_restart_ms\": %.1f, \"stored_after_kill9\": %zu, \"missing\": %d, "
                "\"watch_events\": %d}\n",
                clients, jobs, accepted.size(), failures.load(), p50, p99, mx, 1000.0 * jobs / total_ms,
                list_admin_100, list_admin_1000, list_user, page_all_ms, stored.size(), missing, watch_events.load());
  } else {
    std::printf("memfitd load: %d clients, %d jobs submitted (workers paused), %d watchers\n", clients, jobs, watchers);
    std::printf("  accepted %zu, failed %d, %.0f jobs/s\n", accepted.size(), failures.load(), 1000.0 * jobs / total_ms);
    std::printf("  SubmitJob latency: p50 %.2f ms, p99 %.2f ms, max %.2f ms\n", p50, p99, mx);
    std::printf("  ListJobs at %zu jobs (median of 20): admin first page of 100 %.2f ms, admin QUEUED page of "
                "1000 %.2f ms, one user's jobs %.2f ms\n",
                accepted.size(), list_admin_100, list_admin_1000, list_user);
    std::printf("  watchers received %d events\n", watch_events.load());
    std::printf("  after SIGKILL + restart: %zu jobs in the store (%d queued), %d accepted jobs missing; "
                "reading all took %.0f ms\n",
                stored.size(), queued_after, missing, page_all_ms);
  }
  std::error_code ec;
  if (arg(argc, argv, "--state-dir", "").empty()) fs::remove_all(dir, ec);
  return (missing == 0 && failures == 0 && static_cast<int>(accepted.size()) == jobs) ? 0 : 1;
}
