// Tests of the `colt5` program's logic (app/colt5/*.h): text training,
// exact resumption, checkpoints that survive SIGKILL, the retrieval task and
// the checks on user input.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>

#include "../app/colt5/checkpoint.h"
#include "../app/colt5/config.h"
#include "../app/colt5/data.h"
#include "../app/colt5/model.h"
#include "../app/colt5/train.h"

using namespace colt5::app;

namespace {

std::string temp_dir(const std::string& name) {
  std::string dir = std::string(COLT5_BINARY_DIR) + "/test_app_tmp/" + name + "-" + std::to_string(::getpid());
  remove_tree(dir);
  make_dirs(dir);
  return dir;
}

std::string text_path() {
  const char* env = std::getenv("COLT5_TEXT");
  return env && *env ? std::string(env) : std::string(COLT5_SOURCE_DIR) + "/../shared/data/tinyshakespeare.txt";
}

ModelConfig tiny_model() {
  ModelConfig m;
  m.dim = 32;
  m.depth = 1;
  m.light_heads = 2;
  m.light_dim_head = 16;
  m.heavy_heads = 2;
  m.heavy_dim_head = 16;
  m.light_window_size = 16;
  m.num_heavy_tokens_q = 8;
  m.num_heavy_tokens_kv = 16;
  m.num_heavy_ff_tokens = 8;
  m.max_seq_len = 96;
  return m;
}

TrainConfig tiny_task() {
  TrainConfig t;
  t.seq_len = 96;
  t.batch_size = 4;
  t.steps = 8;
  t.warmup = 2;
  t.eval_every = 4;
  t.save_every = 3;
  t.log_every = 1;
  t.task_keys = 8;
  t.task_values = 8;
  t.task_filler = 16;
  t.task_pairs = 2;
  t.task_eval_size = 16;
  t.lm_weight = 0.1;
  t.seed = 7;
  return t;
}

}  // namespace

TEST(AppText, ValidationLossFallsOnShakespeare) {
  const std::string path = text_path();
  std::ifstream probe(path);
  ASSERT_TRUE(probe.good()) << "the text test needs the Tiny Shakespeare file at '" << path
                            << "' (set COLT5_TEXT to its path); it is not part of the project";
  ModelConfig m = tiny_model();
  m.vocab_size = 256;
  m.max_seq_len = 64;
  TrainConfig t;
  t.data = path;
  t.seq_len = 64;
  t.batch_size = 8;
  t.steps = 80;
  t.warmup = 10;
  t.lr = 3e-3;
  t.eval_every = 5;
  t.eval_batches = 4;
  t.save_every = 1000;
  TrainOptions o;
  o.out_dir = temp_dir("text");
  o.quiet = true;
  o.max_text_bytes = 200000;
  TrainResult r = Trainer(m, t, o).run();
  EXPECT_EQ(r.step, 80);
  ASSERT_TRUE(std::isfinite(r.first_valid.loss));
  // Untrained, a byte costs about ln 256 = 5.5 nats; Shakespeare's letter statistics are learned within 80 steps.
  EXPECT_LT(r.last_valid.loss, r.first_valid.loss - 0.5)
      << "first " << r.first_valid.loss << " last " << r.last_valid.loss;
  EXPECT_LT(r.last_valid.bpc, 5.0);
  EXPECT_NEAR(r.last_valid.bpc, r.last_valid.loss / std::log(2.0), 1e-9);
  // The run directory has what the program promises.
  EXPECT_TRUE(is_complete_checkpoint(r.checkpoint));
  EXPECT_TRUE(path_exists(o.out_dir + "/metrics.csv"));
  std::string svg = read_text(o.out_dir + "/loss.svg");
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  auto rows = read_metrics(o.out_dir + "/metrics.csv");
  ASSERT_FALSE(rows.empty());
  EXPECT_EQ(rows.back().step, 80);
  EXPECT_TRUE(std::isfinite(rows.back().valid_bpc));
  remove_tree(o.out_dir);
}

TEST(AppText, SplitsAreDisjointAndInOrder) {
  std::string dir = temp_dir("split");
  std::string file = dir + "/abc.txt";
  std::string text;
  for (int i = 0; i < 1000; ++i) text.push_back(static_cast<char>('a' + i % 26));
  write_file_atomic(file, text);
  TrainConfig t;
  t.data = file;
  t.seq_len = 8;
  t.train_frac = 0.8;
  t.valid_frac = 0.1;
  TextData d(t);
  EXPECT_EQ(d.size("train"), 800);
  EXPECT_EQ(d.size("valid"), 100);
  EXPECT_EQ(d.size("test"), 100);
  EXPECT_EQ(d.split("valid")[0].item<int64_t>(), 'a' + 800 % 26);
  Batch b = d.train_batch(1, 5, 0);
  EXPECT_TRUE(torch::equal(b.tokens.narrow(1, 1, 7), b.targets.narrow(1, 0, 7)));
  EXPECT_TRUE(torch::equal(b.tokens, d.train_batch(1, 5, 0).tokens));
  EXPECT_FALSE(torch::equal(b.tokens, d.train_batch(1, 6, 0).tokens));
  // Too small for the sequence length: a clear error, not a crash.
  t.seq_len = 200;
  try {
    TextData small(t);
    FAIL() << "a valid split shorter than --seq-len was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("shorter than --seq-len"), std::string::npos) << e.what();
  }
  remove_tree(dir);
}

