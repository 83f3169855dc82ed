// Times the CUDA selective scan (forward, backward) at the eight rows of DESIGN.md's "Numbers to
// beat" table (N 16, G 1, z gating, dt bias, softplus), with CUDA events: warm-up, then the median
// of many runs, rotating between two input sets larger than L2. Prints ms, GB/s, % of the HBM
// floor (device copy bandwidth measured in the same run), the exponential-throughput floor and the
// ratio to the official kernel; writes JSON with --json PATH.
//
//   scan_bench [--json PATH] [--runs N] [--rows i,j,...] [--shape B,D,L] [--fwd-min-threads N]
//              [--bwd-tiles K] [--fwd-lanes 2|4|8] [--fwd-chans 1|2] [--v2]
// --shape adds rows of another shape (fp32 and bf16, no official times: speedup 0.00x);
// repeatable, and with --shape only the --rows given run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/cuda_bench.cuh"
#include "worker/kernels/selective_scan_cuda.h"

namespace {

using mamba::bench::Alloc;
using mamba::bench::Fill;
using mamba::bench::TimeMedian;
using mamba::kernels::cuda::DType;
using mamba::kernels::cuda::ScanProblem;
using mamba::kernels::cuda::ScanTuning;

struct Row {
  int64_t B, D, L;
  bool bf16;
  double official_fwd_ms, official_bwd_ms;
};

// DESIGN.md, "Numbers to beat": mamba_ssm's selective_scan_cuda on an H100 80GB HBM3.
const Row kRows[] = {
    {8, 1536, 2048, false, 0.893, 2.100},  {8, 1536, 2048, true, 0.457, 1.911},
    {16, 2048, 4096, false, 4.910, 11.11}, {16, 2048, 4096, true, 2.300, 9.676},
    {1, 1536, 65536, false, 3.989, 8.727}, {1, 1536, 65536, true, 2.228, 7.881},
    {2, 5120, 8192, false, 3.166, 6.835},  {2, 5120, 8192, true, 1.858, 6.194},
};
constexpr int64_t kN = 16;

// One input set and its outputs, channel-contiguous layout.
struct Set {
  void *u, *delta, *z, *Bm, *Cm, *dout, *out, *du, *ddelta, *dz, *dBm, *dCm;
};

// Device-to-device copy bandwidth, bytes read + written per second.
double CopyBandwidth() {
  const size_t bytes = size_t(1) << 30;
  void* a = Alloc(bytes);
  void* b = Alloc(bytes);
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  const double ms = TimeMedian(
      3, 20, [&](int) { CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  return 2.0 * bytes / (ms * 1e-3);
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  int runs = 20;
  std::vector<int> rows;
  std::vector<Row> table(std::begin(kRows), std::end(kRows));
  ScanTuning tuning;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (a == "--runs" && i + 1 < argc) {
      runs = std::atoi(argv[++i]);
    } else if (a == "--rows" && i + 1 < argc) {
      for (char* s = std::strtok(argv[++i], ","); s; s = std::strtok(nullptr, ","))
        rows.push_back(std::atoi(s));
    } else if (a == "--shape" && i + 1 < argc) {
      long long b = 0, d = 0, l = 0;
      if (std::sscanf(argv[++i], "%lld,%lld,%lld", &b, &d, &l) != 3 || b < 1 || d < 1 || l < 1) {
        std::fprintf(stderr, "--shape wants B,D,L (positive)\n");
        return 2;
      }
      for (bool bf16 : {false, true}) {
        rows.push_back(static_cast<int>(table.size()));
        table.push_back({b, d, l, bf16, 0, 0});
      }
    } else if (a == "--fwd-min-threads" && i + 1 < argc) {
      tuning.fwd_min_threads = std::atoll(argv[++i]);
    } else if (a == "--bwd-tiles" && i + 1 < argc) {
      tuning.bwd_tiles = std::atoll(argv[++i]);
    } else if (a == "--fwd-lanes" && i + 1 < argc) {
      tuning.fwd_lanes = std::atoi(argv[++i]);
    } else if (a == "--fwd-chans" && i + 1 < argc) {
      tuning.fwd_chans = std::atoi(argv[++i]);
    } else if (a == "--v2") {
      tuning.force_v2 = true;
    } else {
      std::fprintf(
          stderr,
          "usage: %s [--json PATH] [--runs N] [--rows i,j] [--shape B,D,L] [--fwd-min-threads N] "
          "[--bwd-tiles K] [--fwd-lanes 2|4|8] [--fwd-chans 1|2] [--v2]\n",
          argv[0]);
      return 2;
    }
  }
  if (rows.empty()) {
    for (int i = 0; i < 8; ++i) rows.push_back(i);
  }
  int dev = 0, sms = 0, clock_khz = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, dev));
  const double copy_bw = CopyBandwidth();
  const double exp_rate = 16.0 * sms * clock_khz * 1e3;  // exponentials per second
  std::printf(
      "device: %s, %d SMs, %.0f MHz max clock, L2 %d MB; copy bandwidth %.0f GB/s (read+write)\n",
      prop.name, sms, clock_khz / 1e3, prop.l2CacheSize >> 20, copy_bw / 1e9);

