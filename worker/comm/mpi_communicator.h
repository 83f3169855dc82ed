// Communicator over MPI. CPU tensors are sent from their own memory; CUDA tensors are staged
// through the backend's page-locked host buffers (Backend::StagingHostEmpty; the transport of ranks
// that share a GPU, which NCCL refuses, and the fallback where NCCL is absent). Reductions run on
// the host in a fixed ring order: each chunk is summed once, by one rank, then copied to the
// others, so every rank holds the same bits and a repeated run repeats them.
#pragma once

#include <mpi.h>

#include <string>
#include <vector>

#include "absl/time/time.h"
#include "worker/backend.h"
#include "worker/comm/communicator.h"

namespace mamba::comm {

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` (freed on destruction unless it is MPI_COMM_WORLD) and sets it to
  // return errors instead of aborting. `backend` stages CUDA tensors; it may be null when only
  // CPU tensors are exchanged. An operation waits at most `timeout` for its peers.
  MpiCommunicator(MPI_Comm comm, std::string name, Backend* backend, absl::Duration timeout);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  const std::string& name() const override { return name_; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm comm() const { return comm_; }

  absl::Status AllReduceSum(Tensor& t) override;
  absl::Status AllGather(const Tensor& in, Tensor& out) override;
  absl::Status SendRecv(const Tensor& send, int dst, Tensor& recv, int src) override;
  absl::Status Broadcast(Tensor& t, int root) override;
  absl::Status ReduceScatterSum(Tensor& t) override;
  absl::Status AllGatherChunks(Tensor& t) override;

 private:
  // Posts a send of `bytes` to `dst` and a receive into `recv_bytes` from `src` (-1: none),
  // split into messages MPI's int counts can carry, and waits for both.
  absl::Status Exchange(const void* send, size_t bytes, int dst, void* recv, size_t recv_bytes,
                        int src, const char* op);
  // Waits for every request, failing after the timeout with the op and the peers named.
  absl::Status Wait(std::vector<MPI_Request>& requests, const char* op, int peer);
  // The ring's two halves over n elements of T: after the reduce-scatter rank r holds the sum of
  // chunk r; the all-gather passes each rank's chunk around.
  template <typename T>
  absl::Status RingReduceScatter(T* data, int64_t n);
  absl::Status RingAllGather(char* data, int64_t n, size_t elem);
  // Runs f(T*) with T the element type of host tensor t (float32, float64 or int32).
  template <typename F>
  absl::Status Typed(const Tensor& t, const char* op, F f);
  // The host memory holding t's elements: t itself on the CPU, else a staged copy.
  Tensor HostOf(const Tensor& t) const;
  // Writes a staged copy back into device tensor t (nothing for CPU tensors).
  void WriteBack(const Tensor& host, Tensor& t) const;
  absl::Status Error(const char* op, int mpi_error) const;
  int WorldRankOf(int group_rank) const;

  MPI_Comm comm_;
  std::string name_;
  Backend* backend_;
  absl::Duration timeout_;
  int rank_ = 0, size_ = 1, world_rank_ = 0;
  std::vector<int> world_ranks_;  // of the group's ranks
};

}  // namespace mamba::comm
