// Communicator over NCCL for CUDA tensors (one GPU a rank). Operations run on the communicator's
// own stream, ordered after everything enqueued so far on the backend's compute stream by an
// event, and the compute stream waits for them in turn; NCCL is used non-blocking, with a
// watchdog that aborts the communicator when an operation makes no progress within the timeout.
// Host tensors (loss statistics, flags) go through the group's MPI communicator. The unique id
// is made by the group's rank 0 and broadcast over MPI.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/comm/mpi_communicator.h"

namespace mamba::comm {

class NcclCommunicator final : public Communicator {
 public:
  static absl::StatusOr<std::unique_ptr<Communicator>> Create(std::unique_ptr<MpiCommunicator> mpi,
                                                              Backend* backend,
                                                              absl::Duration timeout);
  ~NcclCommunicator() override;

  const std::string& name() const override { return mpi_->name(); }
  int rank() const override { return mpi_->rank(); }
  int size() const override { return mpi_->size(); }

  absl::Status AllReduceSum(Tensor& t) override;
  absl::Status AllGather(const Tensor& in, Tensor& out) override;
  absl::Status SendRecv(const Tensor& send, int dst, Tensor& recv, int src) override;
  absl::Status Broadcast(Tensor& t, int root) override;
  // Chunks of unequal sizes (ChunkOf), which ncclReduceScatter cannot take: a group of one
  // reduce (or broadcast) a chunk, rooted at its owner.
  absl::Status ReduceScatterSum(Tensor& t) override;
  absl::Status AllGatherChunks(Tensor& t) override;
  // Enqueued on the communication stream after the compute stream's work so far; WaitAsync
  // orders the compute stream after all of them and watches them with the timeout.
  absl::Status AllReduceSumAsync(Tensor& t) override;
  absl::Status WaitAsync() override;

 private:
  NcclCommunicator(std::unique_ptr<MpiCommunicator> mpi, Backend* backend, absl::Duration timeout)
      : mpi_(std::move(mpi)), backend_(backend), timeout_(timeout) {}
  // Orders the communication stream after the compute stream.
  absl::Status Begin(const char* op);
  // Orders the compute stream after the enqueued operation and waits for it (watchdog).
  absl::Status Finish(const char* op);
  // Waits while NCCL reports the communicator busy; fails on its errors or the timeout.
  absl::Status Settle(ncclResult_t result, const char* op);
  absl::Status Error(const char* op, const std::string& what) const;

  std::unique_ptr<MpiCommunicator> mpi_;
  Backend* backend_;
  absl::Duration timeout_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr, done_ = nullptr;
  bool aborted_ = false;
  bool pending_ = false;  // asynchronous operations enqueued since the last WaitAsync
};

}  // namespace mamba::comm
