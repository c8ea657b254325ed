#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "colt5/safetensors.h"

using colt5::load_safetensors;
using colt5::parse_safetensors;
using colt5::SafetensorsData;
using colt5::save_safetensors;

namespace {

// Names in a directory, sorted. (POSIX calls rather than std::filesystem,
// whose symbols LibTorch also exports, with a different ABI.)
std::vector<std::string> list_dir(const std::string& path) {
  std::vector<std::string> names;
  DIR* d = ::opendir(path.c_str());
  if (d == nullptr) throw std::runtime_error("cannot list " + path);
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

void remove_tree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    for (const auto& name : list_dir(path)) remove_tree(path + "/" + name);
    ::rmdir(path.c_str());
  } else {
    ::unlink(path.c_str());
  }
}

void make_dir(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) != 0) throw std::runtime_error("cannot create " + path);
}

// A fresh directory, removed with its contents at the end of the test.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/colt5_safetensors_XXXXXX";
    if (::mkdtemp(&tmpl[0]) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() { remove_tree(path_); }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  std::vector<std::string> entries() const { return list_dir(path_); }

 private:
  std::string path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A file from a raw JSON header (written as given, no padding) and a byte buffer.
std::string make_file(const std::string& header, const std::string& buffer = "") {
  return le64(header.size()) + header + buffer;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "<no error>";
}

// Malformed bytes must be rejected both from a file (message names the path)
// and from memory, with a message containing `problem`.
void expect_rejected(const std::string& bytes, const std::string& problem) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  write_bytes(path, bytes);
  const std::string from_file = error_of([&] { load_safetensors(path); });
  EXPECT_NE(from_file.find(path), std::string::npos) << from_file;
  EXPECT_NE(from_file.find(problem), std::string::npos) << "expected '" << problem << "' in: " << from_file;
  const std::string from_memory =
      error_of([&] { parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()); });
  EXPECT_NE(from_memory.find(problem), std::string::npos) << "expected '" << problem << "' in: " << from_memory;
}

const std::string kEightBytes(8, '\0');

std::vector<std::pair<std::string, torch::Tensor>> every_dtype() {
  torch::manual_seed(0);
  return {
      {"f64", torch::randn({3, 4}, torch::kDouble)},
      {"f32", torch::randn({5}, torch::kFloat)},
      {"f16", torch::randn({2, 3}, torch::kHalf)},
      {"bf16", torch::randn({2, 2, 2}, torch::kBFloat16)},
      {"i64", torch::randint(-1000000000000LL, 1000000000000LL, {7}, torch::kLong)},
      {"i32", torch::randint(-100000, 100000, {3, 1}, torch::kInt)},
      {"i8", torch::randint(-128, 128, {9}, torch::kChar)},
      {"u8", torch::randint(0, 256, {4, 4}, torch::kByte)},
      {"bool", torch::randint(0, 2, {6}, torch::kLong).to(torch::kBool)},
  };
}

void expect_same(const std::vector<std::pair<std::string, torch::Tensor>>& expected, const SafetensorsData& got) {
  ASSERT_EQ(got.tensors.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    SCOPED_TRACE(expected[i].first);
    EXPECT_EQ(got.tensors[i].first, expected[i].first);
    const torch::Tensor& a = expected[i].second;
    const torch::Tensor& b = got.tensors[i].second;
    EXPECT_EQ(b.scalar_type(), a.scalar_type());
    EXPECT_EQ(b.sizes(), a.sizes());
    EXPECT_TRUE(b.device().is_cpu());
    EXPECT_TRUE(torch::equal(b, a.cpu()));
  }
}

}  // namespace

// ------------------------------------------------------------ round trips

TEST(SafetensorsRoundTrip, EveryDtype) {
  TempDir dir;
  const auto tensors = every_dtype();
  save_safetensors(dir.file("all.safetensors"), tensors);
  expect_same(tensors, load_safetensors(dir.file("all.safetensors")));
}

