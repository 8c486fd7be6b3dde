#include "confined.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <atomic>
#include <mutex>

namespace memfit::fsx {
namespace {

std::string why(int err) {
  switch (err) {
    case EXDEV: return "leads outside its permitted folder (through a symbolic link, '..' or a mount)";
    case ELOOP: return "is or passes through a symbolic link, which memfit does not follow here";
    case ENOENT: return "does not exist";
    case ENOTDIR: return "a part of it is not a folder";
    default: return std::strerror(err);
  }
}

[[noreturn]] void fail(const std::string& path, int err) { throw FsError(path + ": " + why(err), err); }

std::atomic<bool> g_no_openat2{false};

std::vector<std::string> components(const std::string& rel) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i <= rel.size()) {
    const size_t j = std::min(rel.find('/', i), rel.size());
    const std::string c = rel.substr(i, j - i);
    if (!c.empty() && c != ".") out.push_back(c);
    i = j + 1;
  }
  return out;
}

// `rel` beneath `dirfd`. Returns -1 with errno set.
int open_beneath(int dirfd, const std::string& rel, int flags, mode_t mode, bool no_symlinks, bool plain = false) {
  // openat2 refuses O_PATH with flags other than O_CLOEXEC, O_DIRECTORY and O_NOFOLLOW.
  flags |= (flags & O_PATH) ? O_CLOEXEC : (O_CLOEXEC | O_NOCTTY);
  if (plain) return ::openat(dirfd, rel.c_str(), flags, mode);
  if (!g_no_openat2) {
    open_how how{};
    how.flags = static_cast<uint64_t>(flags);
    how.mode = ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) ? mode : 0;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | (no_symlinks ? RESOLVE_NO_SYMLINKS : 0);
    const long fd = ::syscall(SYS_openat2, dirfd, rel.c_str(), &how, sizeof how);
    if (fd >= 0 || errno != ENOSYS) return static_cast<int>(fd);
    g_no_openat2 = true;
  }
  // No openat2: one component at a time, never following a link (stricter than
  // RESOLVE_BENEATH for inputs, which may then not pass through links).
  const std::vector<std::string> parts = components(rel);
  if (parts.empty()) return ::openat(dirfd, ".", flags, mode);
  int cur = dirfd;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i] == "..") {
      if (cur != dirfd) ::close(cur);
      errno = EXDEV;
      return -1;
    }
    const bool last = i + 1 == parts.size();
    const int next = last ? ::openat(cur, parts[i].c_str(), flags | O_NOFOLLOW, mode)
                          : ::openat(cur, parts[i].c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    const int e = errno;
    if (cur != dirfd) ::close(cur);
    if (next < 0) {
      errno = (e == ENOTDIR && !last) ? ELOOP : e;
      return -1;
    }
    cur = next;
  }
  return cur;
}

