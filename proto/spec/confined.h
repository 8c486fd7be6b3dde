// Where a job's files may be: opening every input and output beneath a folder, with the
// kernel doing the check at the moment of use (openat2 with RESOLVE_BENEATH, and
// RESOLVE_NO_SYMLINKS for outputs; on kernels without openat2 a component-by-component
// walk with O_NOFOLLOW). A path checked once and opened later by name can be swapped for a
// symbolic link in between; a path resolved this way cannot lead out of its folder.
//
//   auto out = memfit::fsx::Dir::open_below(write_root, "/data/alice/out/run-1", /*create=*/true);
//   out.write_file_atomic("metrics.json", text);      // never follows a link
//   out.remove_tree("checkpoints/step-000000010");    // unlinks links, never their targets
//
//   memfit::fsx::set_input_roots({"/data", "/models"});     // the worker, once, at start
//   memfit::fsx::InputFile f("/data/alice/train.txt");      // regular file beneath a root
//   std::ifstream in(f.proc_path());                        // the same open file, by fd
//
// Used by the worker (all its file access) and by memfitd (admission checks), so both
// apply one rule. Plain C++ and Linux calls only.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace memfit::fsx {

class FsError : public std::runtime_error {
 public:
  FsError(const std::string& m, int err) : std::runtime_error(m), errno_value(err) {}
  int errno_value;  // ENOENT, EACCES, EXDEV (leads outside), ELOOP (a link), ENOSPC, ...
};

// An operation on a job's outputs failed (disk full, I/O error, or a link planted there).
class OutputError : public FsError {
 public:
  using FsError::FsError;
};

// Lexical helpers (pure). NormalAbsolute: "" for a relative path or one with a ".."
// component; otherwise the path with "//" and "." collapsed and no trailing "/".
std::string NormalAbsolute(const std::string& path);
// Whether `path` is `root` or lies below it (both NormalAbsolute).
bool IsBeneath(const std::string& path, const std::string& root);
// `path` relative to `root` ("." when equal). Precondition: IsBeneath(path, root).
std::string RelativeTo(const std::string& path, const std::string& root);

// An open folder. Movable, not copyable; closes its descriptor.
class Dir {
 public:
  // Opens `root` (an administrator's folder: links in it are followed), then `path` below
  // it without following any link; with `create`, missing folders are made (mode 0750).
  static Dir open_below(const std::string& root, const std::string& path, bool create);
  // The folder `path` with no confinement (links followed): manual runs of the worker.
  static Dir open_plain(const std::string& path, bool create);
  Dir() = default;
  Dir(Dir&& o) noexcept;
  Dir& operator=(Dir&& o) noexcept;
  Dir(const Dir&) = delete;
  Dir& operator=(const Dir&) = delete;
  ~Dir();

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  // `rel` below this folder, opened without following links. Throws FsError naming the
  // whole path.
  int open(const std::string& rel, int flags, mode_t mode = 0640) const;
  Dir sub(const std::string& rel, bool create) const;
  bool exists(const std::string& rel) const;
  bool is_dir(const std::string& rel) const;
  std::vector<std::string> list(const std::string& rel = ".") const;  // names, sorted
  void mkdirs(const std::string& rel) const;
  // Removes `rel` and everything below it; links are removed, never followed. No-op when
  // absent.
  void remove_tree(const std::string& rel) const;
  void rename(const std::string& from, const std::string& to) const;
  std::string read_file(const std::string& rel, int64_t max_bytes = int64_t{1} << 30) const;
  // Writes through `rel`.tmp, fsync, rename: readers never see half a file.
  void write_file_atomic(const std::string& rel, const std::string& data) const;
  std::string full(const std::string& rel) const;  // path() + "/" + rel, for messages

 private:
  Dir(int fd, std::string path, bool plain = false) : fd_(fd), path_(std::move(path)), plain_(plain) {}
  int fd_ = -1;
  std::string path_;
  bool plain_ = false;  // open_plain: links are followed (no confinement)
};

// Inputs. With no roots set, any path opens (a manual run); once set, an input must be a
// regular file beneath one of them (links that stay beneath the root are followed).
void set_input_roots(const std::vector<std::string>& roots);
const std::vector<std::string>& input_roots();
// A read-only descriptor for a regular file; throws FsError naming `path`.
int open_input(const std::string& path);
// The same with explicit roots (memfitd: each user has their own). Roots must be
// NormalAbsolute; empty = no confinement.
int open_input(const std::string& path, const std::vector<std::string>& roots);
// Whether `path` is a folder beneath a root (tokenizer folders, index folders).
bool input_is_dir(const std::string& path);
bool input_is_dir(const std::string& path, const std::vector<std::string>& roots);
// What `path` is, resolved beneath its root as open_input would (one O_PATH open: nothing
// is read, a FIFO does not block). Throws FsError naming `path`.
struct stat stat_input(const std::string& path, const std::vector<std::string>& roots);

class InputFile {
 public:
  explicit InputFile(const std::string& path);
  InputFile(const std::string& path, const std::vector<std::string>& roots);
  ~InputFile();
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
  int fd() const { return fd_; }
  int64_t size() const;
  // /proc/self/fd/N: reopening it gives this same file, whatever the path points to now.
  std::string proc_path() const;
  std::string read_all(int64_t max_bytes = int64_t{1} << 32) const;

 private:
  int fd_ = -1;
};

// Outputs. Once set (the worker, at start, from memfitd's --output-root), every output
// path must lie beneath `dir`, which is opened beneath `root` without following links;
// each operation resolves beneath it and never follows a link. Unset: plain file
// operations (manual runs). All throw OutputError naming the path.
void set_output_root(const std::string& root, const std::string& dir);
bool output_confined();
int open_output(const std::string& path, int flags, mode_t mode = 0640);
void mkdirs_output(const std::string& path);
void remove_output_tree(const std::string& path);
void rename_output(const std::string& from, const std::string& to);
bool output_exists(const std::string& path);
bool output_is_dir(const std::string& path);
std::vector<std::string> list_output(const std::string& path);  // names, sorted
std::string read_output(const std::string& path, int64_t max_bytes = int64_t{1} << 30);
void write_output_atomic(const std::string& path, const std::string& data);

}  // namespace memfit::fsx
