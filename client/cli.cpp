// The one definition of the `memfit` command line, on CLI11: the verbs, their flags and
// arguments, the checks on flag values and the help texts, which are rendered from these
// definitions (usage line, options, connection flags, an example). Every usage error
// exits 2 with one line that names the flag: "memfit list: --state: expected queued,
// running, cancelling, succeeded, failed or cancelled, got 'sleeping'".
#include "cli.h"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>

#include "args.h"
#include "estimator.h"
#include "memfit/v1/service.pb.h"
#include "text.h"

namespace memfit::cli {
namespace {

const char* kOptions = "options";
const char* kConnection = "connection";
const char* kDefaultServer = "127.0.0.1:7540";
constexpr size_t kWidth = 88;  // of the help text

// A usage error with memfit's own message. CLI11 lets it through (it wraps only its own
// ValidationError in a message of its own), and parse() answers every CLI::ParseError with
// exit code 2.
class UsageError : public CLI::ParseError {
 public:
  explicit UsageError(const std::string& msg) : CLI::ParseError("UsageError", msg, kExitBadInput) {}
};

// -h/--help, thrown as soon as it is parsed, so that help wins over anything else wrong
// on the line.
struct HelpRequest {
  const CLI::App* app;
};

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// How messages name an option: "-o", "--device", "JOB".
std::string flag_name(const CLI::Option* o) {
  if (!o->get_snames().empty()) return "-" + o->get_snames()[0];
  if (!o->get_lnames().empty()) return "--" + o->get_lnames()[0];
  return o->get_name(true);
}

bool is_flag(const CLI::Option* o) { return o->get_expected_max() == 0; }

// A check on an option's value: `ok` may rewrite the value (to its canonical form) and
// returns false when it is not allowed; the error says what was expected.
CLI::Option* expect(CLI::Option* o, const std::string& expected, std::function<bool(std::string&)> ok) {
  return o->transform([o, expected, ok](std::string v) {
    const std::string given = v;
    if (!ok(v)) throw UsageError(flag_name(o) + ": expected " + expected + ", got '" + given + "'");
    return v;
  });
}

// A whole integer in [lo, hi], rewritten in its plain form.
std::function<bool(std::string&)> integer(long long lo, long long hi) {
  return [lo, hi](std::string& v) {
    if (v.empty()) return false;
    char* end = nullptr;
    errno = 0;
    const long long x = std::strtoll(v.c_str(), &end, 10);
    if (*end != '\0' || errno != 0 || x < lo || x > hi) return false;
    v = std::to_string(x);
    return true;
  };
}

// One of `choices` (case as given); `alias` maps other spellings to one of them.
std::function<bool(std::string&)> one_of(std::vector<std::string> choices, std::map<std::string, std::string> alias = {}) {
  return [choices, alias](std::string& v) {
    const auto a = alias.find(v);
    if (a != alias.end()) v = a->second;
    for (const auto& c : choices) {
      if (v == c) return true;
    }
    return false;
  };
}

// A size ("16GiB", "800MiB", "80GB", bytes), rewritten as bytes.
CLI::Option* size_option(CLI::Option* o) {
  return o->transform([o](std::string v) {
    try {
      return std::to_string(estimator::parse_size(v, flag_name(o)));
    } catch (const estimator::EstimateError& e) {
      throw UsageError(e.what());
    }
  });
}

// What the help text says about a verb beyond its flags.
struct Doc {
  std::string summary;  // one line, for `memfit --help`
  std::string about;    // a paragraph, for `memfit VERB --help`
  std::string example;  // the arguments after `memfit `
};

class Definition {
 public:
  Definition();
  Parsed parse(const std::vector<std::string>& args);

 private:
  CLI::App* verb(const std::string& name, Doc doc);
  void help_flag(CLI::App* app);
  void job_argument(CLI::App* v);
  std::vector<CLI::Option*> connection(CLI::App* v);
  void output(CLI::App* v, const std::vector<std::string>& formats, const std::string& what);
  std::string usage() const;
  std::string help(const CLI::App* v) const;
  std::string usage_line(const CLI::App* v) const;
  std::string error_for(const CLI::App* v, const std::string& message) const;
  std::string missing(const CLI::App* v, const CLI::RequiredError& e) const;
  std::string unknown(const CLI::App* v, const std::string& what, const std::string& typed) const;
  std::string completion_bash() const;

