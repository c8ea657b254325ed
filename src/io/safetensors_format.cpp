#include "io/safetensors_format.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <limits>
#include <set>
#include <sstream>
#include <utility>

namespace colt5 {
namespace safetensors {

namespace {

using Json = nlohmann::ordered_json;

struct DtypeEntry {
  Dtype dtype;
  const char* name;
  size_t size;
};

constexpr DtypeEntry kDtypes[] = {
    {Dtype::F64, "F64", 8},   {Dtype::F32, "F32", 4}, {Dtype::F16, "F16", 2},
    {Dtype::BF16, "BF16", 2}, {Dtype::I64, "I64", 8}, {Dtype::I32, "I32", 4},
    {Dtype::I8, "I8", 1},     {Dtype::U8, "U8", 1},   {Dtype::BOOL, "BOOL", 1},
};

const DtypeEntry& entry_of(Dtype dtype) {
  for (const auto& e : kDtypes)
    if (e.dtype == dtype) return e;
  throw FormatError("invalid dtype value " + std::to_string(static_cast<int>(dtype)));
}

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  throw FormatError(out.str());
}

const char* type_name(const Json& v) { return v.type_name(); }

// A JSON value that must be a non-negative integer no larger than `max`.
uint64_t as_count(const Json& v, uint64_t max, const std::string& tensor, const char* what) {
  if (v.is_number_unsigned()) {
    const uint64_t x = v.get<uint64_t>();
    if (x > max) fail("tensor '", tensor, "': ", what, " ", x, " is too large");
    return x;
  }
  if (v.is_number_integer()) fail("tensor '", tensor, "': ", what, " ", v.get<int64_t>(), " is negative");
  if (v.is_number_float()) fail("tensor '", tensor, "': ", what, " is not an integer");
  fail("tensor '", tensor, "': ", what, " is a JSON ", type_name(v), ", expected an integer");
}

const Json& field(const Json& entry, const char* key, const std::string& tensor) {
  auto it = entry.find(key);
  if (it == entry.end()) fail("tensor '", tensor, "': missing field \"", key, "\"");
  return *it;
}

TensorInfo parse_tensor(const std::string& name, const Json& entry, uint64_t data_size) {
  if (!entry.is_object()) fail("tensor '", name, "': entry is a JSON ", type_name(entry), ", expected an object");
  TensorInfo info;
  info.name = name;

  const Json& dtype = field(entry, "dtype", name);
  if (!dtype.is_string()) fail("tensor '", name, "': \"dtype\" is a JSON ", type_name(dtype), ", expected a string");
  const auto& dtype_str = dtype.get_ref<const std::string&>();
  if (!dtype_from_name(dtype_str, info.dtype))
    fail("tensor '", name, "': unsupported dtype \"", dtype_str,
         "\" (supported: F64, F32, F16, BF16, I64, I32, I8, U8, BOOL)");

  const Json& shape = field(entry, "shape", name);
  if (!shape.is_array()) fail("tensor '", name, "': \"shape\" is a JSON ", type_name(shape), ", expected an array");
  info.shape.reserve(shape.size());
  for (const Json& dim : shape)
    info.shape.push_back(static_cast<int64_t>(
        as_count(dim, static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), name, "shape entry")));

  const Json& offsets = field(entry, "data_offsets", name);
  if (!offsets.is_array() || offsets.size() != 2)
    fail("tensor '", name, "': \"data_offsets\" must be an array of two integers [begin, end]");
  const uint64_t any = std::numeric_limits<uint64_t>::max();
  info.begin = as_count(offsets[0], any, name, "data offset begin");
  info.end = as_count(offsets[1], any, name, "data offset end");
  if (info.begin > info.end) fail("tensor '", name, "': data_offsets begin ", info.begin, " is after end ", info.end);
  if (info.end > data_size)
    fail("tensor '", name, "': data_offsets [", info.begin, ", ", info.end, "] go past the end of the byte buffer (",
         data_size, " bytes)");

  const uint64_t expected = checked_nbytes(info.shape, info.dtype, name);
  if (expected != info.nbytes())
    fail("tensor '", name, "': data_offsets span ", info.nbytes(), " bytes but dtype ", dtype_str, " and shape need ",
         expected);
  return info;
}

std::map<std::string, std::string> parse_metadata(const Json& v) {
  std::map<std::string, std::string> metadata;
  if (v.is_null()) return metadata;
  if (!v.is_object()) fail("\"__metadata__\" is a JSON ", type_name(v), ", expected an object of strings");
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (!it.value().is_string())
      fail("\"__metadata__\" value of key '", it.key(), "' is a JSON ", type_name(it.value()), ", expected a string");
    metadata.emplace(it.key(), it.value().get<std::string>());
  }
  return metadata;
}

}  // namespace

