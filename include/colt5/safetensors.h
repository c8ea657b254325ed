// Reading and writing safetensors files (https://github.com/huggingface/safetensors
// format: 8-byte little-endian header length, JSON header, raw little-endian data).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace colt5 {

// Tensors in file order plus the `__metadata__` strings.
struct SafetensorsData {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::map<std::string, std::string> metadata;

  // The tensor of that name; throws c10::Error naming it if absent.
  const at::Tensor& at(const std::string& name) const;
  bool contains(const std::string& name) const;
};

// Reads a whole file. Throws c10::Error with the path and the reason for any
// malformed input (truncated, bad header, bad offsets, unknown dtype, ...).
SafetensorsData load_safetensors(const std::string& path);

// Parses an in-memory file; the tensors own copies of their data.
SafetensorsData parse_safetensors(const uint8_t* data, size_t size);

// Writes CPU or CUDA tensors of dtype F64, F32, F16, BF16, I64, I32, I8, U8 or
// BOOL (any layout; written contiguous) atomically: a temporary file in the
// same directory, flushed, then renamed over `path`. Names must be unique and
// must not be "__metadata__".
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace colt5