TEST(SafetensorsRoundTrip, EmptyAndScalarTensors) {
  TempDir dir;
  std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      {"scalar_f64", torch::tensor(3.25, torch::kDouble)},
      {"empty_f32", torch::empty({0}, torch::kFloat)},
      {"scalar_bool", torch::tensor(true)},
      {"empty_3d_i64", torch::empty({3, 0, 2}, torch::kLong)},
      {"scalar_i8", torch::tensor(-5, torch::kChar)},
      {"after_empty", torch::arange(4, torch::kInt)},
  };
  save_safetensors(dir.file("e.safetensors"), tensors);
  const auto loaded = load_safetensors(dir.file("e.safetensors"));
  expect_same(tensors, loaded);
  EXPECT_EQ(loaded.at("scalar_f64").dim(), 0);
  EXPECT_EQ(loaded.at("scalar_f64").item<double>(), 3.25);
  EXPECT_EQ(loaded.at("empty_3d_i64").numel(), 0);
}

TEST(SafetensorsRoundTrip, NoTensors) {
  TempDir dir;
  save_safetensors(dir.file("none.safetensors"), {}, {{"k", "v"}});
  const auto loaded = load_safetensors(dir.file("none.safetensors"));
  EXPECT_TRUE(loaded.tensors.empty());
  EXPECT_EQ(loaded.metadata.at("k"), "v");
}

TEST(SafetensorsRoundTrip, NonContiguousInput) {
  TempDir dir;
  torch::manual_seed(1);
  const auto base = torch::randn({6, 8}, torch::kDouble);
  std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      {"transposed", base.t()},
      {"strided", base.index({torch::indexing::Slice(1, torch::indexing::None, 2),
                              torch::indexing::Slice(torch::indexing::None, torch::indexing::None, 3)})},
      {"expanded", torch::arange(3, torch::kInt).unsqueeze(0).expand({4, 3})},
      {"offset_view", base.select(0, 5)},
  };
  ASSERT_FALSE(tensors[0].second.is_contiguous());
  ASSERT_FALSE(tensors[1].second.is_contiguous());
  ASSERT_FALSE(tensors[2].second.is_contiguous());
  save_safetensors(dir.file("nc.safetensors"), tensors);
  const auto loaded = load_safetensors(dir.file("nc.safetensors"));
  expect_same(tensors, loaded);
  EXPECT_TRUE(loaded.at("transposed").is_contiguous());
}

TEST(SafetensorsRoundTrip, SparseInputIsWrittenDense) {
  TempDir dir;
  const auto dense = torch::tensor({{0.0, 2.0, 0.0}, {1.0, 0.0, 0.0}}, torch::kFloat);
  save_safetensors(dir.file("s.safetensors"), {{"sparse", dense.to_sparse()}});
  EXPECT_TRUE(torch::equal(load_safetensors(dir.file("s.safetensors")).at("sparse"), dense));
}

TEST(SafetensorsRoundTrip, Metadata) {
  TempDir dir;
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"config", R"({"dim": 32, "heads": [1, 2]})"},
      {"quotes \" and \\ and\nnewline", "tab\there"},
      {"unicode", "caf\xc3\xa9 \xe2\x88\x91"},
      {"empty", ""},
  };
  save_safetensors(dir.file("m.safetensors"), {{"x", torch::ones({2})}}, metadata);
  const auto loaded = load_safetensors(dir.file("m.safetensors"));
  EXPECT_EQ(loaded.metadata, metadata);
  EXPECT_TRUE(torch::equal(loaded.at("x"), torch::ones({2})));
}

TEST(SafetensorsRoundTrip, ParseMatchesLoad) {
  TempDir dir;
  const auto tensors = every_dtype();
  save_safetensors(dir.file("p.safetensors"), tensors, {{"a", "b"}});
  const std::string bytes = read_bytes(dir.file("p.safetensors"));
  const auto parsed = parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  expect_same(tensors, parsed);
  EXPECT_EQ(parsed.metadata.at("a"), "b");
}

