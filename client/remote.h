// What the CLI's daemon verbs share: the connection (address, token, TLS: Common, which
// cli.cpp fills from the flags or MEMFIT_SERVER / MEMFIT_TOKEN / MEMFIT_TLS_CA), gRPC
// status -> exit code, and the formatting of sizes, durations, tables and protobuf
// messages as JSON/YAML.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "commands.h"
#include "memfit/v1/service.grpc.pb.h"

namespace memfit::cli {

// A failure with its exit code and a one-line reason.
class CliError : public std::runtime_error {
 public:
  CliError(int code, const std::string& m) : std::runtime_error(m), code(code) {}
  int code;
};

class Remote {
 public:
  explicit Remote(const Common& c);
  v1::JobService::Stub& jobs() { return *jobs_; }
  v1::ClusterService::Stub& cluster() { return *cluster_; }
  // A context with the token and a deadline (0: none, for streams).
  std::unique_ptr<grpc::ClientContext> context(int seconds = 30) const;
  // Throws CliError for a non-OK status (what: "submit", "job j123").
  void check(const grpc::Status& s, const std::string& what) const;
  const std::string& address() const { return address_; }

 private:
  std::string address_, token_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
  std::unique_ptr<v1::ClusterService::Stub> cluster_;
};

// A spec file for the daemon: validated here (the worker's reader; SpecError names the
// field) with every path made absolute against the file's folder.
v1::JobSpec spec_for_daemon(const std::string& file);

std::string human_size(int64_t bytes);      // "1.23 GiB"
std::string human_duration(double seconds); // "1h02m", "3m05s", "12s"
std::string state_name(v1::JobState s);     // "queued", "running", ...
// Exit code of `watch` for a final state: 0 succeeded, 10 failed, 11 cancelled.
int exit_code_of(v1::JobState s);
// Every field, zeros and empty strings included (a dropped field reads as "unknown" to a
// script); all_fields=false: only the set ones (a spec printed to be submitted again).
std::string to_json(const google::protobuf::Message& m, bool pretty = true, bool all_fields = true);
std::string json_to_yaml(const std::string& json);

// `memfit get`'s text for a job: "-" for what is not known yet (loss and peak before the
// first step, the estimate's error before a measured peak).
std::string job_text(const v1::Job& j);

// A plain text table: header row, then rows; columns padded to their widest cell. Every
// cell goes through printable() (text.h): a cell cannot carry a control character.
std::string table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows);

}  // namespace memfit::cli
