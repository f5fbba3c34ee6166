// The MPI implementation of train::Dist (include/mamba/train_dist.h): the only file that includes
// <mpi.h>. Compiled into the mambacpp tool (not libmamba, whose users need no MPI); without MPI
// (MAMBA_MPI=OFF or not found) make_mpi_dist() returns nullptr and training is one process.
//
// sum(): a deterministic all-reduce in two non-blocking collectives. The buffer (padded to N equal
// slices) goes through MPI_Ialltoall, so rank r receives slice r of every rank; it sums them in
// rank order (s = x0; s += x1; ...), and MPI_Iallgather returns every reduced slice to every rank.
// The data volume is that of a ring all-reduce (2 (N-1)/N of the buffer sent and received per
// rank), and the result does not depend on the algorithms MPI picks. MPI_Iallreduce would not
// promise that order (nor, by the standard, the same bits on every rank).
//
// Progress: OpenMPI's non-blocking collectives advance inside MPI calls, so the trainer calls
// progress() after every block's backward; wait_all() polls with MPI_Test so that a peer that
// died or hangs ends the job after the timeout instead of blocking forever.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <thread>
#include <vector>

#include "mamba/error.h"
#include "mamba/train_dist.h"

#if defined(MAMBA_HAVE_MPI)
#include <mpi.h>
#endif