  CLI::App app_{"memfit: memory-efficient fine-tuning", "memfit"};
  Invocation inv_;
  std::string help_topic_;
  std::vector<CLI::App*> verbs_;
  std::map<const CLI::App*, Doc> docs_;
  std::vector<CLI::Option*> estimate_connection_;
  // The values an option takes, for shell completion.
  std::map<const CLI::Option*, std::vector<std::string>> choices_;
};

void Definition::help_flag(CLI::App* app) {
  app->set_help_flag();  // CLI11's own: replaced by one that answers at once
  app->add_flag_callback("-h,--help", [app] { throw HelpRequest{app}; }, "this help")
      ->group(kOptions)
      ->trigger_on_parse();
}

CLI::App* Definition::verb(const std::string& name, Doc doc) {
  CLI::App* v = app_.add_subcommand(name, doc.summary);
  v->allow_extras();  // reported by parse() in memfit's words
  help_flag(v);
  docs_[v] = std::move(doc);
  verbs_.push_back(v);
  return v;
}

void Definition::job_argument(CLI::App* v) {
  v->add_option("JOB", inv_.job, "the job's id (`memfit list` shows them)")->required()->group(kOptions);
}

std::vector<CLI::Option*> Definition::connection(CLI::App* v) {
  return {
      v->add_option("-s,--server", inv_.common.server,
                    "memfitd's address: host (port 7540), host:port, [v6]:port, grpc://host[:port] or "
                    "dns:///host[:port] (MEMFIT_SERVER; default " + std::string(kDefaultServer) + ")")
          ->type_name("HOST:PORT")
          ->group(kConnection),
      v->add_option("--token", inv_.common.token, "your API token (MEMFIT_TOKEN)")->type_name("T")->group(kConnection),
      v->add_option("--tls-ca", inv_.common.tls_ca, "TLS, trusting this PEM certificate (MEMFIT_TLS_CA)")
          ->type_name("FILE")
          ->group(kConnection),
      v->add_flag("--tls", inv_.common.tls, "TLS, trusting the system's certificate authorities")->group(kConnection),
  };
}

void Definition::output(CLI::App* v, const std::vector<std::string>& formats, const std::string& what) {
  std::string names, expected;
  for (size_t i = 0; i < formats.size(); ++i) {
    names += (i ? "|" : "") + formats[i];
    expected += (i == 0 ? "" : i + 1 == formats.size() ? " or " : ", ") + formats[i];
  }
  auto* o = v->add_option_function<std::string>(
      "-o,--output",
      [this](const std::string& f) {
        inv_.common.output = f == "json" ? Output::kJson : f == "yaml" ? Output::kYaml : Output::kTable;
      },
      what);
  expect(o, expected, one_of(formats, {{"text", "table"}}))->type_name(names)->group(kOptions);
  choices_[o] = formats;
}

// --tail N: a count, or "all".
CLI::Option* tail_option(CLI::App* v, int64_t& into, const std::string& what) {
  auto* o = v->add_option_function<std::string>(
      "--tail", [&into](const std::string& n) { into = n == "all" ? kTailAll : std::stoll(n); }, what);
  expect(o, "a count (0 or more) or all", [](std::string& n) { return n == "all" || integer(0, INT64_MAX)(n); });
  return o->type_name("N");
}

Definition::Definition() {
  inv_.common.server = env("MEMFIT_SERVER");
  inv_.common.token = env("MEMFIT_TOKEN");
  inv_.common.tls_ca = env("MEMFIT_TLS_CA");

  app_.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast)->group(kOptions);
  app_.require_subcommand(0, 1);
  app_.allow_extras();  // an unknown command is reported by parse(), with the usage
  help_flag(&app_);