TEST(AppText, MissingOrEmptyFileIsAClearError) {
  std::string dir = temp_dir("files");
  try {
    read_file_bytes(dir + "/nope.txt");
    FAIL() << "a missing file was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("nope.txt"), std::string::npos);
  }
  write_file_atomic(dir + "/empty.txt", "");
  try {
    read_file_bytes(dir + "/empty.txt");
    FAIL() << "an empty file was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("empty"), std::string::npos);
  }
  remove_tree(dir);
}

TEST(AppTask, PairsSitBeyondTheLightWindowAndTheQueryRepeatsAKey) {
  ModelConfig m;
  TrainConfig t;
  t.seq_len = 512;
  t.task_pairs = 3;
  m.vocab_size = task_vocab(t);
  RetrievalTask task(t, m);
  Batch b = task.generate(64, 123);
  ASSERT_EQ(b.tokens.sizes(), (std::vector<int64_t>{64, 512}));
  const int64_t region = task_pair_region(t, m);
  EXPECT_LT(region, t.seq_len - 1 - 2 * m.light_window_size);
  for (int64_t i = 0; i < 64; ++i) {
    auto seq = b.tokens[i];
    const int64_t query = seq[511].item<int64_t>();
    ASSERT_LT(query, t.task_keys);
    int64_t found = -1, keys = 0;
    for (int64_t j = 0; j < 511; ++j) {
      const int64_t tok = seq[j].item<int64_t>();
      if (tok < t.task_keys) {
        ++keys;
        EXPECT_LT(j, region);
        if (tok == query) found = j;
      }
    }
    EXPECT_EQ(keys, 3);
    ASSERT_GE(found, 0);
    EXPECT_EQ(seq[found + 1].item<int64_t>(), b.targets[i].item<int64_t>());
  }
  // Held-out sets do not depend on the training seed; training batches do.
  EXPECT_TRUE(torch::equal(task.eval_set("valid").tokens, task.eval_set("valid").tokens));
  EXPECT_FALSE(torch::equal(task.eval_set("valid").tokens, task.eval_set("test").tokens));
  EXPECT_FALSE(torch::equal(task.train_batch(1, 1, 0).tokens, task.train_batch(2, 1, 0).tokens));
}

TEST(AppConfig, RejectsSizesThatDoNotFit) {
  ModelConfig m;
  TrainConfig t;
  m.vocab_size = task_vocab(t);
  EXPECT_NO_THROW(validate(t, m));
  TrainConfig short_seq = t;
  short_seq.seq_len = 64;  // not longer than the window
  EXPECT_THROW(validate(short_seq, m), UsageError);
  short_seq.seq_len = 131;  // longer than the window, but no room for pairs beyond its reach
  try {
    validate(short_seq, m);
    FAIL() << "a task whose pairs the light window can see was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("too short"), std::string::npos) << e.what();
  }
  ModelConfig bad = m;
  bad.heavy_heads = 3;
  bad.num_routed_kv = 2;
  EXPECT_THROW(validate(t, bad), UsageError);
  TrainConfig dev = t;
  dev.device = "tpu";
  EXPECT_THROW(validate(dev, m), UsageError);
  ModelConfig rt = model_from_json(to_json(m));
  EXPECT_EQ(to_json(rt), to_json(m));
  TrainConfig tt = train_from_json(to_json(t));
  EXPECT_EQ(to_json(tt), to_json(t));
}

TEST(AppConfig, DefaultRouterSettingsAreTheOnesThatLearn) {
  ModelConfig m;
  EXPECT_TRUE(m.cosine_sim_routing);
  EXPECT_DOUBLE_EQ(m.router_eps, 1.0);
}

TEST(AppSchedule, WarmupThenCosineDecay) {
  TrainConfig t;
  t.lr = 1.0;
  t.min_lr_ratio = 0.1;
  t.warmup = 10;
  t.steps = 110;
  EXPECT_DOUBLE_EQ(learning_rate(t, 5), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(t, 10), 1.0);
  EXPECT_NEAR(learning_rate(t, 60), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate(t, 110), 0.1, 1e-12);
  EXPECT_GT(learning_rate(t, 30), learning_rate(t, 31));
}

