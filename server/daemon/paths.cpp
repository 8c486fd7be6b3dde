#include "paths.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include "confined.h"
#include "estimator.h"

namespace memfit::daemon {
namespace {

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::string shown(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size() && i < 3; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > 3) s += ", ... (" + std::to_string(names.size()) + " entries)";
  return s;
}

// The innermost root `p` lies beneath; nullptr when none.
const std::string* Innermost(const std::vector<std::string>& roots, const std::string& p) {
  const std::string* best = nullptr;
  for (const auto& root : roots) {
    if (fsx::IsBeneath(p, root) && (best == nullptr || root.size() > best->size())) best = &root;
  }
  return best;
}

// A folder inside another job's claimed output folder is that job's: its worker replaces
// and removes what is there (adapter, model, checkpoints). Checks the root and each folder
// between it and out.dir for a marker; throws PathError (or FsError for a link on the way).
void CheckNotInsideClaimed(const OutputPlace& out) {
  const std::string rel = fsx::RelativeTo(out.dir, out.root);
  if (rel == ".") return;
  const fsx::Dir root = fsx::Dir::open_below(out.root, out.root, false);
  std::string sub;
  for (size_t from = 0;;) {
    if (root.exists(sub.empty() ? std::string(kOutputMarker) : sub + "/" + kOutputMarker)) {
      throw PathError(PathError::Kind::kPrecondition,
                      "output_dir: " + out.dir + " is inside " + (sub.empty() ? out.root : out.root + "/" + sub) +
                          ", another job's output folder; memfit writes only into a new or empty folder of its own");
    }
    const size_t slash = rel.find('/', from);
    if (slash == std::string::npos) return;  // the parents of out.dir are checked
    sub = rel.substr(0, slash);
    from = slash + 1;
    if (!root.is_dir(sub)) return;  // absent from here on: nothing below is claimed
  }
}

}  // namespace

PathRules PathRules::From(const Config& c) {
  PathRules r;
  r.read_roots = c.read_roots;
  r.write_roots = c.write_roots;
  // Canonical: roots are opened without following links, the state dir's own included.
  r.state_dir = fsx::NormalAbsolute(std::filesystem::weakly_canonical(std::filesystem::absolute(c.state_dir)).string());
  r.jobs_dir = r.state_dir + "/jobs";
  r.max_input_bytes = c.max_input_bytes;
  r.max_weights_bytes = c.max_weights_bytes;
  return r;
}

bool PathSafeUser(const std::string& user) {
  if (user.empty() || user.size() > 64 || user == "." || user == "..") return false;
  for (const char ch : user) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
                    ch == '_' || ch == '-';
    if (!ok) return false;
  }
  return true;
}

std::vector<std::string> ExpandRoots(const std::vector<std::string>& roots, const std::string& user) {
  std::vector<std::string> out;
  for (const auto& r : roots) {
    std::string x = r;
    if (x.find("{user}") != std::string::npos) {
      if (!PathSafeUser(user)) continue;
      for (size_t p = x.find("{user}"); p != std::string::npos; p = x.find("{user}", p + user.size())) {
        x.replace(p, 6, user);
      }
    }
    x = fsx::NormalAbsolute(x);
    if (!x.empty()) out.push_back(x);
  }
  return out;
}

std::string InputRoot(const PathRules& r, const std::string& user, const std::string& field, const std::string& path) {
  if (path.empty() || path.front() != '/') {
    throw PathError(PathError::Kind::kInvalid, field + ": memfitd needs an absolute path, got '" + path + "'");
  }
  const std::string p = fsx::NormalAbsolute(path);
  if (p.empty()) throw PathError(PathError::Kind::kInvalid, field + ": '..' is not allowed in a path, got '" + path + "'");
  if (!r.state_dir.empty() && fsx::IsBeneath(p, r.state_dir)) {
    throw PathError(PathError::Kind::kDenied, field + ": " + path + " is inside memfitd's state folder, which jobs may not read");
  }
  const std::vector<std::string> roots = ExpandRoots(r.read_roots, user);
  const std::string* best = Innermost(roots, p);
  if (best == nullptr) {
    throw PathError(PathError::Kind::kDenied,
                    field + ": " + path + " is outside the folders memfitd may read for " + user +
                        (roots.empty() ? " (none configured: paths.read_roots)" : " (" + joined(roots) + ")"));
  }
  return *best;
}

