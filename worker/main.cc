// mamba-worker: trains one job in this process.
//   mamba-worker --job job.json [--resume DIR] [--summary_json out.json]
// The job spec is the JSON form of mamba.v1.JobSpec (proto/job.proto).
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "nlohmann/json.hpp"
#include "worker/job_spec.h"
#include "worker/trainer.h"

ABSL_FLAG(std::string, job, "", "Path of the job spec (JSON form of mamba.v1.JobSpec).");
ABSL_FLAG(std::string, resume, "",
          "Resume from a checkpoint: a step_ directory, or a checkpoint root meaning its latest "
          "(same as the job spec's checkpoint.resume_from).");
ABSL_FLAG(std::string, summary_json, "", "If set, write the run's summary here as JSON.");

namespace {

int Fail(const absl::Status& status) {
  std::cerr << "mamba-worker: error: " << status.message() << "\n";
  return 2;
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
  const std::string job_path = absl::GetFlag(FLAGS_job);
  if (job_path.empty()) {
    return Fail(absl::InvalidArgumentError("--job: a job spec file is required"));
  }
  auto spec = mamba::LoadJobSpecFile(job_path);
  if (!spec.ok()) return Fail(spec.status());
  if (const std::string resume = absl::GetFlag(FLAGS_resume); !resume.empty()) {
    spec->mutable_checkpoint()->set_resume_from(resume);
    spec = mamba::ResolveJobSpec(*spec);  // re-validated: resume_from excludes init_from
    if (!spec.ok()) return Fail(spec.status());
  }
  auto trainer = mamba::Trainer::Create(*spec);
  if (!trainer.ok()) return Fail(trainer.status());
  auto summary = (*trainer)->Run(std::cout);
  if (!summary.ok()) return Fail(summary.status());
  const std::string out = absl::GetFlag(FLAGS_summary_json);
  if (!out.empty()) {
    std::ofstream f(out);
    f << SummaryJson(*spec, *summary).dump(2) << "\n";
    if (!f) return Fail(absl::InternalError("--summary_json: cannot write " + out));
  }
  return 0;
}