TEST(AppModel, LightOnlyHasNoHeavyBranchAndSameWidths) {
  ModelConfig m = tiny_model();
  LanguageModel routed(m);
  m.light_only = true;
  LanguageModel light(m);
  EXPECT_GT(count_parameters(*routed), count_parameters(*light));
  for (const auto& p : light->named_parameters()) {
    EXPECT_EQ(p.key().find("heavy"), std::string::npos) << p.key();
    EXPECT_EQ(p.key().find("router"), std::string::npos) << p.key();
  }
  torch::Tensor tokens = torch::randint(0, m.vocab_size, {2, 50}, torch::kLong);
  EXPECT_EQ(routed->forward(tokens).sizes(), (std::vector<int64_t>{2, 50, m.vocab_size}));
  EXPECT_EQ(light->forward(tokens).sizes(), (std::vector<int64_t>{2, 50, m.vocab_size}));
  // Causal: the logits of the light-only model at a position ignore later tokens.
  torch::Tensor changed = tokens.clone();
  changed.index_put_({torch::indexing::Slice(), 40}, (tokens.select(1, 40) + 1) % m.vocab_size);
  EXPECT_TRUE(torch::allclose(light->forward(tokens).narrow(1, 0, 40), light->forward(changed).narrow(1, 0, 40)));
}

TEST(AppResume, HalfThenResumeEqualsStraightRun) {
  ModelConfig m = tiny_model();
  TrainConfig t = tiny_task();
  TrainOptions o;
  o.quiet = true;
  o.out_dir = temp_dir("straight");
  TrainResult straight = Trainer(m, t, o).run();
  ASSERT_EQ(straight.step, 8);

  TrainOptions half = o;
  half.out_dir = temp_dir("split");
  TrainConfig first = t;
  first.stop_after = 4;
  TrainResult r1 = Trainer(m, first, half).run();
  ASSERT_EQ(r1.step, 4);
  CheckpointInfo info = read_checkpoint_info(half.out_dir);
  ASSERT_EQ(info.step, 4);
  auto first_ckpt = colt5::load_safetensors(info.dir + "/model.safetensors");
  TrainOptions resume = half;
  resume.resume = half.out_dir;
  TrainResult r2 = Trainer(info.model, info.train, resume).run();
  ASSERT_EQ(r2.step, 8);

  auto a = colt5::load_safetensors(straight.checkpoint + "/model.safetensors");
  auto b = colt5::load_safetensors(r2.checkpoint + "/model.safetensors");
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& kv : a.tensors) EXPECT_TRUE(torch::equal(kv.second, b.at(kv.first))) << kv.first;
  auto oa = colt5::load_safetensors(straight.checkpoint + "/optimizer.safetensors");
  auto ob = colt5::load_safetensors(r2.checkpoint + "/optimizer.safetensors");
  for (const auto& kv : oa.tensors) EXPECT_TRUE(torch::equal(kv.second, ob.at(kv.first))) << kv.first;
  // Training did change the weights (the comparison is not vacuous).
  bool moved = false;
  for (const auto& kv : first_ckpt.tensors) moved = moved || !torch::equal(kv.second, b.at(kv.first));
  EXPECT_TRUE(moved);
  // The metrics of the resumed run continue those of its first half.
  auto rows = read_metrics(half.out_dir + "/metrics.csv");
  ASSERT_EQ(rows.size(), 8u);
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(rows[i].step, static_cast<int64_t>(i + 1));
  EXPECT_DOUBLE_EQ(straight.last_valid.accuracy, r2.last_valid.accuracy);
  remove_tree(o.out_dir);
  remove_tree(half.out_dir);
}

TEST(AppCheckpoint, SigkillWhileSavingLosesNothingBeforeTheLastCompleteCheckpoint) {
  ModelConfig m = tiny_model();
  m.depth = 2;
  m.vocab_size = 512;
  const std::string dir = temp_dir("kill");
  // Each checkpoint k holds weights all equal to k; the child saves k = 1, 2, ... until killed.
  for (int round = 0; round < 4; ++round) {
    const std::string run = dir + "/run" + std::to_string(round);
    make_dirs(run);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      try {
        LanguageModel model(m);
        TrainConfig t;
        for (int64_t k = 1;; ++k) {
          {
            torch::NoGradGuard ng;
            for (auto& p : model->parameters()) p.fill_(static_cast<double>(k));
          }
          save_checkpoint(run, k, *model, nullptr, m, t, nlohmann::json{{"marker", k}}, 2);
        }
      } catch (...) {
      }
      ::_exit(3);
    }
    ::usleep(static_cast<useconds_t>(150000 + 90000 * round));
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status));
    CheckpointInfo info = read_checkpoint_info(run);
    ASSERT_GE(info.step, 1) << "no checkpoint completed before the kill";
    EXPECT_EQ(info.state.value("marker", int64_t(-1)), info.step);
    LanguageModel loaded(m);
    load_model_tensors(*loaded, info.dir + "/model.safetensors");
    for (const auto& p : loaded->named_parameters())
      EXPECT_TRUE(torch::all(p.value() == static_cast<double>(info.step)).item<bool>()) << p.key();
    // Every checkpoint directory visible under its final name is complete.
    for (const auto& n : list_dir(run))
      if (n.rfind("ckpt-", 0) == 0) EXPECT_TRUE(is_complete_checkpoint(run + "/" + n)) << n;
  }
  remove_tree(dir);
}
