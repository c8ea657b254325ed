// Fixtures shared by the tests of the `colt5` program (app/program): a tiny
// routed model that trains in moments, and a fresh scratch directory per test
// and process under the build folder.
#pragma once

#include <unistd.h>

#include <string>

#include "program/config.h"
#include "program/files.h"

namespace colt5 {
namespace app_testing {

// dim 32, one layer, windows of 16, 8 heavy queries over 16 routed keys/values
// and 8 heavy feedforward tokens, positions up to 96.
inline app::ModelConfig tiny_model() {
  app::ModelConfig m;
  m.attn.dim(32)
      .light_heads(2)
      .light_dim_head(16)
      .heavy_heads(2)
      .heavy_dim_head(16)
      .light_window_size(16)
      .num_heavy_tokens_q(8)
      .num_heavy_tokens_kv(16);
  m.ff.num_heavy_tokens(8);
  m.depth = 1;
  m.max_seq_len = 96;
  return m;
}

// BUILD/<group>/<name>-<pid>, emptied and created.
inline std::string fresh_temp_dir(const std::string& group, const std::string& name) {
  std::string dir = std::string(COLT5_BINARY_DIR) + "/" + group + "/" + name + "-" + std::to_string(::getpid());
  app::remove_tree(dir);
  app::make_dirs(dir);
  return dir;
}

}  // namespace app_testing
}  // namespace colt5
