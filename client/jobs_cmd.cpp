// The daemon verbs: submit, get, list, cancel, watch, events, logs, devices.
#include <google/protobuf/util/time_util.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "args.h"
#include "commands.h"
#include "memfit_version.h"
#include "remote.h"
#include "spec.h"
#include "text.h"

namespace memfit::cli {
namespace {

using json = nlohmann::json;
using google::protobuf::util::TimeUtil;

double secs(const google::protobuf::Timestamp& t) { return static_cast<double>(t.seconds()) + t.nanos() / 1e9; }

std::string when(const google::protobuf::Timestamp& t) {
  if (t.seconds() == 0) return "-";
  const std::time_t s = t.seconds();
  std::tm tm{};
  localtime_r(&s, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string age(const v1::Job& j) {
  if (j.has_finished_at() && j.has_started_at()) return human_duration(secs(j.finished_at()) - secs(j.started_at()));
  if (j.has_started_at()) return human_duration(now_s() - secs(j.started_at()));
  return human_duration(now_s() - secs(j.created_at()));
}

int64_t saved_bytes(const v1::Job& j) {
  return std::max<int64_t>(0, j.plan().exact_activation_bytes() - j.plan().activation_bytes());
}

// printf onto a string.
__attribute__((format(printf, 2, 3))) void appendf(std::string& out, const char* fmt, ...) {
  va_list ap, again;
  va_start(ap, fmt);
  va_copy(again, ap);
  const int n = std::vsnprintf(nullptr, 0, fmt, ap);
  va_end(ap);
  if (n > 0) {
    const size_t at = out.size();
    out.resize(at + static_cast<size_t>(n) + 1);
    std::vsnprintf(&out[at], static_cast<size_t>(n) + 1, fmt, again);
    out.resize(at + static_cast<size_t>(n));
  }
  va_end(again);
}

std::string fixed4(double x) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.4f", x);
  return buf;
}

// A measured size: 0 means nothing measured yet.
std::string known_size(int64_t b) { return b > 0 ? human_size(b) : "-"; }

}  // namespace

std::string job_text(const v1::Job& j) {
  std::string out;
  const auto& p = j.plan();
  appendf(out, "job         %s  (%s)\n", printable(j.id()).c_str(), printable(j.name()).c_str());
  appendf(out, "owner       %s\n", printable(j.owner()).c_str());
  appendf(out, "state       %s%s\n", state_name(j.state()).c_str(),
              j.device().empty() ? "" : (" on " + printable(j.device())).c_str());
  appendf(out, "created     %s   started %s   finished %s   attempts %d\n", when(j.created_at()).c_str(),
              when(j.started_at()).c_str(), when(j.finished_at()).c_str(), j.attempts());
  appendf(out, "memory      estimated %s, reserved %s (micro-batch %lld x %lld)\n",
              known_size(p.estimated_peak_bytes()).c_str(), known_size(p.reserved_bytes()).c_str(),
              static_cast<long long>(p.micro_batch()), static_cast<long long>(p.gradient_accumulation()));
  appendf(out, "            activations %s kept, %s saved by memfit's ops\n", human_size(p.activation_bytes()).c_str(),
              human_size(saved_bytes(j)).c_str());
  const auto& m = p.memory();
  appendf(out, "options     activation %s, norm %s, attention %s%s%s%s\n", printable(m.activation()).c_str(),
              printable(m.norm()).c_str(), printable(m.attention()).c_str(), m.fused_mlp() ? ", fused MLP" : "", m.fused_loss() ? ", fused loss" : "",
              m.activation_checkpointing() ? ", checkpointing" : "");
  if (!p.level().empty()) appendf(out, "auto        %s\n", printable(p.level()).c_str());
  for (const auto& r : p.reasons()) appendf(out, "            - %s\n", printable(r).c_str());
  const auto& pr = j.progress();
  if (pr.total_steps() > 0) {
    // Before the first step there is no loss and no measured peak yet: "-", not 0.
    appendf(out, "progress    step %lld/%lld, loss %s, peak %s\n", static_cast<long long>(pr.step()),
                static_cast<long long>(pr.total_steps()), pr.step() > 0 ? fixed4(pr.loss()).c_str() : "-",
                known_size(pr.peak_memory_bytes()).c_str());
  }
  if (j.state() == v1::SUCCEEDED) {
    const auto& r = j.result();
    char error[32] = "-";
    if (p.estimated_peak_bytes() > 0 && r.measured_peak_bytes() > 0) {
      std::snprintf(error, sizeof error, "%+.2f%%",
                    100.0 * (static_cast<double>(p.estimated_peak_bytes()) / static_cast<double>(r.measured_peak_bytes()) - 1.0));
    }
    appendf(out, "result      measured peak %s (estimate %s)", known_size(r.measured_peak_bytes()).c_str(), error);
    if (r.eval_loss() != 0) appendf(out, ", eval loss %.4f", r.eval_loss());
    if (r.eval_accuracy() != 0) appendf(out, ", accuracy %.2f%%", 100 * r.eval_accuracy());
    appendf(out, "\n");
    if (!r.adapter_dir().empty()) appendf(out, "output      %s\n", printable(r.adapter_dir()).c_str());
    if (!r.model_dir().empty()) appendf(out, "output      %s\n", printable(r.model_dir()).c_str());
  }
  if (!j.after().empty()) appendf(out, "after       %s\n", printable(j.after()).c_str());
  if (j.state() == v1::CANCELLED && !j.failure().message().empty()) {
    appendf(out, "cancelled   %s\n", printable(j.failure().message()).c_str());
  }
  if (j.state() == v1::FAILED) {
    appendf(out, "failure     %s (%s): %s\n", j.failure().kind() == v1::USER_INPUT ? "your input" : "system",
                printable(j.failure().reason()).c_str(), printable(j.failure().message()).c_str());
  }
  return out;
}

namespace {

// Every event of the job so far, in order.
std::vector<v1::JobEvent> list_events(Remote& r, const std::string& id) {
  std::vector<v1::JobEvent> all;
  std::string page;
  do {
    v1::ListJobEventsRequest req;
    req.set_id(id);
    req.set_page_size(1000);
    req.set_page_token(page);
    v1::ListJobEventsResponse out;
    auto ctx = r.context();
    r.check(r.jobs().ListJobEvents(ctx.get(), req, &out), "job " + id);
    for (const auto& e : out.events()) all.push_back(e);
    page = out.next_page_token();
  } while (!page.empty());
  return all;
}

// ---- watch ----

class Watcher {
 public:
  Watcher(Remote& r, bool tty, int64_t tail = kTailDefault) : r_(r), tty_(tty), tail_(tail) {}

