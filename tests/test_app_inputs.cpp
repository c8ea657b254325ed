// Bad input to the `colt5` program, each kind with what it must get: damaged
// or inconsistent checkpoints, run directories in use or of another run,
// unbounded or blocking files, bad flags. Most go through the command line
// itself (run_cli), as a user would meet them.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "colt5/safetensors.h"
#include "program/checkpoint.h"
#include "program/commands.h"
#include "program/config.h"
#include "program/files.h"
#include "program/model.h"
#include "program/train.h"
#include "support/app_fixtures.h"

using namespace colt5::app;
using colt5::app_testing::tiny_model;

namespace {

std::string temp_dir(const std::string& name) { return colt5::app_testing::fresh_temp_dir("test_app_tmp", name); }

struct CliResult {
  int status = -1;
  std::string out, err;
};

// Runs the program's command line in this process, capturing what it prints.
CliResult cli(std::vector<std::string> args) {
  args.insert(args.begin(), "colt5");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  CliResult r;
  testing::internal::CaptureStdout();
  testing::internal::CaptureStderr();
  r.status = run_cli(static_cast<int>(argv.size()), argv.data(), [](const std::string&) { return 0; });
  std::fflush(stdout);
  r.out = testing::internal::GetCapturedStdout();
  r.err = testing::internal::GetCapturedStderr();
  return r;
}

#define EXPECT_CONTAINS(text, part) EXPECT_NE((text).find(part), std::string::npos) << "in: " << (text)

TrainConfig tiny_task() {
  TrainConfig t;
  t.seq_len = 96;
  t.batch_size = 2;
  t.steps = 4;
  t.stop_after = 2;
  t.warmup = 1;
  t.eval_every = 2;
  t.save_every = 2;
  t.task_keys = 8;
  t.task_values = 8;
  t.task_filler = 16;
  t.task_eval_size = 4;
  return t;
}

// A run of two steps (of four) in `out`; returns its checkpoint.
std::string train_tiny(const std::string& out, TrainConfig t = tiny_task()) {
  TrainOptions o;
  o.quiet = true;
  o.out_dir = out;
  return Trainer(tiny_model(), t, o).run().checkpoint;
}

// Records the checksums of the checkpoint's files as they are now (after a test changed one).
void reseal(const std::string& ckpt) {
  nlohmann::json marker = nlohmann::json::parse(read_text(ckpt + "/complete", 1 << 20, "marker"));
  for (auto& item : marker["fnv1a64"].items()) item.value() = file_checksum(ckpt + "/" + item.key());
  write_file_atomic(ckpt + "/complete", marker.dump());
}

void edit_json(const std::string& path, const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json j = nlohmann::json::parse(read_text(path, 1 << 20, "json"));
  edit(j);
  write_file_atomic(path, j.dump());
}

void edit_tensors(const std::string& path,
                  const std::function<void(std::vector<std::pair<std::string, torch::Tensor>>&)>& edit) {
  auto data = colt5::load_safetensors(path);
  edit(data.tensors);
  colt5::save_safetensors(path, data.tensors);
}

// A copy of the checkpoint `src` in dir/name.
std::string copy_checkpoint(const std::string& src, const std::string& dir, const std::string& name) {
  const std::string dst = dir + "/" + name;
  make_dirs(dst);
  for (const auto& f : list_dir(src))
    write_file_atomic(dst + "/" + f, read_text(src + "/" + f, uint64_t{1} << 30, "file"));
  return dst;
}

TrainOptions resume_from(const std::string& ckpt, const std::string& out) {
  TrainOptions o;
  o.quiet = true;
  o.resume = ckpt;
  o.out_dir = out;
  return o;
}

// Resuming from ckpt must fail with a UsageError whose message contains every part.
void expect_resume_refused(const std::string& ckpt, const std::string& out, const std::vector<std::string>& parts) {
  try {
    CheckpointInfo info = read_checkpoint_info(ckpt);
    Trainer(info.model, info.train, resume_from(ckpt, out)).run();
    ADD_FAILURE() << "resuming from a bad checkpoint was accepted (" << parts.back() << ")";
  } catch (const UsageError& e) {
    for (const auto& p : parts) EXPECT_CONTAINS(std::string(e.what()), p);
  }
}

}  // namespace

