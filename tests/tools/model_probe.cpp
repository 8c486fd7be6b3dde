// memfit-model-probe (test tool): one forward + backward of a job's model on given
// inputs; writes the logits, the loss and every gradient by Hugging Face name, so that
// tests/reference can compare them with an independent implementation.
//
//   memfit-model-probe --spec job.yaml --inputs in.safetensors --out out.safetensors
//
// in.safetensors: input_ids (I64 [B, S]) | pixels (F32 [B, C, H, W]), optional
// attention_mask (U8/BOOL [B, S]), labels (I64).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdio>
#include <map>
#include <string>

#include "model_config.h"
#include "model/model.h"
#include "safetensors.h"
#include "spec.h"
#include "tensor_io.h"

int main(int argc, char** argv) {
  std::string spec, inputs, out;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--spec") spec = argv[i + 1];
    else if (a == "--inputs") inputs = argv[i + 1];
    else if (a == "--out") out = argv[i + 1];
  }
  if (spec.empty() || inputs.empty() || out.empty()) {
    std::fprintf(stderr, "usage: memfit-model-probe --spec JOB --inputs IN.safetensors --out OUT.safetensors\n");
    return 2;
  }
  try {
    at::set_num_threads(2);
    const memfit::spec::Job job = memfit::spec::load_job(spec);
    const memfit::model::ModelConfig cfg = memfit::model::load_config(job.config_path, job.architecture);
    auto m = memfit::model::Model::create(job, cfg);
    if (!job.weights_path.empty()) {
      std::vector<std::string> fresh;
      m->load(memfit::io::Checkpoint::open(job.weights_path), &fresh);
    }
    m->prepare(at::Device(at::kCPU));
    m->keep_logits(true);
    std::map<std::string, at::Tensor> in;
    for (auto& [k, v] : memfit::io::read_tensors(inputs)) in[k] = v;
    memfit::model::Batch b;
    if (in.count("input_ids")) b.input_ids = in["input_ids"];
    if (in.count("pixels")) b.pixels = in["pixels"];
    if (in.count("attention_mask")) b.attention_mask = in["attention_mask"].to(at::kBool);
    b.labels = in.at("labels");
    const memfit::model::Output o = m->forward(b, /*training=*/true);
    o.loss.backward();
    memfit::io::NamedTensors res{{"logits", o.logits.detach().to(at::kFloat)}, {"loss", o.loss.detach().reshape({1})}};
    for (auto& [name, g] : m->grads()) res.emplace_back("grad." + name, g.to(at::kFloat));
    memfit::io::write_tensors(out, res);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "memfit-model-probe: %s\n", e.what());
    return 1;
  }
  return 0;
}
