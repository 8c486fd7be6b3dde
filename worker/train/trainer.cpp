#include "trainer.h"

#include "estimator.h"
#include "fit.h"
#include "job_input.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "data/dataset.h"
#include "data/tokenizer.h"
#include "memory_meter.h"
#include "model_config.h"
#include "model/model.h"
#include "optimizer.h"
#include "safetensors.h"
#include "tensor_io.h"
#include "confined.h"

namespace memfit::train {

std::atomic<bool> g_stop_requested{false};

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// FNV-1a, stable across builds: fingerprints the job so that a resume only continues
// checkpoints of the same job.
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string hex(uint64_t v) {
  std::ostringstream ss;
  ss << std::hex << v;
  return ss.str();
}

class BadInput : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

at::Device parse_device(const std::string& s) {
  if (s == "cpu") return at::Device(at::kCPU);
  if (s.rfind("cuda", 0) == 0) {
    if (!at::hasCUDA()) throw BadInput("device '" + s + "': no CUDA device here (or a CPU-only build)");
    int idx = 0;
    if (s.size() > 5 && s[4] == ':') {
      try {
        idx = std::stoi(s.substr(5));
      } catch (const std::exception&) {
        throw BadInput("device '" + s + "': expected cuda:N");
      }
    }
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(idx));
  }
  throw BadInput("device '" + s + "': expected cpu or cuda:N");
}

struct EvalResult {
  double loss = 0.0;
  int64_t count = 0;
  int64_t correct = 0;
};

EvalResult evaluate(model::Model& m, const data::Dataset& ds, int64_t batch, int64_t max_batches,
                    const at::Device& dev) {
  at::NoGradGuard ng;
  EvalResult r;
  double total = 0.0;
  int64_t batches = 0;
  for (int64_t i = 0; i + 1 <= ds.size() && (max_batches <= 0 || batches < max_batches); i += batch) {
    std::vector<int64_t> idx;
    for (int64_t k = i; k < std::min(ds.size(), i + batch); ++k) idx.push_back(k);
    const model::Output o = m.forward(ds.batch(idx, dev), /*training=*/false);
    total += o.loss.item<double>() * static_cast<double>(o.count);
    r.count += o.count;
    r.correct += o.correct;
    ++batches;
  }
  r.loss = r.count > 0 ? total / static_cast<double>(r.count) : std::numeric_limits<double>::quiet_NaN();
  return r;
}

json eval_json(const spec::Job& job, const EvalResult& r) {
  json e = {{"loss", r.loss}, {"count", r.count}};
  if (job.task == spec::Task::kCausalLM) {
    e["perplexity"] = std::exp(std::min(r.loss, 700.0));
  } else {
    e["accuracy"] = r.count > 0 ? static_cast<double>(r.correct) / static_cast<double>(r.count) : 0.0;
  }
  return e;
}

// Peak memory per phase of training (init, forward, backward, optimizer, eval): the
// meter's peak is reset at each phase start, and the highest value per phase kept.
class PhasePeaks {
 public:
  explicit PhasePeaks(const at::Device& d) : device_(d) {}
  void begin() {
    overall_ = std::max(overall_, ops::MemoryMeter::stats(device_).peak_bytes);
    ops::MemoryMeter::reset_peak(device_);
  }
  void end(const std::string& phase) {
    if (std::getenv("MEMFIT_ALLOC_TRACE") != nullptr) std::fprintf(stderr, "end %s\n", phase.c_str());
    const int64_t p = ops::MemoryMeter::stats(device_).peak_bytes;
    int64_t& slot = peaks_[phase];
    slot = std::max(slot, p);
    overall_ = std::max(overall_, p);
  }
  int64_t overall() const { return std::max(overall_, ops::MemoryMeter::stats(device_).peak_bytes); }
  json to_json() const {
    json j = json::object();
    for (const auto& [k, v] : peaks_) j[k] = v;
    return j;
  }
  std::string peak_phase() const {
    std::string best;
    int64_t v = -1;
    for (const auto& [k, p] : peaks_) {
      if (p > v) {
        v = p;
        best = k;
      }
    }
    return best;
  }