  CLI::App* v;
  v = verb("submit", {"send a job spec to memfitd (--watch: follow it to the end)",
                      "Send a job spec (JSON or YAML) to memfitd. It is checked here first, with the "
                      "worker's own reader, then by the daemon, which estimates its memory and queues it. "
                      "Relative paths in the spec are made absolute against its folder. --after JOB chains "
                      "jobs: this one waits, queued, until JOB succeeded (a pretrain, then LoRA on its "
                      "checkpoint), and is cancelled with the reason when JOB fails or is cancelled.",
                      "submit -f lora.yaml --watch"});
  v->add_option("-f,--file", inv_.submit.file, "the job spec, JSON or YAML")->type_name("SPEC")->required();
  v->add_flag("-w,--watch", inv_.submit.watch, "follow the job to its end, as `memfit watch` does");
  expect(v->add_option("--priority", inv_.submit.priority, "higher runs first among queued jobs (default 0)")
             ->type_name("N"),
         "-1000..1000", integer(-1000, 1000));
  v->add_option("--request-id", inv_.submit.request_id, "the same ID again returns the first job: safe to retry")
      ->type_name("ID");
  v->add_option("--after", inv_.submit.after,
                "start only once job JOB succeeded; if it fails or is cancelled, this one is cancelled")
      ->type_name("JOB");
  output(v, {"table", "json"}, "table, or json: the job as memfitd queued it");
  connection(v);

  v = verb("get", {"one job (-o yaml: its spec as memfitd runs it)",
                   "One job: state, device, memory plan, progress, result. -o yaml prints its spec as "
                   "memfitd runs it (a file you can submit again).",
                   "get j0001732810000000-000042 -o json"});
  job_argument(v);
  output(v, {"table", "json", "yaml"}, "table, json (the whole job) or yaml (its spec)");
  connection(v);

  v = verb("list", {"jobs, newest first",
                    "Jobs, newest first: yours, or with --all-users (admins) everyone's.",
                    "list --state running --state queued"});
  expect(v->add_option("--state", inv_.list.states,
                       "only jobs in this state (repeat for several): queued, running, cancelling, succeeded, "
                       "failed, cancelled")
             ->type_name("S")
             ->expected(1)
             ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll),
         "queued, running, cancelling, succeeded, failed or cancelled", [](std::string& s) {
           std::string upper, lower;
           for (char ch : s) {
             upper += static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
             lower += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
           }
           v1::JobState st;
           if (!v1::JobState_Parse(upper, &st) || st == v1::JOB_STATE_UNSPECIFIED) return false;
           s = lower;
           return true;
         });
  choices_[v->get_option("--state")] = {"queued", "running", "cancelling", "succeeded", "failed", "cancelled"};
  auto* all = v->add_flag("--all-users", inv_.list.all_users, "everyone's jobs (admins)");
  auto* owner = v->add_option("--owner", inv_.list.owner, "this user's jobs (admins)")->type_name("USER");
  all->excludes(owner);
  expect(v->add_option("--limit", inv_.list.limit, "at most N jobs")->type_name("N"), "a positive number",
         integer(1, INT64_MAX));
  output(v, {"table", "json"}, "table, or json: a list of jobs");
  connection(v);

  v = verb("cancel", {"stop a job (a running one checkpoints first)",
                      "A queued job is cancelled at once; a running one checkpoints and stops.",
                      "cancel j0001732810000000-000042"});
  job_argument(v);
  output(v, {"table", "json"}, "table, or json: the job");
  connection(v);

  v = verb("watch", {"live progress until the job ends (exit code: how it ended)",
                     "Follow a job until it ends: a live progress line on a terminal (step, loss, speed, "
                     "ETA, peak memory against the reservation, memory saved by memfit's ops), plain "
                     "lines otherwise. What happened before comes first: every event but the steps "
                     "before the last one (--tail N: the last N events; --tail all: every one). "
                     "Exit code: 0 succeeded, 10 failed, 11 cancelled.",
                     "watch j0001732810000000-000042 --tail 20"});
  job_argument(v);
  tail_option(v, inv_.watch.tail, "the last N events first (default: all but the older steps; all: every one)");
  connection(v);

  v = verb("events", {"everything that happened to a job",
                      "Every event of the job with its time: submitted, placed, steps, evaluations, "
                      "checkpoints, out-of-memory retries, the end.",
                      "events j0001732810000000-000042 -o json"});
  job_argument(v);
  output(v, {"table", "json"}, "table, or json: a list of events");
  connection(v);

