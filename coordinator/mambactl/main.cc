// mambactl: the command-line client of the coordinator (JobService).
//   mambactl [--coordinator 127.0.0.1:50051] [--token_file F] [--json] COMMAND ...
//     submit SPEC.json [--key K] [--priority N]
//                                  submit a job (the same key and spec return the same job)
//     get ID                       one job
//     list [--state S] [--name N] [--page_size N]   jobs, newest first (every page)
//     cancel ID                    cancel a job
//     watch ID [--from N]          its events (state changes, training log, checkpoints) as they
//                                  happen, until it ends; reconnects where it left off; exits 0
//                                  when it SUCCEEDED
//     logs ID [--follow]           its events so far (with --follow: as watch)
//     checkpoints ID               the checkpoints it has written
//     profile ID [--save DIR]      its profiling report: the tables printed, the files saved
// Tables by default, JSON (protobuf's mapping) with --json. Exit status: 0 on success, 1 when the
// coordinator refuses (its status printed), 2 for a bad command line; watch: 3 when the job
// ended other than SUCCEEDED.
#include <unistd.h>

#include <fstream>
#include <iomanip>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "checkpoints/durable_io.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "proto/service.grpc.pb.h"
#include "worker/job_spec.h"

ABSL_FLAG(std::string, coordinator, "127.0.0.1:50051", "The coordinator's address.");
ABSL_FLAG(std::string, token_file, "", "A file holding the coordinator's bearer token.");
ABSL_FLAG(bool, json, false, "Print JSON instead of tables.");
ABSL_FLAG(std::string, tls_ca, "",
          "TLS: the certificates (PEM) to trust for the coordinator's; empty: no TLS.");
ABSL_FLAG(std::string, key, "", "submit: the idempotency key.");
ABSL_FLAG(int32_t, priority, 0, "submit: the job's priority (overrides the spec's when not 0).");
ABSL_FLAG(bool, follow, false, "logs: keep printing new events until the job ends.");
ABSL_FLAG(std::string, state, "", "list: only jobs in this state (QUEUED, RUNNING, ...).");
ABSL_FLAG(std::string, name, "", "list: only jobs of this name.");
ABSL_FLAG(int32_t, page_size, 50, "list: jobs a page.");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(30), "How long one call may take.");
ABSL_FLAG(int64_t, from, 0, "watch: the first event to show.");
ABSL_FLAG(std::string, save, ".", "profile: where to save the report's files.");

namespace {

using mamba::v1::Job;

int Usage(const std::string& why) {
  std::cerr << "mambactl: " << why << "\n"
            << "usage: mambactl [--coordinator HOST:PORT] [--token_file F] [--json] "
               "submit SPEC.json [--key K] | get ID | list [--state S] [--name N] | cancel ID\n";
  return 2;
}

// gRPC's status code names, by number.
const char* CodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : "UNKNOWN";
}

int Refused(const grpc::Status& s) {
  std::cerr << "mambactl: " << CodeName(s.error_code()) << ": "
            << (s.error_code() == grpc::StatusCode::UNAVAILABLE
                    ? "coordinator unavailable at " + absl::GetFlag(FLAGS_coordinator) + ": "
                    : "")
            << s.error_message() << "\n";
  return 1;
}

std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