TEST(SafetensorsRoundTrip, FileLayout) {
  TempDir dir;
  save_safetensors(dir.file("l.safetensors"),
                   {{"a", torch::ones({3}, torch::kFloat)}, {"b", torch::zeros({1}, torch::kByte)}}, {{"k", "v"}});
  const std::string bytes = read_bytes(dir.file("l.safetensors"));
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + 12 + 1);
  const auto header = nlohmann::json::parse(bytes.substr(8, n));  // trailing padding is whitespace
  EXPECT_EQ(header["a"]["dtype"], "F32");
  EXPECT_EQ(header["a"]["shape"], nlohmann::json::array({3}));
  EXPECT_EQ(header["a"]["data_offsets"], nlohmann::json::array({0, 12}));
  EXPECT_EQ(header["b"]["dtype"], "U8");
  EXPECT_EQ(header["b"]["data_offsets"], nlohmann::json::array({12, 13}));
  EXPECT_EQ(header["__metadata__"]["k"], "v");
}

TEST(SafetensorsRoundTrip, BoolBytesAreNormalised) {
  const std::string bytes =
      make_file(R"({"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})", std::string("\x00\x07\x01", 3));
  const auto data = parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  EXPECT_TRUE(torch::equal(data.at("m"), torch::tensor({false, true, true})));
}

TEST(SafetensorsRoundTrip, TensorsInBufferOrder) {
  // Header order differs from data order: the result follows the data.
  const std::string bytes = make_file(
      R"({"second":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"first":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
      "\x05\x06");
  const auto data = parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  ASSERT_EQ(data.tensors.size(), 2u);
  EXPECT_EQ(data.tensors[0].first, "first");
  EXPECT_EQ(data.tensors[0].second.item<uint8_t>(), 5);
  EXPECT_EQ(data.tensors[1].first, "second");
}

TEST(SafetensorsDataAccess, AtAndContains) {
  SafetensorsData d;
  d.tensors.emplace_back("w", torch::ones({1}));
  EXPECT_TRUE(d.contains("w"));
  EXPECT_FALSE(d.contains("v"));
  EXPECT_TRUE(torch::equal(d.at("w"), torch::ones({1})));
  const std::string msg = error_of([&] { d.at("missing.name"); });
  EXPECT_NE(msg.find("missing.name"), std::string::npos) << msg;
}

// ------------------------------------------------------------ golden files

TEST(SafetensorsGolden, KnownNamesAndDtypes) {
  const std::string dir = std::string(COLT5_SOURCE_DIR) + "/tests/golden/";
  const auto ar = load_safetensors(dir + "ar_plain.safetensors");
  ASSERT_TRUE(ar.contains("param.null_q_token"));
  EXPECT_EQ(ar.at("param.null_q_token").scalar_type(), torch::kDouble);
  EXPECT_EQ(ar.at("param.null_q_token").sizes().vec(), (std::vector<int64_t>{32}));
  EXPECT_EQ(ar.at("param.light_attn.to_qkv.weight").sizes().vec(), (std::vector<int64_t>{48, 32}));
  EXPECT_TRUE(ar.at("param.light_attn.to_qkv.weight").isfinite().all().item<bool>());
  EXPECT_EQ(ar.tensors.front().first, "param.null_q_token");
  EXPECT_EQ(ar.tensors.size(), 28u);
  EXPECT_TRUE(ar.metadata.count("kind"));
  EXPECT_NO_THROW(nlohmann::json::parse(ar.metadata.at("config")));

  const auto mask = load_safetensors(dir + "attn_mask.safetensors");
  EXPECT_EQ(mask.at("input.mask").scalar_type(), torch::kBool);
  EXPECT_EQ(mask.at("input.mask").sizes().vec(), (std::vector<int64_t>{2, 96}));

  const auto router = load_safetensors(dir + "router_basic.safetensors");
  const auto& idx = router.at("aux.indices");
  EXPECT_EQ(idx.scalar_type(), torch::kLong);
  EXPECT_EQ(idx.sizes().vec(), (std::vector<int64_t>{2, 8}));
  EXPECT_GE(idx.min().item<int64_t>(), 0);
}

