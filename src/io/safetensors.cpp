#include "colt5/safetensors.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>

#include "io/safetensors_format.h"

// The byte buffer holds little-endian values, copied as they are.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

namespace colt5 {

namespace st = safetensors;

namespace {

at::ScalarType scalar_type_of(st::Dtype dtype) {
  switch (dtype) {
    case st::Dtype::F64:
      return at::kDouble;
    case st::Dtype::F32:
      return at::kFloat;
    case st::Dtype::F16:
      return at::kHalf;
    case st::Dtype::BF16:
      return at::kBFloat16;
    case st::Dtype::I64:
      return at::kLong;
    case st::Dtype::I32:
      return at::kInt;
    case st::Dtype::I8:
      return at::kChar;
    case st::Dtype::U8:
      return at::kByte;
    case st::Dtype::BOOL:
      return at::kBool;
  }
  TORCH_CHECK(false, "invalid safetensors dtype");
}

bool dtype_of(at::ScalarType type, st::Dtype& dtype) {
  switch (type) {
    case at::kDouble:
      dtype = st::Dtype::F64;
      return true;
    case at::kFloat:
      dtype = st::Dtype::F32;
      return true;
    case at::kHalf:
      dtype = st::Dtype::F16;
      return true;
    case at::kBFloat16:
      dtype = st::Dtype::BF16;
      return true;
    case at::kLong:
      dtype = st::Dtype::I64;
      return true;
    case at::kInt:
      dtype = st::Dtype::I32;
      return true;
    case at::kChar:
      dtype = st::Dtype::I8;
      return true;
    case at::kByte:
      dtype = st::Dtype::U8;
      return true;
    case at::kBool:
      dtype = st::Dtype::BOOL;
      return true;
    default:
      return false;
  }
}

// Runs f, turning format errors into c10::Error prefixed with `where`.
template <typename F>
auto with_context(const std::string& where, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const st::FormatError& e) {
    TORCH_CHECK(false, where, e.what());
  }
}

// BOOL bytes are read as U8 and normalised, since a bool tensor holding
// anything but 0 or 1 is invalid.
at::Tensor empty_for(const st::TensorInfo& info) {
  const at::ScalarType type = info.dtype == st::Dtype::BOOL ? at::kByte : scalar_type_of(info.dtype);
  return at::empty(info.shape, at::TensorOptions().dtype(type));
}

at::Tensor finish(at::Tensor t, const st::TensorInfo& info) { return info.dtype == st::Dtype::BOOL ? t.ne(0) : t; }

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Reads exactly n bytes at offset; false at a premature end of file.
bool pread_all(int fd, void* buf, uint64_t n, uint64_t offset, std::string& error) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, 1u << 30));
    const ssize_t r = ::pread(fd, p, chunk, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      error = std::strerror(errno);
      return false;
    }
    if (r == 0) {
      error = "unexpected end of file (was it modified while being read?)";
      return false;
    }
    p += r;
    n -= static_cast<uint64_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return true;
}

bool write_all(int fd, const void* buf, uint64_t n) {
  auto* p = static_cast<const char*>(buf);
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, 1u << 30));
    const ssize_t r = ::write(fd, p, chunk);
    if (r < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += r;
    n -= static_cast<uint64_t>(r);
  }
  return true;
}

