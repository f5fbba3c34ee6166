// Crash-safe checkpoints, proven by breaking the writer on purpose (issue 18, item 5):
// `mambacpp train --save-every 1` runs as a child process and is killed with SIGKILL at random
// moments, many times over one checkpoint folder (so kills land in the middle of saves too);
// after every kill the folder must load as a complete checkpoint whose weights and AdamW moments
// are bit for bit those of the same step of an uninterrupted run, and the chain of killed and
// resumed runs must end on the uninterrupted run's final checkpoint. A save over a file-size limit
// (the disk-full case) must fail with a clear error and leave the previous checkpoint intact.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "mamba/parallel.h"
#include "mamba/safetensors.h"
#include "mamba/train.h"
#include "test_util.h"

using namespace mamba;
using mamba::train::Trainer;
namespace fs = std::filesystem;

namespace {

constexpr int kSteps = 16;
// A tiny model, so one step (and one save) takes milliseconds; one thread, so the in-process
// reference computes exactly what the child does.
const std::vector<std::string> kModelArgs = {
    "--layer", "mamba1",    "--d_model", "16", "--n_layer",   "2",    "--d_state",      "4",
    "--task",  "induction", "--seqlen",  "16", "--batch",     "2",    "--task-vocab",   "8",
    "--seed",  "5",         "--threads", "1",  "--log-every", "1000", "--eval-batches", "0"};

std::string tmp_dir(const std::string& name) {
  // The process id keeps two runs of the suite on one machine apart.
  const fs::path p =
      fs::temp_directory_path() / ("mamba_crash_" + std::to_string(getpid()) + "_" + name);
  fs::remove_all(p);
  return p.string();
}

// Starts `mambacpp args...` (stdout and stderr to `log`); optionally with a file-size limit.
pid_t spawn(const std::vector<std::string>& args, const std::string& log, rlim_t fsize = 0) {
  std::vector<std::string> all = {MAMBA_CLI_PATH};
  all.insert(all.end(), args.begin(), args.end());
  std::fflush(stdout);  // or the child would write out a copy of what is buffered
  pid_t pid = fork();
  if (pid == 0) {
    FILE* f = std::freopen(log.c_str(), "w", stdout);
    if (f) dup2(fileno(stdout), 2);
    if (fsize) {
      struct rlimit rl = {fsize, fsize};
      setrlimit(RLIMIT_FSIZE, &rl);
    }
    std::vector<char*> argv;
    for (auto& a : all) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

int wait_status(pid_t pid) {
  int st = 0;
  waitpid(pid, &st, 0);
  return st;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::vector<std::string> train_args(const std::string& dir, bool resume, int steps) {
  std::vector<std::string> a = {"train"};
  if (resume) {
    a.insert(a.end(), {"--resume", dir, "--threads", "1", "--log-every", "1000"});
  } else {
    a.insert(a.end(), kModelArgs.begin(), kModelArgs.end());
    a.insert(a.end(), {"--save", dir});
  }
  a.insert(a.end(), {"--steps", std::to_string(steps), "--save-every", "1"});
  return a;
}

// Every parameter value and every optimiser state tensor of the run, as raw bits.
std::vector<float> snapshot(Trainer& tr, const std::string& dir) {
  std::vector<float> out;
  for (auto& [name, p] : tr.model().named_parameters()) {
    Tensor v = p->value.to_f32();
    out.insert(out.end(), v.data(), v.data() + v.numel());
  }
  auto of = SafetensorsFile::open((fs::path(dir) / "optimizer.safetensors").string());
  for (const auto& n : of.names()) {
    Tensor t = of.tensor(n);
    out.insert(out.end(), t.data(), t.data() + t.numel());
  }
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST(CrashSafety, SigkillAtRandomMomentsLeavesALoadableBitExactCheckpoint) {
  set_num_threads(1);
  // The reference: the CLI's step-0 checkpoint, then kSteps uninterrupted steps in process, each
  // step's weights + moments recorded (saved after each step, as the child does).
  const std::string ref = tmp_dir("ref"), log = tmp_dir("log.txt");
  ASSERT_EQ(wait_status(spawn(train_args(ref, false, 0), log)), 0) << read_text(log);
  std::vector<std::vector<float>> expect(kSteps + 1);
  {
    Trainer tr = Trainer::resume(ref);
    ASSERT_EQ(tr.step(), 0);
    expect[0] = snapshot(tr, ref);
    for (int s = 1; s <= kSteps; ++s) {
      tr.train_step();
      tr.save(ref);
      expect[s] = snapshot(tr, ref);
    }
  }
  // An uninterrupted CLI run gives the same final checkpoint (the reference is the child's).
  const std::string whole = tmp_dir("whole");
  ASSERT_EQ(wait_status(spawn(train_args(whole, false, kSteps), log)), 0) << read_text(log);
  {
    Trainer tr = Trainer::resume(whole);
    ASSERT_EQ(tr.step(), kSteps);
    ASSERT_TRUE(same_bits(snapshot(tr, whole), expect[kSteps]));
  }

  const std::string dir = tmp_dir("run"), check = tmp_dir("check");
  std::mt19937 rng(1234);
  // Kill delays: the child needs a few ms to start and each step + save takes a few ms, so delays
  // up to 60% of a whole run's length land at every phase: start-up, steps, and inside saves (a
  // resumed run has fewer steps left; longer delays would mostly let it finish).
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(wait_status(spawn(train_args(tmp_dir("timing"), false, kSteps), log)), 0);
  const double run_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::uniform_real_distribution<double> delay_ms(0.0, 0.6 * run_ms);
  int trials = 0, killed_mid_save = 0, before_first = 0, completed_runs = 0;
  for (; trials < 50; ++trials) {
    const bool have = fs::exists(fs::path(dir) / "trainer_state.json");
    pid_t pid = spawn(train_args(dir, have, kSteps), log);
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(delay_ms(rng)));
    kill(pid, SIGKILL);
    const int st = wait_status(pid);
    if (WIFEXITED(st)) {
      ASSERT_EQ(WEXITSTATUS(st), 0) << read_text(log);  // finished before the kill
    }
    if (fs::exists(fs::path(dir) / ".pending")) ++killed_mid_save;
    if (!fs::exists(fs::path(dir) / "trainer_state.json")) {
      ++before_first;  // killed before its first checkpoint was committed: nothing to load yet
      continue;
    }
    // Load a copy (the next child resumes the original, finishing any interrupted save itself).
    fs::remove_all(check);
    fs::copy(dir, check, fs::copy_options::recursive);
    Trainer tr = Trainer::resume(check);
    const int64_t s = tr.step();
    ASSERT_TRUE(s >= 0 && s <= kSteps) << s;
    ASSERT_TRUE(same_bits(snapshot(tr, check), expect[static_cast<size_t>(s)]))
        << "trial " << trials << ": the checkpoint of step " << s << " differs from the run's";
    EXPECT_FALSE(fs::exists(fs::path(check) / ".pending"));
    if (s == kSteps) {  // this chain is done: start another one
      ++completed_runs;
      fs::remove_all(dir);
    }
  }
  // The chain in progress finishes without a kill on the uninterrupted run's final checkpoint.
  if (fs::exists(fs::path(dir) / "trainer_state.json")) {
    ASSERT_EQ(wait_status(spawn(train_args(dir, true, kSteps), log)), 0) << read_text(log);
    Trainer tr = Trainer::resume(dir);
    ASSERT_EQ(tr.step(), kSteps);
    EXPECT_TRUE(same_bits(snapshot(tr, dir), expect[kSteps]));
  }
  std::printf(
      "%d kills (a run takes %.0f ms): %d landed inside a save, %d before the first checkpoint, %d "
      "chains ran to the end\n",
      trials, run_ms, killed_mid_save, before_first, completed_runs);
  EXPECT_GT(killed_mid_save, 0) << "no kill landed inside a save: the test did not test that";
  for (const auto& d : {ref, whole, dir, check, tmp_dir("timing"), log}) fs::remove_all(d);
}

TEST(CrashSafety, DiskFullFailsClearlyAndKeepsThePreviousCheckpoint) {
  const std::string dir = tmp_dir("full"), log = tmp_dir("full_log.txt");
  ASSERT_EQ(wait_status(spawn(train_args(dir, false, 3), log)), 0) << read_text(log);
  const auto model = read_text(dir + "/model.safetensors"),
             optim = read_text(dir + "/optimizer.safetensors"),
             state = read_text(dir + "/trainer_state.json");
  ASSERT_GT(model.size(), 1000u);
  // No file over half the model's size can be written: the next save cannot complete.
  const int st = wait_status(spawn(train_args(dir, true, 6), log, model.size() / 2));
  const std::string out = read_text(log);
  ASSERT_TRUE(WIFEXITED(st)) << "killed by a signal (SIGXFSZ?): " << out;
  EXPECT_EQ(WEXITSTATUS(st), 1) << out;
  EXPECT_NE(out.find("saving the checkpoint of step 4"), std::string::npos) << out;
  EXPECT_NE(out.find("the previous checkpoint there is intact"), std::string::npos) << out;
  EXPECT_NE(out.find("File too large"), std::string::npos) << out;
  EXPECT_EQ(read_text(dir + "/model.safetensors"), model);
  EXPECT_EQ(read_text(dir + "/optimizer.safetensors"), optim);
  EXPECT_EQ(read_text(dir + "/trainer_state.json"), state);
  EXPECT_FALSE(fs::exists(dir + "/.pending"));
  Trainer tr = Trainer::resume(dir);
  EXPECT_EQ(tr.step(), 3);
  fs::remove_all(dir), fs::remove_all(log);
}