// Every setting of a checkpoint's config.json is validated, the
// train section too, with the file and the field named.
TEST(AppInputs, CheckpointTrainSettingsThatCannotWorkAreErrorsNamingFileAndField) {
  const std::string dir = temp_dir("bad-config");
  const std::string good = train_tiny(dir + "/run");
  struct Case {
    const char* field;
    std::function<void(nlohmann::json&)> edit;
  };
  const std::vector<Case> cases{
      {"train.seq_len", [](nlohmann::json& j) { j["train"]["seq_len"] = 0; }},
      {"train.seq_len", [](nlohmann::json& j) { j["train"]["seq_len"] = -1; }},
      {"train.task_keys", [](nlohmann::json& j) { j["train"]["task_keys"] = 0; }},
      {"train.task_values", [](nlohmann::json& j) { j["train"]["task_values"] = 0; }},
      {"train.task_filler", [](nlohmann::json& j) { j["train"]["task_filler"] = 0; }},
      {"train.task_pairs", [](nlohmann::json& j) { j["train"]["task_pairs"] = 0; }},
      {"train.task_pairs", [](nlohmann::json& j) { j["train"]["task_pairs"] = 9; }},
      {"train.task_eval_size", [](nlohmann::json& j) { j["train"]["task_eval_size"] = 0; }},
      {"train.batch_size", [](nlohmann::json& j) { j["train"]["batch_size"] = 0; }},
      {"train.seq_len", [](nlohmann::json& j) { j["train"]["seq_len"] = "96"; }},
      {"train.seq_len", [](nlohmann::json& j) { j["train"]["seq_len"] = 18446744073709551615ull; }},
      {"train.lr", [](nlohmann::json& j) { j["train"]["lr"] = -1; }},
      {"train.grad_accum", [](nlohmann::json& j) { j["train"].erase("grad_accum"); }},
      {"train.colour", [](nlohmann::json& j) { j["train"]["colour"] = "red"; }},
      {"model.dim", [](nlohmann::json& j) { j["model"]["dim"] = 0; }},
      // A text checkpoint whose data is empty is not scored as the retrieval task.
      {"train.data",
       [](nlohmann::json& j) {
         j["train"]["task"] = "text";
         j["model"]["vocab_size"] = 256;
       }},
      {"model.vocab_size", [](nlohmann::json& j) { j["model"]["vocab_size"] = 256; }},
  };
  for (const auto& c : cases) {
    const std::string ckpt = copy_checkpoint(good, dir, "case");
    edit_json(ckpt + "/config.json", c.edit);
    reseal(ckpt);
    CliResult r = cli({"eval", "--ckpt", ckpt});
    EXPECT_EQ(r.status, 2) << c.field << ": " << r.err;
    EXPECT_CONTAINS(r.err, "config.json");
    EXPECT_CONTAINS(r.err, c.field);
    EXPECT_EQ(r.out.find("loss"), std::string::npos) << "a result was printed: " << r.out;
    remove_tree(ckpt);
  }
  // The untouched checkpoint evaluates.
  CliResult ok = cli({"eval", "--ckpt", good});
  EXPECT_EQ(ok.status, 0) << ok.err;
  EXPECT_CONTAINS(ok.out, "accuracy");
  remove_tree(dir);
}

