// The safetensors container format without any tensor library: validating
// parser of the header and serializer. Layout: 8-byte little-endian header
// length N, N bytes of JSON header, then the byte buffer that the header's
// data_offsets index into.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace colt5 {
namespace safetensors {

// Every failure of parsing or serializing; the message names the problem and,
// where there is one, the tensor.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Dtype { F64, F32, F16, BF16, I64, I32, I8, U8, BOOL };

size_t dtype_size(Dtype dtype);
const char* dtype_name(Dtype dtype);
// False when `name` is not one of the supported dtypes.
bool dtype_from_name(const std::string& name, Dtype& dtype);

// Headers longer than this are rejected before anything is allocated.
constexpr uint64_t kMaxHeaderLength = 100u * 1000u * 1000u;

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<int64_t> shape;
  // Byte range [begin, end) within the byte buffer (after the header).
  uint64_t begin = 0;
  uint64_t end = 0;

  uint64_t nbytes() const { return end - begin; }
};

struct Header {
  // Sorted by data offset, so in the order of the byte buffer.
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
  // Offset of the byte buffer from the start of the file: 8 + N.
  uint64_t data_start = 0;
  // Size of the byte buffer; equals the end of the last tensor.
  uint64_t data_size = 0;
};

// Number of elements of `shape`; throws FormatError on negative entries or
// when the byte size (elements x element size) does not fit in 64 bits.
uint64_t checked_nbytes(const std::vector<int64_t>& shape, Dtype dtype, const std::string& name);

// Validates the first 8 bytes of a file of `file_size` bytes and returns N.
uint64_t parse_header_length(const uint8_t* first8, uint64_t file_size);

// Parses and validates the JSON header of a file whose byte buffer has
// `data_size` bytes: every field, dtype and shape, and that the tensors tile
// the buffer exactly (no overlaps, no holes, nothing past its end).
Header parse_header_json(const char* json, size_t length, uint64_t data_size);

// Both steps on a whole in-memory file.
Header parse(const uint8_t* data, size_t size);

// Assigns consecutive data offsets to `tensors` in their order (from their
// dtype and shape) and returns the 8-byte length plus the JSON header, padded
// with spaces to a multiple of 8 bytes. Names must be unique and not
// "__metadata__". The byte buffer to append is the tensors' bytes in order.
std::string serialize_header(std::vector<TensorInfo>& tensors, const std::map<std::string, std::string>& metadata);

}  // namespace safetensors
}  // namespace colt5