// A root folder, opened one component at a time from "/" without following any link. A
// root with {user} filled in may pass through a folder that user owns: a link there must
// not redirect the root (the configuration resolved the administrator's links at load).
// -1 with errno (ELOOP for a link).
int open_root(const std::string& root) {
  int cur = ::open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (cur < 0) return -1;
  for (const auto& c : components(root)) {
    const int next = ::openat(cur, c.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    int e = errno;
    struct stat st {};
    if (next < 0 && e == ENOTDIR && ::fstatat(cur, c.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode)) {
      e = ELOOP;
    }
    ::close(cur);
    if (next < 0) {
      errno = e;
      return -1;
    }
    cur = next;
  }
  return cur;
}

// Splits "a/b/c" into the parent "a/b" (or ".") and "c".
std::pair<std::string, std::string> split(const std::string& rel) {
  const size_t s = rel.rfind('/');
  if (s == std::string::npos) return {".", rel};
  return {rel.substr(0, s), rel.substr(s + 1)};
}

void remove_at(int parent, const std::string& name, const std::string& shown) {
  struct stat st {};
  if (::fstatat(parent, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    if (errno == ENOENT) return;
    fail(shown, errno);
  }
  if (S_ISDIR(st.st_mode)) {
    const int fd = ::openat(parent, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) fail(shown, errno);
    DIR* d = ::fdopendir(fd);
    if (d == nullptr) {
      const int e = errno;
      ::close(fd);
      fail(shown, e);
    }
    std::vector<std::string> names;
    while (dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      if (n != "." && n != "..") names.push_back(n);
    }
    for (const auto& n : names) remove_at(::dirfd(d), n, shown + "/" + n);
    ::closedir(d);
    if (::unlinkat(parent, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT) fail(shown, errno);
  } else if (::unlinkat(parent, name.c_str(), 0) != 0 && errno != ENOENT) {
    fail(shown, errno);
  }
}

std::mutex g_roots_mu;
std::vector<std::string> g_roots;

}  // namespace

std::string NormalAbsolute(const std::string& path) {
  if (path.empty() || path.front() != '/') return "";
  std::string out;
  for (const auto& c : components(path)) {
    if (c == "..") return "";
    out += "/" + c;
  }
  return out.empty() ? "/" : out;
}

bool IsBeneath(const std::string& path, const std::string& root) {
  if (root == "/") return !path.empty() && path.front() == '/';
  return path == root || (path.size() > root.size() && path.compare(0, root.size(), root) == 0 && path[root.size()] == '/');
}

std::string RelativeTo(const std::string& path, const std::string& root) {
  if (path == root) return ".";
  return path.substr(root == "/" ? 1 : root.size() + 1);
}

// ---- Dir ----

Dir Dir::open_below(const std::string& root_in, const std::string& path_in, bool create) {
  const std::string root = NormalAbsolute(root_in), path = NormalAbsolute(path_in);
  if (root.empty()) throw FsError(root_in + ": not an absolute folder", EINVAL);
  if (path.empty()) throw FsError(path_in + ": expected an absolute path without '..'", EINVAL);
  if (!IsBeneath(path, root)) throw FsError(path + ": " + why(EXDEV), EXDEV);
  int cur = open_root(root);
  if (cur < 0) fail(root, errno);
  std::string shown = root;
  for (const auto& c : components(RelativeTo(path, root))) {
    shown += (shown == "/" ? "" : "/") + c;
    int next = ::openat(cur, c.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (next < 0 && errno == ENOENT && create) {
      if (::mkdirat(cur, c.c_str(), 0750) != 0 && errno != EEXIST) {
        const int e = errno;
        ::close(cur);
        fail(shown, e);
      }
      next = ::openat(cur, c.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    }
    if (next < 0) {
      int e = errno;
      struct stat st {};
      if (e == ENOTDIR && ::fstatat(cur, c.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode)) e = ELOOP;
      ::close(cur);
      fail(shown, e);
    }
    ::close(cur);
    cur = next;
  }
  return Dir(cur, path);
}

Dir Dir::open_plain(const std::string& path, bool create) {
  if (create) {
    std::string p;
    for (const auto& c : components(path)) {
      p += (p.empty() && path.front() != '/' ? "" : "/") + c;
      if (::mkdir(p.c_str(), 0750) != 0 && errno != EEXIST) fail(p, errno);
    }
  }
  const int fd = ::open(path.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail(path, errno);
  return Dir(fd, path, /*plain=*/true);
}

Dir::Dir(Dir&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)), plain_(o.plain_) { o.fd_ = -1; }

Dir& Dir::operator=(Dir&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    path_ = std::move(o.path_);
    plain_ = o.plain_;
    o.fd_ = -1;
  }
  return *this;
}

Dir::~Dir() {
  if (fd_ >= 0) ::close(fd_);
}

std::string Dir::full(const std::string& rel) const {
  if (rel == ".") return path_;
  return path_ == "/" ? "/" + rel : path_ + "/" + rel;
}

int Dir::open(const std::string& rel, int flags, mode_t mode) const {
  const int fd = open_beneath(fd_, rel, flags, mode, /*no_symlinks=*/true, plain_);
  if (fd < 0) fail(full(rel), errno);
  return fd;
}

Dir Dir::sub(const std::string& rel, bool create) const {
  if (create) mkdirs(rel);
  return Dir(open(rel, O_PATH | O_DIRECTORY), full(rel), plain_);
}

bool Dir::exists(const std::string& rel) const {
  const int fd = open_beneath(fd_, rel, O_PATH, 0, true, plain_);
  if (fd < 0) {
    if (errno == ENOENT) return false;
    fail(full(rel), errno);
  }
  ::close(fd);
  return true;
}

bool Dir::is_dir(const std::string& rel) const {
  const int fd = open_beneath(fd_, rel, O_PATH, 0, true, plain_);
  if (fd < 0) return false;
  struct stat st {};
  const bool d = ::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
  ::close(fd);
  return d;
}

std::vector<std::string> Dir::list(const std::string& rel) const {
  const int fd = open(rel, O_RDONLY | O_DIRECTORY);
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) {
    const int e = errno;
    ::close(fd);
    fail(full(rel), e);
  }
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

void Dir::mkdirs(const std::string& rel) const {
  int cur = fd_;
  std::string shown = path_;
  for (const auto& c : components(rel)) {
    shown += "/" + c;
    if (c == "..") fail(shown, EXDEV);
    if (::mkdirat(cur, c.c_str(), 0750) != 0 && errno != EEXIST) {
      const int e = errno;
      if (cur != fd_) ::close(cur);
      fail(shown, e);
    }
    const int next = ::openat(cur, c.c_str(), O_PATH | O_DIRECTORY | (plain_ ? 0 : O_NOFOLLOW) | O_CLOEXEC);
    const int e = errno;
    if (cur != fd_) ::close(cur);
    if (next < 0) fail(shown, e == ENOTDIR && !plain_ ? ELOOP : e);
    cur = next;
  }
  if (cur != fd_) ::close(cur);
}

void Dir::remove_tree(const std::string& rel) const {
  const auto [parent, name] = split(rel);
  if (name.empty() || name == "." || name == "..") fail(full(rel), EINVAL);
  int pfd = -1;
  if (parent == ".") {
    pfd = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
  } else {
    pfd = open_beneath(fd_, parent, O_PATH | O_DIRECTORY, 0, true, plain_);
    if (pfd < 0 && errno == ENOENT) return;
  }
  if (pfd < 0) fail(full(parent), errno);
  try {
    remove_at(pfd, name, full(rel));
  } catch (...) {
    ::close(pfd);
    throw;
  }
  ::close(pfd);
}

void Dir::rename(const std::string& from, const std::string& to) const {
  const auto [fp, fn] = split(from);
  const auto [tp, tn] = split(to);
  const int a = open(fp, O_PATH | O_DIRECTORY);
  const int b = open_beneath(fd_, tp, O_PATH | O_DIRECTORY, 0, true, plain_);
  if (b < 0) {
    const int e = errno;
    ::close(a);
    fail(full(tp), e);
  }
  const int rc = ::renameat(a, fn.c_str(), b, tn.c_str());
  const int e = errno;
  ::close(a);
  ::close(b);
  if (rc != 0) fail(full(from) + " -> " + full(to), e);
}

std::string Dir::read_file(const std::string& rel, int64_t max_bytes) const {
  const int fd = open(rel, O_RDONLY);
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (static_cast<int64_t>(out.size()) > max_bytes) {
      ::close(fd);
      throw FsError(full(rel) + ": larger than " + std::to_string(max_bytes) + " bytes", EFBIG);
    }
  }
  ::close(fd);
  return out;
}

void Dir::write_file_atomic(const std::string& rel, const std::string& data) const {
  const std::string tmp = rel + ".tmp";
  const int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0640);
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int e = n < 0 ? errno : EIO;
      ::close(fd);
      fail(full(tmp), e);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int e = errno;
    ::close(fd);
    fail(full(tmp), e);
  }
  if (::close(fd) != 0) fail(full(tmp), errno);
  rename(tmp, rel);
}