  v = verb("logs", {"the worker's output",
                    "The worker's output file: its JSON-lines events (--stderr: its error stream). On a "
                    "terminal, control characters in it are shown escaped (\\x1b); redirected, or with "
                    "--raw, the bytes are written as they are.",
                    "logs j0001732810000000-000042 --tail 20 --follow"});
  job_argument(v);
  tail_option(v, inv_.logs.tail, "the last N lines first (default all), then --follow goes on");
  v->add_flag("--stderr", inv_.logs.stderr_stream, "the worker's error stream instead");
  v->add_flag("-f,--follow", inv_.logs.follow, "keep printing until the job ends");
  v->add_flag("--raw", inv_.logs.raw, "the bytes as they are, even on a terminal");
  connection(v);

  v = verb("devices", {"each device's memory and compute: total, reserved, used; its jobs",
                       "Each device: total, reserved and measured memory, the compute its jobs have "
                       "committed (0 idle, 1 one device's worth), a bar (# used, + reserved, . free), "
                       "and its jobs; then what sharing a device costs each kind of job, learned from "
                       "the workers' throughput alone and shared.",
                       "devices"});
  output(v, {"table", "json"}, "table, or json");
  connection(v);

  v = verb("estimate", {"predict a job's peak device memory, with a breakdown (no daemon needed)",
                        "Predict the job's peak device memory with a breakdown, without running it. With "
                        "--device-memory, also the largest micro-batch and the cheapest memory options that "
                        "fit. CUDA defaults: 800MiB context, 64MiB cuBLAS workspaces, the caching allocator modelled + 8%; measured values for GPUs memfit has been run on (--gpu-model). Sizes: 16GiB, "
                        "800MiB, 80GB or plain bytes. With a connection flag (--server, --token, ...), "
                        "memfitd answers instead: its devices, worker threads and calibration apply, and it "
                        "says what it would reserve. --write-spec saves the plan as a spec that "
                        "memfit submit and memfit-worker run as is.",
                        "estimate -f lora.yaml --device cuda --device-memory 80GiB --write-spec plan.yaml"});
  v->add_option("-f,--file", inv_.estimate.spec, "the job spec, JSON or YAML")->type_name("SPEC")->required();
  size_option(v->add_option("--device-memory", inv_.estimate.device_memory,
                            "the device's memory: also plan the largest micro-batch that fits")
                  ->type_name("SIZE"));
  v->add_option("--write-spec", inv_.estimate.write_spec,
                "with --device-memory: write the plan as a runnable spec (JSON, absolute paths)")
      ->type_name("FILE");
  expect(v->add_option("--device", inv_.estimate.device, "the device kind (default: the spec's)")
             ->type_name("cpu|cuda"),
         "cpu or cuda", [](std::string& d) { return d == "cpu" || d.rfind("cuda", 0) == 0; });
  choices_[v->get_option("--device")] = {"cpu", "cuda"};
  expect(v->add_option("--threads", inv_.estimate.threads, "CPU threads (default: this machine's)")
             ->type_name("N"),
         "1..65536", integer(1, 65536));
  size_option(v->add_option("--cuda-context", inv_.estimate.cuda_context, "the CUDA context's memory (800MiB)")
                  ->type_name("SIZE"));
  expect(v->add_option("--reserved-overhead", inv_.estimate.reserved_overhead,
                       "the caching allocator's memory beyond the tensors, a fraction of them (0.08)")
             ->type_name("FRACTION"),
         "a fraction in [0, 10)", [](std::string& s) {
           if (s.empty()) return false;
           char* end = nullptr;
           const double x = std::strtod(s.c_str(), &end);
           return *end == '\0' && x >= 0.0 && x < 10.0;
         });
  v->add_option("--gpu-model", inv_.estimate.gpu_model,
                "the GPU as NVML names it (\"NVIDIA H200\"): its measured CUDA constants, where "
                "memfit has them (docs/GPU.md)")
      ->type_name("NAME");
  auto* o = v->add_option_function<std::string>(
      "-o,--output", [this](const std::string& f) { inv_.estimate.json_out = f == "json"; },
      "text, or json: one object");
  expect(o, "json or text", one_of({"text", "json"}))->type_name("text|json");
  choices_[o] = {"text", "json"};
  estimate_connection_ = connection(v);

