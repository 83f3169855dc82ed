// The coordinator's embedded worker pool (--local_workers N): an `mpirun -np N mamba-worker
// --coordinator ...` child that the coordinator starts once it serves, restarts when it dies
// (after a pause that grows while it keeps dying), and stops (SIGTERM, then SIGKILL) when the
// coordinator exits. Its output goes to the coordinator's.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace mamba::coordinator {

class LocalPool {
 public:
  // `command`: the argv of the pool (mpirun and its arguments).
  explicit LocalPool(std::vector<std::string> command);
  ~LocalPool();  // stops the pool
  LocalPool(const LocalPool&) = delete;
  LocalPool& operator=(const LocalPool&) = delete;

  // The mpirun command line for `ranks` ranks of `worker` dialing `address` (over TLS trusting
  // `tls_ca` when it is set).
  static std::vector<std::string> MpirunCommand(int ranks, const std::string& worker,
                                                const std::string& address,
                                                const std::string& token_file,
                                                const std::string& tls_ca);

 private:
  void Supervise();
  pid_t Spawn();

  std::vector<std::string> command_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  pid_t child_ = -1;
  std::thread supervisor_;
};

}  // namespace mamba::coordinator