OutputPlace DecideOutput(const PathRules& r, const std::string& user, const std::string& job_id,
                         const std::string& requested) {
  OutputPlace o;
  if (requested.empty()) {
    o.root = r.jobs_dir + "/" + job_id;
    o.dir = o.root + "/output";
    o.in_state_dir = true;
    return o;
  }
  if (requested.front() != '/') {
    throw PathError(PathError::Kind::kInvalid, "output_dir: memfitd needs an absolute path, got '" + requested + "'");
  }
  const std::string p = fsx::NormalAbsolute(requested);
  if (p.empty()) throw PathError(PathError::Kind::kInvalid, "output_dir: '..' is not allowed in a path, got '" + requested + "'");
  if (fsx::IsBeneath(p, r.state_dir) || fsx::IsBeneath(r.state_dir, p)) {
    throw PathError(PathError::Kind::kDenied, "output_dir: " + requested +
                                                  " is memfitd's state folder or holds it; leave output_dir empty and "
                                                  "the job writes into its own folder there");
  }
  const std::vector<std::string> roots = ExpandRoots(r.write_roots, user);
  const std::string* best = Innermost(roots, p);
  if (best == nullptr) {
    throw PathError(PathError::Kind::kDenied,
                    "output_dir: " + requested + " is outside the folders memfitd may write for " + user +
                        (roots.empty() ? " (none configured: paths.write_roots; leave output_dir empty to write "
                                         "into the job's own folder)"
                                       : " (" + joined(roots) + ")"));
  }
  o.root = *best;
  o.dir = p;
  return o;
}

void CheckInput(const PathRules& r, const std::string& user, const std::string& field, const std::string& path,
                bool folder_ok, bool weights) {
  const std::string root = InputRoot(r, user, field, path);
  struct stat st {};
  try {
    st = fsx::stat_input(path, {root});  // resolved beneath the root; nothing opened for reading
  } catch (const fsx::FsError& e) {
    throw PathError(e.errno_value == ENOENT ? PathError::Kind::kInvalid : PathError::Kind::kDenied,
                    field + ": " + e.what());
  }
  if (folder_ok && S_ISDIR(st.st_mode)) return;
  if (!S_ISREG(st.st_mode)) {
    throw PathError(PathError::Kind::kDenied, field + ": " + path + ": not a regular file");
  }
  const int64_t cap = weights ? r.max_weights_bytes : r.max_input_bytes;
  if (st.st_size > cap) {
    throw PathError(PathError::Kind::kInvalid,
                    field + ": " + path + " is " + estimator::format_size(st.st_size) + ", more than " +
                        estimator::format_size(cap) + (weights ? " (limits.max_weights_bytes)" : " (limits.max_input_bytes)"));
  }
}

std::string ReadInput(const PathRules& r, const std::string& user, const std::string& field, const std::string& path,
                      int64_t max_bytes) {
  const std::string root = InputRoot(r, user, field, path);
  try {
    fsx::InputFile f(path, {root});
    if (f.size() > max_bytes) {
      throw PathError(PathError::Kind::kInvalid, field + ": " + path + " is larger than " + estimator::format_size(max_bytes));
    }
    return f.read_all(max_bytes);
  } catch (const fsx::FsError& e) {
    throw PathError(e.errno_value == ENOENT ? PathError::Kind::kInvalid : PathError::Kind::kDenied,
                    field + ": " + e.what());
  }
}

// The write root itself must exist: an administrator makes it (memfitd does not create
// folders on a pattern's behalf).
void CheckRoot(const OutputPlace& out) {
  struct stat st {};
  if (::lstat(out.root.c_str(), &st) != 0 && errno == ENOENT) {
    throw PathError(PathError::Kind::kPrecondition, "output_dir: " + out.dir + ": its write root " + out.root +
                                                        " does not exist (paths.write_roots; an administrator creates it)");
  }
}

