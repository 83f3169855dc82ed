// mamba-worker: trains one job, alone or as one rank of an MPI worker pool; or, in service mode,
// the coordinator's jobs one after another.
//   mamba-worker --job job.json [--resume DIR] [--summary_json out.json]
//   mpirun -np P mamba-worker --job job.json          (srun --mpi=pmix on Slurm clusters)
//   mpirun -np P mamba-worker --coordinator HOST:PORT [--token_file F] [--backend cpu|cuda]
// The job spec is the JSON form of mamba.v1.JobSpec (proto/job.proto); its `parallel` field
// arranges the P ranks as dp x sp. Rank 0 prints progress and writes the summary and
// checkpoints; an error on any rank is printed with the rank named and ends every rank.
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "checkpoints/durable_io.h"
#include "nlohmann/json.hpp"
#include "worker/comm/process_groups.h"
#include "worker/job_spec.h"
#include "worker/pool.h"
#include "worker/trainer.h"

ABSL_FLAG(std::string, job, "", "Path of the job spec (JSON form of mamba.v1.JobSpec).");
ABSL_FLAG(std::string, resume, "",
          "Resume from a checkpoint: a step_ directory, or a checkpoint root meaning its latest "
          "(same as the job spec's checkpoint.resume_from).");
ABSL_FLAG(std::string, summary_json, "", "If set, write the run's summary here as JSON.");
ABSL_FLAG(std::string, transport, "auto",
          "How ranks exchange CUDA tensors: \"nccl\", \"mpi\" (staged through host memory; "
          "for ranks sharing a GPU), or \"auto\" (NCCL when every rank has its own GPU).");
ABSL_FLAG(std::string, coordinator, "",
          "Service mode: train the jobs of the coordinator at HOST:PORT (worker/pool.h).");
ABSL_FLAG(std::string, token_file, "", "Service mode: a file holding the coordinator's token.");
ABSL_FLAG(std::string, tls_ca, "",
          "Service mode: the certificates (PEM) to trust for the coordinator's TLS; empty: none.");
ABSL_FLAG(std::string, backend, "",
          "Service mode: the backend the pool offers, cpu or cuda (default: cuda where a GPU is "
          "visible).");
ABSL_FLAG(absl::Duration, comm_timeout, absl::Minutes(5),
          "How long an exchange waits for the other ranks before the job fails (a rank died or "
          "hangs).");

namespace {

// An error found by every rank alike (the spec) is printed once, by rank 0; one found by a rank
// alone is printed with its rank named, and ends the other ranks too.
int Fail(const absl::Status& status, bool every_rank_alike = false) {
  const mamba::comm::MpiRuntime& mpi = mamba::comm::MpiRuntime::Get();
  if (mpi.world_size() == 1) {
    std::cerr << "mamba-worker: error: " << status.message() << "\n";
    return 2;
  }
  if (every_rank_alike) {
    if (mpi.world_rank() == 0) std::cerr << "mamba-worker: error: " << status.message() << "\n";
    return 2;
  }
  // Messages of the communication layer already start with the rank.
  const std::string rank = absl::StrCat("rank ", mpi.world_rank(), ": ");
  std::cerr << "mamba-worker: " << (absl::StartsWith(status.message(), rank) ? "" : rank)
            << "error: " << status.message() << std::endl;
  mpi.Abort(2);
}

nlohmann::json SummaryJson(const mamba::v1::JobSpec& spec, const mamba::TrainSummary& s) {
  nlohmann::json j;
  j["job"] = spec.name();
  j["steps"] = s.steps;
  j["seconds"] = s.seconds;
  j["tokens_per_second"] = s.tokens_per_second;
  j["first_loss"] = s.first_loss;
  j["final_loss"] = s.final_loss;
  j["final_accuracy"] = s.final_accuracy;
  j["losses"] = s.losses;
  j["peak_memory_gib"] = double(s.peak_memory_bytes) / (1 << 30);  // rank 0's device tensors
  j["workspace_gib"] = double(s.workspace_bytes) / (1 << 30);
  for (const auto& e : s.evals) {
    j["eval"].push_back(
        {{"seq_len", e.seq_len}, {"loss", e.loss}, {"accuracy", e.accuracy}, {"tokens", e.tokens}});
  }
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Trains one Mamba job: mamba-worker --job job.json");
  absl::ParseCommandLine(argc, argv);
  mamba::comm::MpiRuntime::Init(&argc, &argv);
  mamba::RankOptions rank;
  auto transport = mamba::comm::ParseTransport(absl::GetFlag(FLAGS_transport));
  if (!transport.ok()) return Fail(transport.status(), true);
  rank.transport = *transport;
  rank.comm_timeout = absl::GetFlag(FLAGS_comm_timeout);
  if (const std::string coordinator = absl::GetFlag(FLAGS_coordinator); !coordinator.empty()) {
    mamba::PoolOptions pool;
    pool.coordinator = coordinator;
    pool.rank = rank;
    // The token as the coordinator reads its own file: the whole file, whitespace trimmed.
    if (const std::string path = absl::GetFlag(FLAGS_token_file); !path.empty()) {
      auto text = mamba::ckpt::ReadWholeFile(path);
      if (!text.ok()) {
        return Fail(absl::InvalidArgumentError("--token_file: cannot read " + path), true);
      }
      pool.token = std::string(absl::StripAsciiWhitespace(*text));
    }
    if (const std::string path = absl::GetFlag(FLAGS_tls_ca); !path.empty()) {
      auto pem = mamba::ckpt::ReadWholeFile(path);
      if (!pem.ok()) return Fail(absl::InvalidArgumentError("--tls_ca: cannot read " + path), true);
      pool.tls_ca = *pem;
    }
    pool.backend = absl::GetFlag(FLAGS_backend);
    if (pool.backend.empty()) {
#ifdef MAMBA_HAS_CUDA
      pool.backend = mamba::CudaDeviceCount() > 0 ? "cuda" : "cpu";
#else
      pool.backend = "cpu";
#endif
    }
    if (pool.backend != "cpu" && pool.backend != "cuda") {
      return Fail(absl::InvalidArgumentError("--backend: must be cpu or cuda"), true);
    }
    return mamba::RunPool(pool, std::cout);
  }
  const std::string job_path = absl::GetFlag(FLAGS_job);
  if (job_path.empty()) {
    return Fail(absl::InvalidArgumentError("--job: a job spec file is required"), true);
  }
  auto spec = mamba::LoadJobSpecFile(job_path);
  if (!spec.ok()) return Fail(spec.status(), true);
  if (const std::string resume = absl::GetFlag(FLAGS_resume); !resume.empty()) {
    spec->mutable_checkpoint()->set_resume_from(resume);
    spec = mamba::ResolveJobSpec(*spec);  // re-validated: resume_from excludes init_from
    if (!spec.ok()) return Fail(spec.status(), true);
  }
  auto trainer = mamba::Trainer::Create(*spec, rank);
  // Creation fails alike on every rank for a spec or layout the job cannot run.
  if (!trainer.ok())
    return Fail(trainer.status(), trainer.status().code() == absl::StatusCode::kInvalidArgument);
  auto summary = (*trainer)->Run(std::cout);
  if (!summary.ok()) return Fail(summary.status());
  const std::string out = absl::GetFlag(FLAGS_summary_json);
  if (!out.empty() && (*trainer)->groups().is_root()) {
    std::ofstream f(out);
    f << SummaryJson(*spec, *summary).dump(2) << "\n";
    if (!f) return Fail(absl::InternalError("--summary_json: cannot write " + out));
  }
  return 0;
}
