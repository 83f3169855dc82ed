// The communication layer's one interface: collectives and neighbour exchanges over a group of
// ranks (the world, a rank's data-parallel group, its sequence-parallel group). The trainer and
// the model use it without knowing the transport:
//
//   MpiCommunicator (mpi_communicator.h): CPU tensors directly; CUDA tensors staged through host
//     memory (how several ranks share one GPU, and the fallback where NCCL is absent).
//   NcclCommunicator (nccl_communicator.h): CUDA tensors over NCCL on its own stream, ordered
//     after the backend's compute stream; host tensors through the group's MPI communicator.
//
// Every operation is deterministic: a fixed reduction order and no atomics, so a run repeated on
// the same layout gives the same bits, and every rank of a group receives bitwise the same sum.
// Operations block until their result is usable on the caller's stream, and fail (never hang)
// when a peer does not take part within the group's timeout: DEADLINE_EXCEEDED naming this rank,
// the operation and the peer waited for.
#pragma once

#include <stdexcept>
#include <string>

#include "absl/status/status.h"
#include "worker/tensor.h"

namespace mamba::comm {

class Communicator {
 public:
  virtual ~Communicator() = default;
  // "world", "dp" or "sp": for messages.
  virtual const std::string& name() const = 0;
  virtual int rank() const = 0;  // within the group
  virtual int size() const = 0;

  // t = the elementwise sum of every rank's t (float32, float64 or int32), in place.
  virtual absl::Status AllReduceSum(Tensor& t) = 0;
  // out = every rank's `in`, rank after rank: out has size() * in.numel() elements, same dtype.
  virtual absl::Status AllGather(const Tensor& in, Tensor& out) = 0;
  // Sends `send` to group rank `dst` while receiving `recv` from group rank `src`, at once (the
  // two may differ in shape); -1 for either means none (an undefined tensor there is ignored).
  // A chain of neighbours (r -> r + 1) exchanges without deadlock.
  virtual absl::Status SendRecv(const Tensor& send, int dst, Tensor& recv, int src) = 0;
  // t = root's t on every rank.
  virtual absl::Status Broadcast(Tensor& t, int root) = 0;

  // The sharded form of AllReduceSum, in two halves (ZeRO): t's elements are cut into size()
  // chunks (ChunkOf), and ReduceScatterSum leaves in chunk rank() of t the sum of every rank's
  // chunk (the other chunks are then unspecified); AllGatherChunks copies each rank's chunk of t
  // to every rank. One after the other they sum exactly as AllReduceSum does.
  virtual absl::Status ReduceScatterSum(Tensor& t) = 0;
  virtual absl::Status AllGatherChunks(Tensor& t) = 0;

  // Starts t's AllReduceSum and returns, so that it overlaps the work enqueued after it (a
  // device transport); t holds the sum once WaitAsync has returned, for the host and for work
  // enqueued after. Transports that cannot overlap sum at once. Every rank starts the same
  // all-reduces in the same order.
  virtual absl::Status AllReduceSumAsync(Tensor& t) { return AllReduceSum(t); }
  virtual absl::Status WaitAsync() { return absl::OkStatus(); }
};

// Elements [begin, end) of chunk `index` when n elements are cut into `chunks` near-equal chunks.
struct Chunk {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};
inline Chunk ChunkOf(int64_t n, int chunks, int index) {
  return {n * index / chunks, n * (index + 1) / chunks};
}

// What a failed exchange inside the model throws (the model's ops return nothing); the trainer
// turns it back into the Status it carries.
class CommunicationError : public std::runtime_error {
 public:
  explicit CommunicationError(absl::Status status)
      : std::runtime_error(std::string(status.message())), status_(std::move(status)) {}
  const absl::Status& status() const { return status_; }

 private:
  absl::Status status_;
};

// Throws CommunicationError unless `status` is OK.
inline void ThrowIfError(absl::Status status) {
  if (!status.ok()) throw CommunicationError(std::move(status));
}

}  // namespace mamba::comm