void CheckOutput(const OutputPlace& out) {
  if (out.in_state_dir) return;
  CheckRoot(out);
  try {
    CheckNotInsideClaimed(out);
    fsx::Dir root = fsx::Dir::open_below(out.root, out.root, false);
    const std::string rel = fsx::RelativeTo(out.dir, out.root);
    if (rel != "." && !root.exists(rel)) return;
    const fsx::Dir d = fsx::Dir::open_below(out.root, out.dir, false);
    const auto names = d.list();
    if (!names.empty()) {
      throw PathError(PathError::Kind::kPrecondition,
                      "output_dir: " + out.dir + " already holds " + shown(names) +
                          (d.exists(kOutputMarker) ? " (another job's outputs)" : "") +
                          "; memfit writes only into a new or empty folder, and never deletes what it did not write");
    }
  } catch (const fsx::FsError& e) {
    throw PathError(PathError::Kind::kDenied, std::string("output_dir: ") + e.what());
  }
}

void ClaimOutput(const OutputPlace& out, const std::string& job_id, int64_t uid, int64_t gid) {
  try {
    if (out.in_state_dir) {
      // The job's own folder: made by memfitd, traversable by the worker's user only.
      fsx::Dir::open_below(std::filesystem::path(out.root).parent_path().string(), out.root, true);
    }
    if (!out.in_state_dir) {
      CheckRoot(out);
      CheckNotInsideClaimed(out);
    }
    fsx::Dir d = fsx::Dir::open_below(out.root, out.dir, true);
    const auto names = d.list();
    if (!names.empty()) CheckOutput(out);  // names what is there
    const int fd = d.open(kOutputMarker, O_WRONLY | O_CREAT | O_EXCL, 0640);
    const std::string text = job_id + "\n";
    bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    // Handed over through its descriptor: a name could be swapped for a hard link.
    if (ok && uid >= 0) ok = ::fchown(fd, static_cast<uid_t>(uid), static_cast<gid_t>(gid)) == 0;
    ::close(fd);
    if (!ok) throw PathError(PathError::Kind::kPrecondition, "output_dir: " + out.dir + ": cannot write its marker");
    if (!out.in_state_dir) {
      // Checked again with the marker in place: of two concurrent claims of nested folders
      // (a and a/x) at least one sees the other's marker or folder here, so they cannot
      // both win.
      try {
        CheckNotInsideClaimed(out);
        const auto now = d.list();
        if (now.size() != 1) {
          throw PathError(PathError::Kind::kPrecondition,
                          "output_dir: " + out.dir + " gained files while it was being claimed; memfit writes only "
                                                     "into a new or empty folder of its own");
        }
      } catch (...) {
        ::unlinkat(d.fd(), kOutputMarker, 0);
        throw;
      }
    }
    if (uid >= 0) {
      // The worker's user owns the folder it writes (and the marker stays readable).
      if (::fchownat(d.fd(), "", static_cast<uid_t>(uid), static_cast<gid_t>(gid), AT_EMPTY_PATH) != 0) {
        throw PathError(PathError::Kind::kPrecondition, "output_dir: " + out.dir + ": cannot hand it to the worker's user");
      }
    }
  } catch (const fsx::FsError& e) {
    throw PathError(e.errno_value == EEXIST ? PathError::Kind::kPrecondition : PathError::Kind::kDenied,
                    std::string("output_dir: ") + e.what() +
                        (e.errno_value == EEXIST ? " (another job claimed this folder)" : ""));
  }
}

void ReleaseOutput(const OutputPlace& out) {
  try {
    fsx::Dir d = fsx::Dir::open_below(out.root, out.dir, false);
    ::unlinkat(d.fd(), kOutputMarker, 0);
    if (d.list().empty() && out.dir != out.root) {
      const std::string parent = std::filesystem::path(out.dir).parent_path().string();
      fsx::Dir p = fsx::Dir::open_below(out.root, parent, false);
      ::unlinkat(p.fd(), std::filesystem::path(out.dir).filename().c_str(), AT_REMOVEDIR);
    }
  } catch (const std::exception&) {
  }
}

}  // namespace memfit::daemon
