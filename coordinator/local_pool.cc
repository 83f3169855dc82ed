#include "coordinator/local_pool.h"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

extern char** environ;

namespace mamba::coordinator {

LocalPool::LocalPool(std::vector<std::string> command) : command_(std::move(command)) {
  supervisor_ = std::thread([this] { Supervise(); });
}

LocalPool::~LocalPool() {
  pid_t child;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    child = child_;
  }
  cv_.notify_all();
  if (child > 0) kill(child, SIGTERM);  // mpirun passes it on to the ranks
  supervisor_.join();
}

std::vector<std::string> LocalPool::MpirunCommand(int ranks, const std::string& worker,
                                                  const std::string& address,
                                                  const std::string& token_file,
                                                  const std::string& tls_ca) {
  std::vector<std::string> argv = {
      "mpirun", "-np", std::to_string(ranks), "--oversubscribe", "--bind-to",
      "none",   "-x",  "OMP_NUM_THREADS=1"};
  if (geteuid() == 0) argv.push_back("--allow-run-as-root");
  argv.insert(argv.end(), {worker, "--coordinator", address});
  if (!token_file.empty()) argv.insert(argv.end(), {"--token_file", token_file});
  if (!tls_ca.empty()) argv.insert(argv.end(), {"--tls_ca", tls_ca});
  return argv;
}

pid_t LocalPool::Spawn() {
  std::vector<char*> argv;
  for (std::string& a : command_) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawnp(&pid, argv[0], nullptr, nullptr, argv.data(), environ) != 0) return -1;
  return pid;
}

void LocalPool::Supervise() {
  auto pause = std::chrono::seconds(1);
  for (;;) {
    const auto started = std::chrono::steady_clock::now();
    const pid_t pid = Spawn();
    {
      std::lock_guard<std::mutex> lock(mu_);
      child_ = pid;
      if (stopping_ && pid > 0) kill(pid, SIGTERM);
    }
    if (pid < 0) {
      std::cerr << "mamba-coordinator: cannot start the local pool (" << command_[0] << ")\n";
    } else {
      std::cout << "local pool: started (" << absl::StrJoin(command_, " ") << ")" << std::endl;
      int status = 0;
      // Waits for the pool; a stop request makes the destructor signal it, so this returns.
      while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      std::lock_guard<std::mutex> lock(mu_);
      child_ = -1;
      if (stopping_) return;
      std::cout << "local pool: exited ("
                << (WIFSIGNALED(status) ? absl::StrCat("signal ", WTERMSIG(status))
                                        : absl::StrCat("status ", WEXITSTATUS(status)))
                << "); restarting it" << std::endl;
    }
    // A pool that ran a while restarts at once; one that keeps dying, ever more slowly.
    if (std::chrono::steady_clock::now() - started > std::chrono::seconds(60)) {
      pause = std::chrono::seconds(1);
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (cv_.wait_for(lock, pause, [this] { return stopping_; })) return;
    pause = std::min(pause * 2, std::chrono::seconds(30));
  }
}

}  // namespace mamba::coordinator