// ---- inputs ----

namespace {
std::mutex g_out_mu;
Dir* g_out = nullptr;  // the output folder (set once by set_output_root, never freed)
}  // namespace

void set_input_roots(const std::vector<std::string>& roots) {
  std::lock_guard<std::mutex> lock(g_roots_mu);
  g_roots.clear();
  for (const auto& r : roots) {
    const std::string n = NormalAbsolute(r);
    if (n.empty()) throw FsError(r + ": an input root must be an absolute folder", EINVAL);
    g_roots.push_back(n);
  }
}

const std::vector<std::string>& input_roots() { return g_roots; }

namespace {

// -1 with errno, or a descriptor (O_PATH when `flags` has it).
std::vector<std::string> global_roots() {
  std::lock_guard<std::mutex> lock(g_roots_mu);
  return g_roots;
}

int open_input_fd(const std::string& path, const std::vector<std::string>& roots, int flags, std::string* root_out) {
  if (roots.empty()) return ::open(path.c_str(), flags | O_CLOEXEC | O_NOCTTY);
  const std::string p = NormalAbsolute(path);
  if (p.empty()) {
    errno = EXDEV;
    return -1;
  }
  const std::string* best = nullptr;
  for (const auto& r : roots) {
    if (IsBeneath(p, r) && (best == nullptr || r.size() > best->size())) best = &r;
  }
  if (best == nullptr) {
    errno = EACCES;
    *root_out = "";
    return -1;
  }
  *root_out = *best;
  const int root = open_root(*best);
  if (root < 0) return -1;
  const int fd = open_beneath(root, RelativeTo(p, *best), flags, 0, /*no_symlinks=*/false);
  const int e = errno;
  ::close(root);
  errno = e;
  return fd;
}

}  // namespace

