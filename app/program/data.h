// What the program trains on: the built-in long-range retrieval task, or the
// bytes of a text file split into train / valid / test.
//
// Every batch is a pure function of (seed, step, micro-batch): a resumed run
// draws exactly the batches the uninterrupted run would have drawn.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "program/config.h"

namespace colt5 {
namespace app {

uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0);

struct Batch {
  torch::Tensor tokens;   // int64 (b, n)
  torch::Tensor targets;  // int64 (b, n): next token (text), or (b): the value asked for (task)
};

// Vocabulary: keys [0, K), values [K, K+V), filler [K+V, K+V+F). A sequence is
// filler with `pairs` key/value pairs (key then its value) in the region
// task_pair_region() at the start; its last token repeats one of the keys, and
// the model must predict that key's value there.
class RetrievalTask {
 public:
  RetrievalTask(const TrainConfig& t, const ModelConfig& m);
  // Sequences drawn from `seed`; targets (b) are the values asked for.
  Batch generate(int64_t count, uint64_t seed) const;
  Batch train_batch(uint64_t seed, int64_t step, int64_t micro) const;
  // Held-out sets come from fixed seeds, whatever the training seed is.
  Batch eval_set(const std::string& split) const;

 private:
  TrainConfig t_;
  int64_t region_;
};

// The bytes of a regular file of at most kMaxTextBytes (UsageError otherwise, or when empty).
torch::Tensor read_text_bytes(const std::string& path);

// A file's bytes (held as uint8; batches are int64), split in order: the first
// train_frac for training, the next valid_frac for validation, the rest for test.
class TextData {
 public:
  // max_bytes > 0 keeps only the file's first max_bytes bytes (before splitting).
  explicit TextData(const TrainConfig& t, int64_t max_bytes = 0);
  const torch::Tensor& split(const std::string& name) const;
  Batch train_batch(uint64_t seed, int64_t step, int64_t micro) const;
  // `count` windows spread evenly over the split (count <= 0: every
  // non-overlapping window), in batches of at most batch_size.
  std::vector<Batch> eval_batches(const std::string& name, int64_t count) const;
  int64_t size(const std::string& name) const { return split(name).size(0); }

 private:
  Batch windows(const torch::Tensor& s, const std::vector<int64_t>& offsets) const;

  TrainConfig t_;
  torch::Tensor all_, train_, valid_, test_;
};

}  // namespace app
}  // namespace colt5
