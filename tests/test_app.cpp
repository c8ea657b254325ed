// Tests of the `colt5` program's library (app/program/): text training,
// exact resumption, checkpoints that survive SIGKILL, the retrieval task, the
// models and the settings tables. Bad input of every kind: test_app_inputs.cpp.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>

#include <random>

#include "colt5/safetensors.h"
#include "program/checkpoint.h"
#include "program/commands.h"
#include "program/config.h"
#include "program/data.h"
#include "program/files.h"
#include "program/model.h"
#include "program/train.h"
#include "support/app_fixtures.h"

using namespace colt5::app;
using colt5::app_testing::tiny_model;

namespace {

std::string temp_dir(const std::string& name) { return colt5::app_testing::fresh_temp_dir("test_app_tmp", name); }

// A deterministic English-like text: sentences of words from a small
// vocabulary in a fixed grammar, drawn from a fixed seed.
std::string english_like_text(size_t bytes) {
  const std::vector<std::string> det{"the", "a", "every", "no", "this"},
      adj{"quick", "old", "green", "quiet", "bright", "small", "heavy", "gentle"},
      noun{"king", "river", "garden", "letter", "horse", "window", "sailor", "candle", "mountain", "friend"},
      verb{"sees", "follows", "carries", "remembers", "finds", "answers", "keeps", "watches"},
      tail{" at night", " in the morning", " by the sea", "", "", " again"};
  std::mt19937_64 rng(2024);
  auto pick = [&](const std::vector<std::string>& v) -> const std::string& { return v[rng() % v.size()]; };
  std::string text;
  while (text.size() < bytes) {
    std::string sentence = pick(det) + " " + pick(adj) + " " + pick(noun) + " " + pick(verb) + " " + pick(det) + " " +
                           pick(noun) + pick(tail) + ".";
    sentence[0] = static_cast<char>(sentence[0] - 'a' + 'A');
    text += sentence + ((rng() % 4 == 0) ? "\n" : " ");
  }
  text.resize(bytes);
  return text;
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

TEST(AppText, ValidationLossFallsOnGeneratedEnglishLikeText) {
  const std::string dir = temp_dir("text-data");
  const std::string path = dir + "/english.txt";
  write_file_atomic(path, english_like_text(200000));
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
  // Untrained, a byte costs about ln 256 = 5.5 nats; the text's letter statistics are learned within 80 steps.
  EXPECT_LT(r.last_valid.loss, r.first_valid.loss - 0.5)
      << "first " << r.first_valid.loss << " last " << r.last_valid.loss;
  EXPECT_LT(r.last_valid.bpc, 5.0);
  EXPECT_NEAR(r.last_valid.bpc, r.last_valid.loss / std::log(2.0), 1e-9);
  // The run directory has what the program promises.
  EXPECT_TRUE(is_complete_checkpoint(r.checkpoint));
  EXPECT_TRUE(path_exists(o.out_dir + "/metrics.csv"));
  std::string svg = read_text(o.out_dir + "/loss.svg", 1 << 20, "plot");
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  auto rows = read_metrics(o.out_dir + "/metrics.csv");
  ASSERT_FALSE(rows.empty());
  EXPECT_EQ(rows.back().step, 80);
  EXPECT_TRUE(std::isfinite(rows.back().valid_bpc));
  remove_tree(o.out_dir);
  remove_tree(dir);
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
  // Held as bytes; batches are int64.
  EXPECT_EQ(d.split("train").scalar_type(), torch::kByte);
  EXPECT_EQ(d.train_batch(1, 5, 0).tokens.scalar_type(), torch::kLong);
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
    read_text_bytes(dir + "/nope.txt");
    FAIL() << "a missing file was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("nope.txt"), std::string::npos);
  }
  write_file_atomic(dir + "/empty.txt", "");
  try {
    read_text_bytes(dir + "/empty.txt");
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
  EXPECT_LT(region, t.seq_len - 1 - 2 * m.attn.light_window_size());
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
}

TEST(AppTask, HeldOutSetsDoNotDependOnTheTrainingSeedButTrainingBatchesDo) {
  ModelConfig m;
  TrainConfig a, b;
  a.seed = 1;
  b.seed = 2;
  m.vocab_size = task_vocab(a);
  // Two runs that differ only in --seed: their workloads draw the same held-out sets.
  Workload wa(a, m), wb(b, m);
  EXPECT_TRUE(torch::equal(wa.task()->eval_set("valid").tokens, wb.task()->eval_set("valid").tokens));
  EXPECT_TRUE(torch::equal(wa.task()->eval_set("test").targets, wb.task()->eval_set("test").targets));
  EXPECT_FALSE(torch::equal(wa.task()->eval_set("valid").tokens, wa.task()->eval_set("test").tokens));
  EXPECT_FALSE(torch::equal(wa.train_batch(1, 0).tokens, wb.train_batch(1, 0).tokens));
  EXPECT_FALSE(torch::equal(wa.train_batch(1, 0).tokens, wa.train_batch(2, 0).tokens));
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
  bad.attn.heavy_heads(3).num_routed_kv(2);
  EXPECT_THROW(validate(t, bad), UsageError);
  TrainConfig dev = t;
  dev.device = "tpu";
  EXPECT_THROW(validate(dev, m), UsageError);
  ModelConfig rt = model_from_json(to_json(m));
  EXPECT_EQ(to_json(rt), to_json(m));
  TrainConfig tt = train_from_json(to_json(t));
  EXPECT_EQ(to_json(tt), to_json(t));
}

TEST(AppConfig, DefaultRouterSettingsReachEveryRouterOfTheModel) {
  // The program's defaults are the library's router defaults except cosine routing and eps 1.
  const colt5::nn::RouterKwargs lib;
  ModelConfig m = tiny_model();
  m.depth = 2;
  LanguageModel model(m);
  int routers = 0;
  for (const auto& layer : *model->layers) {
    auto block = layer->as<DecoderBlock>();
    for (const colt5::nn::CoordinateDescentRouterOptions& o :
         {block->attn->q_router->options, block->attn->kv_router->options, block->ff->router->options}) {
      ++routers;
      EXPECT_TRUE(o.cosine_sim_routing());
      EXPECT_DOUBLE_EQ(o.eps(), 1.0);
      EXPECT_EQ(o.eps_init(), lib.eps_init());
      EXPECT_DOUBLE_EQ(o.eps_decay(), lib.eps_decay());
      EXPECT_EQ(o.n_iters(), lib.n_iters());
      EXPECT_DOUBLE_EQ(o.fetch_k_ratio(), lib.fetch_k_ratio());
    }
  }
  EXPECT_EQ(routers, 6);
  // A router flag reaches the modules' options through the settings table.
  std::string err;
  ModelConfig changed = m;
  for (const auto& s : model_settings())
    if (std::string(s.flag) == "--router-eps-decay") s.set(changed, SettingValue(0.5));
  EXPECT_DOUBLE_EQ(changed.attn.router_kwargs().eps_decay(), 0.5);
  EXPECT_DOUBLE_EQ(changed.feedforward_options().router_kwargs().eps_decay(), 0.5);
}

TEST(AppConfig, JsonReaderRejectsUnknownAndMissingKeysNamingThem) {
  ModelConfig m;
  nlohmann::json j = to_json(m);
  j["heavy_ff_mul"] = 2;
  try {
    model_from_json(j, SettingNames{"x/config.json"});
    FAIL() << "an unknown key was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("model.heavy_ff_mul"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("x/config.json"), std::string::npos) << e.what();
  }
  j = to_json(m);
  j.erase("depth");
  try {
    model_from_json(j);
    FAIL() << "a missing key was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("model.depth"), std::string::npos) << e.what();
  }
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
  m.arch = Arch::light_only;
  LanguageModel light(m);
  EXPECT_GT(count_parameters(*routed), count_parameters(*light));
  for (const auto& p : light->named_parameters()) {
    EXPECT_EQ(p.key().find("heavy"), std::string::npos) << p.key();
    EXPECT_EQ(p.key().find("router"), std::string::npos) << p.key();
  }
  m.arch = Arch::dense;
  LanguageModel dense(m);
  for (const auto& p : dense->named_parameters()) EXPECT_EQ(p.key().find("router"), std::string::npos) << p.key();
  torch::Tensor tokens = torch::randint(0, m.vocab_size, {2, 50}, torch::kLong);
  EXPECT_EQ(routed->forward(tokens).sizes(), (std::vector<int64_t>{2, 50, m.vocab_size}));
  EXPECT_EQ(light->forward(tokens).sizes(), (std::vector<int64_t>{2, 50, m.vocab_size}));
  EXPECT_EQ(dense->forward(tokens).sizes(), (std::vector<int64_t>{2, 50, m.vocab_size}));
  // Causal: the logits of the light-only and dense models at a position ignore later tokens.
  torch::Tensor changed = tokens.clone();
  changed.index_put_({torch::indexing::Slice(), 40}, (tokens.select(1, 40) + 1) % m.vocab_size);
  EXPECT_TRUE(torch::allclose(light->forward(tokens).narrow(1, 0, 40), light->forward(changed).narrow(1, 0, 40)));
  EXPECT_TRUE(
      torch::allclose(dense->forward(tokens).narrow(1, 0, 40), dense->forward(changed).narrow(1, 0, 40), 1e-5, 1e-6));
  // Dense attention reaches back further than the light window (16 here, at most 32 back).
  torch::Tensor early = tokens.clone();
  early.index_put_({torch::indexing::Slice(), 0}, (tokens.select(1, 0) + 1) % m.vocab_size);
  EXPECT_FALSE(torch::allclose(dense->forward(tokens).select(1, 49), dense->forward(early).select(1, 49)));
  EXPECT_TRUE(torch::allclose(light->forward(tokens).select(1, 49), light->forward(early).select(1, 49)));
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
  m.vocab_size = task_vocab(TrainConfig());
  m.max_seq_len = 512;
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
        t.steps = int64_t{1} << 40;
        for (int64_t k = 1;; ++k) {
          {
            torch::NoGradGuard ng;
            for (auto& p : model->parameters()) p.fill_(static_cast<double>(k));
          }
          CheckpointState state;
          state.step = k;
          state.run_id = "killed";
          state.tokens_seen = k;
          save_checkpoint(run, *model, nullptr, m, t, state, 2);
        }
      } catch (...) {
      }
      ::_exit(3);
    }
    // Kill only once a first checkpoint is complete (on a loaded machine the
    // child may take longer than any fixed sleep to get there), then at a
    // different moment of the next saves in each round.
    auto has_complete = [&] {
      try {
        for (const auto& n : list_dir(run))
          if (n.rfind("ckpt-", 0) == 0 && is_complete_checkpoint(run + "/" + n)) return true;
      } catch (const std::exception&) {  // a directory renamed or removed while listed
      }
      return false;
    };
    for (int waited_ms = 0; !has_complete() && waited_ms < 60000; waited_ms += 5) ::usleep(5000);
    ::usleep(static_cast<useconds_t>(20000 + 90000 * round));
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status));
    CheckpointInfo info = read_checkpoint_info(run);
    ASSERT_GE(info.step, 1) << "no checkpoint completed before the kill";
    EXPECT_EQ(info.state.tokens_seen, info.step);
    LanguageModel loaded(m);
    load_model_weights(*loaded, info.dir + "/model.safetensors");
    for (const auto& p : loaded->named_parameters())
      EXPECT_TRUE(torch::all(p.value() == static_cast<double>(info.step)).item<bool>()) << p.key();
    // Every checkpoint directory visible under its final name is complete.
    for (const auto& n : list_dir(run))
      if (n.rfind("ckpt-", 0) == 0) EXPECT_TRUE(is_complete_checkpoint(run + "/" + n)) << n;
  }
  remove_tree(dir);
}
