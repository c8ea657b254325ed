// What the program trains on: the built-in long-range retrieval task, or the
// bytes of a text file split into train / valid / test.
//
// Every batch is a pure function of (seed, step, micro-batch): a resumed run
// draws exactly the batches the uninterrupted run would have drawn.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "config.h"

namespace colt5 {
namespace app {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0) {
  return splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ a) ^ b) ^ c);
}

// Uniform integer in [0, n) (n >= 1).
inline int64_t draw(std::mt19937_64& rng, int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); }

struct Batch {
  torch::Tensor tokens;   // int64 [b, n]
  torch::Tensor targets;  // int64 [b, n]: next token (text), or [b]: the value asked for (task)
};

// --------------------------------------------------------------- retrieval task

// Vocabulary: keys [0, K), values [K, K+V), filler [K+V, K+V+F). A sequence is
// filler with `pairs` key/value pairs (key then its value) in the region
// task_pair_region() at the start; its last token repeats one of the keys, and
// the model must predict that key's value there.
class RetrievalTask {
 public:
  RetrievalTask(const TrainConfig& t, const ModelConfig& m) : t_(t), region_(task_pair_region(t, m)) {}

  // Sequences drawn from `seed`; targets [b] are the values asked for.
  Batch generate(int64_t count, uint64_t seed) const {
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

  Batch train_batch(uint64_t seed, int64_t step, int64_t micro) const {
    return generate(t_.batch_size, mix_seed(seed, static_cast<uint64_t>(step), static_cast<uint64_t>(micro), 1));
  }

  // Held-out sets come from fixed seeds, whatever --seed is.
  Batch eval_set(const std::string& split) const {
    if (split != "valid" && split != "test") throw UsageError("split must be valid or test, got '" + split + "'");
    return generate(t_.task_eval_size, split == "valid" ? 0x7A11DA7Eull : 0x7E57C0DEull);
  }

 private:
  TrainConfig t_;
  int64_t region_;
};

// ---------------------------------------------------------------------- text

inline std::vector<uint8_t> read_file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("cannot open data file '" + path + "': " + std::strerror(errno));
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw UsageError("error reading data file '" + path + "'");
  if (bytes.empty()) throw UsageError("data file '" + path + "' is empty");
  return bytes;
}

class TextData {
 public:
  // Splits the file's bytes: first train_frac for training, next valid_frac
  // for validation, the rest for test. max_bytes > 0 keeps only the file's
  // first max_bytes bytes (before splitting).
  TextData(const TrainConfig& t, int64_t max_bytes = 0) : t_(t) {
    std::vector<uint8_t> bytes = read_file_bytes(t.data);
    if (max_bytes > 0 && static_cast<int64_t>(bytes.size()) > max_bytes) bytes.resize(static_cast<size_t>(max_bytes));
    const int64_t total = static_cast<int64_t>(bytes.size());
    const int64_t n_train = static_cast<int64_t>(total * t.train_frac);
    const int64_t n_valid = static_cast<int64_t>(total * t.valid_frac);
    all_ = torch::from_blob(bytes.data(), {total}, torch::kUInt8).to(torch::kLong);
    train_ = all_.narrow(0, 0, n_train);
    valid_ = all_.narrow(0, n_train, n_valid);
    test_ = all_.narrow(0, n_train + n_valid, total - n_train - n_valid);
    const int64_t need = t.seq_len + 1;
    auto check = [&](const torch::Tensor& s, const char* name) {
      if (s.size(0) < need)
        throw UsageError("data file '" + t.data + "' (" + str(total) + " bytes) gives a " + name + " split of " +
                         str(s.size(0)) + " bytes, shorter than --seq-len + 1 = " + str(need) +
                         "; use a larger file, a shorter --seq-len or other --split fractions");
    };
    check(train_, "train");
    check(valid_, "valid");
    check(test_, "test");
  }

  const torch::Tensor& split(const std::string& name) const {
    if (name == "train") return train_;
    if (name == "valid") return valid_;
    if (name == "test") return test_;
    throw UsageError("split must be train, valid or test, got '" + name + "'");
  }

  Batch train_batch(uint64_t seed, int64_t step, int64_t micro) const {
    std::mt19937_64 rng(mix_seed(seed, static_cast<uint64_t>(step), static_cast<uint64_t>(micro), 2));
    const int64_t span = train_.size(0) - t_.seq_len;  // offsets 0..span-1 leave room for the target
    std::vector<int64_t> offsets(static_cast<size_t>(t_.batch_size));
    for (auto& o : offsets) o = draw(rng, span);
    return windows(train_, offsets);
  }

  // `count` windows spread evenly over the split (count <= 0: every
  // non-overlapping window), in batches of at most batch_size.
  std::vector<Batch> eval_batches(const std::string& name, int64_t count) const {
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

  int64_t size(const std::string& name) const { return split(name).size(0); }

 private:
  Batch windows(const torch::Tensor& s, const std::vector<int64_t>& offsets) const {
    std::vector<torch::Tensor> xs, ys;
    for (int64_t o : offsets) {
      xs.push_back(s.narrow(0, o, t_.seq_len));
      ys.push_back(s.narrow(0, o + 1, t_.seq_len));
    }
    return Batch{torch::stack(xs), torch::stack(ys)};
  }

  TrainConfig t_;
  torch::Tensor all_, train_, valid_, test_;
};

}  // namespace app
}  // namespace colt5
