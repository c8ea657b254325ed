// libFuzzer target: the `colt5` program's reader and checks of a checkpoint's
// config.json (app/program/config.cpp). Any input must either give settings
// that pass validate() and survive a JSON round trip unchanged, or a
// UsageError; anything else (a crash, another exception, undefined behaviour
// caught by the sanitizers) is a bug.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>

#include "program/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace colt5::app;
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return 0;
  const SettingNames names{"config.json"};
  try {
    const ModelConfig m = model_from_json(j.contains("model") ? j.at("model") : nlohmann::json(), names);
    const TrainConfig t = train_from_json(j.contains("train") ? j.at("train") : nlohmann::json(), names);
    validate(t, m, names);
    if (to_json(model_from_json(to_json(m))) != to_json(m)) std::abort();
    if (to_json(train_from_json(to_json(t))) != to_json(t)) std::abort();
    if (is_task(t) && task_pair_region(t, m) < 2 * t.task_pairs) std::abort();
  } catch (const UsageError&) {
  }
  return 0;
}