// One process per run directory; a lock left by a dead process is taken over.
TEST(AppInputs, RunDirectoryIsLockedWhileARunUsesIt) {
  const std::string dir = temp_dir("lock");
  const std::string out = dir + "/run";
  make_dirs(out);
  {
    RunLock held(out);  // another process's lock, as far as the trainer can tell
    TrainOptions o;
    o.quiet = true;
    o.out_dir = out;
    try {
      Trainer(tiny_model(), tiny_task(), o).run();
      FAIL() << "a second run on a locked run directory was accepted";
    } catch (const UsageError& e) {
      EXPECT_CONTAINS(std::string(e.what()), "in use by another colt5 process (pid " + std::to_string(::getpid()));
    }
    EXPECT_TRUE(list_checkpoints(out).empty());
  }
  // A stale lock file (its process is gone, so no one holds the lock) does not stop a run.
  write_file_atomic(out + "/.lock", "999999\n");
  const std::string ckpt = train_tiny(out);
  EXPECT_TRUE(is_complete_checkpoint(ckpt));
  // Two resumes of one directory: the second is refused while the first holds the lock.
  {
    RunLock first(out);
    expect_resume_refused(out, out, {"in use"});
  }
  CheckpointInfo info = read_checkpoint_info(out);
  TrainResult r = Trainer(info.model, info.train, resume_from(out, out)).run();
  EXPECT_EQ(r.step, 4);  // the lock was free again: it continued to --steps
  remove_tree(dir);
}

// --resume A --out B, where B holds another run, is refused and leaves B as it was.
TEST(AppInputs, ResumeIntoAnotherRunsDirectoryIsRefused) {
  const std::string dir = temp_dir("other-run");
  train_tiny(dir + "/a");
  train_tiny(dir + "/b");
  const std::string b_metrics = read_text(dir + "/b/metrics.csv", 1 << 20, "metrics");
  const auto b_ckpts = list_checkpoints(dir + "/b");
  TrainConfig t = tiny_task();
  t.stop_after = 0;
  CheckpointInfo info = read_checkpoint_info(dir + "/a");
  try {
    Trainer(info.model, t, resume_from(dir + "/a", dir + "/b")).run();
    FAIL() << "resuming run a into run b's directory was accepted";
  } catch (const UsageError& e) {
    EXPECT_CONTAINS(std::string(e.what()), "another run");
  }
  EXPECT_EQ(read_text(dir + "/b/metrics.csv", 1 << 20, "metrics"), b_metrics);
  EXPECT_EQ(list_checkpoints(dir + "/b"), b_ckpts);
  // Into a new directory it continues, with the metrics of its first part.
  TrainResult r = Trainer(info.model, t, resume_from(dir + "/a", dir + "/c")).run();
  EXPECT_EQ(r.step, 4);
  EXPECT_EQ(read_metrics(dir + "/c/metrics.csv").front().step, 2);
  remove_tree(dir);
}

// The optimizer state is checked in full before anything runs.
TEST(AppInputs, DamagedOptimizerStateIsRefusedNamingFileAndTensor) {
  const std::string dir = temp_dir("bad-optimizer");
  const std::string good = train_tiny(dir + "/run");
  const std::string param = "exp_avg/to_logits.weight";
  struct Case {
    const char* expect;
    std::function<void(std::vector<std::pair<std::string, torch::Tensor>>&)> edit;
  };
  const std::vector<Case> cases{
      {"no optimizer state", [](auto& ts) { ts.clear(); }},
      {"one int64 step",
       [](auto& ts) {
         for (auto& [n, t] : ts)
           if (n.rfind("step/", 0) == 0) t = t.to(torch::kDouble);
       }},
      {"NaN",
       [&](auto& ts) {
         for (auto& [n, t] : ts)
           if (n == param) t.view(-1)[0].fill_(NAN);
       }},
      {"outside 1..2",
       [](auto& ts) {
         for (auto& [n, t] : ts)
           if (n.rfind("step/", 0) == 0) t.fill_(-3);
       }},
      {"has shape",
       [&](auto& ts) {
         for (auto& [n, t] : ts)
           if (n == param) t = t.narrow(0, 0, 1).contiguous();
       }},
      {"rng/cpu",
       [](auto& ts) {
         for (auto& [n, t] : ts)
           if (n == "rng/cpu") t = t.narrow(0, 0, 10).contiguous();
       }},
  };
  for (const auto& c : cases) {
    const std::string ckpt = copy_checkpoint(good, dir, "ckpt-00000002");
    edit_tensors(ckpt + "/optimizer.safetensors", c.edit);
    reseal(ckpt);
    expect_resume_refused(ckpt, dir + "/out", {"optimizer.safetensors", c.expect});
    remove_tree(ckpt);
    remove_tree(dir + "/out");
  }
  remove_tree(dir);
}

