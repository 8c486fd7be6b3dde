// memfitd: the scheduler daemon. See docs/DAEMON.md; `memfitd --help` for the flags.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "auth.h"
#include "config.h"
#include "core.h"
#include "devices.h"
#include "metrics.h"
#include "runner.h"
#include "service.h"
#include "state_lock.h"
#include "store.h"

namespace {

std::string read_file(const std::string& path, const char* what) {
  std::ifstream f(path);
  if (!f) throw memfit::daemon::ConfigError(std::string(what) + ": cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace memfit::daemon;
  // Signals go to one thread (sigwait below), not to whichever thread runs.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
  // A scrape builds its text in buffers of about 1 MB with many finished jobs retained
  // (prometheus-cpp's serializer, gzip). glibc's defaults hand such buffers back to the
  // kernel after each scrape, and the next one faults every page in again: half of the
  // scrape's CPU (docs/PERFORMANCE.md, "Metrics"). Keep them in the heap.
  mallopt(M_MMAP_THRESHOLD, 16 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);

  std::vector<std::string> args(argv + 1, argv + argc);
  for (const auto& a : args) {
    if (a == "-h" || a == "--help") {
      std::fputs(usage().c_str(), stdout);
      return 0;
    }
  }
  Config cfg;
  std::unique_ptr<memfit::store::Store> store;
  std::unique_ptr<DeviceMonitor> devices;
  Auth auth;
  std::unique_ptr<StateLock> state_lock;
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  std::string devlog;
  const bool check_only = std::find(args.begin(), args.end(), "--check-config") != args.end();
  if (check_only) args.erase(std::find(args.begin(), args.end(), "--check-config"));
  try {
    cfg = load_config(args, argv[0]);
    if (check_only) {
      std::fputs(describe(cfg).c_str(), stdout);
      return 0;
    }
    // One daemon per state folder, decided before anything else touches it.
    state_lock = std::make_unique<StateLock>(StateLock::acquire(cfg.state_dir));
    try {
      store = memfit::store::Store::open(cfg.state_dir);
    } catch (const memfit::store::StoreError& e) {
      throw ConfigError(std::string("state_dir: ") + e.what());
    }
    if (!cfg.worker_cgroup.empty()) {
      std::string why;
      if (!CgroupUsable(cfg.worker_cgroup, &why)) throw ConfigError("workers.cgroup: " + why);
    }
    devices = DeviceMonitor::create(cfg, &devlog);
    auth = Auth::load(cfg.tokens_file);
    if (!cfg.tls_cert.empty()) {
      grpc::SslServerCredentialsOptions o;
      o.pem_key_cert_pairs.push_back({read_file(cfg.tls_key, "tls.key"), read_file(cfg.tls_cert, "tls.cert")});
      creds = grpc::SslServerCredentials(o);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "memfitd: %s\n", e.what());
    return 2;
  }
  if (::geteuid() == 0 && cfg.worker_user.empty()) {
    std::fprintf(stderr,
                 "memfitd: warning: running as root with no workers.user: workers run as root "
                 "(docs/DAEMON.md, Deploying for several users)\n");
  }
  if (!std::filesystem::exists(cfg.worker)) {
    std::fprintf(stderr, "memfitd: warning: no worker at %s (--worker); jobs will fail to start\n", cfg.worker.c_str());
  }
  std::fprintf(stderr, "memfitd: state in %s\n%s", cfg.state_dir.c_str(), devlog.c_str());
  Core core(cfg, *store, *devices);
  core.start();
  JobServiceImpl jobs(core, auth);
  ClusterServiceImpl cluster(core, auth);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort(cfg.listen, creds, &port);
  b.RegisterService(&jobs);
  b.RegisterService(&cluster);
  b.experimental().SetInterceptorCreators(StatusInterceptors());
  b.SetMaxReceiveMessageSize(static_cast<int>(std::min<int64_t>(cfg.max_message_bytes, INT32_MAX)));
  std::unique_ptr<grpc::Server> server = b.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "memfitd: cannot listen on %s\n", cfg.listen.c_str());
    core.stop(false);
    return 1;
  }
  std::unique_ptr<MetricsExporter> metrics;
  if (!cfg.metrics_listen.empty()) {
    try {
      metrics = std::make_unique<MetricsExporter>(cfg.metrics_listen, core);
      std::fprintf(stderr, "memfitd: metrics on http://%s/metrics\n", metrics->address().c_str());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "memfitd: metrics: %s\n", e.what());
      server->Shutdown();
      core.stop(false);
      return 1;
    }
  }
  const std::string host = cfg.listen.substr(0, cfg.listen.rfind(':'));
  std::fprintf(stderr, "memfitd: listening on %s:%d%s%s\n", host.c_str(), port, cfg.tls_cert.empty() ? "" : " (TLS)",
               auth.enabled() ? " (tokens)" : "");
  std::thread stopper([&] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    std::fprintf(stderr, "memfitd: %s: stopping (workers checkpoint and their jobs resume at the next start)\n",
                 sig == SIGTERM ? "SIGTERM" : "SIGINT");
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  });
  server->Wait();
  stopper.join();
  metrics.reset();
  core.stop(true);
  std::fprintf(stderr, "memfitd: stopped\n");
  return 0;
}
