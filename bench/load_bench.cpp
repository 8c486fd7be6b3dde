// memfitd under load: starts a real daemon with workers held back (--paused, so every
// job stays queued), then C clients (one token each, one thread each, one channel per 8
// clients) submit N jobs over gRPC on loopback while W of them also watch one of their
// jobs. Reports submit latency (p50/p99/max), throughput, ListJobs latency once the store
// holds every job, and checks that every accepted job is in the store after the daemon
// is killed with SIGKILL and started again.
//
//   memfit-bench-load --memfitd build/bin/memfitd --clients 200 --jobs 10000 --watchers 20
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
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
#include <mutex>
#include <set>
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

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::puts("usage: memfit-bench-load [--memfitd PATH] [--clients N] [--jobs N] [--watchers N]\n"
                "                         [--data DIR] [--state-dir DIR] [--json]");
      return 0;
    }
  }
  const std::string self_dir = fs::path(argv[0]).parent_path().string();
  const std::string memfitd = arg(argc, argv, "--memfitd", (fs::path(self_dir) / "memfitd").string());
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