// state.json is validated: its step, run and seed.
TEST(AppInputs, DamagedStateIsRefusedNamingFileAndField) {
  const std::string dir = temp_dir("bad-state");
  const std::string good = train_tiny(dir + "/run");
  const std::vector<std::pair<const char*, std::function<void(nlohmann::json&)>>> cases{
      {"step", [](nlohmann::json& j) { j["step"] = -4; }},
      {"step", [](nlohmann::json& j) { j.erase("step"); }},
      {"step", [](nlohmann::json& j) { j["step"] = 1; }},
      {"run_id", [](nlohmann::json& j) { j.erase("run_id"); }},
      {"seed", [](nlohmann::json& j) { j["seed"] = 5; }},
      {"elapsed_s", [](nlohmann::json& j) { j["elapsed_s"] = -1.0; }},
      {"unknown field", [](nlohmann::json& j) { j["data_position"] = 2; }},
  };
  for (const auto& [expect, edit] : cases) {
    const std::string ckpt = copy_checkpoint(good, dir, "ckpt-00000002");
    edit_json(ckpt + "/state.json", edit);
    reseal(ckpt);
    expect_resume_refused(ckpt, dir + "/out", {"state.json", expect});
    remove_tree(ckpt);
  }
  remove_tree(dir);
}

// Weights are checked (names, dtypes, finite) and every file against its checksum.
TEST(AppInputs, DamagedWeightsAreRefused) {
  const std::string dir = temp_dir("bad-weights");
  const std::string good = train_tiny(dir + "/run");
  const std::string w = "to_logits.weight";
  const std::vector<std::pair<const char*, std::function<void(std::vector<std::pair<std::string, torch::Tensor>>&)>>>
      cases{
          {"NaN or infinite",
           [&](auto& ts) {
             for (auto& [n, t] : ts)
               if (n == w) t.view(-1)[3].fill_(NAN);
           }},
          {"dtype",
           [&](auto& ts) {
             for (auto& [n, t] : ts)
               if (n == w) t = t.to(torch::kInt);
           }},
          {"dtype",
           [&](auto& ts) {
             for (auto& [n, t] : ts)
               if (n == w) t = t.to(torch::kBool);
           }},
          {"missing keys", [&](auto& ts) { ts.pop_back(); }},
          // Finite weights so large that the activations overflow.
          {"forward pass",
           [&](auto& ts) {
             for (auto& [n, t] : ts)
               if (n == w) t.fill_(3e38);
           }},
      };
  for (const auto& [expect, edit] : cases) {
    const std::string ckpt = copy_checkpoint(good, dir, "ckpt-00000002");
    edit_tensors(ckpt + "/model.safetensors", edit);
    reseal(ckpt);
    CliResult r = cli({"eval", "--ckpt", ckpt});
    EXPECT_EQ(r.status, 2) << expect << ": " << r.err;
    EXPECT_CONTAINS(r.err, "model.safetensors");
    EXPECT_CONTAINS(r.err, expect);
    remove_tree(ckpt);
  }
  {
    // The same for a resumed run.
    const std::string ckpt = copy_checkpoint(good, dir, "ckpt-00000002");
    edit_tensors(ckpt + "/model.safetensors", [&](auto& ts) {
      for (auto& [n, t] : ts)
        if (n == w) t.fill_(3e38);
    });
    reseal(ckpt);
    expect_resume_refused(ckpt, dir + "/out", {"model.safetensors", "forward pass", "damaged"});
    remove_tree(ckpt);
  }
  // One flipped bit in any file, with the marker left as written: the checksum catches it.
  for (const char* file : {"model.safetensors", "optimizer.safetensors", "config.json", "state.json"}) {
    const std::string ckpt = copy_checkpoint(good, dir, "ckpt-00000002");
    std::string bytes = read_text(ckpt + "/" + file, uint64_t{1} << 30, "file");
    bytes[bytes.size() - 2] ^= 0x10;
    write_file_atomic(ckpt + "/" + file, bytes);
    CliResult r = cli({"eval", "--ckpt", ckpt});
    EXPECT_EQ(r.status, 2) << file;
    EXPECT_CONTAINS(r.err, std::string(file) + "' is damaged");
    remove_tree(ckpt);
  }
  remove_tree(dir);
}