TEST(SafetensorsGolden, EveryFileLoadsAndReserializesIdentically) {
  int files = 0;
  TempDir tmp;
  const std::string dir = std::string(COLT5_SOURCE_DIR) + "/tests/golden/";
  for (const auto& name : list_dir(dir)) {
    const std::string suffix = ".safetensors";
    if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    SCOPED_TRACE(name);
    ++files;
    const auto data = load_safetensors(dir + name);
    EXPECT_FALSE(data.tensors.empty());
    EXPECT_TRUE(data.metadata.count("case"));
    save_safetensors(tmp.file("copy.safetensors"), data.tensors, data.metadata);
    const auto again = load_safetensors(tmp.file("copy.safetensors"));
    expect_same(data.tensors, again);
    EXPECT_EQ(again.metadata, data.metadata);
  }
  EXPECT_GE(files, 10);
}

// ------------------------------------------------------------ malformed input

TEST(SafetensorsMalformed, ShorterThanEightBytes) {
  expect_rejected("", "shorter than the 8-byte header length");
  expect_rejected("\x02\x00\x00", "shorter than the 8-byte header length");
}

TEST(SafetensorsMalformed, HeaderLengthPastEnd) {
  expect_rejected(le64(100) + "{}", "goes past the end of the file");
  expect_rejected(le64(3) + "{}", "goes past the end of the file");
}

TEST(SafetensorsMalformed, AbsurdHeaderLength) {
  expect_rejected(le64(UINT64_MAX) + "{}", "exceeds the limit");
  expect_rejected(le64(100000001) + "{}", "exceeds the limit");
}

TEST(SafetensorsMalformed, BadJson) {
  expect_rejected(make_file(R"({"a": )"), "not valid JSON");
  expect_rejected(make_file(""), "not valid JSON");
  expect_rejected(make_file(std::string("{\"\xff\xfe\":1}")), "not valid JSON");  // not UTF-8
  expect_rejected(make_file(R"({} trailing)"), "not valid JSON");
}

TEST(SafetensorsMalformed, HeaderNotAnObject) {
  expect_rejected(make_file("[1, 2]"), "header is a JSON array, expected an object");
  expect_rejected(make_file("42"), "expected an object");
}

TEST(SafetensorsMalformed, MissingFields) {
  expect_rejected(make_file(R"({"t":{"shape":[1],"data_offsets":[0,1]}})", "x"), "tensor 't': missing field \"dtype\"");
  expect_rejected(make_file(R"({"t":{"dtype":"U8","data_offsets":[0,1]}})", "x"),
                  "tensor 't': missing field \"shape\"");
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[1]}})", "x"), "tensor 't': missing field \"data_offsets\"");
}

TEST(SafetensorsMalformed, IllTypedFields) {
  expect_rejected(make_file(R"({"t":[1]})"), "tensor 't': entry is a JSON array");
  expect_rejected(make_file(R"({"t":{"dtype":8,"shape":[1],"data_offsets":[0,1]}})", "x"),
                  "\"dtype\" is a JSON number, expected a string");
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":"1","data_offsets":[0,1]}})", "x"),
                  "\"shape\" is a JSON string, expected an array");
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", "x"),
                  "\"data_offsets\" must be an array of two integers");
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":{"begin":0}}})", "x"),
                  "\"data_offsets\" must be an array of two integers");
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,"1"]}})", "x"),
                  "data offset end is a JSON string");
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[-1,1]}})", "x"),
                  "data offset begin -1 is negative");
}

TEST(SafetensorsMalformed, UnknownDtype) {
  expect_rejected(make_file(R"({"weights.q":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", "x"),
                  "tensor 'weights.q': unsupported dtype \"F8_E4M3\"");
  expect_rejected(make_file(R"({"c":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", "xxxx"),
                  "unsupported dtype \"f32\"");
}