 private:
  at::Device device_;
  std::map<std::string, int64_t> peaks_;
  int64_t overall_ = 0;
};

struct TrainState {
  int64_t step = 0;
  int64_t epoch = 0, offset = 0;
  double best_eval = std::numeric_limits<double>::infinity();
  int64_t bad_evals = 0;
};

// A file of the job's own output folder (checkpoint state), never through a link.
std::string read_output_file(const std::string& p) { return fsx::read_output(p, int64_t{64} << 20); }

void save_checkpoint(const std::string& dir, const std::string& name, const model::Model& m, const AdamW& opt,
                     const TrainState& st, const std::string& fingerprint) {
  const fs::path base(dir);
  fsx::mkdirs_output(base.string());
  const fs::path tmp = base / (name + ".tmp");
  fsx::remove_output_tree(tmp.string());
  fsx::mkdirs_output(tmp.string());
  io::NamedTensors t;
  for (const auto& [n, v] : m.trainable_state()) t.emplace_back("model." + n, v);
  for (const auto& [n, v] : opt.state()) t.emplace_back(n, v);
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    t.emplace_back("rng.cpu", gen.get_state());
  }
  io::write_tensors((tmp / "state.safetensors").string(), t);
  const json s = {{"step", st.step},       {"epoch", st.epoch},         {"offset", st.offset},
                  {"best_eval", std::isfinite(st.best_eval) ? json(st.best_eval) : json(nullptr)},
                  {"bad_evals", st.bad_evals}, {"optimizer_steps", opt.steps()}, {"job_fingerprint", fingerprint}};
  io::write_file_atomic((tmp / "state.json").string(), s.dump(2));
  fsx::remove_output_tree((base / name).string());
  fsx::rename_output(tmp.string(), (base / name).string());
  io::write_file_atomic((base / "latest").string(), name + "\n");
  // Keep the two newest checkpoints: folders this job wrote (step-NNNNNNNNN with its
  // state files); anything else in the folder is left alone.
  std::vector<std::string> all;
  for (const auto& n : fsx::list_output(base.string())) {
    if (n.size() == 14 && n.rfind("step-", 0) == 0 && n.find_first_not_of("0123456789", 5) == std::string::npos &&
        fsx::output_is_dir((base / n).string()) && fsx::output_exists((base / n / "state.json").string())) {
      all.push_back(n);
    }
  }
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + 2 < all.size(); ++i) fsx::remove_output_tree((base / all[i]).string());
}

bool load_checkpoint(const std::string& dir, model::Model& m, AdamW& opt, TrainState& st,
                     const std::string& fingerprint, std::string* which) {
  const fs::path base(dir);
  if (!fsx::output_exists((base / "latest").string())) return false;
  std::string name = read_output_file((base / "latest").string());
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  const fs::path ck = base / name;
  json s;
  try {
    if (name.empty() || name.find('/') != std::string::npos || name == "..") throw BadInput("bad checkpoint name");
    s = json::parse(read_output_file((ck / "state.json").string()));
  } catch (const json::exception& e) {
    throw BadInput((ck / "state.json").string() + ": unreadable checkpoint state: " + e.what());
  }
  if (s.value("job_fingerprint", std::string()) != fingerprint) {
    throw BadInput(dir + ": holds checkpoints of a different job (the spec changed); use a new output_dir "
                   "or remove the checkpoints");
  }
  const io::NamedTensors t = io::read_tensors((ck / "state.safetensors").string());
  std::map<std::string, at::Tensor> by_name(t.begin(), t.end());
  at::NoGradGuard ng;
  for (const auto& [n, v] : m.trainable_state()) {
    const auto it = by_name.find("model." + n);
    if (it == by_name.end()) throw BadInput((ck / "state.safetensors").string() + ": lacks " + n);
    const_cast<at::Tensor&>(v).copy_(it->second);
  }
  io::NamedTensors optim;
  for (const auto& [n, v] : t) {
    if (n.rfind("optim.", 0) == 0) optim.emplace_back(n, v.to(m.trainable().empty() ? at::kCPU : m.trainable()[0].device()));
  }
  opt.load_state(optim, s.at("optimizer_steps").get<int64_t>());
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(by_name.at("rng.cpu"));
  }
  st.step = s.at("step").get<int64_t>();
  st.epoch = s.at("epoch").get<int64_t>();
  st.offset = s.at("offset").get<int64_t>();
  st.best_eval = s["best_eval"].is_null() ? std::numeric_limits<double>::infinity() : s["best_eval"].get<double>();
  st.bad_evals = s.at("bad_evals").get<int64_t>();
  *which = ck.string();
  return true;
}

