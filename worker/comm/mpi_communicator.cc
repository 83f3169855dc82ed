#include "worker/comm/mpi_communicator.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "worker/check.h"
#include "worker/status_macros.h"

namespace mamba::comm {
namespace {

// Messages stay under MPI's int count of bytes.
constexpr size_t kMaxMessage = size_t{1} << 30;

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, Backend* backend,
                                 absl::Duration timeout)
    : comm_(comm), name_(std::move(name)), backend_(backend), timeout_(timeout) {
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  world_ranks_.resize(size_);
  std::vector<int> group_ranks(size_);
  for (int i = 0; i < size_; ++i) group_ranks[i] = i;
  MPI_Group group, world;
  MPI_Comm_group(comm_, &group);
  MPI_Comm_group(MPI_COMM_WORLD, &world);
  MPI_Group_translate_ranks(group, size_, group_ranks.data(), world, world_ranks_.data());
  MPI_Group_free(&group);
  MPI_Group_free(&world);
}

MpiCommunicator::~MpiCommunicator() {
  if (comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

int MpiCommunicator::WorldRankOf(int group_rank) const {
  return group_rank >= 0 && group_rank < size_ ? world_ranks_[group_rank] : -1;
}

absl::Status MpiCommunicator::Error(const char* op, int mpi_error) const {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(mpi_error, text, &len);
  return absl::UnavailableError(absl::StrFormat("rank %d: %s over the %s group failed: %s",
                                                world_rank_, op, name_, std::string(text, len)));
}

absl::Status MpiCommunicator::Wait(std::vector<MPI_Request>& requests, const char* op, int peer) {
  const bool forever = timeout_ == absl::InfiniteDuration();
  const auto deadline =
      std::chrono::steady_clock::now() +
      (forever ? std::chrono::nanoseconds(0) : absl::ToChronoNanoseconds(timeout_));
  for (int polls = 0;; ++polls) {
    int done = 0;
    if (const int err = MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done,
                                    MPI_STATUSES_IGNORE);
        err != MPI_SUCCESS) {
      return Error(op, err);
    }
    if (done) return absl::OkStatus();
    // Poll hot at first (exchanges are usually quick), then yield the core: ranks may share
    // cores (mpirun --oversubscribe), and a spinning rank would slow the one it waits for.
    if (polls > 2000) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      if (!forever && std::chrono::steady_clock::now() > deadline) {
        return absl::DeadlineExceededError(absl::StrFormat(
            "rank %d: %s over the %s group made no progress for %s waiting for rank %d (it died, "
            "hangs, or is not in the same step)",
            world_rank_, op, name_, absl::FormatDuration(timeout_), WorldRankOf(peer)));
      }
    }
  }
}

absl::Status MpiCommunicator::Exchange(const void* send, size_t bytes, int dst, void* recv,
                                       size_t recv_bytes, int src, const char* op) {
  std::vector<MPI_Request> requests;
  constexpr int kTag = 7;
  // Messages of at most kMaxMessage bytes; an empty buffer is still one (empty) message, so that
  // both sides post the same count.
  const auto pieces = [](size_t n) {
    return std::max<size_t>(1, (n + kMaxMessage - 1) / kMaxMessage);
  };
  const auto piece = [](size_t n, size_t i) {
    return static_cast<int>(std::min(kMaxMessage, n - std::min(n, i * kMaxMessage)));
  };
  if (src >= 0) {
    for (size_t i = 0; i < pieces(recv_bytes); ++i) {
      requests.emplace_back();
      if (int err = MPI_Irecv(static_cast<char*>(recv) + i * kMaxMessage, piece(recv_bytes, i),
                              MPI_BYTE, src, kTag, comm_, &requests.back());
          err != MPI_SUCCESS) {
        return Error(op, err);
      }
    }
  }
  if (dst >= 0) {
    for (size_t i = 0; i < pieces(bytes); ++i) {
      requests.emplace_back();
      if (int err = MPI_Isend(static_cast<const char*>(send) + i * kMaxMessage, piece(bytes, i),
                              MPI_BYTE, dst, kTag, comm_, &requests.back());
          err != MPI_SUCCESS) {
        return Error(op, err);
      }
    }
  }
  return Wait(requests, op, src >= 0 ? src : dst);
}

Tensor MpiCommunicator::HostOf(const Tensor& t) const {
  if (t.device() == Device::kCPU) return t;
  MAMBA_CHECK(backend_ != nullptr) << "a device tensor needs the backend to stage it";
  Tensor host = backend_->StagingHostEmpty(t.shape(), t.dtype());
  backend_->CopyToHost(t, host);
  return host;
}

void MpiCommunicator::WriteBack(const Tensor& host, Tensor& t) const {
  if (t.device() != Device::kCPU) backend_->CopyFromHost(host, t);
}

template <typename T>
absl::Status MpiCommunicator::RingReduceScatter(T* data, int64_t n) {
  const int P = size_, r = rank_;
  const auto chunk = [&](int c) { return ChunkOf(n, P, ((c % P) + P) % P); };
  std::vector<T> incoming(static_cast<size_t>(n / P + 1));
  const int right = (r + 1) % P, left = (r + P - 1) % P;
  // At step k rank r passes on chunk r - k - 1 (its partial sum so far) and adds in chunk
  // r - k - 2 from the left: after P - 1 steps it holds the whole sum of chunk r, each chunk
  // summed in one fixed order (starting at the rank after its owner).
  for (int k = 0; k < P - 1; ++k) {
    const Chunk out = chunk(r - k - 1), in = chunk(r - k - 2);
    RETURN_IF_ERROR(Exchange(data + out.begin, out.size() * sizeof(T), right, incoming.data(),
                             in.size() * sizeof(T), left, "reduce_scatter"));
    T* dst = data + in.begin;
    for (int64_t i = 0; i < in.size(); ++i) dst[i] += incoming[i];
  }
  return absl::OkStatus();
}

absl::Status MpiCommunicator::RingAllGather(char* data, int64_t n, size_t elem) {
  const int P = size_, r = rank_;
  const auto chunk = [&](int c) { return ChunkOf(n, P, ((c % P) + P) % P); };
  const int right = (r + 1) % P, left = (r + P - 1) % P;
  for (int k = 0; k < P - 1; ++k) {
    const Chunk out = chunk(r - k), in = chunk(r - k - 1);
    RETURN_IF_ERROR(Exchange(data + out.begin * elem, out.size() * elem, right,
                             data + in.begin * elem, in.size() * elem, left, "all_gather_chunks"));
  }
  return absl::OkStatus();
}

template <typename F>
absl::Status MpiCommunicator::Typed(const Tensor& t, const char* op, F f) {
  switch (t.dtype()) {
    case DType::kF32:
      return f(t.data<float>());
    case DType::kF64:
      return f(t.data<double>());
    case DType::kI32:
      return f(t.data<int32_t>());
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": no sum of ", DTypeName(t.dtype()), " tensors"));
  }
}

