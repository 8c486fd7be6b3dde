// Reading and validating job specs (memfit.v1.JobSpec) from JSON or YAML files.
// Shared by the worker, the daemon and the CLI: no LibTorch, no gRPC.
//
//   memfit::spec::Job job = memfit::spec::load_job("job.yaml");   // throws SpecError
//
// Errors name the file and the field ("job.yaml: training.micro_batch: must be > 0,
// got 0"). Paths in the spec are resolved against the spec file's folder.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "job.h"
#include "memfit/v1/job.pb.h"

namespace memfit::spec {

// Parsing only: the message as written, unknown fields and wrong types rejected.
v1::JobSpec parse_json(const std::string& text, const std::string& origin);
v1::JobSpec parse_yaml(const std::string& text, const std::string& origin);
// By extension: .yaml/.yml as YAML, anything else as JSON.
v1::JobSpec read_spec_file(const std::string& path);

// Validates spec (origin names it in errors) and resolves relative paths against
// base_dir. Throws SpecError naming the first bad field.
Job resolve(const v1::JobSpec& spec, const std::string& origin, const std::string& base_dir);
// read_spec_file + resolve against the file's folder.
Job load_job(const std::string& path);

// The options as a spec's memory section (every option explicit; preset "auto" dropped:
// the options are what a plan chose).
v1::MemorySpec memory_to_spec(const Memory& m);

}  // namespace memfit::spec