int open_input(const std::string& path) {
  // A job reads back its own outputs (checkpoints) beneath its output folder.
  bool in_output = false;
  {
    std::lock_guard<std::mutex> lock(g_out_mu);
    in_output = g_out != nullptr && IsBeneath(NormalAbsolute(path), g_out->path());
  }
  if (in_output) {
    const int fd = open_output(path, O_RDONLY | O_NONBLOCK);
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw FsError(path + ": not a regular file", EINVAL);
    }
    ::fcntl(fd, F_SETFL, 0);
    return fd;
  }
  return open_input(path, global_roots());
}

int open_input(const std::string& path, const std::vector<std::string>& roots) {
  std::string root;
  const int fd = open_input_fd(path, roots, O_RDONLY | O_NONBLOCK, &root);
  if (fd < 0) {
    if (errno == EACCES && root.empty() && !roots.empty()) {
      throw FsError(path + ": outside the folders this job may read", EACCES);
    }
    fail(path, errno);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FsError(path + ": not a regular file", EINVAL);
  }
  ::fcntl(fd, F_SETFL, 0);  // blocking reads from here on
  return fd;
}

struct stat stat_input(const std::string& path, const std::vector<std::string>& roots) {
  std::string root;
  const int fd = open_input_fd(path, roots, O_PATH, &root);
  if (fd < 0) {
    if (errno == EACCES && root.empty() && !roots.empty()) {
      throw FsError(path + ": outside the folders this job may read", EACCES);
    }
    fail(path, errno);
  }
  struct stat st {};
  const int rc = ::fstat(fd, &st);
  const int e = errno;
  ::close(fd);
  if (rc != 0) fail(path, e);
  return st;
}

bool input_is_dir(const std::string& path) { return input_is_dir(path, global_roots()); }

bool input_is_dir(const std::string& path, const std::vector<std::string>& roots) {
  std::string root;
  const int fd = open_input_fd(path, roots, O_PATH, &root);
  if (fd < 0) return false;
  struct stat st {};
  const bool d = ::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
  ::close(fd);
  return d;
}

InputFile::InputFile(const std::string& path) : fd_(open_input(path)) {}

InputFile::InputFile(const std::string& path, const std::vector<std::string>& roots) : fd_(open_input(path, roots)) {}

InputFile::~InputFile() {
  if (fd_ >= 0) ::close(fd_);
}

