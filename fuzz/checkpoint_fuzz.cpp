// libFuzzer target: reading a checkpoint directory of the `colt5` program
// (app/program/checkpoint.cpp) as `eval`, `sample` and `train --resume` do.
// The input holds the four files, separated by the line "@@colt5@@":
// config.json, state.json, model.safetensors, optimizer.safetensors. The
// harness writes them with a completion marker whose checksums match (a
// mismatch is refused first; matching sums let the fuzzer reach the checks
// behind it), then reads the settings, builds the model, loads the weights
// and the optimizer state and runs the program's forward check. Any input
// must either be refused with a UsageError or load completely; anything else
// is a bug.
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "program/checkpoint.h"
#include "program/config.h"
#include "program/error.h"
#include "program/files.h"
#include "program/model.h"
#include "program/train.h"

namespace {

const char* const kFiles[] = {"config.json", "state.json", "model.safetensors", "optimizer.safetensors"};
const std::string kSeparator = "\n@@colt5@@\n";

std::string scratch_dir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/colt5-ckpt-fuzz-XXXXXX";
  if (::mkdtemp(dir.data()) == nullptr) std::abort();
  return dir + "/ckpt";
}

void write(const std::string& path, std::string_view bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) std::abort();
  std::fclose(f);
}

// Small enough to build in a moment: the fuzzer explores the checks, not big models.
bool small(const colt5::app::ModelConfig& m) {
  const auto& a = m.attn;
  return m.dim() <= 64 && m.depth <= 2 && m.vocab_size <= 512 && m.max_seq_len <= 1024 && a.light_heads() <= 4 &&
         a.heavy_heads() <= 4 && a.light_dim_head() <= 32 && a.heavy_dim_head() <= 32 && m.ff.light_ff_mult() <= 4 &&
         m.ff.heavy_ff_mult() <= 8;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace colt5::app;
  static const std::string dir = [] {
    torch::set_num_threads(1);
    std::string d = scratch_dir();
    make_dirs(d);
    return d;
  }();
  // Views into the input (no copies: each input is up to a few hundred kB).
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> parts;
  size_t start = 0;
  while (parts.size() < 3) {
    const size_t at = input.find(kSeparator, start);
    if (at == std::string_view::npos) return 0;
    parts.push_back(input.substr(start, at - start));
    start = at + kSeparator.size();
  }
  parts.push_back(input.substr(start));
  nlohmann::json marker{{"step", 1}, {"fnv1a64", nlohmann::json::object()}};
  // The marker's step follows state.json's when it has one.
  const nlohmann::json state = nlohmann::json::parse(parts[1], nullptr, false);
  if (state.is_object() && state.contains("step") && state.at("step").is_number_integer())
    marker["step"] = state.at("step");
  for (size_t i = 0; i < 4; ++i) {
    write(dir + "/" + kFiles[i], parts[i]);
    marker["fnv1a64"][kFiles[i]] = file_checksum(dir + "/" + kFiles[i]);
  }
  write(dir + "/complete", marker.dump());

  try {
    const CheckpointInfo info = read_checkpoint_info(dir);
    if (!small(info.model)) return 0;
    // The model of the previous input when the settings are the same (building
    // one is most of an input's time); loading overwrites every weight, and an
    // input whose weights are refused leaves nothing the next load relies on.
    static std::string cached_key;
    static LanguageModel cached{nullptr};
    const std::string key = to_json(info.model).dump();
    if (!cached || key != cached_key) {
      cached = LanguageModel(info.model);
      cached_key = key;
    }
    LanguageModel model = cached;
    load_model_weights(*model, dir + "/model.safetensors");
    auto opt = make_optimizer(*model, info.train);
    load_optimizer(dir + "/optimizer.safetensors", *model, *opt, info.step);
    // The program's own check after loading (eval, sample, resume): a forward
    // pass that must give finite logits of the vocabulary's width, or refuse.
    torch::Tensor logits = check_model_runs(*model, dir + "/model.safetensors");
    if (logits.size(-1) != info.model.vocab_size || !torch::isfinite(logits).all().item<bool>()) std::abort();
  } catch (const UsageError& e) {
    // COLT5_FUZZ_VERBOSE=1: why an input was refused (for checking the seeds reach deep).
    static const bool verbose = std::getenv("COLT5_FUZZ_VERBOSE") != nullptr;
    if (verbose) std::fprintf(stderr, "refused: %s\n", e.what());
  }
  return 0;
}