// Inputs are read only from regular files, with a size limit; nothing blocks.
TEST(AppInputs, ReadsAreBoundedAndOnlyFromRegularFiles) {
  const std::string dir = temp_dir("bounded");
  // --data /dev/zero: refused at once, not read until memory runs out.
  CliResult r = cli({"train", "--data", "/dev/zero", "--out", dir + "/zero", "--steps", "1"});
  EXPECT_EQ(r.status, 2);
  EXPECT_CONTAINS(r.err, "'/dev/zero' is not a regular file");
  // A directory as --data.
  r = cli({"train", "--data", dir, "--out", dir + "/d", "--steps", "1"});
  EXPECT_EQ(r.status, 2);
  EXPECT_CONTAINS(r.err, "a directory");
  // A checkpoint's config.json linked to /dev/zero, and a FIFO as state.json.
  const std::string good = train_tiny(dir + "/run");
  std::string ckpt = copy_checkpoint(good, dir, "ckpt-00000002");
  ::unlink((ckpt + "/config.json").c_str());
  ASSERT_EQ(::symlink("/dev/zero", (ckpt + "/config.json").c_str()), 0);
  r = cli({"eval", "--ckpt", ckpt});
  EXPECT_EQ(r.status, 2);
  EXPECT_CONTAINS(r.err, "config.json' is not a regular file");
  remove_tree(ckpt);
  ckpt = copy_checkpoint(good, dir, "ckpt-00000002");
  ::unlink((ckpt + "/state.json").c_str());
  ASSERT_EQ(::mkfifo((ckpt + "/state.json").c_str(), 0644), 0);
  r = cli({"eval", "--ckpt", ckpt});
  EXPECT_EQ(r.status, 2);
  EXPECT_CONTAINS(r.err, "state.json' is not a regular file (a FIFO)");
  remove_tree(ckpt);
  // Over the limit: a clear message with both sizes.
  write_file_atomic(dir + "/big.json", std::string(100, ' '));
  try {
    read_text(dir + "/big.json", 10, "settings file");
    FAIL() << "a file over the limit was read";
  } catch (const UsageError& e) {
    EXPECT_CONTAINS(std::string(e.what()), "is 100 bytes, more than the limit of 10 bytes");
  }
  remove_tree(dir);
}

// A temperature that is not a finite number >= 0 is refused; a tiny one is greedy.
TEST(AppInputs, SampleTemperatureMustBeFiniteAndTinyOnesAreGreedy) {
  const std::string dir = temp_dir("sample");
  std::string text;
  for (int i = 0; i < 4000; ++i) text += "abcabd"[i % 6];
  write_file_atomic(dir + "/text.txt", text);
  ModelConfig m = tiny_model();
  m.vocab_size = 256;
  TrainConfig t;
  t.data = dir + "/text.txt";
  t.seq_len = 48;
  t.batch_size = 2;
  t.steps = 2;
  t.eval_batches = 1;
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir + "/run";
  Trainer(m, t, o).run();
  for (const char* bad : {"nan", "-1", "inf"}) {
    CliResult r = cli({"sample", "--ckpt", o.out_dir, "--prompt", "ab", "--temperature", bad});
    EXPECT_NE(r.status, 0) << bad;
    EXPECT_CONTAINS(r.err, "--temperature");
  }
  CliResult greedy = cli({"sample", "--ckpt", o.out_dir, "--prompt", "ab", "--temperature", "0", "--length", "20"});
  CliResult tiny = cli({"sample", "--ckpt", o.out_dir, "--prompt", "ab", "--temperature", "1e-320", "--length", "20"});
  ASSERT_EQ(greedy.status, 0) << greedy.err;
  ASSERT_EQ(tiny.status, 0) << tiny.err;
  EXPECT_EQ(tiny.out, greedy.out);
  EXPECT_EQ(greedy.out.size(), 2u + 20u + 1u);
  remove_tree(dir);
}