  int run(const std::string& id) {
    id_ = id;
    v1::Job j = get(id);
    reserved_ = j.plan().reserved_bytes();
    saved_ = saved_bytes(j);
    if (!tty_) {
      std::printf("%s %s: %s\n", printable(j.id()).c_str(), printable(j.name()).c_str(),
                  state_name(j.state()).c_str());
    }
    // What happened so far, cut to --tail; then the stream from the last event shown.
    const std::vector<v1::JobEvent> history = list_events(r_, id);
    std::vector<size_t> keep;
    size_t last_step = history.size();
    for (size_t i = 0; i < history.size(); ++i) {
      if (history[i].kind() == "step") last_step = i;
    }
    for (size_t i = 0; i < history.size(); ++i) {
      if (tail_ == kTailAll) keep.push_back(i);
      else if (tail_ == kTailDefault) {
        if (history[i].kind() != "step" || i == last_step) keep.push_back(i);
      } else if (static_cast<int64_t>(history.size() - i) <= tail_) {
        keep.push_back(i);
      }
    }
    for (size_t i : keep) show(history[i]);
    auto ctx = r_.context(0);
    v1::WatchJobRequest req;
    req.set_id(id);
    req.set_after_seq(history.empty() ? 0 : history.back().seq());
    auto reader = r_.jobs().WatchJob(ctx.get(), req);
    v1::JobEvent e;
    while (reader->Read(&e)) show(e);
    r_.check(reader->Finish(), "job " + id);
    if (tty_ && line_open_) std::printf("\n");
    j = get(id);
    std::printf("%s %s", printable(j.id()).c_str(), state_name(j.state()).c_str());
    if (j.state() == v1::SUCCEEDED) {
      std::printf(": measured peak %s, estimated %s, reserved %s", human_size(j.result().measured_peak_bytes()).c_str(),
                  human_size(j.plan().estimated_peak_bytes()).c_str(), human_size(j.plan().reserved_bytes()).c_str());
      if (j.result().eval_loss() != 0) std::printf(", eval loss %.4f", j.result().eval_loss());
      if (j.result().eval_accuracy() != 0) std::printf(", accuracy %.2f%%", 100 * j.result().eval_accuracy());
    } else if (j.state() == v1::FAILED || (j.state() == v1::CANCELLED && !j.failure().message().empty())) {
      std::printf(": %s", printable(j.failure().message()).c_str());
    }
    std::printf("\n");
    std::fflush(stdout);
    return exit_code_of(j.state());
  }

