#include "program/files.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "program/error.h"

namespace colt5 {
namespace app {

namespace {

std::string error_text() { return std::strerror(errno); }

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

std::string bytes(uint64_t n) {
  char buf[64];
  if (n >= (uint64_t{1} << 30))
    std::snprintf(buf, sizeof buf, "%.1f GiB", static_cast<double>(n) / (1u << 30));
  else if (n >= (uint64_t{1} << 20))
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(n) / (1u << 20));
  else
    std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(n));
  return buf;
}

void check_regular(const std::string& path, const struct stat& st, uint64_t limit, const std::string& what) {
  if (!S_ISREG(st.st_mode))
    throw UsageError(what + " '" + path + "' is not a regular file" +
                     (S_ISDIR(st.st_mode)    ? " (a directory)"
                      : S_ISFIFO(st.st_mode) ? " (a FIFO)"
                      : S_ISCHR(st.st_mode)  ? " (a device)"
                                             : ""));
  if (static_cast<uint64_t>(st.st_size) > limit)
    throw UsageError(what + " '" + path + "' is " + bytes(static_cast<uint64_t>(st.st_size)) +
                     ", more than the limit of " + bytes(limit));
}

}  // namespace

bool path_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

bool is_directory(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

void make_dirs(const std::string& path) {
  std::string cur;
  std::stringstream ss(path);
  std::string part;
  if (!path.empty() && path[0] == '/') cur = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    cur += part + "/";
    if (::mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST)
      throw UsageError("cannot create directory '" + cur + "': " + error_text());
  }
  if (!is_directory(path)) throw UsageError("'" + path + "' exists and is not a directory");
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return names;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

void remove_tree(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    for (const auto& n : list_dir(path)) remove_tree(path + "/" + n);
    ::rmdir(path.c_str());
  } else {
    ::unlink(path.c_str());
  }
}

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

std::string parent_dir(const std::string& path) {
  auto pos = path.find_last_of('/');
  return pos == std::string::npos ? "." : (pos == 0 ? "/" : path.substr(0, pos));
}

std::string absolute_path(const std::string& path) {
  char buf[PATH_MAX];
  if (!::realpath(path.c_str(), buf)) throw UsageError("cannot resolve '" + path + "': " + error_text());
  return buf;
}

void write_file_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "wbe");
  if (!f) throw std::runtime_error("cannot write '" + tmp + "': " + error_text());
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = std::fflush(f) == 0 && ok;
  ok = ::fsync(fileno(f)) == 0 && ok;
  ok = std::fclose(f) == 0 && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string reason = error_text();
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot write '" + path + "': " + reason);
  }
}

uint64_t regular_file_size(const std::string& path, uint64_t limit, const std::string& what) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw UsageError("cannot read " + what + " '" + path + "': " + error_text());
  check_regular(path, st, limit, what);
  return static_cast<uint64_t>(st.st_size);
}

void read_regular_file(const std::string& path, uint64_t limit, const std::string& what,
                       const std::function<char*(uint64_t)>& alloc) {
  regular_file_size(path, limit, what);
  // O_NONBLOCK: if the path was replaced by a FIFO since, open does not wait for a writer.
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (fd.get() < 0) throw UsageError("cannot read " + what + " '" + path + "': " + error_text());
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) throw UsageError("cannot read " + what + " '" + path + "': " + error_text());
  check_regular(path, st, limit, what);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  char* out = alloc(size);
  uint64_t done = 0;
  while (done < size) {
    const ssize_t r = ::read(fd.get(), out + done, static_cast<size_t>(std::min<uint64_t>(size - done, 1u << 30)));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw UsageError("error reading " + what + " '" + path + "': " + error_text());
    if (r == 0) throw UsageError(what + " '" + path + "' shrank while it was read");
    done += static_cast<uint64_t>(r);
  }
}

std::string read_text(const std::string& path, uint64_t limit, const std::string& what) {
  std::string text;
  read_regular_file(path, limit, what, [&](uint64_t n) {
    text.resize(static_cast<size_t>(n));
    return &text[0];
  });
  return text;
}

std::string file_checksum(const std::string& path) {
  regular_file_size(path, kMaxTensorFileBytes, "checkpoint file");
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (fd.get() < 0) throw UsageError("cannot read '" + path + "': " + error_text());
  uint64_t h = 0xcbf29ce484222325ull;
  std::vector<unsigned char> buf(1 << 16);  // 64 KiB reads: as fast as larger ones, no large zeroed allocation per file
  for (;;) {
    const ssize_t r = ::read(fd.get(), buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw UsageError("error reading '" + path + "': " + error_text());
    if (r == 0) break;
    for (ssize_t i = 0; i < r; ++i) {
      h ^= buf[static_cast<size_t>(i)];
      h *= 0x100000001b3ull;
    }
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

RunLock::RunLock(const std::string& dir) {
  const std::string path = dir + "/.lock";
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd_ < 0) throw UsageError("cannot open the lock file '" + path + "': " + error_text());
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[64] = {0};
    const ssize_t r = ::pread(fd_, buf, sizeof buf - 1, 0);
    std::string holder = r > 0 ? std::string(buf, static_cast<size_t>(r)) : "";
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK)
      throw UsageError("run directory '" + dir + "' is in use by another colt5 process" +
                       (holder.empty() ? "" : " (pid " + holder + ")") +
                       "; wait for it to finish or choose another --out");
    throw UsageError("cannot lock '" + path + "': " + std::strerror(err));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) == 0) {
    if (::pwrite(fd_, pid.data(), pid.size(), 0) < 0) {
      // The pid is informational only; the lock itself is held.
    }
  }
}

RunLock::~RunLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

}  // namespace app
}  // namespace colt5
