// libFuzzer target: the `colt5` program's text loader (app/program/data.cpp).
// The first four bytes choose the sequence length (9..64), the batch and the split
// fractions; the rest is the text file. Any input must either be refused
// with a UsageError by the settings' checks or the loader, or give batches of
// the asked shape whose tokens are bytes and whose targets are the next
// tokens; anything else is a bug.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "program/config.h"
#include "program/data.h"
#include "program/error.h"

static void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

static std::string scratch_file() {
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/colt5-text-fuzz-XXXXXX";
  if (::mkdtemp(dir.data()) == nullptr) std::abort();
  return dir + "/text";
}

static void check_batch(const colt5::app::Batch& b, int64_t seq_len) {
  require(b.tokens.dim() == 2 && b.tokens.size(1) == seq_len, "tokens are (b, seq_len)");
  require(b.targets.sizes() == b.tokens.sizes(), "targets have the tokens' shape");
  if (b.tokens.numel() == 0) return;
  require(b.tokens.min().item<int64_t>() >= 0 && b.tokens.max().item<int64_t>() < 256, "tokens are bytes");
  require(b.targets.min().item<int64_t>() >= 0 && b.targets.max().item<int64_t>() < 256, "targets are bytes");
  // Each target is the next token: the tokens shifted by one.
  if (seq_len > 1)
    require(b.tokens.narrow(1, 1, seq_len - 1).equal(b.targets.narrow(1, 0, seq_len - 1)), "targets are the next tokens");
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace colt5::app;
  if (size < 4) return 0;
  static const std::string path = scratch_file();
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 4 && std::fwrite(data + 4, 1, size - 4, f) != size - 4) std::abort();
  std::fclose(f);

  TrainConfig t;
  t.data = path;
  t.seq_len = 9 + data[0] % 56;
  t.batch_size = 1 + data[1] % 4;
  // Mostly valid splits (train 0.3..1, valid a share of the rest); byte 255 makes them invalid.
  t.train_frac = data[2] == 255 ? 1.0 : 0.3 + 0.7 * data[2] / 255.0;
  t.valid_frac = (1.0 - t.train_frac) * data[3] / 256.0;
  ModelConfig m;
  m.vocab_size = 256;
  m.max_seq_len = 64;
  m.attn.light_window_size(8).num_heavy_tokens_q(4).num_heavy_tokens_kv(8);
  m.ff.num_heavy_tokens(4);
  try {
    validate(t, m);
    TextData text(t);
    require(text.size("train") + text.size("valid") + text.size("test") == static_cast<int64_t>(size - 4),
            "the splits cover the file");
    check_batch(text.train_batch(data[0], data[1], 0), t.seq_len);
    for (const char* split : {"valid", "test"})
      for (const Batch& b : text.eval_batches(split, data[2] % 3)) check_batch(b, t.seq_len);
  } catch (const UsageError& e) {
    // COLT5_FUZZ_VERBOSE=1: why an input was refused (for checking the seeds reach deep).
    static const bool verbose = std::getenv("COLT5_FUZZ_VERBOSE") != nullptr;
    if (verbose) std::fprintf(stderr, "refused: %s\n", e.what());
  }
  return 0;
}