void PrintJobs(const std::vector<Job>& jobs) {
  std::cout << std::left << std::setw(12) << "ID" << std::setw(12) << "STATE" << std::setw(24)
            << "NAME" << std::setw(9) << "PRIORITY"
            << "REASON\n";
  for (const Job& j : jobs) {
    std::cout << std::left << std::setw(12) << j.id() << std::setw(12)
              << mamba::v1::JobState_Name(j.state()) << std::setw(24)
              << (j.name().empty() ? "-" : j.name()) << std::setw(9) << j.priority() << j.reason()
              << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("mambactl: submit and follow Mamba training jobs");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() < 2) return Usage("a command is required");
  const std::string command = args[1];
  std::string token;
  if (const std::string path = absl::GetFlag(FLAGS_token_file); !path.empty()) {
    auto text = mamba::ckpt::ReadWholeFile(path);
    if (!text.ok()) return Usage(absl::StrCat("--token_file ", path, ": cannot read it"));
    token = std::string(absl::StripAsciiWhitespace(*text));
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (const std::string ca = absl::GetFlag(FLAGS_tls_ca); !ca.empty()) {
    auto pem = mamba::ckpt::ReadWholeFile(ca);
    if (!pem.ok()) return Usage(absl::StrCat("--tls_ca ", ca, ": cannot read it"));
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = *pem;
    credentials = grpc::SslCredentials(ssl);
  }
  auto channel = grpc::CreateChannel(absl::GetFlag(FLAGS_coordinator), credentials);
  auto stub = mamba::v1::JobService::NewStub(channel);
  const auto context = [&]() {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(absl::ToChronoTime(absl::Now() + absl::GetFlag(FLAGS_timeout)));
    if (!token.empty()) c->AddMetadata("authorization", "Bearer " + token);
    return c;
  };
  const bool json = absl::GetFlag(FLAGS_json);

  if (command == "submit") {
    if (args.size() != 3) return Usage("submit takes one spec file");
    auto text = mamba::ckpt::ReadWholeFile(args[2]);
    if (!text.ok()) return Usage(absl::StrCat("submit: cannot read ", args[2]));
    mamba::v1::SubmitJobRequest request;
    google::protobuf::util::JsonParseOptions options;
    if (auto s =
            google::protobuf::util::JsonStringToMessage(*text, request.mutable_spec(), options);
        !s.ok()) {
      return Usage(absl::StrCat(args[2], ": not a JobSpec: ", std::string(s.message())));
    }
    request.set_idempotency_key(absl::GetFlag(FLAGS_key));
    if (const int32_t p = absl::GetFlag(FLAGS_priority); p != 0)
      request.mutable_spec()->set_priority(p);
    mamba::v1::SubmitJobResponse response;
    if (grpc::Status s = stub->SubmitJob(context().get(), request, &response); !s.ok()) {
      return Refused(s);
    }
    if (json) {
      std::cout << "{\"id\": \"" << response.job().id()
                << "\", \"created\": " << (response.created() ? "true" : "false") << "}\n";
    } else {
      std::cout << (response.created() ? "submitted " : "already submitted ") << response.job().id()
                << "\n";
    }
    return 0;
  }
  if (command == "get" || command == "cancel") {
    if (args.size() != 3) return Usage(command + " takes one job id");
    Job job;
    grpc::Status s;
    if (command == "get") {
      mamba::v1::GetJobRequest request;
      request.set_id(args[2]);
      s = stub->GetJob(context().get(), request, &job);
    } else {
      mamba::v1::CancelJobRequest request;
      request.set_id(args[2]);
      s = stub->CancelJob(context().get(), request, &job);
    }
    if (!s.ok()) return Refused(s);
    if (json) {
      std::cout << Json(job) << "\n";
    } else {
      PrintJobs({job});
    }
    return 0;
  }
  if (command == "list") {
    mamba::v1::ListJobsRequest request;
    if (const std::string state = absl::GetFlag(FLAGS_state); !state.empty()) {
      mamba::v1::JobState parsed;
      if (!mamba::v1::JobState_Parse(state, &parsed)) {
        return Usage(absl::StrCat("--state: no state \"", state, "\""));
      }
      request.set_state(parsed);
    }
    request.set_name(absl::GetFlag(FLAGS_name));
    request.set_page_size(absl::GetFlag(FLAGS_page_size));
    std::vector<Job> jobs;
    do {
      mamba::v1::ListJobsResponse response;
      if (grpc::Status s = stub->ListJobs(context().get(), request, &response); !s.ok()) {
        return Refused(s);
      }
      jobs.insert(jobs.end(), response.jobs().begin(), response.jobs().end());
      request.set_page_token(response.next_page_token());
    } while (!request.page_token().empty());
    if (json) {
      mamba::v1::ListJobsResponse all;
      for (const Job& j : jobs) *all.add_jobs() = j;
      std::cout << Json(all) << "\n";
    } else {
      PrintJobs(jobs);
    }
    return 0;
  }
  if (command == "watch" || command == "logs") {
    if (args.size() != 3) return Usage(command + " takes one job id");
    mamba::v1::WatchJobRequest request;
    request.set_id(args[2]);
    request.set_from_offset(absl::GetFlag(FLAGS_from));
    request.set_snapshot(command == "logs" && !absl::GetFlag(FLAGS_follow));
    mamba::v1::JobState last = mamba::v1::JOB_STATE_UNSPECIFIED;
    const bool live = !request.snapshot() && isatty(STDOUT_FILENO);
    bool progress_shown = false;
    // A broken stream (the coordinator restarting, say) is picked up where it stopped.
    for (int reconnects = 0;; ++reconnects) {
      grpc::ClientContext c;
      if (!token.empty()) c.AddMetadata("authorization", "Bearer " + token);
      auto reader = stub->WatchJob(&c, request);
      mamba::v1::JobUpdate u;
      while (reader->Read(&u)) {
        if (json) {
          std::cout << Json(u) << std::endl;
        } else if (live && u.kind() == "log" && absl::StartsWith(u.text(), "step ")) {
          // On a terminal, progress lines redraw one line (step/total, loss, accuracy, tokens/s,
          // ETA); everything else is printed below it.
          std::cout << "\r\033[K" << u.text() << std::flush;
          progress_shown = true;
        } else if (u.kind() != "metric") {  // the log lines already say what metrics do
          std::cout << (progress_shown ? "\n" : "") << "[" << u.offset() << "] " << u.text()
                    << std::endl;
          progress_shown = false;
        }
        request.set_from_offset(u.offset() + 1);
        last = u.state();
      }
      const grpc::Status s = reader->Finish();
      if (s.ok()) break;
      if (s.error_code() != grpc::StatusCode::UNAVAILABLE || reconnects >= 30) return Refused(s);
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    if (request.snapshot()) return 0;
    return last == mamba::v1::SUCCEEDED ? 0 : 3;
  }
  if (command == "profile") {
    if (args.size() != 3) return Usage("profile takes one job id");
    mamba::v1::GetProfileRequest request;
    request.set_id(args[2]);
    mamba::v1::GetProfileResponse response;
    if (grpc::Status s = stub->GetProfile(context().get(), request, &response); !s.ok()) {
      return Refused(s);
    }
    const std::string dir = absl::GetFlag(FLAGS_save);
    for (const auto& [name, bytes] : response.files()) {
      std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
    }
    if (const auto it = response.files().find("profile.md"); it != response.files().end()) {
      std::cout << it->second;
    }
    std::cerr << "saved " << response.files().size() << " file(s) to " << dir << "\n";
    return 0;
  }
  if (command == "checkpoints") {
    if (args.size() != 3) return Usage("checkpoints takes one job id");
    mamba::v1::ListCheckpointsRequest request;
    request.set_id(args[2]);
    mamba::v1::ListCheckpointsResponse response;
    if (grpc::Status s = stub->ListCheckpoints(context().get(), request, &response); !s.ok()) {
      return Refused(s);
    }
    if (json) {
      std::cout << Json(response) << "\n";
    } else {
      for (const std::string& c : response.checkpoints()) std::cout << c << "\n";
    }
    return 0;
  }
  return Usage(absl::StrCat("no command \"", command, "\""));
}