int64_t InputFile::size() const {
  struct stat st {};
  return ::fstat(fd_, &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

std::string InputFile::proc_path() const { return "/proc/self/fd/" + std::to_string(fd_); }

std::string InputFile::read_all(int64_t max_bytes) const {
  std::string out;
  char buf[65536];
  off_t off = 0;
  for (;;) {
    const ssize_t n = ::pread(fd_, buf, sizeof buf, off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
    off += n;
    if (static_cast<int64_t>(out.size()) > max_bytes) throw FsError("input larger than the limit", EFBIG);
  }
  return out;
}

// ---- outputs ----

namespace {

// Runs fn(dir, rel) for `path` beneath the output folder; converts FsError to OutputError.
template <typename Fn>
auto on_output(const std::string& path, Fn&& fn) -> decltype(fn(std::declval<const Dir&>(), std::string())) {
  Dir* out = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_out_mu);
    out = g_out;
  }
  try {
    if (out != nullptr) {
      const std::string p = NormalAbsolute(path);
      if (p.empty() || !IsBeneath(p, out->path())) {
        throw FsError(path + ": outside the job's output folder " + out->path(), EXDEV);
      }
      return fn(*out, RelativeTo(p, out->path()));
    }
    // No confinement: the path as given, from the root or the working folder.
    const bool abs = !path.empty() && path.front() == '/';
    Dir base = Dir::open_plain(abs ? "/" : ".", false);
    std::string rel = abs ? path.substr(1) : path;
    if (rel.empty()) rel = ".";
    return fn(base, rel);
  } catch (const OutputError&) {
    throw;
  } catch (const FsError& e) {
    throw OutputError(e.what(), e.errno_value);
  }
}

}  // namespace

void set_output_root(const std::string& root, const std::string& dir) {
  Dir d = Dir::open_below(root, dir, /*create=*/true);
  std::lock_guard<std::mutex> lock(g_out_mu);
  delete g_out;
  g_out = new Dir(std::move(d));
}

bool output_confined() {
  std::lock_guard<std::mutex> lock(g_out_mu);
  return g_out != nullptr;
}

int open_output(const std::string& path, int flags, mode_t mode) {
  return on_output(path, [&](const Dir& d, const std::string& rel) { return d.open(rel, flags, mode); });
}

void mkdirs_output(const std::string& path) {
  on_output(path, [&](const Dir& d, const std::string& rel) {
    d.mkdirs(rel);
    return 0;
  });
}

void remove_output_tree(const std::string& path) {
  on_output(path, [&](const Dir& d, const std::string& rel) {
    d.remove_tree(rel);
    return 0;
  });
}

void rename_output(const std::string& from, const std::string& to) {
  const std::string p = NormalAbsolute(to);
  on_output(from, [&](const Dir& d, const std::string& rel) {
    // `to` relative to the same folder.
    std::string trel;
    if (output_confined()) {
      if (p.empty() || !IsBeneath(p, d.path())) throw FsError(to + ": outside the job's output folder", EXDEV);
      trel = RelativeTo(p, d.path());
    } else {
      trel = (!to.empty() && to.front() == '/') ? to.substr(1) : to;
    }
    d.rename(rel, trel);
    return 0;
  });
}

bool output_exists(const std::string& path) {
  return on_output(path, [&](const Dir& d, const std::string& rel) { return d.exists(rel); });
}

bool output_is_dir(const std::string& path) {
  return on_output(path, [&](const Dir& d, const std::string& rel) { return d.is_dir(rel); });
}

std::vector<std::string> list_output(const std::string& path) {
  return on_output(path, [&](const Dir& d, const std::string& rel) { return d.list(rel); });
}

std::string read_output(const std::string& path, int64_t max_bytes) {
  return on_output(path, [&](const Dir& d, const std::string& rel) { return d.read_file(rel, max_bytes); });
}

void write_output_atomic(const std::string& path, const std::string& data) {
  on_output(path, [&](const Dir& d, const std::string& rel) {
    d.write_file_atomic(rel, data);
    return 0;
  });
}

}  // namespace memfit::fsx