// Replaces folder `dst` by one written through fill(tmp) so that a failure leaves the
// previous output in place.
template <typename Fill>
void replace_folder(const fs::path& dst, Fill&& fill) {
  const fs::path tmp = dst.string() + ".tmp", old = dst.string() + ".old";
  fsx::remove_output_tree(tmp.string());
  fsx::mkdirs_output(tmp.string());
  fill(tmp);
  fsx::remove_output_tree(old.string());
  if (fsx::output_exists(dst.string())) fsx::rename_output(dst.string(), old.string());
  fsx::rename_output(tmp.string(), dst.string());
  fsx::remove_output_tree(old.string());
}

// The tokenizer files a job read, as Hugging Face tools look for them next to a model:
// (source path, name in the export). Names follow Tokenizer::load's choice; OpenAI's
// encoder.json / vocab.bpe become vocab.json / merges.txt (the same formats).
std::vector<std::pair<fs::path, std::string>> tokenizer_files(const std::string& path) {
  std::vector<std::pair<fs::path, std::string>> out;
  if (path.empty()) return out;
  const fs::path d(path);
  if (fs::is_regular_file(d)) return {{d, "tokenizer.model"}};
  auto add = [&](const char* src, const char* name) {
    if (fs::is_regular_file(d / src)) out.emplace_back(d / src, name);
  };
  if (fs::exists(d / "vocab.json")) {
    add("vocab.json", "vocab.json");
    add("merges.txt", "merges.txt");
  } else if (fs::exists(d / "encoder.json")) {
    add("encoder.json", "vocab.json");
    add("vocab.bpe", "merges.txt");
  } else if (fs::exists(d / "vocab.txt")) {
    add("vocab.txt", "vocab.txt");
  } else {
    add("tokenizer.model", "tokenizer.model");
  }
  for (const char* extra : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}) add(extra, extra);
  return out;
}

// Copies them into an export folder; returns the names written.
std::vector<std::string> export_tokenizer(const std::string& path, const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& [src, name] : tokenizer_files(path)) {
    io::write_file_atomic((dir / name).string(), fsx::InputFile(src.string()).read_all(int64_t{256} << 20));
    names.push_back(name);
  }
  return names;
}

json job_summary(const spec::Job& j) {
  return {{"name", j.name},
          {"architecture", spec::name_of(j.architecture)},
          {"task", spec::name_of(j.task)},
          {"method", spec::name_of(j.method)},
          {"memory",
           {{"approx_activation", j.memory.approx_activation},
            {"memory_sharing_norm", j.memory.memory_sharing_norm},
            {"fused_mlp", j.memory.fused_mlp},
            {"efficient_attention", j.memory.efficient_attention},
            {"checkpointing", j.memory.checkpointing},
            {"fused_loss", j.memory.fused_loss},
            {"preset", j.memory.preset}}},
          {"micro_batch", j.training.micro_batch},
          {"gradient_accumulation", j.training.gradient_accumulation},
          {"sequence_length", j.training.sequence_length},
          {"dtype", j.training.dtype == spec::DType::kBFloat16 ? "bf16" : "fp32"}};
}

