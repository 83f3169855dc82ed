#include "worker/comm/nccl_communicator.h"

#include <chrono>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "worker/status_macros.h"

namespace mamba::comm {
namespace {

absl::StatusOr<ncclDataType_t> NcclType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kF64:
      return ncclFloat64;
    case DType::kI32:
      return ncclInt32;
    case DType::kBF16:
      return ncclBfloat16;
  }
  return absl::InvalidArgumentError("nccl: unknown dtype");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> NcclCommunicator::Create(
    std::unique_ptr<MpiCommunicator> mpi, Backend* backend, absl::Duration timeout) {
  std::unique_ptr<NcclCommunicator> c(new NcclCommunicator(std::move(mpi), backend, timeout));
  static_assert(sizeof(ncclUniqueId) % sizeof(int32_t) == 0);
  Tensor id = Tensor::Empty({int64_t(sizeof(ncclUniqueId) / sizeof(int32_t))}, DType::kI32);
  ncclUniqueId unique;
  if (c->rank() == 0) {
    if (ncclResult_t r = ncclGetUniqueId(&unique); r != ncclSuccess) {
      return c->Error("init", ncclGetErrorString(r));
    }
    std::memcpy(id.raw(), &unique, sizeof(unique));
  }
  RETURN_IF_ERROR(c->mpi_->Broadcast(id, 0));
  std::memcpy(&unique, id.raw(), sizeof(unique));
  if (cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking) != cudaSuccess ||
      cudaEventCreateWithFlags(&c->ready_, cudaEventDisableTiming) != cudaSuccess ||
      cudaEventCreateWithFlags(&c->done_, cudaEventDisableTiming) != cudaSuccess) {
    return c->Error("init", "cannot create the communication stream and events");
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // calls return at once; Settle watches them with the timeout
  RETURN_IF_ERROR(
      c->Settle(ncclCommInitRankConfig(&c->comm_, c->size(), unique, c->rank(), &config), "init"));
  return std::unique_ptr<Communicator>(std::move(c));
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_) {
    if (aborted_) {
      ncclCommAbort(comm_);
    } else {
      ncclCommFinalize(comm_);
      ncclResult_t state = ncclInProgress;
      while (ncclCommGetAsyncError(comm_, &state) == ncclSuccess && state == ncclInProgress) {
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      ncclCommDestroy(comm_);
    }
  }
  if (done_) cudaEventDestroy(done_);
  if (ready_) cudaEventDestroy(ready_);
  if (stream_) cudaStreamDestroy(stream_);
}

absl::Status NcclCommunicator::Error(const char* op, const std::string& what) const {
  int world = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world);
  return absl::UnavailableError(
      absl::StrFormat("rank %d: %s over the %s group (NCCL) failed: %s", world, op, name(), what));
}