absl::Status MpiCommunicator::AllReduceSum(Tensor& t) {
  if (size_ == 1 || t.numel() == 0) return absl::OkStatus();
  Tensor host = HostOf(t);
  RETURN_IF_ERROR(
      Typed(host, "all_reduce", [&](auto* data) { return RingReduceScatter(data, host.numel()); }));
  RETURN_IF_ERROR(
      RingAllGather(static_cast<char*>(host.raw()), host.numel(), DTypeSize(host.dtype())));
  WriteBack(host, t);
  return absl::OkStatus();
}

absl::Status MpiCommunicator::ReduceScatterSum(Tensor& t) {
  if (size_ == 1 || t.numel() == 0) return absl::OkStatus();
  Tensor host = HostOf(t);
  RETURN_IF_ERROR(Typed(host, "reduce_scatter",
                        [&](auto* data) { return RingReduceScatter(data, host.numel()); }));
  WriteBack(host, t);
  return absl::OkStatus();
}

absl::Status MpiCommunicator::AllGatherChunks(Tensor& t) {
  if (size_ == 1 || t.numel() == 0) return absl::OkStatus();
  Tensor host = HostOf(t);
  RETURN_IF_ERROR(
      RingAllGather(static_cast<char*>(host.raw()), host.numel(), DTypeSize(host.dtype())));
  WriteBack(host, t);
  return absl::OkStatus();
}

absl::Status MpiCommunicator::AllGather(const Tensor& in, Tensor& out) {
  MAMBA_CHECK(out.numel() == in.numel() * size_ && out.dtype() == in.dtype())
      << "all_gather: out must hold size() x in";
  Tensor src = HostOf(in);
  Tensor dst =
      out.device() == Device::kCPU ? out : backend_->StagingHostEmpty(out.shape(), out.dtype());
  const size_t bytes = in.nbytes();
  char* base = static_cast<char*>(dst.raw());
  std::memcpy(base + rank_ * bytes, src.raw(), bytes);
  // A ring: at step k rank r passes on the slot it received at step k - 1 (its own first).
  const int right = (rank_ + 1) % size_, left = (rank_ + size_ - 1) % size_;
  for (int k = 0; k < size_ - 1; ++k) {
    const int out_slot = ((rank_ - k) % size_ + size_) % size_;
    const int in_slot = ((rank_ - k - 1) % size_ + size_) % size_;
    RETURN_IF_ERROR(Exchange(base + out_slot * bytes, bytes, right, base + in_slot * bytes, bytes,
                             left, "all_gather"));
  }
  WriteBack(dst, out);
  return absl::OkStatus();
}

absl::Status MpiCommunicator::SendRecv(const Tensor& send, int dst, Tensor& recv, int src) {
  if (dst >= size_ || src >= size_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "send_recv: peer %d or %d outside the %s group of %d", dst, src, name_, size_));
  }
  Tensor out = dst >= 0 ? HostOf(send) : Tensor();
  Tensor in;
  if (src >= 0)
    in = recv.device() == Device::kCPU ? recv
                                       : backend_->StagingHostEmpty(recv.shape(), recv.dtype());
  RETURN_IF_ERROR(Exchange(dst >= 0 ? out.raw() : nullptr, dst >= 0 ? out.nbytes() : 0, dst,
                           src >= 0 ? in.raw() : nullptr, src >= 0 ? in.nbytes() : 0, src,
                           "send_recv"));
  if (src >= 0) WriteBack(in, recv);
  return absl::OkStatus();
}

absl::Status MpiCommunicator::Broadcast(Tensor& t, int root) {
  if (size_ == 1) return absl::OkStatus();
  Tensor host = HostOf(t);
  std::vector<MPI_Request> requests;
  char* p = static_cast<char*>(host.raw());
  for (size_t off = 0; off < host.nbytes(); off += kMaxMessage) {
    requests.emplace_back();
    const int n = static_cast<int>(std::min(kMaxMessage, host.nbytes() - off));
    if (int err = MPI_Ibcast(p + off, n, MPI_BYTE, root, comm_, &requests.back());
        err != MPI_SUCCESS) {
      return Error("broadcast", err);
    }
  }
  RETURN_IF_ERROR(Wait(requests, "broadcast", root));
  if (rank_ != root) WriteBack(host, t);
  return absl::OkStatus();
}

}  // namespace mamba::comm
