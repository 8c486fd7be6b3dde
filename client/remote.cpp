#include "remote.h"

#include "spec.h"
#include "text.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace memfit::cli {
namespace {

void emit_yaml(YAML::Emitter& out, const nlohmann::ordered_json& j) {
  if (j.is_object()) {
    out << YAML::BeginMap;
    for (auto it = j.begin(); it != j.end(); ++it) {
      out << YAML::Key << it.key() << YAML::Value;
      emit_yaml(out, it.value());
    }
    out << YAML::EndMap;
  } else if (j.is_array()) {
    out << YAML::BeginSeq;
    for (const auto& x : j) emit_yaml(out, x);
    out << YAML::EndSeq;
  } else if (j.is_string()) {
    // yaml-cpp escapes control characters, but not Unicode's bidirectional overrides: a
    // string with anything printable() would escape has all its non-ASCII escaped.
    const auto& s = j.get_ref<const std::string&>();
    if (printable(s) != s) out << YAML::EscapeNonAscii;
    out << s;
  } else if (j.is_boolean()) {
    out << j.get<bool>();
  } else if (j.is_number_integer()) {
    out << j.get<int64_t>();
  } else if (j.is_number()) {
    out << j.dump();  // the shortest text that reads back as the same double
  } else {
    out << YAML::Null;
  }
}

}  // namespace

Remote::Remote(const Common& c) : address_(c.server), token_(c.token) {
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (!c.tls_ca.empty()) {
    std::ifstream f(c.tls_ca);
    if (!f) throw CliError(kExitBadInput, "--tls-ca: cannot read " + c.tls_ca);
    std::stringstream ss;
    ss << f.rdbuf();
    grpc::SslCredentialsOptions o;
    o.pem_root_certs = ss.str();
    creds = grpc::SslCredentials(o);
  } else if (c.tls) {
    creds = grpc::SslCredentials(grpc::SslCredentialsOptions());
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  channel_ = grpc::CreateCustomChannel(address_, creds, args);
  jobs_ = v1::JobService::NewStub(channel_);
  cluster_ = v1::ClusterService::NewStub(channel_);
}

std::unique_ptr<grpc::ClientContext> Remote::context(int seconds) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  if (!token_.empty()) ctx->AddMetadata("authorization", "Bearer " + token_);
  if (seconds > 0) ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  return ctx;
}

void Remote::check(const grpc::Status& s, const std::string& what) const {
  if (s.ok()) return;
  const std::string msg = what + ": " + s.error_message();
  switch (s.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      throw CliError(kExitUnreachable, "cannot reach memfitd at " + address_ + " (" + s.error_message() +
                                           "); start it, or set --server / MEMFIT_SERVER");
    case grpc::StatusCode::UNAUTHENTICATED:
      throw CliError(kExitRefused, msg + " (set --token or MEMFIT_TOKEN)");
    case grpc::StatusCode::PERMISSION_DENIED: throw CliError(kExitRefused, msg);
    case grpc::StatusCode::NOT_FOUND: throw CliError(kExitNotFound, msg);
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::RESOURCE_EXHAUSTED: throw CliError(kExitBadInput, msg);
    default: throw CliError(kExitError, msg);
  }
}

v1::JobSpec spec_for_daemon(const std::string& file) {
  v1::JobSpec s = spec::read_spec_file(file);
  const spec::Job job = spec::resolve(s, file, std::filesystem::absolute(file).parent_path().string());
  s.mutable_model()->set_config_path(job.config_path);
  s.mutable_model()->set_weights_path(job.weights_path);
  s.mutable_data()->set_train_path(job.train_path);
  s.mutable_data()->set_validation_path(job.validation_path);
  s.mutable_data()->set_tokenizer_path(job.tokenizer_path);
  s.mutable_data()->set_train_labels_path(job.train_labels_path);
  s.mutable_data()->set_validation_labels_path(job.validation_labels_path);
  if (!s.output_dir().empty()) s.set_output_dir(job.output_dir);
  return s;
}