 private:
  v1::Job get(const std::string& id) {
    v1::GetJobRequest g;
    g.set_id(id);
    v1::Job j;
    auto ctx = r_.context();
    r_.check(r_.jobs().GetJob(ctx.get(), g, &j), "job " + id);
    return j;
  }

  void say(const std::string& text) {
    if (tty_ && line_open_) std::printf("\r\033[K");
    line_open_ = false;
    std::printf("%s\n", text.c_str());
    std::fflush(stdout);
  }

  void show(const v1::JobEvent& e) {
    const std::string t = when(e.time()).substr(11);
    if (e.kind() == "step") {
      json d = json::parse(e.data_json(), nullptr, false);
      if (d.is_discarded()) return;
      const int64_t step = d.value("step", int64_t{0}), total = d.value("total_steps", int64_t{0});
      const double now = secs(e.time());
      if (first_step_time_ < 0 || step < last_step_) {
        first_step_time_ = now;
        first_step_ = step;
      }
      last_step_ = step;
      peak_ = std::max(peak_, d.value("peak_memory_bytes", int64_t{0}));
      const double rate = now > first_step_time_ ? static_cast<double>(step - first_step_) / (now - first_step_time_) : 0;
      char speed[48] = "";
      if (d.contains("tokens_per_second")) std::snprintf(speed, sizeof speed, "%.0f tok/s", d.value("tokens_per_second", 0.0));
      else if (d.contains("samples_per_second")) std::snprintf(speed, sizeof speed, "%.1f samples/s", d.value("samples_per_second", 0.0));
      const std::string eta = rate > 0 ? human_duration(static_cast<double>(total - step) / rate) : "-";
      char buf[320];
      if (tty_) {
        const int width = 20;
        const int filled = total > 0 ? static_cast<int>(width * step / total) : 0;
        std::snprintf(buf, sizeof buf, "[%s%s] step %lld/%lld  loss %.4f  %s  ETA %s  peak %s / %s reserved  saved %s",
                      std::string(static_cast<size_t>(filled), '#').c_str(),
                      std::string(static_cast<size_t>(width - filled), '.').c_str(), static_cast<long long>(step),
                      static_cast<long long>(total), d.value("loss", 0.0), speed, eta.c_str(), human_size(peak_).c_str(),
                      human_size(reserved_).c_str(), human_size(saved_).c_str());
        // One line, cut to the terminal's width so that \r rewrites all of it.
        std::string line = buf;
        winsize ws{};
        if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 10 && line.size() >= ws.ws_col) {
          line.resize(ws.ws_col - 1);
        }
        std::printf("\r\033[K%s", line.c_str());
        line_open_ = true;
        std::fflush(stdout);
      } else {
        std::snprintf(buf, sizeof buf, "%s step %lld/%lld loss %.4f %s ETA %s peak %s of %s reserved", t.c_str(),
                      static_cast<long long>(step), static_cast<long long>(total), d.value("loss", 0.0), speed,
                      eta.c_str(), human_size(peak_).c_str(), human_size(reserved_).c_str());
        say(buf);
      }
      return;
    }
    if (e.kind() == "placed") {
      // The reservation may have grown (out-of-memory retry).
      reserved_ = get(id_).plan().reserved_bytes();
    }
    say(t + " " + printable(e.kind()) + ": " + printable(e.message()));
  }

