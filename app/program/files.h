// File system functions of the `colt5` program: bounded reads of regular files,
// atomic text writes, directory listing and removal, checksums, and the
// advisory lock that keeps two processes out of one run directory.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace colt5 {
namespace app {

// Size limits of the inputs the program reads.
constexpr uint64_t kMaxJsonBytes = uint64_t{1} << 20;  // config.json, state.json, the completion marker
constexpr uint64_t kMaxTextBytes = uint64_t{4} << 30;  // --data
constexpr uint64_t kMaxMetricsBytes = uint64_t{256} << 20;
constexpr uint64_t kMaxTensorFileBytes = uint64_t{256} << 30;

bool path_exists(const std::string& p);
bool is_directory(const std::string& p);
void make_dirs(const std::string& path);
// Names in dir (without . and ..), sorted; empty when dir cannot be read.
std::vector<std::string> list_dir(const std::string& dir);
void remove_tree(const std::string& path);
void fsync_path(const std::string& path);
std::string parent_dir(const std::string& path);
// The absolute, symlink-free form of an existing path (UsageError when it does not exist).
std::string absolute_path(const std::string& path);

// Writes `text` to path through a temporary file in the same directory, fsync and a rename.
void write_file_atomic(const std::string& path, const std::string& text);

// Size of `path`, which must be a regular file (symlinks followed) of at most
// `limit` bytes; otherwise UsageError naming the path and `what` it was read as.
uint64_t regular_file_size(const std::string& path, uint64_t limit, const std::string& what);

// Reads a regular file of at most `limit` bytes. Never blocks on FIFOs or
// devices: they are refused. `alloc(n)` gives the buffer for the n bytes.
void read_regular_file(const std::string& path, uint64_t limit, const std::string& what,
                       const std::function<char*(uint64_t)>& alloc);
std::string read_text(const std::string& path, uint64_t limit, const std::string& what);

// 64-bit FNV-1a of the file's bytes, as 16 hex digits.
std::string file_checksum(const std::string& path);

// An exclusive advisory lock (flock) on DIR/.lock, held until destruction or
// process exit. A lock file left by a crashed process is not held by anyone,
// so it is simply taken over. Throws UsageError naming the holder's pid when
// another process holds it.
class RunLock {
 public:
  explicit RunLock(const std::string& dir);
  ~RunLock();
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace app
}  // namespace colt5