  v = verb("version", {"the CLI's version and memfitd's",
                       "The version of this CLI and, when memfitd answers at --server, the daemon's "
                       "(with the git commit each was built from). Without a daemon it prints the CLI's and "
                       "says memfitd is unreachable; the exit code is 0 either way.",
                       "version -o json"});
  output(v, {"table", "json"}, "table, or json: {\"cli\": ..., \"daemon\": ...}");
  connection(v);

  v = verb("completion", {"a shell completion script (bash)",
                          "Prints a bash completion script for memfit's commands and flags. Load it with "
                          "`source <(memfit completion bash)`, or save it as "
                          "/etc/bash_completion.d/memfit (or ~/.local/share/bash-completion/completions/memfit).",
                          "completion bash > ~/.local/share/bash-completion/completions/memfit"});
  expect(v->add_option("SHELL", inv_.shell, "the shell: bash")->required(), "bash", one_of({"bash"}));
  choices_[v->get_option("SHELL")] = {"bash"};

  v = verb("help", {"this text, or a command's (memfit help COMMAND)", "The help of memfit or of one command.",
                    "help submit"});
  v->add_option("COMMAND", help_topic_, "the command");
}

// "usage: memfit list [--state S]... [--all-users | --owner USER] ...", wrapped.
std::string Definition::usage_line(const CLI::App* v) const {
  auto term = [](const CLI::Option* o) {
    if (o->get_positional()) return o->get_name(true);
    if (is_flag(o)) return o->get_lnames().empty() ? flag_name(o) : "--" + o->get_lnames()[0];
    return flag_name(o) + " " + o->get_type_name();
  };
  std::vector<std::string> parts;
  const auto opts = v->get_options([](const CLI::Option* o) {
    return o->get_group() == kOptions && o->get_name(false, false) != "--help";
  });
  for (size_t i = 0; i < opts.size(); ++i) {
    const CLI::Option* o = opts[i];
    std::string t = term(o);
    if (i + 1 < opts.size() && o->get_excludes().count(const_cast<CLI::Option*>(opts[i + 1])) > 0) {
      t += " | " + term(opts[++i]);
    }
    if (!o->get_required()) t = "[" + t + "]";
    if (o->get_multi_option_policy() == CLI::MultiOptionPolicy::TakeAll) t += "...";
    parts.push_back(t);
  }
  const std::string head = "usage: memfit " + v->get_name();
  std::string out = head, line = head;
  for (const auto& p : parts) {
    if (line.size() + 1 + p.size() > kWidth) {
      out += "\n" + std::string(head.size() + 1, ' ');
      line = std::string(head.size() + 1, ' ');
    } else {
      out += " ";
      line += " ";
    }
    out += p;
    line += p;
  }
  return out + "\n";
}

// Words wrapped to the help's width, each line indented.
std::string wrap(const std::string& text, size_t indent) {
  std::string out, line;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find(' ', start);
    if (end == std::string::npos) end = text.size();
    const std::string word = text.substr(start, end - start);
    if (!line.empty() && indent + line.size() + 1 + word.size() > kWidth) {
      out += std::string(indent, ' ') + line + "\n";
      line.clear();
    }
    line += (line.empty() ? "" : " ") + word;
    start = end + 1;
  }
  if (!line.empty()) out += std::string(indent, ' ') + line + "\n";
  return out;
}

std::string Definition::help(const CLI::App* v) const {
  if (v == &app_) return usage();
  const Doc& doc = docs_.at(v);
  std::string out = usage_line(v) + wrap(doc.about, 2);
  // The options by group, in the order they were defined.
  std::vector<std::string> groups;
  for (const auto* o : v->get_options()) {
    if (std::find(groups.begin(), groups.end(), o->get_group()) == groups.end()) groups.push_back(o->get_group());
  }
  auto left = [](const CLI::Option* o) {
    if (o->get_positional()) return o->get_name(true);
    std::string names;
    for (const auto& s : o->get_snames()) names += (names.empty() ? "-" : ", -") + s;
    for (const auto& l : o->get_lnames()) names += (names.empty() ? "--" : ", --") + l;
    return is_flag(o) ? names : names + " " + o->get_type_name();
  };
  size_t width = 0;
  for (const auto* o : v->get_options()) width = std::max(width, left(o).size());
  // -h, --help last
  auto opts = v->get_options();
  std::stable_partition(opts.begin(), opts.end(), [](const CLI::Option* o) { return o->get_name() != "--help"; });
  for (const auto& g : groups) {
    out += "\n" + g + ":\n";
    for (const auto* o : opts) {
      if (o->get_group() != g) continue;
      const std::string l = left(o);
      const std::string desc = wrap(o->get_description(), 2 + width + 2);
      out += "  " + l + std::string(width - l.size() + 2, ' ') + desc.substr(std::min(desc.size(), 2 + width + 2));
    }
  }
  return out + "\nexample: memfit " + doc.example + "\n";
}