std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// A file created next to the target and removed again unless committed.
class TempFile {
 public:
  explicit TempFile(const std::string& target) {
    thread_local std::mt19937_64 rng(std::random_device{}() ^ (static_cast<uint64_t>(::getpid()) << 32));
    for (int attempt = 0; attempt < 100; ++attempt) {
      char suffix[32];
      std::snprintf(suffix, sizeof(suffix), ".%016llx.tmp", static_cast<unsigned long long>(rng()));
      path_ = target + suffix;
      fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ >= 0 || errno != EEXIST) break;
    }
    TORCH_CHECK(fd_ >= 0, "save_safetensors('", target, "'): cannot create temporary file '", path_,
                "': ", std::strerror(errno));
  }
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(path_.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  int close() {
    const int r = ::close(fd_);
    fd_ = -1;
    return r;
  }
  void commit() { committed_ = true; }

 private:
  std::string path_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace

const at::Tensor& SafetensorsData::at(const std::string& name) const {
  for (const auto& kv : tensors)
    if (kv.first == name) return kv.second;
  TORCH_CHECK(false, "safetensors data has no tensor named '", name, "'");
}

bool SafetensorsData::contains(const std::string& name) const {
  for (const auto& kv : tensors)
    if (kv.first == name) return true;
  return false;
}

SafetensorsData load_safetensors(const std::string& path) {
  const std::string where = "safetensors file '" + path + "': ";
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  TORCH_CHECK(fd.get() >= 0, where, "cannot open: ", std::strerror(errno));
  struct stat info {};
  TORCH_CHECK(::fstat(fd.get(), &info) == 0, where, "cannot stat: ", std::strerror(errno));
  TORCH_CHECK(S_ISREG(info.st_mode), where, "not a regular file");
  const uint64_t size = static_cast<uint64_t>(info.st_size);

  std::string error;
  uint8_t first8[8] = {};
  if (size >= 8) TORCH_CHECK(pread_all(fd.get(), first8, 8, 0, error), where, "cannot read: ", error);
  const uint64_t n = with_context(where, [&] { return st::parse_header_length(first8, size); });
  std::string json(static_cast<size_t>(n), '\0');
  TORCH_CHECK(pread_all(fd.get(), &json[0], n, 8, error), where, "cannot read the header: ", error);
  const st::Header header = with_context(where, [&] { return st::parse_header_json(json.data(), n, size - 8 - n); });

  SafetensorsData out;
  out.metadata = header.metadata;
  out.tensors.reserve(header.tensors.size());
  for (const auto& t : header.tensors) {
    at::Tensor tensor = empty_for(t);
    TORCH_CHECK(pread_all(fd.get(), tensor.data_ptr(), t.nbytes(), 8 + n + t.begin, error), where,
                "cannot read tensor '", t.name, "': ", error);
    out.tensors.emplace_back(t.name, finish(std::move(tensor), t));
  }
  return out;
}

SafetensorsData parse_safetensors(const uint8_t* data, size_t size) {
  const st::Header header = with_context("safetensors data: ", [&] { return st::parse(data, size); });
  SafetensorsData out;
  out.metadata = header.metadata;
  out.tensors.reserve(header.tensors.size());
  for (const auto& t : header.tensors) {
    at::Tensor tensor = empty_for(t);
    if (t.nbytes() > 0) std::memcpy(tensor.data_ptr(), data + header.data_start + t.begin, t.nbytes());
    out.tensors.emplace_back(t.name, finish(std::move(tensor), t));
  }
  return out;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  const std::string where = "save_safetensors('" + path + "'): ";
  std::vector<st::TensorInfo> infos;
  std::vector<at::Tensor> dense;
  infos.reserve(tensors.size());
  dense.reserve(tensors.size());
  // Everything is validated and converted before the temporary file exists.
  for (const auto& kv : tensors) {
    const at::Tensor& t = kv.second;
    TORCH_CHECK(t.defined(), where, "tensor '", kv.first, "' is undefined");
    st::TensorInfo info;
    info.name = kv.first;
    TORCH_CHECK(dtype_of(t.scalar_type(), info.dtype), where, "tensor '", kv.first, "' has unsupported dtype ",
                t.scalar_type(), " (supported: F64, F32, F16, BF16, I64, I32, I8, U8, BOOL)");
    at::Tensor c = t.layout() == at::kStrided ? t : t.to_dense();
    c = c.to(at::kCPU).resolve_neg().contiguous();
    info.shape = c.sizes().vec();
    infos.push_back(std::move(info));
    dense.push_back(std::move(c));
  }
  const std::string header = with_context(where, [&] { return st::serialize_header(infos, metadata); });

  TempFile tmp(path);
  auto check = [&](bool ok, const char* what) {
    TORCH_CHECK(ok, where, what, " '", tmp.path(), "': ", std::strerror(errno));
  };
  check(write_all(tmp.fd(), header.data(), header.size()), "cannot write");
  for (size_t i = 0; i < dense.size(); ++i)
    if (infos[i].nbytes() > 0) check(write_all(tmp.fd(), dense[i].data_ptr(), infos[i].nbytes()), "cannot write");
  check(::fsync(tmp.fd()) == 0, "cannot flush");
  check(tmp.close() == 0, "cannot close");
  TORCH_CHECK(::rename(tmp.path().c_str(), path.c_str()) == 0, where, "cannot rename '", tmp.path(),
              "' over it: ", std::strerror(errno));
  tmp.commit();
  // Makes the rename itself durable; the data is already safe, so failure here is not an error.
  Fd dir(::open(parent_dir(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.get() >= 0) ::fsync(dir.get());
}

}  // namespace colt5
