#include "program/data.h"

#include <torch/torch.h>

#include <algorithm>

#include "program/files.h"

namespace colt5 {
namespace app {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform integer in [0, n) (n >= 1).
int64_t draw(std::mt19937_64& rng, int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); }

}  // namespace

uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
  return splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ a) ^ b) ^ c);
}

// --------------------------------------------------------------- retrieval task

RetrievalTask::RetrievalTask(const TrainConfig& t, const ModelConfig& m) : t_(t), region_(task_pair_region(t, m)) {}

Batch RetrievalTask::generate(int64_t count, uint64_t seed) const {
  std::mt19937_64 rng(seed);
  const int64_t n = t_.seq_len, K = t_.task_keys, V = t_.task_values, F = t_.task_filler;
  std::vector<int64_t> tokens(static_cast<size_t>(count * n)), answers(static_cast<size_t>(count));
  const int64_t slots = region_ / 2;
  std::vector<int64_t> slot_ids(static_cast<size_t>(slots)), keys(static_cast<size_t>(K));
  for (int64_t i = 0; i < count; ++i) {
    int64_t* seq = tokens.data() + i * n;
    for (int64_t j = 0; j < n; ++j) seq[j] = K + V + draw(rng, F);
    for (int64_t s = 0; s < slots; ++s) slot_ids[s] = s;
    for (int64_t k = 0; k < K; ++k) keys[k] = k;
    int64_t first_value = 0, asked = draw(rng, t_.task_pairs);
    for (int64_t p = 0; p < t_.task_pairs; ++p) {
      // Partial Fisher-Yates: distinct slots and distinct keys.
      std::swap(slot_ids[p], slot_ids[p + draw(rng, slots - p)]);
      std::swap(keys[p], keys[p + draw(rng, K - p)]);
      const int64_t value = K + draw(rng, V);
      seq[2 * slot_ids[p]] = keys[p];
      seq[2 * slot_ids[p] + 1] = value;
      if (p == asked) first_value = value;
    }
    seq[n - 1] = keys[asked];
    answers[i] = first_value;
  }
  Batch b;
  b.tokens = torch::from_blob(tokens.data(), {count, n}, torch::kLong).clone();
  b.targets = torch::from_blob(answers.data(), {count}, torch::kLong).clone();
  return b;
}

Batch RetrievalTask::train_batch(uint64_t seed, int64_t step, int64_t micro) const {
  return generate(t_.batch_size, mix_seed(seed, static_cast<uint64_t>(step), static_cast<uint64_t>(micro), 1));
}

Batch RetrievalTask::eval_set(const std::string& split) const {
  if (split != "valid" && split != "test") throw UsageError("split must be valid or test, got '" + split + "'");
  return generate(t_.task_eval_size, split == "valid" ? 0x7A11DA7Eull : 0x7E57C0DEull);
}

// ---------------------------------------------------------------------- text

torch::Tensor read_text_bytes(const std::string& path) {
  torch::Tensor bytes;
  read_regular_file(path, kMaxTextBytes, "data file", [&](uint64_t n) {
    bytes = torch::empty({static_cast<int64_t>(n)}, torch::kUInt8);
    return reinterpret_cast<char*>(bytes.data_ptr<uint8_t>());
  });
  if (bytes.numel() == 0) throw UsageError("data file '" + path + "' is empty");
  return bytes;
}

TextData::TextData(const TrainConfig& t, int64_t max_bytes) : t_(t) {
  all_ = read_text_bytes(t.data);
  if (max_bytes > 0 && all_.numel() > max_bytes) all_ = all_.narrow(0, 0, max_bytes).clone();
  const int64_t total = all_.numel();
  const int64_t n_train = static_cast<int64_t>(static_cast<double>(total) * t.train_frac);
  const int64_t n_valid = static_cast<int64_t>(static_cast<double>(total) * t.valid_frac);
  train_ = all_.narrow(0, 0, n_train);
  valid_ = all_.narrow(0, n_train, n_valid);
  test_ = all_.narrow(0, n_train + n_valid, total - n_train - n_valid);
  const int64_t need = t.seq_len + 1;
  auto check = [&](const torch::Tensor& s, const char* name) {
    if (s.size(0) < need)
      throw UsageError("data file '" + t.data + "' (" + std::to_string(total) + " bytes) gives a " + name +
                       " split of " + std::to_string(s.size(0)) + " bytes, shorter than --seq-len + 1 = " +
                       std::to_string(need) + "; use a larger file, a shorter --seq-len or other --split fractions");
  };
  check(train_, "train");
  check(valid_, "valid");
  check(test_, "test");
}

const torch::Tensor& TextData::split(const std::string& name) const {
  if (name == "train") return train_;
  if (name == "valid") return valid_;
  if (name == "test") return test_;
  throw UsageError("split must be train, valid or test, got '" + name + "'");
}

Batch TextData::train_batch(uint64_t seed, int64_t step, int64_t micro) const {
  std::mt19937_64 rng(mix_seed(seed, static_cast<uint64_t>(step), static_cast<uint64_t>(micro), 2));
  const int64_t span = train_.size(0) - t_.seq_len;  // offsets 0..span-1 leave room for the target
  std::vector<int64_t> offsets(static_cast<size_t>(t_.batch_size));
  for (auto& o : offsets) o = draw(rng, span);
  return windows(train_, offsets);
}

std::vector<Batch> TextData::eval_batches(const std::string& name, int64_t count) const {
  const torch::Tensor& s = split(name);
  const int64_t span = s.size(0) - t_.seq_len;
  const int64_t chunks = (s.size(0) - 1) / t_.seq_len;
  std::vector<int64_t> offsets;
  if (count <= 0 || count >= chunks) {
    for (int64_t i = 0; i < chunks; ++i) offsets.push_back(i * t_.seq_len);
  } else {
    for (int64_t i = 0; i < count; ++i) offsets.push_back(count == 1 ? 0 : i * (span - 1) / (count - 1));
  }
  std::vector<Batch> out;
  for (size_t i = 0; i < offsets.size(); i += static_cast<size_t>(t_.batch_size)) {
    std::vector<int64_t> part(offsets.begin() + static_cast<long>(i),
                              offsets.begin() + static_cast<long>(std::min(offsets.size(), i + t_.batch_size)));
    out.push_back(windows(s, part));
  }
  return out;
}

Batch TextData::windows(const torch::Tensor& s, const std::vector<int64_t>& offsets) const {
  std::vector<torch::Tensor> xs, ys;
  for (int64_t o : offsets) {
    xs.push_back(s.narrow(0, o, t_.seq_len));
    ys.push_back(s.narrow(0, o + 1, t_.seq_len));
  }
  return Batch{torch::stack(xs).to(torch::kLong), torch::stack(ys).to(torch::kLong)};
}

}  // namespace app
}  // namespace colt5
