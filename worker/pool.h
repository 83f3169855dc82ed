// Service mode: an mpirun world that trains the coordinator's jobs one after another.
//   mpirun -np P mamba-worker --coordinator HOST:PORT [--token_file F]
// Rank 0 registers the pool (world size, backend, devices, host), heartbeats, and receives
// assignments; each job's spec reaches every rank over MPI, and all ranks train it together
// (Trainer). Rank 0 reports progress and log lines as events, stops a job at a step boundary when
// the coordinator cancels it (after a checkpoint), and completes it: SUCCEEDED, FAILED by its own
// fault (a spec the worker refuses, unreadable data, a non-finite loss) with the reason, or
// CANCELLED. A job the coordinator gave to another pool meanwhile is dropped without a report. A
// pool survives a coordinator restart: it registers again under its id, naming the job it holds.
#pragma once

#include <ostream>
#include <string>

#include "worker/trainer.h"

namespace mamba {

struct PoolOptions {
  std::string coordinator;  // HOST:PORT
  std::string token;        // bearer token, or empty
  std::string tls_ca;       // PEM certificates to trust for the coordinator's TLS; empty: none
  std::string backend;      // what the pool offers: "cpu" or "cuda"
  RankOptions rank;
};

// Runs the pool until SIGINT or SIGTERM reaches rank 0 (every rank then exits); returns the
// process's exit code.
int RunPool(const PoolOptions& options, std::ostream& log);

}  // namespace mamba