std::string Definition::usage() const {
  std::string out = "usage: memfit <command> [options]\n\ncommands:\n";
  size_t width = 0;
  for (const auto* v : verbs_) width = std::max(width, v->get_name().size());
  for (const auto* v : verbs_) {
    out += "  " + v->get_name() + std::string(width - v->get_name().size() + 2, ' ') + docs_.at(v).summary + "\n";
  }
  // The flags most commands share, as the commands' own help shows them (they go after
  // the command: memfit list --server H).
  out += "\nconnection (after the command; every command but estimate and completion talks to memfitd):\n";
  const std::vector<std::pair<std::string, std::string>> shared = {
      {"-s, --server ADDRESS", "memfitd's address (MEMFIT_SERVER; default " + std::string(kDefaultServer) +
                                   "): host, host:port, [v6]:port, grpc://host[:port], dns:///host[:port]"},
      {"--token T", "your API token (MEMFIT_TOKEN)"},
      {"--tls-ca FILE", "TLS, trusting this PEM certificate (MEMFIT_TLS_CA)"},
      {"--tls", "TLS, trusting the system's certificate authorities"},
  };
  const std::vector<std::pair<std::string, std::string>> output = {
      {"-o, --output FORMAT", "table (default) or json, with every field; get also takes yaml (the spec)"},
      {"-h, --help", "this help; memfit COMMAND --help: the command's options and an example"},
  };
  size_t w = 0;
  for (const auto& [l, d] : shared) w = std::max(w, l.size());
  for (const auto& [l, d] : output) w = std::max(w, l.size());
  auto rows = [&](const std::vector<std::pair<std::string, std::string>>& list) {
    std::string r;
    for (const auto& [l, d] : list) {
      const std::string desc = wrap(d, 2 + w + 2);
      r += "  " + l + std::string(w - l.size() + 2, ' ') + desc.substr(std::min(desc.size(), 2 + w + 2));
    }
    return r;
  };
  out += rows(shared);
  out += "\noptions:\n" + rows(output);
  return out;
}

std::string Definition::error_for(const CLI::App* v, const std::string& message) const {
  return (v == nullptr || v == &app_ ? "memfit: " : "memfit " + v->get_name() + ": ") + message + "\n";
}

// CLI11 names a missing option by its long name ("--file is required"); memfit's
// messages name it as the usage line does: "-f SPEC is required", "JOB is required".
std::string Definition::missing(const CLI::App* v, const CLI::RequiredError& e) const {
  if (v != nullptr) {
    for (const auto* o : v->get_options()) {
      if (o->get_required() && o->count() == 0) {
        return o->get_positional() ? o->get_name(true) + " is required"
                                   : flag_name(o) + " " + o->get_type_name() + " is required";
      }
    }
  }
  return e.what();
}

// "unknown command 'sumbit'; did you mean 'submit'?" (one line): the closest of the
// defined names, or a pointer to the help.
std::string Definition::unknown(const CLI::App* v, const std::string& what, const std::string& typed) const {
  std::vector<std::string> names;
  if (what == "command") {
    for (const auto* verb : verbs_) names.push_back(verb->get_name());
  } else {
    for (const auto* o : (v ? v : &app_)->get_options()) {
      for (const auto& l : o->get_lnames()) names.push_back("--" + l);
      for (const auto& sn : o->get_snames()) names.push_back("-" + sn);
    }
  }
  const std::string name = typed.substr(0, typed.find('='));
  const std::string guess = closest(name, names);
  if (!guess.empty()) return "unknown " + what + " '" + typed + "'; did you mean '" + guess + "'?";
  return "unknown " + what + " '" + typed + "' (" +
         (what == "command" || v == nullptr || v == &app_ ? std::string("memfit --help lists them")
                                                           : "memfit " + v->get_name() + " --help lists them") +
         ")";
}