// memory.preset auto run by hand: the fit plan `memfit estimate --device-memory` prints,
// for the memory given, applied to the job (memfitd resolves it at admission instead).
json apply_fit_plan(spec::Job& job, const model::ModelConfig& cfg, const at::Device& device, int threads,
                    int64_t bytes) {
  if (bytes <= 0) {
    throw BadInput("memory.preset: auto fits the job to a memory size: pass --fit SIZE (or --memory-limit on the CPU)");
  }
  const estimator::DeviceModel dm = device.is_cuda() ? estimator::DeviceModel::cuda() : estimator::DeviceModel::cpu(threads);
  const estimator::FitPlan plan = estimator::fit(estimator::job_input(job, cfg, dm), bytes);
  if (!plan.fits) {
    throw BadInput("memory.preset: auto: " + plan.reasons.back());
  }
  job.memory = plan.memory;
  job.memory.preset.clear();
  job.training.micro_batch = plan.micro_batch;
  job.training.gradient_accumulation = plan.gradient_accumulation;
  return {{"level", plan.level},
          {"micro_batch", plan.micro_batch},
          {"gradient_accumulation", plan.gradient_accumulation},
          {"device_bytes", bytes},
          {"estimated_peak_bytes", plan.estimate.peak_bytes},
          {"reasons", plan.reasons}};
}