  Remote& r_;
  std::string id_;
  bool tty_;
  int64_t tail_;
  bool line_open_ = false;
  int64_t reserved_ = 0, saved_ = 0, peak_ = 0;
  double first_step_time_ = -1;
  int64_t first_step_ = 0, last_step_ = 0;
};

// ---- verbs ----
// Their arguments arrive parsed and checked (cli.cpp); what comes back from memfitd goes
// through printable() (text.h) before it reaches a terminal.

int submit(Remote& r, const Common& c, const SubmitArgs& a) {
  v1::SubmitJobRequest req;
  try {
    // Checked here first (the same reader as the worker), so a typo is named before any
    // network; relative paths become absolute (the daemon runs elsewhere).
    *req.mutable_spec() = spec_for_daemon(a.file);
  } catch (const spec::SpecError& e) {
    throw CliError(kExitBadInput, e.what());
  }
  req.set_priority(a.priority);
  req.set_request_id(a.request_id);
  req.set_after(a.after);
  v1::Job j;
  auto ctx = r.context();
  r.check(r.jobs().SubmitJob(ctx.get(), req, &j), "submit " + a.file);
  if (c.output == Output::kJson) {
    std::printf("%s\n", to_json(j).c_str());
  } else {
    if (j.plan().reserved_bytes() == 0 && !j.after().empty()) {
      // Its inputs come from that job: memfitd estimates it once that job succeeded.
      std::printf("%s queued: after %s succeeds (estimated then)\n", printable(j.id()).c_str(),
                  printable(j.after()).c_str());
    } else {
      std::printf("%s queued: estimated peak %s, reserving %s%s\n", printable(j.id()).c_str(),
                  human_size(j.plan().estimated_peak_bytes()).c_str(), human_size(j.plan().reserved_bytes()).c_str(),
                  j.after().empty() ? "" : ("; after " + printable(j.after()) + " succeeds").c_str());
    }
    if (!j.plan().level().empty()) std::printf("  memory auto: %s\n", printable(j.plan().level()).c_str());
  }
  std::fflush(stdout);
  if (!a.watch) return kExitOk;
  // Every event of a job just submitted: none is old news.
  Watcher w(r, isatty(STDOUT_FILENO) != 0, kTailAll);
  return w.run(j.id());
}

int get(Remote& r, const Common& c, const std::string& id) {
  v1::GetJobRequest g;
  g.set_id(id);
  v1::Job j;
  auto ctx = r.context();
  r.check(r.jobs().GetJob(ctx.get(), g, &j), "job " + id);
  if (c.output == Output::kJson) std::printf("%s\n", to_json(j).c_str());
  else if (c.output == Output::kYaml) std::printf("%s", json_to_yaml(to_json(j.spec(), true, false)).c_str());
  else std::printf("%s", job_text(j).c_str());
  return kExitOk;
}

int list(Remote& r, const Common& c, const ListArgs& a) {
  v1::ListJobsRequest req;
  for (const auto& s : a.states) {
    std::string upper;
    for (char ch : s) upper += static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    v1::JobState st;
    if (!v1::JobState_Parse(upper, &st)) throw CliError(kExitBadInput, "--state: no state '" + s + "'");
    req.add_states(st);
  }
  req.set_owner(a.owner);
  req.set_all_users(a.all_users && a.owner.empty());
  const int64_t limit = a.limit;
  std::vector<v1::Job> jobs;
  std::string page;
  do {
    req.set_page_size(static_cast<int>(std::min<int64_t>(1000, limit - static_cast<int64_t>(jobs.size()))));
    req.set_page_token(page);
    v1::ListJobsResponse out;
    auto ctx = r.context();
    r.check(r.jobs().ListJobs(ctx.get(), req, &out), "list");
    for (const auto& j : out.jobs()) jobs.push_back(j);
    page = out.next_page_token();
  } while (!page.empty() && static_cast<int64_t>(jobs.size()) < limit);
  if (c.output == Output::kJson) {
    std::printf("[");
    for (size_t i = 0; i < jobs.size(); ++i) std::printf("%s%s", i ? ",\n" : "\n", to_json(jobs[i], false).c_str());
    std::printf("%s]\n", jobs.empty() ? "" : "\n");
    return kExitOk;
  }
  std::vector<std::vector<std::string>> rows;
  for (const auto& j : jobs) {
    const auto& p = j.progress();
    rows.push_back({j.id(), j.name(), j.owner(), state_name(j.state()), j.device().empty() ? "-" : j.device(),
                    p.total_steps() > 0 ? std::to_string(p.step()) + "/" + std::to_string(p.total_steps()) : "-",
                    human_size(j.plan().reserved_bytes()),
                    j.result().measured_peak_bytes() > 0 ? human_size(j.result().measured_peak_bytes())
                    : p.peak_memory_bytes() > 0         ? human_size(p.peak_memory_bytes())
                                                        : "-",
                    age(j)});
  }
  std::printf("%s", table({"JOB", "NAME", "OWNER", "STATE", "DEVICE", "STEP", "RESERVED", "PEAK", "TIME"}, rows).c_str());
  return kExitOk;
}

int cancel(Remote& r, const Common& c, const std::string& id) {
  v1::CancelJobRequest req;
  req.set_id(id);
  v1::Job j;
  auto ctx = r.context();
  r.check(r.jobs().CancelJob(ctx.get(), req, &j), "cancel " + id);
  if (c.output == Output::kJson) std::printf("%s\n", to_json(j).c_str());
  else std::printf("%s %s\n", printable(j.id()).c_str(), state_name(j.state()).c_str());
  return kExitOk;
}

int events(Remote& r, const Common& c, const std::string& id) {
  const std::vector<v1::JobEvent> all = list_events(r, id);
  if (c.output == Output::kJson) {
    std::printf("[");
    for (size_t i = 0; i < all.size(); ++i) std::printf("%s%s", i ? ",\n" : "\n", to_json(all[i], false).c_str());
    std::printf("%s]\n", all.empty() ? "" : "\n");
    return kExitOk;
  }
  std::vector<std::vector<std::string>> rows;
  for (const auto& e : all) rows.push_back({std::to_string(e.seq()), when(e.time()), e.kind(), state_name(e.state()), e.message()});
  std::printf("%s", table({"SEQ", "TIME", "EVENT", "STATE", "MESSAGE"}, rows).c_str());
  return kExitOk;
}

// Where the last a.tail lines of the log begin: read backwards from its end, 1 MiB at a
// time, until enough line feeds are seen (tail_start, args.h).
int64_t tail_offset(Remote& r, const std::string& id, const LogsArgs& a) {
  auto read = [&](int64_t offset, int32_t limit) {
    v1::ReadJobLogRequest req;
    req.set_id(id);
    req.set_stream(a.stderr_stream ? "stderr" : "stdout");
    req.set_offset(offset);
    req.set_limit(limit);
    v1::ReadJobLogResponse out;
    auto ctx = r.context();
    r.check(r.jobs().ReadJobLog(ctx.get(), req, &out), "job " + id);
    return out;
  };
  const int64_t size = read(0, 1).size();
  const int64_t chunk = 1 << 20;
  std::string data;  // the file's end, from `from` to `size`
  int64_t from = size;
  while (from > 0) {
    const int64_t start = std::max<int64_t>(0, from - chunk);
    std::string part;
    while (start + static_cast<int64_t>(part.size()) < from) {
      const auto got = read(start + static_cast<int64_t>(part.size()),
                            static_cast<int32_t>(from - start - static_cast<int64_t>(part.size())));
      if (got.data().empty()) break;
      part += got.data();
    }
    data = part + data;
    from = start;
    const size_t at = tail_start(data, a.tail, from == 0);
    if (at != std::string_view::npos) return from + static_cast<int64_t>(at);
  }
  return 0;
}

// The worker's output file. On a terminal, control characters are shown escaped (lines
// and tabs kept): the file holds what the job's code printed, which may be anything.
// Redirected, or with --raw, the bytes go out as they are.
int logs(Remote& r, const std::string& id, const LogsArgs& a) {
  const bool escape = !a.raw && isatty(STDOUT_FILENO) != 0;
  std::string pending;  // the start of a UTF-8 sequence that the next chunk completes
  auto write = [&](const std::string& data, bool last) {
    if (!escape) {
      std::fwrite(data.data(), 1, data.size(), stdout);
    } else {
      pending += data;
      const size_t n = last ? pending.size() : utf8_complete_prefix(pending);
      const std::string text = printable_lines(std::string_view(pending).substr(0, n));
      std::fwrite(text.data(), 1, text.size(), stdout);
      pending.erase(0, n);
    }
    std::fflush(stdout);
  };
  int64_t offset = 0;
  if (a.tail != kTailAll) offset = tail_offset(r, id, a);
  for (;;) {
    v1::ReadJobLogRequest req;
    req.set_id(id);
    req.set_stream(a.stderr_stream ? "stderr" : "stdout");
    req.set_offset(offset);
    req.set_limit(1 << 20);
    v1::ReadJobLogResponse out;
    auto ctx = r.context();
    r.check(r.jobs().ReadJobLog(ctx.get(), req, &out), "job " + id);
    write(out.data(), false);
    offset = out.next_offset();
    if (!out.data().empty()) continue;
    if (!a.follow) break;
    v1::GetJobRequest g;
    g.set_id(id);
    v1::Job j;
    auto gctx = r.context();
    r.check(r.jobs().GetJob(gctx.get(), g, &j), "job " + id);
    if (j.state() == v1::SUCCEEDED || j.state() == v1::FAILED || j.state() == v1::CANCELLED) {
      if (offset >= out.size()) break;
      continue;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  write("", true);
  return kExitOk;
}

// `memfit version`: the CLI's, then memfitd's when it answers (exit 0 either way: the
// CLI's version is always known).
int version(const Common& c) {
  const std::string cli_commit = kMemfitCommit;
  json out = {{"cli", {{"version", kMemfitVersion}, {"commit", cli_commit}}}, {"server", c.server}};
  std::string daemon_error;
  try {
    Remote r(c);
    v1::GetVersionResponse v;
    auto ctx = r.context(5);
    r.check(r.cluster().GetVersion(ctx.get(), v1::GetVersionRequest(), &v), "version");
    out["daemon"] = {{"version", v.version()}, {"commit", v.commit()}};
  } catch (const CliError& e) {
    daemon_error = e.what();
    out["daemon"] = nullptr;
    out["daemon_error"] = daemon_error;
  }
  if (c.output == Output::kJson) {
    std::printf("%s\n", out.dump(2).c_str());
    return kExitOk;
  }
  auto line = [](const std::string& what, const std::string& ver, const std::string& commit) {
    return what + " " + printable(ver) + (commit.empty() ? "" : " (commit " + printable(commit) + ")");
  };
  std::printf("%s\n", line("memfit", kMemfitVersion, cli_commit).c_str());
  if (daemon_error.empty()) {
    std::printf("%s at %s\n",
                line("memfitd", out["daemon"]["version"].get<std::string>(), out["daemon"]["commit"].get<std::string>()).c_str(),
                printable(c.server).c_str());
  } else {
    std::printf("memfitd: %s\n", printable(daemon_error).c_str());
  }
  return kExitOk;
}

int devices(Remote& r, const Common& c) {
  v1::ListDevicesResponse out;
  auto ctx = r.context();
  r.check(r.cluster().ListDevices(ctx.get(), v1::ListDevicesRequest(), &out), "devices");
  if (c.output == Output::kJson) {
    std::printf("%s\n", to_json(out).c_str());
    return kExitOk;
  }
  std::vector<std::vector<std::string>> rows;
  for (const auto& d : out.devices()) {
    const int width = 24;
    const double total = static_cast<double>(std::max<int64_t>(1, d.total_bytes()));
    const int res = std::min(width, static_cast<int>(std::lround(width * static_cast<double>(d.reserved_bytes()) / total)));
    const int used = std::min(res, static_cast<int>(std::lround(width * static_cast<double>(d.used_bytes()) / total)));
    // '#' measured in use, '+' reserved but not (yet) used, '.' free
    const std::string bar = "[" + std::string(static_cast<size_t>(used), '#') + std::string(static_cast<size_t>(res - used), '+') +
                            std::string(static_cast<size_t>(width - res), '.') + "]";
    std::string jobs;
    for (const auto& id : d.job_ids()) jobs += (jobs.empty() ? "" : ",") + id;
    char compute[32];
    std::snprintf(compute, sizeof compute, "%.2f", d.committed_compute());
    rows.push_back({d.name(), d.model(), human_size(d.total_bytes()), human_size(d.reserved_bytes()),
                    human_size(d.used_bytes()), compute, bar, jobs.empty() ? "-" : jobs});
  }
  std::printf("%s", table({"DEVICE", "MODEL", "TOTAL", "RESERVED", "USED", "COMPUTE", "MEMORY (# used, + reserved)", "JOBS"},
                          rows)
                        .c_str());
  if (out.kinds_size() > 0) {
    // What co-location costs each kind of job, learned from its workers' throughput.
    std::vector<std::vector<std::string>> kinds;
    auto num = [](double v, const char* fmt) {
      char b[32];
      std::snprintf(b, sizeof b, fmt, v);
      return std::string(b);
    };
    for (const auto& k : out.kinds()) {
      kinds.push_back({k.kind(), k.solo_steps() > 0 ? num(k.solo_rate(), "%.1f/s") : "-",
                       k.shared_steps() > 0 ? num(k.shared_rate(), "%.1f/s") : "-",
                       k.shared_steps() > 0 ? num(k.shared_jobs(), "%.1f") : "-",
                       k.slowdown() > 0 ? num(k.slowdown(), "%.2fx") : "-", num(k.compute(), "%.2f")});
    }
    std::printf("\nco-location, learned from throughput (tokens or samples per second; COMPUTE: the share of a device "
                "placement assumes; until learned, a bound from a learned kind like it, else 1):\n%s",
                table({"KIND", "ALONE", "SHARED", "JOBS WHEN SHARED", "SLOWDOWN", "COMPUTE"}, kinds).c_str());
  }
  return kExitOk;
}

}  // namespace

int remote_cmd(const Invocation& inv) {
  const std::string& verb = inv.verb;
  if (verb == "version") return version(inv.common);
  try {
    Remote r(inv.common);
    const Common& c = inv.common;
    if (verb == "submit") return submit(r, c, inv.submit);
    if (verb == "get") return get(r, c, inv.job);
    if (verb == "list") return list(r, c, inv.list);
    if (verb == "cancel") return cancel(r, c, inv.job);
    if (verb == "watch") {
      Watcher w(r, isatty(STDOUT_FILENO) != 0, inv.watch.tail);
      return w.run(inv.job);
    }
    if (verb == "events") return events(r, c, inv.job);
    if (verb == "logs") return logs(r, inv.job, inv.logs);
    if (verb == "devices") return devices(r, c);
    throw std::logic_error("no verb '" + verb + "'");
  } catch (const CliError& e) {
    std::fflush(stdout);
    // The message may carry memfitd's words (or a spec's): escaped, like all it sends.
    std::fprintf(stderr, "memfit %s: %s\n", verb.c_str(), printable(e.what()).c_str());
    return e.code;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "memfit %s: %s\n", verb.c_str(), printable(e.what()).c_str());
    return kExitError;
  }
}

}  // namespace memfit::cli