// --threads after the subcommand, bounded by the cores this process may use.
TEST(AppInputs, ThreadsFlagAfterTheSubcommandAndBoundedByTheCores) {
  CliResult r = cli({"eval", "--threads", "1", "--ckpt", "/nonexistent/run"});
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err.find("not expected"), std::string::npos) << r.err;
  EXPECT_CONTAINS(r.err, "/nonexistent/run");
  r = cli({"train", "--threads", "1000", "--steps", "1"});
  EXPECT_EQ(r.status, 2);
  EXPECT_CONTAINS(r.err, "--threads 1000 is more than the " + std::to_string(available_cores()) + " cores");
  r = cli({"--threads", "1", "eval", "--ckpt", "/nonexistent/run"});
  EXPECT_EQ(r.status, 2);
  EXPECT_CONTAINS(r.err, "/nonexistent/run");
}

// Checkpoints ordered by step, integers out of range refused,
// and --data stored as an absolute path.
TEST(AppInputs, CheckpointsSortByStepIntegersDoNotSaturateDataPathIsAbsolute) {
  const std::string dir = temp_dir("smaller");
  for (const char* name : {"ckpt-99999999", "ckpt-100000000", "ckpt-00000007"}) {
    make_dirs(dir + "/" + name);
    write_file_atomic(dir + "/" + name + "/complete", "{}");
  }
  EXPECT_EQ(list_checkpoints(dir),
            (std::vector<std::string>{dir + "/ckpt-00000007", dir + "/ckpt-99999999", dir + "/ckpt-100000000"}));
  EXPECT_EQ(resolve_checkpoint(dir), dir + "/ckpt-100000000");
  remove_tree(dir);

  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"sample", "--ckpt", "x", "--prompt", "a", "--length", "18446744073709551621"},
        std::vector<std::string>{"train", "--steps", "9223372036854775808"},
        std::vector<std::string>{"train", "--seed=-1"}, std::vector<std::string>{"train", "--dim", "12abc"}}) {
    CliResult r = cli(args);
    EXPECT_NE(r.status, 0) << args.back();
    EXPECT_TRUE(r.err.find("out of range") != std::string::npos || r.err.find("integer") != std::string::npos)
        << args.back() << ": " << r.err;
  }

  const std::string work = temp_dir("relative");
  std::string text;
  for (int i = 0; i < 3000; ++i) text += "xyz"[i % 3];
  write_file_atomic(work + "/text.txt", text);
  char cwd[4096];
  ASSERT_NE(::getcwd(cwd, sizeof cwd), nullptr);
  ASSERT_EQ(::chdir(work.c_str()), 0);
  CliResult r = cli({"train", "--data",         "text.txt", "--seq-len",  "48",   "--window",
                     "16",    "--heavy-window", "16",       "--dim",      "16",   "--depth",
                     "1",     "--heavy-q",      "8",        "--heavy-kv", "8",    "--heavy-ff-tokens",
                     "8",     "--batch",        "2",        "--steps",    "1",    "--eval-batches",
                     "1",     "--out",          "run",      "--progress", "never"});
  ASSERT_EQ(::chdir(cwd), 0);
  ASSERT_EQ(r.status, 0) << r.err;
  CheckpointInfo info = read_checkpoint_info(work + "/run");
  EXPECT_EQ(info.train.data, absolute_path(work + "/text.txt"));
  // So it evaluates from another folder.
  CliResult e = cli({"eval", "--ckpt", work + "/run"});
  EXPECT_EQ(e.status, 0) << e.err;
  remove_tree(work);
}