// A bash completion script from the definitions: the verbs, each verb's flags, the values
// of the flags that take a fixed set of them, and file names for files.
std::string Definition::completion_bash() const {
  auto join = [](const std::vector<std::string>& xs) {
    std::string r;
    for (const auto& x : xs) r += (r.empty() ? "" : " ") + x;
    return r;
  };
  std::vector<std::string> verbs;
  for (const auto* v : verbs_) verbs.push_back(v->get_name());
  std::string flags_case, values_case, args_case;
  std::vector<std::string> file_flags;
  for (const auto* v : verbs_) {
    std::vector<std::string> flags;
    std::string values;
    for (const auto* o : v->get_options()) {
      if (o->get_positional()) {
        const auto c = choices_.find(o);
        if (c != choices_.end()) args_case += "    " + v->get_name() + ") words=\"" + join(c->second) + "\" ;;\n";
        if (o->get_name() == "COMMAND") args_case += "    " + v->get_name() + ") words=\"" + join(verbs) + "\" ;;\n";
        continue;
      }
      std::vector<std::string> names;
      for (const auto& l : o->get_lnames()) names.push_back("--" + l);
      for (const auto& sn : o->get_snames()) names.push_back("-" + sn);
      flags.insert(flags.end(), names.begin(), names.end());
      std::string pattern;
      for (const auto& n : names) pattern += (pattern.empty() ? "" : "|") + n;
      const auto c = choices_.find(o);
      if (c != choices_.end()) {
        values += "        " + pattern + ") words=\"" + join(c->second) + "\" ;;\n";
      } else if (o->get_type_name() == "SPEC" || o->get_type_name() == "FILE") {
        values += "        " + pattern + ") COMPREPLY=($(compgen -f -- \"$cur\")); return ;;\n";
      } else if (!is_flag(o)) {
        values += "        " + pattern + ") return ;;\n";  // a value to type: nothing to offer
      }
    }
    flags_case += "    " + v->get_name() + ") flags=\"" + join(flags) + "\" ;;\n";
    if (!values.empty()) {
      values_case += "    " + v->get_name() + ")\n      case \"$prev\" in\n" + values + "      esac ;;\n";
    }
  }
  return "# bash completion for memfit (generated by `memfit completion bash`)\n"
         "_memfit() {\n"
         "  local cur=\"${COMP_WORDS[COMP_CWORD]}\" prev=\"${COMP_WORDS[COMP_CWORD-1]}\"\n"
         "  local verb=\"\" i words=\"\" flags=\"\"\n"
         "  for ((i = 1; i < COMP_CWORD; i++)); do\n"
         "    case \"${COMP_WORDS[i]}\" in -*) ;; *) verb=\"${COMP_WORDS[i]}\"; break ;; esac\n"
         "  done\n"
         "  COMPREPLY=()\n"
         "  if [[ -z \"$verb\" ]]; then\n"
         "    COMPREPLY=($(compgen -W \"" + join(verbs) + " --help -h\" -- \"$cur\"))\n"
         "    return\n"
         "  fi\n"
         "  case \"$verb\" in\n" + values_case + "  esac\n"
         "  if [[ -n \"$words\" ]]; then COMPREPLY=($(compgen -W \"$words\" -- \"$cur\")); return; fi\n"
         "  case \"$verb\" in\n" + flags_case + "  esac\n"
         "  if [[ \"$cur\" == -* ]]; then COMPREPLY=($(compgen -W \"$flags\" -- \"$cur\")); return; fi\n"
         "  case \"$verb\" in\n" + args_case + "  esac\n"
         "  if [[ -n \"$words\" ]]; then COMPREPLY=($(compgen -W \"$words\" -- \"$cur\")); return; fi\n"
         "}\n"
         "complete -F _memfit memfit\n";
}

