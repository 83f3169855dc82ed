// The ranks of one job as a dp x sp grid, and a communicator for each group a rank belongs to.
//
// World rank w sits at sp_rank = w % sp, dp_rank = w / sp: the sp ranks of a group are
// consecutive world ranks (one node, where the launcher fills nodes in order), holding consecutive
// slices of the same sequences; the dp group of a rank is the ranks at its sp position in every
// group. Gradients are summed over the world; the state handoff runs inside an sp group.
//
//   MpiRuntime mpi = MpiRuntime::Init(&argc, &argv);        // MPI only under a launcher
//   ASSIGN_OR_RETURN(ProcessGroups g, MakeProcessGroups(mpi, {dp, sp}, Transport::kAuto, backend));
//   g.world->AllReduceSum(grads);
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/backend.h"
#include "worker/comm/communicator.h"
#include "worker/comm/layout.h"

namespace mamba::comm {

// MPI for the life of the process, when it was started by a launcher (mpirun, or srun with PMI);
// otherwise a world of one process without MPI.
class MpiRuntime {
 public:
  static MpiRuntime& Init(int* argc, char*** argv);
  // The runtime Init made (a world of one if Init was never called).
  static MpiRuntime& Get();
  // A world of this process alone, whatever Init did: for a process that trains by itself
  // beside its pool (the tests' one-rank references).
  static const MpiRuntime& Solo();
  ~MpiRuntime();

  bool active() const { return active_; }
  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  // This process's rank among the world's processes on its node, and how many there are.
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  // Ends every rank of the job (MPI_Abort), or exits when there is no MPI.
  [[noreturn]] void Abort(int code) const;

 private:
  MpiRuntime() = default;
  bool active_ = false;
  int world_rank_ = 0, world_size_ = 1, local_rank_ = 0, local_size_ = 1;
};

enum class Transport {
  kAuto,  // NCCL for CUDA when NCCL is built in and every rank of the node has its own GPU
  kMpi,
  kNccl,
};
// "auto", "mpi" or "nccl".
absl::StatusOr<Transport> ParseTransport(const std::string& name);

struct ProcessGroups {
  Layout layout;
  int world_rank = 0, dp_rank = 0, sp_rank = 0;
  std::string transport;  // "none" (one process), "mpi" or "nccl"
  std::unique_ptr<Communicator> world, dp, sp;
  bool is_root() const { return world_rank == 0; }
};

// The groups of `layout` over the runtime's world (layout.world() must equal its size). The
// backend is the one the communicators stage or order their work on. Every operation waits at
// most `timeout` for its peers.
absl::StatusOr<ProcessGroups> MakeProcessGroups(const MpiRuntime& mpi, const Layout& layout,
                                                Transport transport, Backend* backend,
                                                absl::Duration timeout);

}  // namespace mamba::comm