size_t dtype_size(Dtype dtype) { return entry_of(dtype).size; }

const char* dtype_name(Dtype dtype) { return entry_of(dtype).name; }

bool dtype_from_name(const std::string& name, Dtype& dtype) {
  for (const auto& e : kDtypes) {
    if (name == e.name) {
      dtype = e.dtype;
      return true;
    }
  }
  return false;
}

uint64_t checked_nbytes(const std::vector<int64_t>& shape, Dtype dtype, const std::string& name) {
  uint64_t count = 1;
  bool overflow = false;
  for (int64_t d : shape) {
    if (d < 0) fail("tensor '", name, "': negative shape entry ", d);
    if (d == 0) return 0;  // no elements, whatever the other entries are
    overflow = overflow || __builtin_mul_overflow(count, static_cast<uint64_t>(d), &count);
  }
  uint64_t bytes = 0;
  if (overflow || __builtin_mul_overflow(count, static_cast<uint64_t>(dtype_size(dtype)), &bytes))
    fail("tensor '", name, "': the byte size of its shape overflows 64 bits");
  return bytes;
}

uint64_t parse_header_length(const uint8_t* first8, uint64_t file_size) {
  if (file_size < 8) fail("file is ", file_size, " bytes, shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | first8[i];
  if (n > kMaxHeaderLength) fail("header length ", n, " exceeds the limit of ", kMaxHeaderLength, " bytes");
  if (n > file_size - 8)
    fail("header length ", n, " goes past the end of the file (", file_size, " bytes, ", file_size - 8,
         " after the length)");
  return n;
}

Header parse_header_json(const char* json, size_t length, uint64_t data_size) {
  // The default parser keeps the last of duplicate keys; the callback sees every
  // key and rejects repeats in each object.
  std::vector<std::set<std::string>> keys;
  const Json::parser_callback_t on_event = [&keys](int, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        keys.pop_back();
        break;
      case Json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!keys.back().insert(key).second) {
          if (keys.size() == 1 && key != "__metadata__") fail("duplicate tensor name '", key, "' in the header");
          fail("duplicate key \"", key, "\" in the header");
        }
        break;
      }
      default:
        break;
    }
    return true;
  };

  Json root;
  try {
    root = Json::parse(json, json + length, on_event);
  } catch (const Json::exception& e) {
    fail("header is not valid JSON: ", e.what());
  }
  if (!root.is_object()) fail("header is a JSON ", type_name(root), ", expected an object");

  Header header;
  header.data_size = data_size;
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__")
      header.metadata = parse_metadata(it.value());
    else
      header.tensors.push_back(parse_tensor(it.key(), it.value(), data_size));
  }

  auto& ts = header.tensors;
  std::stable_sort(ts.begin(), ts.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].begin < pos) fail("tensors '", ts[i - 1].name, "' and '", ts[i].name, "' overlap in the byte buffer");
    if (ts[i].begin > pos)
      fail("bytes [", pos, ", ", ts[i].begin, ") of the byte buffer belong to no tensor (hole before '", ts[i].name,
           "')");
    pos = ts[i].end;
  }
  if (pos != data_size)
    fail("byte buffer has ", data_size, " bytes but the tensors cover only ", pos, " (trailing bytes)");
  return header;
}

Header parse(const uint8_t* data, size_t size) {
  const uint64_t n = parse_header_length(data, size);
  Header header = parse_header_json(reinterpret_cast<const char*>(data) + 8, n, size - 8 - n);
  header.data_start = 8 + n;
  return header;
}

std::string serialize_header(std::vector<TensorInfo>& tensors, const std::map<std::string, std::string>& metadata) {
  Json root = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& kv : metadata) meta[kv.first] = kv.second;
    root["__metadata__"] = std::move(meta);
  }
  std::set<std::string> names;
  uint64_t pos = 0;
  for (auto& t : tensors) {
    if (t.name == "__metadata__") fail("tensor name \"__metadata__\" is reserved");
    if (!names.insert(t.name).second) fail("duplicate tensor name '", t.name, "'");
    const uint64_t bytes = checked_nbytes(t.shape, t.dtype, t.name);
    t.begin = pos;
    if (__builtin_add_overflow(pos, bytes, &t.end)) fail("total byte size overflows 64 bits");
    pos = t.end;
    root[t.name] = Json{{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }

  std::string json;
  try {
    json = root.dump();
  } catch (const Json::exception& e) {
    fail("cannot write the header (names and metadata must be UTF-8): ", e.what());
  }
  json.append((8 - json.size() % 8) % 8, ' ');

  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += json;
  return out;
}

}  // namespace safetensors
}  // namespace colt5