Parsed Definition::parse(const std::vector<std::string>& args) {
  Parsed p;
  p.code = kExitBadInput;
  if (args.empty()) {
    p.out = usage();
    return p;
  }
  auto selected = [&]() -> const CLI::App* {
    const auto subs = app_.get_subcommands();
    return subs.empty() ? nullptr : subs.front();
  };
  try {
    std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 takes them from the back
    app_.parse(reversed);
  } catch (const HelpRequest& h) {
    p.code = kExitOk;
    p.out = help(h.app);
    return p;
  } catch (const CLI::RequiredError& e) {
    p.err = error_for(selected(), missing(selected(), e));
    return p;
  } catch (const CLI::ParseError& e) {
    p.err = error_for(selected(), e.what());
    return p;
  }
  // What no definition took (CLI11 keeps a "--" there too: not an argument).
  auto left_over = [](const CLI::App* a) {
    std::vector<std::string> r = a->remaining();
    r.erase(std::remove(r.begin(), r.end(), "--"), r.end());
    return r;
  };
  const CLI::App* v = selected();
  if (!left_over(&app_).empty() || v == nullptr) {
    const std::string x = left_over(&app_).empty() ? "" : left_over(&app_).front();
    if (!x.empty() && x[0] == '-') {
      // A verb's flag given before the verb ("memfit --server H list"): say where it goes.
      const std::string name = x.substr(0, x.find('='));
      const bool verbs_flag = std::any_of(verbs_.begin(), verbs_.end(), [&](const CLI::App* v) {
        return v->get_option_no_throw(name) != nullptr;
      });
      p.err = error_for(nullptr, verbs_flag ? "unknown option '" + x + "' (a command's flags go after it: memfit COMMAND " +
                                                  name + " ...)"
                                            : unknown(nullptr, "option", x));
    } else if (x.empty()) {
      p.err = error_for(nullptr, "no command (memfit --help lists them)");
    } else {
      p.err = error_for(nullptr, unknown(nullptr, "command", x));
    }
    return p;
  }
  if (!left_over(v).empty()) {
    const std::string x = left_over(v).front();
    p.err = error_for(v, !x.empty() && x[0] == '-' ? unknown(v, "option", x) : "unexpected argument '" + x + "'");
    return p;
  }
  if (v->get_name() == "help") {
    if (help_topic_.empty()) {
      p.code = kExitOk;
      p.out = usage();
      return p;
    }
    for (const auto* verb : verbs_) {
      if (verb->get_name() == help_topic_) {
        p.code = kExitOk;
        p.out = help(verb);
        return p;
      }
    }
    p.err = error_for(nullptr, unknown(nullptr, "command", help_topic_));
    return p;
  }
  inv_.verb = v->get_name();
  for (const auto* o : estimate_connection_) inv_.estimate.remote = inv_.estimate.remote || o->count() > 0;
  if (inv_.verb == "completion") {
    inv_.completion_script = completion_bash();
  } else if (inv_.verb != "estimate" || inv_.estimate.remote) {
    // memfitd's address as users type it (args.h), checked before any network.
    const CLI::Option* flag = v->get_option_no_throw("--server");
    if (inv_.common.server.empty()) inv_.common.server = kDefaultServer;
    try {
      inv_.common.server = server_target(inv_.common.server);
    } catch (const std::invalid_argument& e) {
      p.err = error_for(v, (flag != nullptr && flag->count() > 0 ? "--server: " : "MEMFIT_SERVER: ") + std::string(e.what()));
      return p;
    }
  }
  if (inv_.common.server.empty()) inv_.common.server = kDefaultServer;
  p.run = true;
  p.code = kExitOk;
  p.invocation = inv_;
  return p;
}

}  // namespace

Parsed parse(const std::vector<std::string>& args) {
  Definition d;  // fresh each time: CLI11 apps keep what they parsed
  return d.parse(args);
}

int run(const std::vector<std::string>& args) {
  const Parsed p = parse(args);
  if (!p.run) {
    std::fputs(p.out.c_str(), stdout);
    std::fflush(stdout);
    // The message may quote what was typed; nothing typed reaches the terminal raw.
    std::fputs(printable_lines(p.err).c_str(), stderr);
    return p.code;
  }
  if (p.invocation.verb == "estimate") return estimate_cmd(p.invocation);
  if (p.invocation.verb == "completion") {
    std::fputs(p.invocation.completion_script.c_str(), stdout);
    return kExitOk;
  }
  return remote_cmd(p.invocation);
}

}  // namespace memfit::cli
