// Data-parallel training: how the Trainer talks to its peer processes. The trainer only sees this
// interface; LocalDist is the single-process one (no peers), and the MPI one lives in
// src/train/dist_mpi.cpp (compiled into the mambacpp tool when CMake finds MPI: MAMBA_MPI), the
// only file that includes <mpi.h>.
//
// The contract that makes N processes equal one: sum() of a float buffer gives every rank the
// same bits, ((r0 + r1) + r2) + ... summed in rank order element by element (a reduce-scatter by
// all-to-all, each rank summing its slice in rank order, then an all-gather), never an order that
// depends on timing or on the collective algorithm MPI picks.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace mamba::train {

class Dist {
 public:
  virtual ~Dist() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int local_size() const { return 1; }  // ranks on this machine (threads per rank)
  // Starts summing `buf` over all ranks (rank order, see above); returns at once. buf must stay
  // alive and untouched until wait_all(), which leaves the sum in it on every rank.
  virtual void start_sum(std::span<float> buf) = 0;
  virtual void progress() = 0;  // lets started sums advance; call between pieces of compute
  // Waits for every started sum. A peer that does not answer within the timeout ends the whole
  // job with a message naming this rank (never a hang).
  virtual void wait_all() = 0;
  // Blocking exact sum of values each of which only one rank contributes (the others pass +0):
  // the per-micro-batch losses and counts, gathered without any rounding.
  virtual void sum_disjoint(std::span<double> v) = 0;
  virtual void barrier() = 0;
  // Ends every process of the job with `message` (from this rank) and exit code 1.
  [[noreturn]] virtual void abort(const std::string& message) = 0;

  // Communication accounting since the last take_stats(): bytes this rank sent and received in
  // sums, seconds inside start_sum/progress (packing, local reduction, MPI calls) and seconds
  // blocked in wait_all (the communication not hidden behind compute).
  struct Stats {
    int64_t sums = 0, bytes_sent = 0, bytes_received = 0;
    double busy_s = 0, wait_s = 0;
  };
  virtual Stats take_stats() { return {}; }
};

// One process, no peers: sums are the identity.
class LocalDist final : public Dist {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void start_sum(std::span<float>) override {}
  void progress() override {}
  void wait_all() override {}
  void sum_disjoint(std::span<double>) override {}
  void barrier() override {}
  [[noreturn]] void abort(const std::string& message) override;
};

// The MPI communicator of the job when this process was started by mpirun / srun (and mambacpp was
// built with MPI); nullptr otherwise (a plain single process). timeout_s bounds every wait on a
// peer. Defined in src/train/dist_mpi.cpp.
std::unique_ptr<Dist> make_mpi_dist(double timeout_s);
bool mpi_built();  // mambacpp was built with MPI (MAMBA_MPI found it)

}  // namespace mamba::train