int run(const spec::Job& job_in, const std::string& spec_text, const RunOptions& opts, Events& events) {
  spec::Job job = job_in;
  const int threads = opts.threads > 0 ? opts.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);
  const at::Device device = parse_device(opts.device.empty() ? job.device : opts.device);
  ops::MemoryMeter::install();
  if (opts.memory_limit > 0) {
    if (!device.is_cpu()) throw BadInput("--memory-limit applies to CPU devices only");
    ops::MemoryMeter::set_limit(ops::MemoryMeter::stats().current_bytes + opts.memory_limit);
  }
  fsx::mkdirs_output(job.output_dir);
  events.open_log((fs::path(job.output_dir) / "metrics.jsonl").string());

  const model::ModelConfig cfg = model::load_config(job.config_path, job.architecture);
  json plan;
  if (job.memory.preset == "auto") plan = apply_fit_plan(job, cfg, device, threads, opts.fit_bytes > 0 ? opts.fit_bytes : opts.memory_limit);
  std::unique_ptr<data::Tokenizer> tok;
  if (job.format != spec::DataFormat::kIdx) tok = data::Tokenizer::load(job.tokenizer_path);
  if (tok && tok->vocab_size() > cfg.vocab_size) {
    throw BadInput("data.tokenizer_path: the tokenizer has " + std::to_string(tok->vocab_size()) +
                   " tokens but the model's vocab_size is " + std::to_string(cfg.vocab_size));
  }
  const auto train = data::load_dataset(job, false, tok.get(), cfg);
  const auto val = data::load_dataset(job, true, tok.get(), cfg);

  auto m = model::Model::create(job, cfg);
  std::vector<std::string> fresh;
  if (!job.weights_path.empty()) m->load(io::Checkpoint::open(job.weights_path), &fresh);
  m->prepare(device);
  AdamW opt(m->trainable_state(), job.training.weight_decay);

  const int64_t per_step = job.training.micro_batch * job.training.gradient_accumulation;
  const int64_t micro_per_epoch = std::max<int64_t>(1, train->size() / job.training.micro_batch);
  const int64_t spec_total = job.training.steps > 0
                                 ? job.training.steps
                                 : std::max<int64_t>(1, job.training.epochs * micro_per_epoch / job.training.gradient_accumulation);
  const int64_t total = opts.max_steps > 0 ? std::min(spec_total, opts.max_steps) : spec_total;
  const std::string fingerprint = hex(fnv1a(spec_text));
  const std::string ckpt_dir = (fs::path(job.output_dir) / "checkpoints").string();

  PhasePeaks phases(device);
  phases.end("init");  // everything up to here: data, model, optimizer state
  TrainState st;
  std::string resumed_from;
  load_checkpoint(ckpt_dir, *m, opt, st, fingerprint, &resumed_from);
  data::Sampler sampler(train->size(), job.training.micro_batch, job.training.seed, /*shuffle=*/true);
  sampler.seek(st.epoch, st.offset);
  if (resumed_from.empty()) at::manual_seed(static_cast<int64_t>(job.training.seed));

  json started = {{"event", "started"},
                  {"job", job_summary(job)},
                  {"device", device.str()},
                  {"threads", threads},
                  {"parameters", m->parameter_count()},
                  {"trainable_parameters", m->trainable_count()},
                  {"train", train->describe()},
                  {"validation", val ? val->describe() : "none"},
                  {"total_steps", total},
                  {"start_step", st.step},
                  {"memory_limit_bytes", opts.memory_limit},
                  {"memory_bytes", ops::MemoryMeter::stats(device).current_bytes}};
  if (m->folded_norm_parameters() > 0) {
    started["folded_norm_parameters"] = m->folded_norm_parameters();
    started["folded_norm_note"] =
        "memory-sharing norms folded their scale and shift into the next linear layers: " +
        std::to_string(m->folded_norm_parameters()) +
        " norm parameters train as part of those layers' weights (W*diag(scale), weight-decayed as W is) and "
        "biases (b + W*shift, not decayed), and are unfolded at export";
  }
  if (!plan.is_null()) started["plan"] = plan;  // memory.preset auto, fitted here
  if (!resumed_from.empty()) started["resumed_from"] = resumed_from;
  if (!fresh.empty()) started["initialized_heads"] = fresh;
  events.emit(started);

  const bool lm = job.task == spec::Task::kCausalLM;
  int64_t activation_bytes = -1;
  EvalResult last_eval;
  bool have_eval = false, early_stopped = false;
  auto do_eval = [&](int64_t step) {
    if (!val) return;
    phases.begin();
    last_eval = evaluate(*m, *val, job.training.micro_batch, job.training.eval_batches, device);
    phases.end("eval");
    have_eval = true;
    json e = {{"event", "eval"}, {"step", step}};
    e.update(eval_json(job, last_eval));
    if (job.training.patience > 0) {
      if (last_eval.loss < st.best_eval - job.training.min_delta) {
        st.best_eval = last_eval.loss;
        st.bad_evals = 0;
      } else {
        ++st.bad_evals;
      }
      e["best_loss"] = st.best_eval;
      e["evals_without_improvement"] = st.bad_evals;
    }
    events.emit(e);
  };
  auto do_checkpoint = [&] {
    st.epoch = sampler.epoch();
    st.offset = sampler.offset();
    char name[32];
    std::snprintf(name, sizeof name, "step-%09lld", static_cast<long long>(st.step));
    save_checkpoint(ckpt_dir, name, *m, opt, st, fingerprint);
    events.emit({{"event", "checkpoint"}, {"step", st.step}, {"path", (fs::path(ckpt_dir) / name).string()}});
  };

  // A fresh run with periodic evaluation measures where it starts from.
  if (st.step == 0 && job.training.eval_interval > 0) do_eval(0);
  while (st.step < total) {
    if (g_stop_requested.load()) {
      do_checkpoint();
      events.emit({{"event", "stopped"}, {"step", st.step}, {"reason", "signal"},
                   {"message", "stopped on request; resume by running the same spec again"}});
      return kExitStopped;
    }
    const auto t0 = Clock::now();
    double loss_sum = 0.0;
    int64_t counted = 0, samples = 0;
    for (int64_t a = 0; a < job.training.gradient_accumulation; ++a) {
      const model::Batch b = train->batch(sampler.next(), device);
      const int64_t before = ops::MemoryMeter::stats(device).current_bytes;
      phases.begin();
      model::Output o = m->forward(b, /*training=*/true);
      phases.end("forward");
      if (activation_bytes < 0) activation_bytes = ops::MemoryMeter::stats(device).current_bytes - before;
      loss_sum += o.loss.item<double>() * static_cast<double>(o.count);
      counted += o.count;
      phases.begin();
      (o.loss / static_cast<double>(job.training.gradient_accumulation)).backward();
      o = model::Output();
      phases.end("backward");
      samples += (b.input_ids.defined() ? b.input_ids.size(0) : b.pixels.size(0));
    }
    phases.begin();
    const double grad_norm = opt.clip_grad_norm(job.training.max_grad_norm);
    const double lr = learning_rate(job.training, st.step, spec_total);
    opt.step(lr);
    opt.zero_grad();
    phases.end("optimizer");
    ++st.step;
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    const double loss = counted > 0 ? loss_sum / static_cast<double>(counted) : 0.0;
    if (!std::isfinite(loss)) {
      throw std::runtime_error("training diverged: loss is " + std::to_string(loss) + " at step " +
                               std::to_string(st.step) + " (lower training.learning_rate?)");
    }
    if (st.step % job.training.log_interval == 0 || st.step == total || st.step == 1) {
      const ops::MemoryStats ms = ops::MemoryMeter::stats(device);
      json e = {{"event", "step"},          {"step", st.step},        {"total_steps", total},
                {"loss", loss},             {"lr", lr},               {"grad_norm", grad_norm},
                {"epoch", sampler.epoch()}, {"memory_bytes", ms.current_bytes}, {"peak_memory_bytes", phases.overall()},
                {"step_seconds", secs}};
      if (lm) {
        e["tokens_per_second"] = static_cast<double>(counted) / secs;
      } else {
        e["samples_per_second"] = static_cast<double>(samples) / secs;
      }
      if (st.step == 1) e["activation_bytes"] = activation_bytes;
      events.emit(e);
    }
    const bool last = st.step == total;
    if (job.training.eval_interval > 0 && st.step % job.training.eval_interval == 0 && !last) {
      do_eval(st.step);
      if (job.training.patience > 0 && st.bad_evals >= job.training.patience) {
        early_stopped = true;
        break;
      }
    }
    if (job.training.checkpoint_interval > 0 && st.step % job.training.checkpoint_interval == 0 && !last) do_checkpoint();
  }
  (void)per_step;
  do_eval(st.step);
  do_checkpoint();

  // The result: a PEFT adapter, or full weights with the model's config.json.
  phases.begin();
  json result;
  const fs::path out(job.output_dir);
  std::vector<std::string> tokenizer_names;
  if (job.method == spec::Method::kLora) {
    replace_folder(out / "adapter", [&](const fs::path& dir) {
      io::write_tensors((dir / "adapter_model.safetensors").string(), m->export_adapter(), {{"format", "pt"}});
      tokenizer_names = export_tokenizer(job.tokenizer_path, dir);
      const std::vector<std::string> heads = m->head_modules();
      json cfg_json = {{"peft_type", "LORA"},
                       {"task_type", lm ? "CAUSAL_LM" : "SEQ_CLS"},
                       {"r", job.lora.rank},
                       {"lora_alpha", job.lora.alpha},
                       {"lora_dropout", job.lora.dropout},
                       {"target_modules", m->lora_modules()},
                       {"bias", "none"},
                       {"fan_in_fan_out", job.architecture == spec::Architecture::kGPT2},
                       {"modules_to_save", heads.empty() ? json(nullptr) : json(heads)},
                       {"inference_mode", true},
                       {"base_model_name_or_path", fs::path(job.config_path).parent_path().string()}};
      io::write_file_atomic((dir / "adapter_config.json").string(), cfg_json.dump(2));
    });
    result["adapter"] = (out / "adapter").string();
  } else {
    replace_folder(out / "model", [&](const fs::path& dir) {
      io::write_tensors((dir / "model.safetensors").string(), m->export_state(), {{"format", "pt"}});
      tokenizer_names = export_tokenizer(job.tokenizer_path, dir);
      json c = json::parse(fsx::InputFile(job.config_path).read_all(int64_t{16} << 20));
      if (cfg.num_labels > 0 && !lm) c["num_labels"] = cfg.num_labels;
      io::write_file_atomic((dir / "config.json").string(), c.dump(2));
    });
    result["model"] = (out / "model").string();
  }
  if (!tokenizer_names.empty()) result["tokenizer_files"] = tokenizer_names;
  phases.end("export");
  const ops::MemoryStats ms = ops::MemoryMeter::stats(device);
  json fin = {{"event", "finished"},
              {"step", st.step},
              {"total_steps", total},
              {"peak_memory_bytes", std::max(phases.overall(), ms.peak_bytes)},
              {"peak_by_phase", phases.to_json()},
              {"peak_phase", phases.peak_phase()},
              {"peak_reserved_bytes", ms.peak_reserved_bytes},
              {"activation_bytes", activation_bytes},
              {"output", result},
              {"early_stopped", early_stopped},
              {"truncated", total < spec_total && !early_stopped}};
  if (have_eval) fin["eval"] = eval_json(job, last_eval);
  events.emit(fin);
  return kExitOk;
}

}  // namespace

