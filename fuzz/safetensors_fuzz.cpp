// libFuzzer target for the safetensors parser (no torch). Every input must
// either be rejected with FormatError or be accepted with ranges inside the
// input, and then survive a serialize -> parse round trip unchanged.
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <string>
#include <vector>

#include "io/safetensors_format.h"

namespace st = colt5::safetensors;

static void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  st::Header h;
  try {
    h = st::parse(data, size);
  } catch (const st::FormatError&) {
    return 0;
  }
  require(h.data_start + h.data_size == size, "buffer does not end the input");
  uint64_t pos = 0;
  for (const auto& t : h.tensors) {
    require(t.begin == pos && t.begin <= t.end && t.end <= h.data_size, "tensor ranges do not tile the buffer");
    require(st::checked_nbytes(t.shape, t.dtype, t.name) == t.nbytes(), "byte size mismatch");
    pos = t.end;
  }

  std::vector<st::TensorInfo> copy = h.tensors;
  const std::string bytes = st::serialize_header(copy, h.metadata);
  require(bytes.size() % 8 == 0, "header not padded to 8 bytes");
  st::Header again;
  try {
    const uint64_t n =
        st::parse_header_length(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size() + h.data_size);
    require(n + 8 == bytes.size(), "serialized header length");
    again = st::parse_header_json(bytes.data() + 8, n, h.data_size);
  } catch (const st::FormatError& e) {
    std::fprintf(stderr, "reparse failed: %s\n", e.what());
    std::abort();
  }
  require(again.metadata == h.metadata, "metadata changed in the round trip");
  require(again.tensors.size() == h.tensors.size(), "tensor count changed in the round trip");
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const auto& a = h.tensors[i];
    const auto& b = again.tensors[i];
    require(a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.begin == b.begin && a.end == b.end,
            "tensor changed in the round trip");
  }
  return 0;
}
