#include "worker/comm/process_groups.h"

#include <mpi.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "worker/comm/mpi_communicator.h"
#ifdef MAMBA_HAS_NCCL
#include "worker/comm/nccl_communicator.h"
#endif
#include "worker/status_macros.h"

namespace mamba::comm {
namespace {

// The group of one process: every operation is the identity.
class SoloCommunicator final : public Communicator {
 public:
  explicit SoloCommunicator(std::string name) : name_(std::move(name)) {}
  const std::string& name() const override { return name_; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  absl::Status AllReduceSum(Tensor&) override { return absl::OkStatus(); }
  absl::Status AllGather(const Tensor& in, Tensor& out) override {
    if (in.raw() == out.raw()) return absl::OkStatus();
    return absl::UnimplementedError("all_gather of one rank into another buffer: use `in`");
  }
  absl::Status SendRecv(const Tensor&, int dst, Tensor&, int src) override {
    if (dst >= 0 || src >= 0)
      return absl::InvalidArgumentError("send_recv: no peer in a group of one");
    return absl::OkStatus();
  }
  absl::Status Broadcast(Tensor&, int) override { return absl::OkStatus(); }
  absl::Status ReduceScatterSum(Tensor&) override { return absl::OkStatus(); }
  absl::Status AllGatherChunks(Tensor&) override { return absl::OkStatus(); }

 private:
  std::string name_;
};

bool UnderLauncher() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

MpiRuntime* g_runtime = nullptr;

}  // namespace

MpiRuntime& MpiRuntime::Init(int* argc, char*** argv) {
  if (g_runtime != nullptr) return *g_runtime;
  g_runtime = new MpiRuntime();  // lives until exit; MPI_Finalize runs from atexit
  if (!UnderLauncher()) return *g_runtime;
  int provided = 0;
  MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  g_runtime->active_ = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &g_runtime->world_rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &g_runtime->world_size_);
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &g_runtime->local_rank_);
  MPI_Comm_size(node, &g_runtime->local_size_);
  MPI_Comm_free(&node);
  std::atexit([] {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  });
  return *g_runtime;
}

MpiRuntime& MpiRuntime::Get() {
  if (g_runtime == nullptr) g_runtime = new MpiRuntime();
  return *g_runtime;
}

const MpiRuntime& MpiRuntime::Solo() {
  static const MpiRuntime* solo = new MpiRuntime();
  return *solo;
}

MpiRuntime::~MpiRuntime() = default;

void MpiRuntime::Abort(int code) const {
  if (active_) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

absl::StatusOr<Transport> ParseTransport(const std::string& name) {
  if (name == "auto") return Transport::kAuto;
  if (name == "mpi") return Transport::kMpi;
  if (name == "nccl") return Transport::kNccl;
  return absl::InvalidArgumentError(
      absl::StrCat("--transport: must be \"auto\", \"mpi\" or \"nccl\", got \"", name, "\""));
}

absl::StatusOr<ProcessGroups> MakeProcessGroups(const MpiRuntime& mpi, const Layout& layout,
                                                Transport transport, Backend* backend,
                                                absl::Duration timeout) {
  if (layout.world() != mpi.world_size()) {
    return absl::InvalidArgumentError(absl::StrCat("parallel: dp x sp (", layout.dp, " x ",
                                                   layout.sp, ") must equal the number of ranks (",
                                                   mpi.world_size(), ")"));
  }
  ProcessGroups g;
  g.layout = layout;
  g.world_rank = mpi.world_rank();
  g.sp_rank = g.world_rank % layout.sp;
  g.dp_rank = g.world_rank / layout.sp;
  const bool device = backend->device() == Device::kCUDA;
  bool nccl = false;
#ifdef MAMBA_HAS_NCCL
  const bool own_gpus = device && mpi.local_size() <= CudaDeviceCount();
  // A process alone (no launcher) has nothing to exchange: auto picks no transport then.
  nccl =
      transport == Transport::kNccl || (transport == Transport::kAuto && own_gpus && mpi.active());
  if (nccl && !device) {
    return absl::InvalidArgumentError("--transport nccl: needs the cuda backend");
  }
  if (nccl && !own_gpus) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--transport nccl: ", mpi.local_size(), " ranks on this node share ", CudaDeviceCount(),
        " GPU(s), and NCCL needs one GPU a rank; use --transport mpi"));
  }
#else
  (void)device;
  if (transport == Transport::kNccl) {
    return absl::FailedPreconditionError("--transport nccl: this build has no NCCL");
  }
#endif
  if (!mpi.active()) {
    if (!nccl) {
      g.transport = "none";
      g.world = std::make_unique<SoloCommunicator>("world");
      g.dp = std::make_unique<SoloCommunicator>("dp");
      g.sp = std::make_unique<SoloCommunicator>("sp");
      return g;
    }
    return absl::FailedPreconditionError(
        "--transport nccl: the worker was not started by mpirun (or srun), so there is no MPI to "
        "set NCCL up with");
  }
  MPI_Comm world, dp, sp;
  MPI_Comm_dup(MPI_COMM_WORLD, &world);
  MPI_Comm_split(MPI_COMM_WORLD, g.dp_rank, g.sp_rank, &sp);
  MPI_Comm_split(MPI_COMM_WORLD, g.sp_rank, g.dp_rank, &dp);
  auto world_mpi = std::make_unique<MpiCommunicator>(world, "world", backend, timeout);
  auto dp_mpi = std::make_unique<MpiCommunicator>(dp, "dp", backend, timeout);
  auto sp_mpi = std::make_unique<MpiCommunicator>(sp, "sp", backend, timeout);
#ifdef MAMBA_HAS_NCCL
  if (nccl) {
    g.transport = "nccl";
    ASSIGN_OR_RETURN(g.world, NcclCommunicator::Create(std::move(world_mpi), backend, timeout));
    ASSIGN_OR_RETURN(g.dp, NcclCommunicator::Create(std::move(dp_mpi), backend, timeout));
    ASSIGN_OR_RETURN(g.sp, NcclCommunicator::Create(std::move(sp_mpi), backend, timeout));
    return g;
  }
#endif
  g.transport = "mpi";
  g.world = std::move(world_mpi);
  g.dp = std::move(dp_mpi);
  g.sp = std::move(sp_mpi);
  return g;
}

}  // namespace mamba::comm