int run_job(const spec::Job& job, const std::string& spec_text, const RunOptions& opts, Events& events) {
  auto failed = [&](const char* reason, const std::string& msg, int code) {
    events.emit({{"event", "failed"}, {"reason", reason}, {"message", msg}});
    return code;
  };
  try {
    return run(job, spec_text, opts, events);
  } catch (const c10::OutOfMemoryError& e) {
    return failed("oom", std::string("out of memory: ") + e.what_without_backtrace() +
                             " (lower training.micro_batch or sequence_length, or turn on memfit's memory options)",
                  kExitOom);
  } catch (const std::bad_alloc&) {
    // The kernel's limit on the whole process (memfitd's RLIMIT_DATA or cgroup): more
    // than the reservation plus the allowance for code and data.
    return failed("oom", "out of memory: the worker process reached its memory limit (the reservation plus "
                         "workers.memory_allowance); data loading or a large input needed more", kExitOom);
  } catch (const fsx::OutputError& e) {
    // A link planted in the output folder is the user's doing; anything else (disk full,
    // I/O error, permissions) is the system's, and worth a retry.
    const bool user = e.errno_value == ELOOP || e.errno_value == EXDEV;
    return failed(user ? "bad_input" : "io", std::string(user ? "output_dir: " : "writing the outputs: ") + e.what(),
                  user ? kExitBadInput : kExitIo);
  } catch (const fsx::FsError& e) {
    return failed("bad_input", e.what(), kExitBadInput);
  } catch (const spec::SpecError& e) {
    return failed("bad_input", e.what(), kExitBadInput);
  } catch (const model::ConfigError& e) {
    return failed("bad_input", e.what(), kExitBadInput);
  } catch (const io::IoError& e) {
    return failed("bad_input", e.what(), kExitBadInput);
  } catch (const data::TokenizerError& e) {
    return failed("bad_input", e.what(), kExitBadInput);
  } catch (const data::DataError& e) {
    return failed("bad_input", e.what(), kExitBadInput);
  } catch (const BadInput& e) {
    return failed("bad_input", e.what(), kExitBadInput);
  } catch (const fs::filesystem_error& e) {
    return failed("bad_input", e.what(), kExitBadInput);
  } catch (const c10::Error& e) {
    const std::string m = e.what_without_backtrace();
    if (m.find("not enough memory") != std::string::npos) {
      return failed("oom", "out of memory: the worker process reached its memory limit: " + m, kExitOom);
    }
    return failed("internal", m, kExitInternal);
  } catch (const std::exception& e) {
    return failed("internal", e.what(), kExitInternal);
  }
}

}  // namespace memfit::train