std::string human_size(int64_t b) {
  const double x = static_cast<double>(b);
  char buf[32];
  if (b < 0) return "-";
  if (x >= 1024.0 * 1024 * 1024) std::snprintf(buf, sizeof buf, "%.2f GiB", x / (1024.0 * 1024 * 1024));
  else if (x >= 1024.0 * 1024) std::snprintf(buf, sizeof buf, "%.1f MiB", x / (1024.0 * 1024));
  else if (x >= 1024.0) std::snprintf(buf, sizeof buf, "%.1f KiB", x / 1024.0);
  else std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(b));
  return buf;
}

std::string human_duration(double s) {
  if (!(s >= 0) || std::isinf(s)) return "-";
  const auto t = static_cast<long long>(std::llround(s));
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", t / 3600, (t % 3600) / 60);
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%lldm%02llds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%llds", t);
  return buf;
}

std::string state_name(v1::JobState s) {
  std::string n = v1::JobState_Name(s);
  for (char& ch : n) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return n;
}

int exit_code_of(v1::JobState s) {
  if (s == v1::SUCCEEDED) return kExitOk;
  if (s == v1::CANCELLED) return kExitJobCancelled;
  return kExitJobFailed;
}

namespace {

// protobuf's always_print_primitive_fields prints zeros, empty strings and empty lists,
// but leaves out a message field that is not set (a queued job's progress, started_at):
// here it is null, so every field is there and "not known yet" is not 0.
void add_unset_messages(const google::protobuf::Message& m, nlohmann::ordered_json& j) {
  if (!j.is_object()) return;
  const auto* d = m.GetDescriptor();
  const auto* r = m.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const auto* f = d->field(i);
    if (f->cpp_type() != google::protobuf::FieldDescriptor::CPPTYPE_MESSAGE || f->is_map()) continue;
    if (f->containing_oneof() != nullptr) continue;  // only the member that is set belongs there
    const std::string key = f->name();
    const bool well_known = f->message_type()->file()->package() == "google.protobuf";  // printed as scalars
    if (f->is_repeated()) {
      if (well_known || !j.contains(key)) continue;
      for (int k = 0; k < r->FieldSize(m, f) && k < static_cast<int>(j[key].size()); ++k) {
        add_unset_messages(r->GetRepeatedMessage(m, f, k), j[key][static_cast<size_t>(k)]);
      }
    } else if (!r->HasField(m, f)) {
      j[key] = nullptr;
    } else if (!well_known && j.contains(key)) {
      add_unset_messages(r->GetMessage(m, f), j[key]);
    }
  }
}

}  // namespace

std::string to_json(const google::protobuf::Message& m, bool pretty, bool all_fields) {
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = all_fields;
  o.add_whitespace = pretty;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  if (!all_fields) return out;
  auto j = nlohmann::ordered_json::parse(out, nullptr, false);
  if (j.is_discarded()) return out;
  add_unset_messages(m, j);
  return j.dump(pretty ? 2 : -1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

std::string json_to_yaml(const std::string& json) {
  YAML::Emitter out;
  emit_yaml(out, nlohmann::ordered_json::parse(json));
  return std::string(out.c_str()) + "\n";
}

std::string table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::vector<std::string>> cells;
  cells.reserve(rows.size() + 1);
  cells.push_back(header);
  for (const auto& r : rows) {
    std::vector<std::string> safe;
    for (const auto& c : r) safe.push_back(printable(c));
    cells.push_back(std::move(safe));
  }
  std::vector<size_t> w(header.size(), 0);
  for (const auto& r : cells) {
    for (size_t i = 0; i < r.size() && i < w.size(); ++i) w[i] = std::max(w[i], display_width(r[i]));
  }
  std::string out;
  for (const auto& r : cells) {
    std::string l;
    for (size_t i = 0; i < w.size(); ++i) {
      const std::string cell = i < r.size() ? r[i] : "";
      l += cell;
      if (i + 1 < w.size()) l += std::string(w[i] - display_width(cell) + 2, ' ');
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    out += l + "\n";
  }
  return out;
}

}  // namespace memfit::cli