  std::string json = "{\n  \"device\": \"" + std::string(prop.name) +
                     "\",\n  \"copy_GBps\": " + std::to_string(copy_bw / 1e9) +
                     ",\n  \"rows\": [\n";
  std::printf("\n%-16s %-5s | %8s %7s %6s %7s %7s | %8s %7s %6s %7s %7s | %8s\n", "B,D,L", "dtype",
              "fwd ms", "GB/s", "%HBM", "x exp", "speedup", "bwd ms", "GB/s", "%HBM", "x exp",
              "speedup", "exp ms");
  for (size_t ri = 0; ri < rows.size(); ++ri) {
    const Row& r = table[rows[ri]];
    const int64_t act = r.B * r.L * r.D, bc = r.B * r.L * kN;
    const size_t el = r.bf16 ? 2 : 4;
    Set sets[2];
    for (int s = 0; s < 2; ++s) {
      Set& x = sets[s];
      for (void** p : {&x.u, &x.delta, &x.z, &x.dout, &x.out, &x.du, &x.ddelta, &x.dz})
        *p = Alloc(act * el);
      for (void** p : {&x.Bm, &x.Cm, &x.dBm, &x.dCm}) *p = Alloc(bc * el);
      Fill(x.u, act, r.bf16, 10 * s + 1, -1, 1);
      Fill(x.delta, act, r.bf16, 10 * s + 2, -3, 0.5f);
      Fill(x.z, act, r.bf16, 10 * s + 3, -2, 2);
      Fill(x.dout, act, r.bf16, 10 * s + 4, -1, 1);
      Fill(x.Bm, bc, r.bf16, 10 * s + 5, -1, 1);
      Fill(x.Cm, bc, r.bf16, 10 * s + 6, -1, 1);
    }
    float* A = static_cast<float*>(Alloc(r.D * kN * 4));
    float* params = static_cast<float*>(Alloc(r.D * 4 * 5));
    float* dA = static_cast<float*>(Alloc(r.D * kN * 4));
    Fill(A, r.D * kN, false, 7, -8, -0.5f);
    Fill(params, r.D * 5, false, 8, -1, 0);
    const auto problem = [&](const Set& x) {
      ScanProblem p;
      p.batch = r.B, p.len = r.L, p.dim = r.D, p.dstate = kN, p.groups = 1;
      p.dtype = r.bf16 ? DType::kBF16 : DType::kF32;
      p.softplus = true;
      const auto t3 = [&](void* q) { return mamba::kernels::cuda::Strided3{q, r.L * r.D, r.D, 1}; };
      const auto t4 = [&](void* q) {
        return mamba::kernels::cuda::Strided4{q, r.L * kN, kN, kN, 1};
      };
      p.u = t3(x.u), p.delta = t3(x.delta), p.z = t3(x.z), p.out = t3(x.out);
      p.Bm = t4(x.Bm), p.Cm = t4(x.Cm);
      p.A = A, p.D_skip = params, p.dt_bias = params + r.D;
      p.dout = t3(x.dout), p.du = t3(x.du), p.ddelta = t3(x.ddelta), p.dz = t3(x.dz);
      p.dBm = t4(x.dBm), p.dCm = t4(x.dCm);
      p.dA = dA, p.dD_skip = params + 2 * r.D, p.ddt_bias = params + 3 * r.D;
      return p;
    };
    const ScanProblem probs[2] = {problem(sets[0]), problem(sets[1])};
    const double fwd_ms = TimeMedian(3, runs, [&](int i) {
      CHECK_CUDA(mamba::kernels::cuda::LaunchScanForward(probs[i & 1], nullptr, tuning));
    });
    const double bwd_ms = TimeMedian(3, runs, [&](int i) {
      CHECK_CUDA(mamba::kernels::cuda::LaunchScanBackward(probs[i & 1], nullptr, tuning));
    });
    CHECK_CUDA(cudaDeviceSynchronize());
    const double fwd_bytes = double(4 * act + 2 * bc) * el,
                 bwd_bytes = double(7 * act + 4 * bc) * el;
    const double exp_ms = double(act) * kN / exp_rate * 1e3;
    const double fwd_floor = std::max(fwd_bytes / copy_bw * 1e3, exp_ms);
    const double bwd_floor = std::max(bwd_bytes / copy_bw * 1e3, exp_ms);
    char shape[64];
    std::snprintf(shape, sizeof shape, "%lld,%lld,%lld", (long long)r.B, (long long)r.D,
                  (long long)r.L);
    const double fwd_gbs = fwd_bytes / (fwd_ms * 1e-3) / 1e9,
                 bwd_gbs = bwd_bytes / (bwd_ms * 1e-3) / 1e9;
    std::printf(
        "%-16s %-5s | %8.3f %7.0f %5.1f%% %7.2f %6.2fx | %8.3f %7.0f %5.1f%% %7.2f %6.2fx | "
        "%8.3f\n",
        shape, r.bf16 ? "bf16" : "fp32", fwd_ms, fwd_gbs, 100 * fwd_gbs * 1e9 / copy_bw,
        fwd_ms / exp_ms, r.official_fwd_ms / fwd_ms, bwd_ms, bwd_gbs, 100 * bwd_gbs * 1e9 / copy_bw,
        bwd_ms / exp_ms, r.official_bwd_ms / bwd_ms, exp_ms);  // 0.00x: no official time
    char buf[1024];
    std::snprintf(buf, sizeof buf,
                  "    {\"B\": %lld, \"D\": %lld, \"L\": %lld, \"N\": 16, \"dtype\": \"%s\", "
                  "\"fwd_ms\": %.4f, \"bwd_ms\": %.4f, \"fwd_GBps\": %.1f, \"bwd_GBps\": %.1f, "
                  "\"fwd_pct_hbm\": %.2f, \"bwd_pct_hbm\": %.2f, \"exp_floor_ms\": %.4f, "
                  "\"fwd_over_floor\": %.2f, \"bwd_over_floor\": %.2f, "
                  "\"official_fwd_ms\": %.3f, \"official_bwd_ms\": %.3f, "
                  "\"fwd_speedup\": %.2f, \"bwd_speedup\": %.2f}%s\n",
                  (long long)r.B, (long long)r.D, (long long)r.L, r.bf16 ? "bf16" : "fp32", fwd_ms,
                  bwd_ms, fwd_gbs, bwd_gbs, 100 * fwd_gbs * 1e9 / copy_bw,
                  100 * bwd_gbs * 1e9 / copy_bw, exp_ms, fwd_ms / fwd_floor, bwd_ms / bwd_floor,
                  r.official_fwd_ms, r.official_bwd_ms, r.official_fwd_ms / fwd_ms,
                  r.official_bwd_ms / bwd_ms, ri + 1 < rows.size() ? "," : "");
    json += buf;
    for (Set& x : sets) {
      for (void* p :
           {x.u, x.delta, x.z, x.dout, x.out, x.du, x.ddelta, x.dz, x.Bm, x.Cm, x.dBm, x.dCm}) {
        CHECK_CUDA(cudaFree(p));
      }
    }
    for (void* p : {(void*)A, (void*)params, (void*)dA}) CHECK_CUDA(cudaFree(p));
  }
  json += "  ]\n}\n";
  std::printf(
      "\nx exp: time over the exponential floor (B*D*L*N exps at 16/SM/clock); "
      "speedup: official time / ours\n");
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 1;
    }
    std::fputs(json.c_str(), f);
    std::fclose(f);
  }
  return 0;
}
