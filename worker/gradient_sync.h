// Summing the ranks' gradients: the one synchronization between a backward and the optimizer
// step. Three ways, by the job:
//   - whole: every gradient arena all-reduced after the backward;
//   - bucketed: the arenas' ranges that the backward has finished, in buckets of about
//     bucket_bytes, all-reduced as soon as each bucket is complete (the model's
//     gradients-ready hook), so that a device transport sums them while the backward goes on
//     (llm.c's and DDP's overlap); the last bucket, the embedding's, after the backward;
//   - sharded (optimizer state over the ranks): each arena reduce-scattered after the backward.
// Every rank launches the same operations in the same order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "worker/comm/communicator.h"
#include "worker/model.h"

namespace mamba {

class GradientSync {
 public:
  // bucket_bytes 0, or a sharded optimizer: no buckets. `model`, `world` outlive this; with
  // buckets, installs the model's gradients-ready hook.
  GradientSync(MambaModel* model, comm::Communicator* world, bool sharded, size_t bucket_bytes);
  ~GradientSync();
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  // Before a backward whose gradients are to be summed (a backward outside Begin / Finish, such
  // as a probe pass, launches nothing).
  void Begin();
  // After it: whatever is not summed yet, then waits until every sum is done.
  absl::Status Finish();
  // Buckets (0: the gradients are summed whole after the backward).
  size_t buckets() const { return buckets_.size(); }

 private:
  struct Range {
    size_t group = 0;
    int64_t begin = 0, end = 0;
  };
  struct Bucket {
    std::vector<int64_t> layers;  // the hook's points that complete it
    std::vector<Range> ranges;    // at most one a parameter group
    int64_t remaining = 0;
    bool launched = false;
  };
  // The hook: `layer`'s gradients are final; launches the buckets this completes.
  void OnReady(int64_t layer);
  absl::Status Launch(Bucket& b);

  MambaModel* model_;
  comm::Communicator* world_;
  bool sharded_;
  bool active_ = false;  // between Begin and Finish
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;  // by layer + 1 (index 0: the embedding's point, -1)
};

}  // namespace mamba