absl::Status NcclCommunicator::Settle(ncclResult_t result, const char* op) {
  const auto deadline = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout_);
  ncclResult_t state = result;
  while (state == ncclInProgress) {
    if (std::chrono::steady_clock::now() > deadline) {
      aborted_ = true;
      int world = 0;
      MPI_Comm_rank(MPI_COMM_WORLD, &world);
      return absl::DeadlineExceededError(absl::StrFormat(
          "rank %d: %s over the %s group (NCCL) made no progress for %s (a rank died or hangs)",
          world, op, name(), absl::FormatDuration(timeout_)));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
    if (comm_ == nullptr || ncclCommGetAsyncError(comm_, &state) != ncclSuccess) break;
  }
  if (state != ncclSuccess && state != ncclInProgress) {
    aborted_ = true;
    return Error(op, ncclGetErrorString(state));
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Begin(const char* op) {
  auto compute = static_cast<cudaStream_t>(backend_->compute_stream());
  if (cudaEventRecord(ready_, compute) != cudaSuccess ||
      cudaStreamWaitEvent(stream_, ready_, 0) != cudaSuccess) {
    return Error(op, "cannot order the communication after the compute stream");
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Finish(const char* op) {
  auto compute = static_cast<cudaStream_t>(backend_->compute_stream());
  if (cudaEventRecord(done_, stream_) != cudaSuccess ||
      cudaStreamWaitEvent(compute, done_, 0) != cudaSuccess) {
    return Error(op, "cannot order the compute stream after the communication");
  }
  // The watchdog: the operation must complete within the timeout, else the communicator is
  // aborted (which also releases this rank's kernels waiting on it).
  const auto deadline = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout_);
  for (;;) {
    const cudaError_t q = cudaEventQuery(done_);
    if (q == cudaSuccess) return absl::OkStatus();
    if (q != cudaErrorNotReady) return Error(op, cudaGetErrorString(q));
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm_, &state);
    if (state != ncclSuccess && state != ncclInProgress) {
      aborted_ = true;
      return Error(op, ncclGetErrorString(state));
    }
    if (std::chrono::steady_clock::now() > deadline) {
      aborted_ = true;
      ncclCommAbort(comm_);
      comm_ = nullptr;
      int world = 0;
      MPI_Comm_rank(MPI_COMM_WORLD, &world);
      return absl::DeadlineExceededError(absl::StrFormat(
          "rank %d: %s over the %s group (NCCL) did not complete within %s (a rank died or "
          "hangs); communicator aborted",
          world, op, name(), absl::FormatDuration(timeout_)));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

absl::Status NcclCommunicator::AllReduceSum(Tensor& t) {
  if (t.device() == Device::kCPU) return mpi_->AllReduceSum(t);
  RETURN_IF_ERROR(AllReduceSumAsync(t));
  return WaitAsync();
}

absl::Status NcclCommunicator::AllReduceSumAsync(Tensor& t) {
  if (t.device() == Device::kCPU) return mpi_->AllReduceSum(t);
  if (t.dtype() == DType::kBF16) return absl::InvalidArgumentError("all_reduce: no bf16 sums");
  ASSIGN_OR_RETURN(ncclDataType_t type, NcclType(t.dtype()));
  RETURN_IF_ERROR(Begin("all_reduce"));
  RETURN_IF_ERROR(Settle(ncclAllReduce(t.raw(), t.raw(), t.numel(), type, ncclSum, comm_, stream_),
                         "all_reduce"));
  pending_ = true;
  return absl::OkStatus();
}

absl::Status NcclCommunicator::WaitAsync() {
  if (!pending_) return absl::OkStatus();
  pending_ = false;
  return Finish("all_reduce");
}

absl::Status NcclCommunicator::AllGather(const Tensor& in, Tensor& out) {
  if (in.device() == Device::kCPU) return mpi_->AllGather(in, out);
  ASSIGN_OR_RETURN(ncclDataType_t type, NcclType(in.dtype()));
  RETURN_IF_ERROR(Begin("all_gather"));
  RETURN_IF_ERROR(
      Settle(ncclAllGather(in.raw(), out.raw(), in.numel(), type, comm_, stream_), "all_gather"));
  return Finish("all_gather");
}

absl::Status NcclCommunicator::SendRecv(const Tensor& send, int dst, Tensor& recv, int src) {
  const Tensor& any = dst >= 0 ? send : recv;
  if (!any.defined() || any.device() == Device::kCPU) return mpi_->SendRecv(send, dst, recv, src);
  RETURN_IF_ERROR(Begin("send_recv"));
  ncclGroupStart();
  if (dst >= 0) {
    ASSIGN_OR_RETURN(ncclDataType_t type, NcclType(send.dtype()));
    ncclSend(send.raw(), send.numel(), type, dst, comm_, stream_);
  }
  if (src >= 0) {
    ASSIGN_OR_RETURN(ncclDataType_t type, NcclType(recv.dtype()));
    ncclRecv(recv.raw(), recv.numel(), type, src, comm_, stream_);
  }
  RETURN_IF_ERROR(Settle(ncclGroupEnd(), "send_recv"));
  return Finish("send_recv");
}

absl::Status NcclCommunicator::Broadcast(Tensor& t, int root) {
  if (t.device() == Device::kCPU) return mpi_->Broadcast(t, root);
  ASSIGN_OR_RETURN(ncclDataType_t type, NcclType(t.dtype()));
  RETURN_IF_ERROR(Begin("broadcast"));
  RETURN_IF_ERROR(
      Settle(ncclBroadcast(t.raw(), t.raw(), t.numel(), type, root, comm_, stream_), "broadcast"));
  return Finish("broadcast");
}

absl::Status NcclCommunicator::ReduceScatterSum(Tensor& t) {
  if (t.device() == Device::kCPU) return mpi_->ReduceScatterSum(t);
  if (t.dtype() == DType::kBF16) return absl::InvalidArgumentError("reduce_scatter: no bf16 sums");
  ASSIGN_OR_RETURN(ncclDataType_t type, NcclType(t.dtype()));
  RETURN_IF_ERROR(Begin("reduce_scatter"));
  const size_t elem = DTypeSize(t.dtype());
  char* base = static_cast<char*>(t.raw());
  ncclGroupStart();
  for (int c = 0; c < size(); ++c) {
    const Chunk k = ChunkOf(t.numel(), size(), c);
    ncclReduce(base + k.begin * elem, base + k.begin * elem, k.size(), type, ncclSum, c, comm_,
               stream_);
  }
  RETURN_IF_ERROR(Settle(ncclGroupEnd(), "reduce_scatter"));
  return Finish("reduce_scatter");
}

absl::Status NcclCommunicator::AllGatherChunks(Tensor& t) {
  if (t.device() == Device::kCPU) return mpi_->AllGatherChunks(t);
  ASSIGN_OR_RETURN(ncclDataType_t type, NcclType(t.dtype()));
  RETURN_IF_ERROR(Begin("all_gather_chunks"));
  const size_t elem = DTypeSize(t.dtype());
  char* base = static_cast<char*>(t.raw());
  ncclGroupStart();
  for (int c = 0; c < size(); ++c) {
    const Chunk k = ChunkOf(t.numel(), size(), c);
    ncclBroadcast(base + k.begin * elem, base + k.begin * elem, k.size(), type, c, comm_, stream_);
  }
  RETURN_IF_ERROR(Settle(ncclGroupEnd(), "all_gather_chunks"));
  return Finish("all_gather_chunks");
}

}  // namespace mamba::comm
