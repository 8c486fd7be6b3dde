// memfit-worker: trains one job and reports on stdout, one JSON event per line.
//
//   memfit-worker run --spec FILE [--device cpu|cuda:N] [--memory-limit SIZE]
//                     [--max-steps N] [--threads N]
//                     [--input-root DIR]... [--output-root DIR [--job-id ID]]
//
// memfitd confines every worker it starts: inputs are opened only beneath the
// --input-root folders, outputs only beneath the output folder, itself opened beneath
// --output-root without following links (proto/spec/confined.h); with --job-id the
// output folder must carry that job's marker (.memfit-job), written when memfitd
// accepted the job. A run by hand without these flags reads and writes where it is told.
//
// SIZE: bytes, or with a unit: 800MiB, 16GiB, 2GB. Exit codes: 0 finished, 1 internal
// error, 2 bad input, 3 out of memory, 4 stopped by SIGTERM/SIGINT after a checkpoint
// (run the same spec again to resume).
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "confined.h"
#include "spec.h"
#include "train/events.h"
#include "train/trainer.h"

namespace {

extern "C" void on_signal(int) { memfit::train::g_stop_requested.store(true); }

bool parse_size(const std::string& s, int64_t* out) {
  size_t pos = 0;
  long double v;
  try {
    v = std::stold(s, &pos);
  } catch (const std::exception&) {
    return false;
  }
  const std::string unit = s.substr(pos);
  long double mul = 1;
  if (unit.empty() || unit == "B") mul = 1;
  else if (unit == "KiB") mul = 1024.0L;
  else if (unit == "MiB") mul = 1024.0L * 1024;
  else if (unit == "GiB") mul = 1024.0L * 1024 * 1024;
  else if (unit == "TiB") mul = 1024.0L * 1024 * 1024 * 1024;
  else if (unit == "KB") mul = 1e3L;
  else if (unit == "MB") mul = 1e6L;
  else if (unit == "GB") mul = 1e9L;
  else if (unit == "TB") mul = 1e12L;
  else return false;
  const long double bytes = v * mul;
  if (!(bytes >= 1) || bytes > 9.0e18L) return false;
  *out = static_cast<int64_t>(bytes);
  return true;
}

int usage(const std::string& why) {
  memfit::train::Events ev;
  ev.emit({{"event", "failed"}, {"reason", "bad_input"}, {"message", why}});
  std::fprintf(stderr,
               "memfit-worker: %s\nusage: memfit-worker run --spec FILE [--device cpu|cuda:N] "
               "[--memory-limit SIZE] [--fit SIZE] [--max-steps N] [--threads N]\n",
               why.c_str());
  return memfit::train::kExitBadInput;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) != "run") {
    if (argc >= 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
      std::printf("usage: memfit-worker run --spec FILE [--device cpu|cuda:N] [--memory-limit SIZE] "
                  "[--fit SIZE] [--max-steps N] [--threads N]\n"
                  "  --fit SIZE  memory.preset auto: fit the options and micro-batch to SIZE (default: --memory-limit)\n");
      return 0;
    }
    return usage("expected the 'run' command");
  }
  std::string spec_path, output_root, job_id;
  std::vector<std::string> input_roots;
  memfit::train::RunOptions opts;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--spec" && has_value) {
      spec_path = argv[++i];
    } else if (a == "--device" && has_value) {
      opts.device = argv[++i];
    } else if (a == "--memory-limit" && has_value) {
      if (!parse_size(argv[++i], &opts.memory_limit)) {
        return usage(std::string("--memory-limit: '") + argv[i] + "' is not a size (e.g. 800MiB, 16GiB, 1048576)");
      }
    } else if (a == "--fit" && has_value) {
      if (!parse_size(argv[++i], &opts.fit_bytes)) {
        return usage(std::string("--fit: '") + argv[i] + "' is not a size (e.g. 800MiB, 16GiB, 1048576)");
      }
    } else if (a == "--input-root" && has_value) {
      input_roots.push_back(argv[++i]);
    } else if (a == "--output-root" && has_value) {
      output_root = argv[++i];
    } else if (a == "--job-id" && has_value) {
      job_id = argv[++i];
    } else if ((a == "--max-steps" || a == "--threads") && has_value) {
      char* end = nullptr;
      const long long v = std::strtoll(argv[++i], &end, 10);
      if (*end != '\0' || v <= 0 || v > 1000000000) return usage(a + ": expected a positive integer");
      if (a == "--max-steps") opts.max_steps = v;
      else opts.threads = static_cast<int>(v);
    } else {
      return usage("unknown or incomplete argument '" + a + "'");
    }
  }
  if (spec_path.empty()) return usage("--spec FILE is required");

  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);

  memfit::train::Events events;
  memfit::spec::Job job;
  std::string spec_text;
  try {
    job = memfit::spec::load_job(spec_path);
    std::ifstream in(spec_path);
    std::ostringstream ss;
    ss << in.rdbuf();
    spec_text = ss.str();
  } catch (const memfit::spec::SpecError& e) {
    events.emit({{"event", "failed"}, {"reason", "bad_input"}, {"message", e.what()}});
    return memfit::train::kExitBadInput;
  }
  // Confinement, before any input or output is touched.
  try {
    if (!input_roots.empty()) memfit::fsx::set_input_roots(input_roots);
    if (!output_root.empty()) {
      memfit::fsx::set_output_root(output_root, job.output_dir);
      if (!job_id.empty()) {
        std::string marker;
        try {
          marker = memfit::fsx::read_output(job.output_dir + "/.memfit-job", 4096);
        } catch (const memfit::fsx::FsError&) {
        }
        while (!marker.empty() && (marker.back() == '\n' || marker.back() == ' ')) marker.pop_back();
        if (marker != job_id) {
          events.emit({{"event", "failed"},
                       {"reason", "bad_input"},
                       {"message", "output_dir: " + job.output_dir + " is not this job's folder (its marker .memfit-job " +
                                       (marker.empty() ? std::string("is missing") : "names another job") + ")"}});
          return memfit::train::kExitBadInput;
        }
      }
    }
  } catch (const memfit::fsx::FsError& e) {
    const bool user = e.errno_value == ELOOP || e.errno_value == EXDEV || e.errno_value == ENOTDIR;
    events.emit({{"event", "failed"}, {"reason", user ? "bad_input" : "io"}, {"message", std::string("output_dir: ") + e.what()}});
    return user ? memfit::train::kExitBadInput : memfit::train::kExitIo;
  }
  return memfit::train::run_job(job, spec_text, opts, events);
}