TEST(AppBench, DenseModelIsTimedBesideRoutedAndLightOnlyWithPeakMemory) {
  CliResult r = cli({"bench",     "--dense", "--batch",        "1", "--seq-len",         "64",
                     "--dim",     "16",      "--depth",        "1", "--window",          "16",
                     "--heavy-q", "8",       "--heavy-kv",     "8", "--heavy-ff-tokens", "8",
                     "--iters",   "1",       "--warmup-iters", "0"});
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* row : {"\nrouted ", "\nlight-only ", "\ndense ", "peak MiB", "routed / dense time"})
    EXPECT_CONTAINS(r.out, row);
}

// The parameter estimate behind the memory check follows the real count of
// each kind of model, and a run that cannot fit is refused before anything
// is built, naming the estimate, what is available and the flags to change.
TEST(AppInputs, RunsThatCannotFitAreRefusedEarlyWithTheEstimate) {
  for (Arch arch : {Arch::routed, Arch::light_only, Arch::dense})
    for (int64_t dim : {32, 256}) {
      ModelConfig m = tiny_model();
      m.arch = arch;
      m.attn.dim(dim).light_heads(4).light_dim_head(dim / 4).heavy_heads(4).heavy_dim_head(dim / 4);
      m.depth = 2;
      m.max_seq_len = 512;
      const double real = static_cast<double>(count_parameters(*LanguageModel(m)));
      const double estimate = estimate_parameters(m);
      EXPECT_LE(estimate, real) << arch_name(arch) << " dim " << dim;  // a lower bound: nothing that fits is refused
      EXPECT_GT(estimate, 0.9 * real) << arch_name(arch) << " dim " << dim;
    }
  // Training needs more than a forward, and memory grows with the tokens.
  const ModelConfig m = tiny_model();
  EXPECT_GT(estimate_memory(m, 2, 96, true, false).bytes, estimate_memory(m, 2, 96, false, false).bytes);
  EXPECT_GT(estimate_memory(m, 4, 96, true, false).bytes, 1.5 * estimate_memory(m, 2, 96, true, false).bytes);
  const double available = available_memory(torch::kCPU);
  ASSERT_TRUE(std::isfinite(available));
  EXPECT_GT(available, 0);

  const std::string dir = temp_dir("fit");
  // 2^20 sequences of 8192 tokens at width 512: petabytes, refused at once.
  const auto t0 = std::chrono::steady_clock::now();
  CliResult r = cli({"train", "--out", dir + "/run", "--batch", "1048576", "--seq-len", "8192", "--dim", "512",
                     "--steps", "1", "--progress", "never"});
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_CONTAINS(r.err, "training (1048576 sequences per process and step) cannot fit: it needs about ");
  EXPECT_CONTAINS(r.err, "but this machine has ");
  EXPECT_CONTAINS(r.err, "use a smaller --batch, --seq-len, --dim or --depth");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
  EXPECT_FALSE(path_exists(dir + "/run/metrics.csv"));
  r = cli({"bench", "--batch", "1048576", "--seq-len", "8192", "--dim", "512"});
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_CONTAINS(r.err, "colt5 bench's routed model cannot fit");
  remove_tree(dir);
}