TEST(SafetensorsMalformed, NegativeShapeEntry) {
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[2,-1],"data_offsets":[0,0]}})"),
                  "tensor 't': shape entry -1 is negative");
}

TEST(SafetensorsMalformed, NonIntegerShapeEntry) {
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})", "x"),
                  "shape entry is not an integer");
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[1e30],"data_offsets":[0,1]}})", "x"),
                  "shape entry is not an integer");
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":["2"],"data_offsets":[0,2]}})", "xx"),
                  "shape entry is a JSON string");
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,1]}})", "x"),
                  "shape entry 9223372036854775808 is too large");
}

TEST(SafetensorsMalformed, ShapeProductOverflow) {
  expect_rejected(make_file(R"({"t":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
                  "byte size of its shape overflows");
  // Elements fit in 64 bits, bytes do not.
  expect_rejected(make_file(R"({"t":{"dtype":"F64","shape":[2305843009213693952,2],"data_offsets":[0,0]}})"),
                  "byte size of its shape overflows");
}

TEST(SafetensorsMalformed, OffsetsOutOfRange) {
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", "xx"),
                  "go past the end of the byte buffer (2 bytes)");
  expect_rejected(
      make_file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,18446744073709551615]}})", "x"),
      "go past the end of the byte buffer");
}

TEST(SafetensorsMalformed, BeginAfterEnd) {
  expect_rejected(make_file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[2,1]}})", "xx"),
                  "data_offsets begin 2 is after end 1");
}

TEST(SafetensorsMalformed, ByteSizeMismatch) {
  expect_rejected(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", "xxxx"),
                  "tensor 't': data_offsets span 4 bytes but dtype F32 and shape need 8");
}

TEST(SafetensorsMalformed, OverlappingTensors) {
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                            R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                            std::string(12, 'x')),
                  "tensors 'a' and 'b' overlap");
  // Two names for the same bytes.
  expect_rejected(make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                            R"("b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
                            "xx"),
                  "overlap");
}

TEST(SafetensorsMalformed, HolesInByteBuffer) {
  expect_rejected(make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                            R"("b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})",
                            std::string(6, 'x')),
                  "bytes [2, 4) of the byte buffer belong to no tensor (hole before 'b')");
  expect_rejected(make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})", "xxx"),
                  "bytes [0, 1) of the byte buffer belong to no tensor");
  expect_rejected(make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "xxxx"),
                  "byte buffer has 4 bytes but the tensors cover only 2");
}

TEST(SafetensorsMalformed, DuplicateNames) {
  expect_rejected(make_file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                            R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                            "xx"),
                  "duplicate tensor name 'a'");
  expect_rejected(make_file(R"({"a":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}})", "x"),
                  "duplicate key \"dtype\"");
  expect_rejected(make_file(R"({"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}})"),
                  "duplicate key \"__metadata__\"");
}

TEST(SafetensorsMalformed, MetadataNotStrings) {
  expect_rejected(make_file(R"({"__metadata__":{"ok":"yes","n":1}})"),
                  "\"__metadata__\" value of key 'n' is a JSON number, expected a string");
  expect_rejected(make_file(R"({"__metadata__":{"o":{"x":"y"}}})"), "value of key 'o' is a JSON object");
  expect_rejected(make_file(R"({"__metadata__":["a"]})"), "\"__metadata__\" is a JSON array");
}

TEST(SafetensorsMalformed, MissingOrUnreadableFile) {
  TempDir dir;
  const std::string missing = dir.file("does_not_exist.safetensors");
  std::string msg = error_of([&] { load_safetensors(missing); });
  EXPECT_NE(msg.find(missing), std::string::npos) << msg;
  EXPECT_NE(msg.find("cannot open"), std::string::npos) << msg;

  const std::string directory = dir.file("a_directory");
  make_dir(directory);
  msg = error_of([&] { load_safetensors(directory); });
  EXPECT_NE(msg.find(directory), std::string::npos) << msg;
  EXPECT_NE(msg.find("not a regular file"), std::string::npos) << msg;
}

