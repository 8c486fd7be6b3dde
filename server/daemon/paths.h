// Where a job's files may be, decided by memfitd (docs/DAEMON.md, "Deploying for several
// users"). The decisions are pure functions of the configuration, the caller and the
// request (unit tested in tests/daemon/test_paths.cpp); the checks that touch the disk
// open files the way the worker will (fsx: beneath a root, links never followed out), so
// what admission accepts is what the worker can open, and what it refuses names the field.
//
//   PathRules rules = PathRules::From(cfg);
//   std::string root = InputRoot(rules, "alice", "data.train_path", "/data/alice/train.txt");
//   CheckInput(rules, "alice", "data.train_path", path, /*folder_ok=*/false);
//   OutputPlace out = DecideOutput(rules, "alice", job_id, spec.output_dir());
//   ClaimOutput(out, job_id, uid, gid);   // at submit: the folder is this job's from now on
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "config.h"

namespace memfit::daemon {

class PathError : public std::runtime_error {
 public:
  enum class Kind { kInvalid, kDenied, kPrecondition };
  PathError(Kind k, const std::string& m) : std::runtime_error(m), kind(k) {}
  Kind kind;
};

struct PathRules {
  std::vector<std::string> read_roots, write_roots;  // may hold {user}
  std::string jobs_dir;                              // <state_dir>/jobs
  std::string state_dir;
  int64_t max_input_bytes = int64_t{4} << 30;
  int64_t max_weights_bytes = int64_t{1} << 40;
  static PathRules From(const Config& c);
};

// The marker a claimed output folder holds: the job's id.
inline constexpr const char* kOutputMarker = ".memfit-job";

// A user name that may stand for {user} in a root: letters, digits, ".", "_", "-", at most
// 64 bytes, not "." or "..".
bool PathSafeUser(const std::string& user);
// The roots with {user} replaced (roots naming {user} are dropped for an unsafe name).
std::vector<std::string> ExpandRoots(const std::vector<std::string>& roots, const std::string& user);

// The read root `path` lies beneath (the longest). Throws PathError naming the field:
// relative or '..' paths are invalid; a path outside every root is denied (before any
// file is touched, so nothing is learned about it).
std::string InputRoot(const PathRules& r, const std::string& user, const std::string& field, const std::string& path);

struct OutputPlace {
  std::string dir;   // the output folder
  std::string root;  // the folder it is opened beneath (a write root, or the job's folder)
  bool in_state_dir = false;
};
// Empty request: <jobs_dir>/<job_id>/output. Otherwise beneath a write root, never inside
// the state dir.
OutputPlace DecideOutput(const PathRules& r, const std::string& user, const std::string& job_id,
                         const std::string& requested);

// Opens `path` as the worker will: a regular file beneath its root (a folder where
// `folder_ok`), at most max_input_bytes (max_weights_bytes for weights). Errors name the
// field and never quote the file.
void CheckInput(const PathRules& r, const std::string& user, const std::string& field, const std::string& path,
                bool folder_ok, bool weights = false);
// The text of a small input (config.json), read through the same confined open.
std::string ReadInput(const PathRules& r, const std::string& user, const std::string& field, const std::string& path,
                      int64_t max_bytes);

// Whether the output folder could be claimed now (absent, or empty); PathError otherwise.
void CheckOutput(const OutputPlace& out);
// Creates the folder (beneath its root, no links followed) and its marker with O_EXCL:
// two jobs cannot claim one folder. Hands it to uid/gid when >= 0. PathError when the
// folder holds anything (another job's files, or anything memfit did not write).
void ClaimOutput(const OutputPlace& out, const std::string& job_id, int64_t uid, int64_t gid);
// Undoes a claim that was never used (the submit failed after it): the marker, and the
// folder if it is empty then.
void ReleaseOutput(const OutputPlace& out);

}  // namespace memfit::daemon