// The command line's check-only mode (the command-line fuzzer's entry)
// accepts what the program would start with and refuses what it would refuse,
// without running anything or reading any file.
TEST(AppInputs, CheckOnlyCommandLineChecksWithoutRunning) {
  auto check = [](std::vector<std::string> args) {
    args.insert(args.begin(), "colt5");
    std::vector<const char*> argv;
    for (const auto& a : args) argv.push_back(a.c_str());
    testing::internal::CaptureStdout();
    testing::internal::CaptureStderr();
    const int status =
        run_cli(static_cast<int>(argv.size()), argv.data(), [](const std::string&) { return 0; }, true);
    testing::internal::GetCapturedStdout();
    const std::string err = testing::internal::GetCapturedStderr();
    return std::make_pair(status, err);
  };
  const std::string dir = temp_dir("check");
  EXPECT_EQ(check({"train", "--out", dir + "/run", "--steps", "100000"}).first, 0);
  EXPECT_FALSE(path_exists(dir + "/run"));  // nothing ran
  EXPECT_EQ(check({"train", "--resume", "/nonexistent/run"}).first, 0);  // no file is read
  auto r = check({"train", "--seq-len", "0"});
  EXPECT_EQ(r.first, 2);
  EXPECT_CONTAINS(r.second, "--seq-len");
  r = check({"train", "--resume", "x", "--dim", "64"});
  EXPECT_EQ(r.first, 2);
  EXPECT_CONTAINS(r.second, "--dim cannot change on --resume");
  r = check({"sample", "--ckpt", "x", "--prompt", "a", "--temperature", "nan"});
  EXPECT_EQ(r.first, 2);
  EXPECT_CONTAINS(r.second, "--temperature must be a finite number");
  r = check({"bench", "--iters", "0"});
  EXPECT_EQ(r.first, 2);
  EXPECT_CONTAINS(r.second, "--iters >= 1");
  EXPECT_EQ(check({"eval", "--ckpt", "/nonexistent/run"}).first, 0);
  // --tf32 is a run-time switch: accepted with --resume too.
  EXPECT_EQ(check({"bench", "--tf32", "--no-amp"}).first, 0);
  EXPECT_EQ(check({"train", "--resume", "x", "--tf32"}).first, 0);
  EXPECT_EQ(check({"train", "--resume", "x", "--cuda-graph"}).first, 0);
  r = check({"train", "--cuda-graph"});  // the CPU by default
  EXPECT_EQ(r.first, 2);
  EXPECT_CONTAINS(r.second, "--cuda-graph");
  remove_tree(dir);
}

// --cuda-graph (train, bench) replays the training step from a CUDA graph: on
// the CPU, with several micro-batches or several processes it is a usage error
// naming what to change; with --resume it is accepted (a run-time switch).
TEST(AppInputs, CudaGraphNeedsCudaOneMicroBatchAndOneProcess) {
  const std::string dir = temp_dir("graph");
  CliResult r = cli({"train", "--out", dir + "/run", "--cuda-graph", "--steps", "1", "--progress", "never"});
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_CONTAINS(r.err, "--cuda-graph replays the training step from a CUDA graph: it needs --device cuda");
  EXPECT_FALSE(path_exists(dir + "/run/metrics.csv"));
  r = cli({"bench", "--cuda-graph", "--iters", "1"});
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_CONTAINS(r.err, "--cuda-graph replays the training step from a CUDA graph: it needs --device cuda");

  TrainConfig t;
  t.device = "cuda";
  TrainOptions o;
  EXPECT_NO_THROW(check_cuda_graph(t, o));  // off: nothing to check
  o.cuda_graph = true;
  auto message = [&] {
    try {
      check_cuda_graph(t, o);
    } catch (const UsageError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
#ifdef COLT5_WITH_CUDA
  EXPECT_EQ(message(), "");
  t.grad_accum = 2;
  EXPECT_CONTAINS(message(), "use --grad-accum 1 (got 2)");
  t.grad_accum = 1;
  o.dist.nproc = 2;
  EXPECT_CONTAINS(message(), "--cuda-graph runs in one process");
  o.dist.nproc = 1;
  o.dist.explicit_group = true;
  EXPECT_CONTAINS(message(), "--cuda-graph runs in one process");
#else
  EXPECT_CONTAINS(message(), "--cuda-graph needs colt5 built with CUDA");
#endif
  remove_tree(dir);
}
