// mamba-coordinator: the gRPC front door of the service (proto/service.proto). Jobs live in a
// SQLite file and survive restarts.
//   mamba-coordinator [--listen 127.0.0.1:50051] [--db coordinator.db] [--token_file F]
//                     [--local_workers N] [--lease 30s] [--checkpoint_root runs]
// Prints "listening on HOST:PORT" once it serves (port 0 picks a free one); SIGINT or SIGTERM
// stop it gracefully.
#include <chrono>
#include <csignal>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "checkpoints/durable_io.h"
#include "coordinator/job_service.h"
#include "coordinator/local_pool.h"
#include "coordinator/worker_service.h"
#include "grpcpp/grpcpp.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "Address to serve on (loopback unless told otherwise; port 0: any free port).");
ABSL_FLAG(std::string, db, "coordinator.db", "The SQLite job store (created if absent).");
ABSL_FLAG(std::string, token_file, "",
          "A file holding the bearer token every RPC must carry (empty: no authentication).");
ABSL_FLAG(absl::Duration, lease, absl::Seconds(30),
          "How long a worker pool may stay silent before it is declared lost (its job recovers "
          "on another pool).");
ABSL_FLAG(absl::Duration, heartbeat, absl::Seconds(1), "How often pools heartbeat.");
ABSL_FLAG(int32_t, local_workers, 0,
          "Start (and supervise) a local pool of this many mpirun ranks that trains the jobs "
          "(0: none; pools started elsewhere register themselves).");
ABSL_FLAG(std::string, worker, "",
          "The mamba-worker binary of the local pool (default: the one beside this binary).");
ABSL_FLAG(std::string, data_root, "",
          "Where jobs may read data files (paths outside, \"..\" and symbolic links out "
          "included, are refused; relative ones are taken inside it). Empty: anywhere.");
ABSL_FLAG(std::string, tls_cert, "", "TLS: the server's certificate chain (PEM); with --tls_key.");
ABSL_FLAG(std::string, tls_key, "", "TLS: the server's private key (PEM).");
ABSL_FLAG(std::string, checkpoint_root, "runs",
          "Where jobs that name no checkpoint directory keep theirs: <root>/<job id>.");

namespace {

volatile std::sig_atomic_t g_stop = 0;

int Fail(const std::string& message) {
  std::cerr << "mamba-coordinator: error: " << message << "\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("The Mamba training service's coordinator (gRPC)");
  absl::ParseCommandLine(argc, argv);
  std::string token;
  if (const std::string path = absl::GetFlag(FLAGS_token_file); !path.empty()) {
    auto text = mamba::ckpt::ReadWholeFile(path);
    if (!text.ok()) return Fail(absl::StrCat("--token_file ", path, ": cannot read it"));
    token = std::string(absl::StripAsciiWhitespace(*text));
    if (token.empty()) return Fail(absl::StrCat("--token_file ", path, ": the file is empty"));
  }
  auto store = mamba::coordinator::JobStore::Open(absl::GetFlag(FLAGS_db));
  if (!store.ok()) return Fail(std::string(store.status().message()));
  mamba::coordinator::JobServiceImpl jobs(store->get(), token, absl::GetFlag(FLAGS_checkpoint_root),
                                          absl::GetFlag(FLAGS_data_root));
  mamba::coordinator::WorkerServiceOptions worker_options;
  worker_options.token = token;
  worker_options.lease = absl::GetFlag(FLAGS_lease);
  worker_options.heartbeat = absl::GetFlag(FLAGS_heartbeat);
  worker_options.checkpoint_root = absl::GetFlag(FLAGS_checkpoint_root);
  mamba::coordinator::WorkerServiceImpl workers(store->get(), worker_options);
  grpc::ServerBuilder builder;
  int port = 0;
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!absl::GetFlag(FLAGS_tls_cert).empty() || !absl::GetFlag(FLAGS_tls_key).empty()) {
    const auto read = [](const std::string& path) {
      return mamba::ckpt::ReadWholeFile(path).value_or("");
    };
    grpc::SslServerCredentialsOptions ssl;
    const std::string cert = read(absl::GetFlag(FLAGS_tls_cert)),
                      key = read(absl::GetFlag(FLAGS_tls_key));
    if (cert.empty() || key.empty()) {
      return Fail("--tls_cert and --tls_key: both must name readable PEM files");
    }
    ssl.pem_key_cert_pairs.push_back({key, cert});
    credentials = grpc::SslServerCredentials(ssl);
  }
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), credentials, &port);
  builder.RegisterService(&jobs);
  builder.RegisterService(&workers);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    return Fail(absl::StrCat("--listen ", absl::GetFlag(FLAGS_listen), ": cannot serve there"));
  }
  std::string host = absl::GetFlag(FLAGS_listen);
  host = host.substr(0, host.rfind(':'));
  std::cout << "listening on " << host << ":" << port << std::endl;
  std::signal(SIGINT, [](int) { g_stop = 1; });
  std::signal(SIGTERM, [](int) { g_stop = 1; });
  std::unique_ptr<mamba::coordinator::LocalPool> pool;
  if (const int n = absl::GetFlag(FLAGS_local_workers); n > 0) {
    std::string worker = absl::GetFlag(FLAGS_worker);
    if (worker.empty()) {
      worker =
          (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "mamba-worker").string();
    }
    pool = std::make_unique<mamba::coordinator::LocalPool>(
        mamba::coordinator::LocalPool::MpirunCommand(n, worker, absl::StrCat("127.0.0.1:", port),
                                                     absl::GetFlag(FLAGS_token_file),
                                                     absl::GetFlag(FLAGS_tls_cert)));
  }
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  pool.reset();  // stops the local pool first
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  std::cout << "stopped" << std::endl;
  return 0;
}