TEST(SafetensorsMalformed, TruncatedValidFile) {
  TempDir dir;
  save_safetensors(dir.file("ok.safetensors"), every_dtype());
  const std::string bytes = read_bytes(dir.file("ok.safetensors"));
  // Every strict prefix of a valid file is rejected, never read past its end.
  for (size_t cut = 0; cut < bytes.size(); cut += 7) {
    const std::string prefix = bytes.substr(0, cut);
    EXPECT_THROW(parse_safetensors(reinterpret_cast<const uint8_t*>(prefix.data()), prefix.size()), c10::Error)
        << "prefix of " << cut << " bytes";
  }
}

// ------------------------------------------------------------ atomic writes

TEST(SafetensorsAtomicWrite, NoTemporaryLeft) {
  TempDir dir;
  save_safetensors(dir.file("w.safetensors"), every_dtype());
  save_safetensors(dir.file("w.safetensors"), {{"x", torch::ones({2})}});  // over an existing file
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"w.safetensors"});
  const auto loaded = load_safetensors(dir.file("w.safetensors"));
  ASSERT_EQ(loaded.tensors.size(), 1u);
  EXPECT_TRUE(torch::equal(loaded.at("x"), torch::ones({2})));
}

TEST(SafetensorsAtomicWrite, UnsupportedDtypeKeepsPreviousFile) {
  TempDir dir;
  const std::string path = dir.file("keep.safetensors");
  save_safetensors(path, {{"w", torch::arange(5, torch::kFloat)}});
  const std::string before = read_bytes(path);

  const std::string msg = error_of([&] {
    save_safetensors(path, {{"ok", torch::ones({2})}, {"z", torch::ones({2}, torch::kComplexFloat)}});
  });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("tensor 'z' has unsupported dtype ComplexFloat"), std::string::npos) << msg;
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"keep.safetensors"});
}

TEST(SafetensorsAtomicWrite, BadNamesKeepPreviousFile) {
  TempDir dir;
  const std::string path = dir.file("keep.safetensors");
  save_safetensors(path, {{"w", torch::ones({1})}});
  const std::string before = read_bytes(path);
  std::string msg = error_of([&] { save_safetensors(path, {{"a", torch::ones({1})}, {"a", torch::zeros({1})}}); });
  EXPECT_NE(msg.find("duplicate tensor name 'a'"), std::string::npos) << msg;
  msg = error_of([&] { save_safetensors(path, {{"__metadata__", torch::ones({1})}}); });
  EXPECT_NE(msg.find("\"__metadata__\" is reserved"), std::string::npos) << msg;
  msg = error_of([&] { save_safetensors(path, {{"u", torch::Tensor()}}); });
  EXPECT_NE(msg.find("tensor 'u' is undefined"), std::string::npos) << msg;
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"keep.safetensors"});
}

TEST(SafetensorsAtomicWrite, FailedRenameRemovesTemporary) {
  TempDir dir;
  // The target is a non-empty directory: the rename fails after the data is written.
  const std::string target = dir.file("target");
  make_dir(target);
  write_bytes(target + "/inside", "x");
  const std::string msg = error_of([&] { save_safetensors(target, {{"x", torch::ones({3})}}); });
  EXPECT_NE(msg.find("cannot rename"), std::string::npos) << msg;
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"target"});
  EXPECT_EQ(read_bytes(target + "/inside"), "x");
}

TEST(SafetensorsAtomicWrite, MissingDirectory) {
  TempDir dir;
  const std::string path = dir.file("no/such/dir/x.safetensors");
  const std::string msg = error_of([&] { save_safetensors(path, {{"x", torch::ones({1})}}); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("cannot create temporary file"), std::string::npos) << msg;
}