namespace mamba::train {

#if defined(MAMBA_HAVE_MPI)
namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

class MpiDist final : public Dist {
 public:
  explicit MpiDist(double timeout_s) : timeout_s_(timeout_s) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node);
    MPI_Comm_size(node, &local_size_);
    MPI_Comm_free(&node);
    // Errors come back as codes (checked below) instead of MPI's default abort without context.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    // Every rank must start the collectives of a communicator in the same order. The all-to-alls
    // start in bucket order, the all-gathers in bucket order too, but how they interleave depends
    // on when each all-to-all completes on each rank: so each phase has its own communicator.
    MPI_Comm_dup(MPI_COMM_WORLD, &scatter_comm_);
    MPI_Comm_dup(MPI_COMM_WORLD, &gather_comm_);
  }
  ~MpiDist() override {
    // Leaving by an exception while peers may sit in a collective: end the job, do not hang in
    // MPI_Finalize.
    if (std::uncaught_exceptions() > 0 && size_ > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    MPI_Comm_free(&scatter_comm_);
    MPI_Comm_free(&gather_comm_);
    MPI_Finalize();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_size() const override { return local_size_; }

  void start_sum(std::span<float> buf) override {
    const auto t0 = Clock::now();
    Op& op = ops_.emplace_back();
    op.out = buf;
    const size_t n = buf.size(), N = static_cast<size_t>(size_);
    op.chunk = (n + N - 1) / N;
    MAMBA_CHECK(op.chunk <= static_cast<size_t>(INT32_MAX), "dist: a gradient bucket of ", n,
                " floats is too large for one MPI call");
    op.send.assign(op.chunk * N, 0.0f);
    std::copy(buf.begin(), buf.end(), op.send.begin());
    op.recv.resize(op.chunk * N);
    check(MPI_Ialltoall(op.send.data(), static_cast<int>(op.chunk), MPI_FLOAT, op.recv.data(),
                        static_cast<int>(op.chunk), MPI_FLOAT, scatter_comm_, &op.req),
          "MPI_Ialltoall");
    stats_.sums += 1;
    stats_.bytes_sent += static_cast<int64_t>(2 * (N - 1) * op.chunk * sizeof(float));
    stats_.bytes_received += static_cast<int64_t>(2 * (N - 1) * op.chunk * sizeof(float));
    stats_.busy_s += since(t0);
  }

  void progress() override {
    const auto t0 = Clock::now();
    advance();
    stats_.busy_s += since(t0);
  }

  void wait_all() override {
    const auto t0 = Clock::now();
    while (!ops_.empty()) {
      if (!advance()) {
        if (since(t0) > timeout_s_) timed_out("the gradient sum");
        std::this_thread::yield();
      }
    }
    stats_.wait_s += since(t0);
  }

  void sum_disjoint(std::span<double> v) override {
    std::vector<double> in(v.begin(), v.end());
    MPI_Request req;
    check(MPI_Iallreduce(in.data(), v.data(), static_cast<int>(v.size()), MPI_DOUBLE, MPI_SUM,
                         MPI_COMM_WORLD, &req),
          "MPI_Iallreduce");
    wait(req, "the loss sum");
  }

  void barrier() override {
    MPI_Request req;
    check(MPI_Ibarrier(MPI_COMM_WORLD, &req), "MPI_Ibarrier");
    wait(req, "a barrier");
  }

  [[noreturn]] void abort(const std::string& message) override {
    std::fprintf(stderr, "error (rank %d of %d): %s\n", rank_, size_, message.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    std::exit(1);  // MPI_Abort does not return; in case it does
  }

  Stats take_stats() override {
    Stats s = stats_;
    stats_ = Stats{};
    return s;
  }

 private:
  struct Op {
    std::span<float> out;
    size_t chunk = 0;
    std::vector<float> send, recv;
    MPI_Request req = MPI_REQUEST_NULL;
    int stage = 0;  // 0: all-to-all in flight; 1: all-gather in flight
  };

  void check(int rc, const char* what) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    abort(str(what, " failed: ", std::string(msg, static_cast<size_t>(len)),
              " (a peer process died?)"));
  }

  [[noreturn]] void timed_out(const char* what) {
    abort(str("waited more than ", timeout_s_, " s for ", what,
              ": a peer process died or hangs (--dist-timeout sets the limit); ending the job"));
  }

  void wait(MPI_Request& req, const char* what) {
    const auto t0 = Clock::now();
    int done = 0;
    for (;;) {
      check(MPI_Test(&req, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (done) return;
      if (since(t0) > timeout_s_) timed_out(what);
      std::this_thread::yield();
    }
  }

  // Advances the oldest operations in order (collectives must be matched in the same order on
  // every rank); returns whether anything finished or moved to its next stage.
  bool advance() {
    bool moved = false;
    for (Op& op : ops_) {
      int done = 0;
      check(MPI_Test(&op.req, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (!done) break;
      moved = true;
      if (op.stage == 0) {
        // This rank's slice, summed in rank order; then every slice to every rank.
        float* mine = op.send.data() + static_cast<size_t>(rank_) * op.chunk;
        for (size_t k = 0; k < op.chunk; ++k) {
          float s = op.recv[k];
          for (int r = 1; r < size_; ++r) s += op.recv[static_cast<size_t>(r) * op.chunk + k];
          mine[k] = s;
        }
        check(MPI_Iallgather(mine, static_cast<int>(op.chunk), MPI_FLOAT, op.recv.data(),
                             static_cast<int>(op.chunk), MPI_FLOAT, gather_comm_, &op.req),
              "MPI_Iallgather");
        op.stage = 1;
        break;  // the next operation's turn comes with the next call
      }
      std::copy(op.recv.begin(), op.recv.begin() + static_cast<std::ptrdiff_t>(op.out.size()),
                op.out.begin());
      op.stage = 2;
    }
    while (!ops_.empty() && ops_.front().stage == 2) ops_.pop_front();
    return moved;
  }

  double timeout_s_;
  int rank_ = 0, size_ = 1, local_size_ = 1;
  MPI_Comm scatter_comm_ = MPI_COMM_NULL, gather_comm_ = MPI_COMM_NULL;
  std::deque<Op> ops_;
  Stats stats_;
};

// Started by a launcher: OpenMPI's mpirun, or a PMI / PMIx one (Slurm's srun, MPICH's hydra).
bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"})
    if (std::getenv(v)) return true;
  return false;
}
}  // namespace

std::unique_ptr<Dist> make_mpi_dist(double timeout_s) {
  MAMBA_CHECK(timeout_s > 0, "--dist-timeout must be > 0, got ", timeout_s);
  if (!launched_by_mpi()) return nullptr;
  return std::make_unique<MpiDist>(timeout_s);
}
bool mpi_built() { return true; }

#else  // built without MPI

std::unique_ptr<Dist> make_mpi_dist(double timeout_s) {
  MAMBA_CHECK(timeout_s > 0, "--dist-timeout must be > 0, got ", timeout_s);
  return nullptr;
}
bool mpi_built() { return false; }

#endif

}  // namespace mamba::train
