#include "profiling/cupti_counters.h"

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cupti_profiler_host.h>
#include <cupti_profiler_target.h>
#include <cupti_range_profiler.h>
#include <cupti_result.h>
#include <cupti_target.h>
#include <dlfcn.h>

#include <vector>

namespace mamba::profiling {
namespace {

// Kernels one Begin/End may launch (an op launches a few).
constexpr size_t kMaxRanges = 256;

// The CUPTI entry points used, resolved from the library at run time.
struct Api {
  void* lib = nullptr;
#define MAMBA_CUPTI_FN(name) decltype(&::name) name = nullptr;
  MAMBA_CUPTI_FN(cuptiGetResultString)
  MAMBA_CUPTI_FN(cuptiProfilerInitialize)
  MAMBA_CUPTI_FN(cuptiDeviceGetChipName)
  MAMBA_CUPTI_FN(cuptiProfilerGetCounterAvailability)
  MAMBA_CUPTI_FN(cuptiProfilerHostInitialize)
  MAMBA_CUPTI_FN(cuptiProfilerHostDeinitialize)
  MAMBA_CUPTI_FN(cuptiProfilerHostConfigAddMetrics)
  MAMBA_CUPTI_FN(cuptiProfilerHostGetConfigImageSize)
  MAMBA_CUPTI_FN(cuptiProfilerHostGetConfigImage)
  MAMBA_CUPTI_FN(cuptiProfilerHostGetNumOfPasses)
  MAMBA_CUPTI_FN(cuptiProfilerHostEvaluateToGpuValues)
  MAMBA_CUPTI_FN(cuptiRangeProfilerEnable)
  MAMBA_CUPTI_FN(cuptiRangeProfilerDisable)
  MAMBA_CUPTI_FN(cuptiRangeProfilerGetCounterDataSize)
  MAMBA_CUPTI_FN(cuptiRangeProfilerCounterDataImageInitialize)
  MAMBA_CUPTI_FN(cuptiRangeProfilerSetConfig)
  MAMBA_CUPTI_FN(cuptiRangeProfilerStart)
  MAMBA_CUPTI_FN(cuptiRangeProfilerStop)
  MAMBA_CUPTI_FN(cuptiRangeProfilerDecodeData)
  MAMBA_CUPTI_FN(cuptiRangeProfilerGetCounterDataInfo)
#undef MAMBA_CUPTI_FN
};

// Where CUDA installs CUPTI: the loader's path first, then the toolkit's two folders.
bool Load(Api& api, std::string* why) {
  for (const char* path : {"libcupti.so.13", "libcupti.so", "/usr/local/cuda/lib64/libcupti.so.13",
                           "/usr/local/cuda/extras/CUPTI/lib64/libcupti.so.13"}) {
    if ((api.lib = dlopen(path, RTLD_NOW | RTLD_LOCAL))) break;
  }
  if (!api.lib) {
    *why = std::string("CUPTI not found (libcupti.so.13: ") + dlerror() + ")";
    return false;
  }
  bool ok = true;
  const auto resolve = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(api.lib, name));
    if (!fn && ok) {
      *why = std::string("CUPTI lacks ") + name + " (older than CUDA 12.6?)";
      ok = false;
    }
  };
#define MAMBA_CUPTI_RESOLVE(name) resolve(api.name, #name);
  MAMBA_CUPTI_RESOLVE(cuptiGetResultString)
  MAMBA_CUPTI_RESOLVE(cuptiProfilerInitialize)
  MAMBA_CUPTI_RESOLVE(cuptiDeviceGetChipName)
  MAMBA_CUPTI_RESOLVE(cuptiProfilerGetCounterAvailability)
  MAMBA_CUPTI_RESOLVE(cuptiProfilerHostInitialize)
  MAMBA_CUPTI_RESOLVE(cuptiProfilerHostDeinitialize)
  MAMBA_CUPTI_RESOLVE(cuptiProfilerHostConfigAddMetrics)
  MAMBA_CUPTI_RESOLVE(cuptiProfilerHostGetConfigImageSize)
  MAMBA_CUPTI_RESOLVE(cuptiProfilerHostGetConfigImage)
  MAMBA_CUPTI_RESOLVE(cuptiProfilerHostGetNumOfPasses)
  MAMBA_CUPTI_RESOLVE(cuptiProfilerHostEvaluateToGpuValues)
  MAMBA_CUPTI_RESOLVE(cuptiRangeProfilerEnable)
  MAMBA_CUPTI_RESOLVE(cuptiRangeProfilerDisable)
  MAMBA_CUPTI_RESOLVE(cuptiRangeProfilerGetCounterDataSize)
  MAMBA_CUPTI_RESOLVE(cuptiRangeProfilerCounterDataImageInitialize)
  MAMBA_CUPTI_RESOLVE(cuptiRangeProfilerSetConfig)
  MAMBA_CUPTI_RESOLVE(cuptiRangeProfilerStart)
  MAMBA_CUPTI_RESOLVE(cuptiRangeProfilerStop)
  MAMBA_CUPTI_RESOLVE(cuptiRangeProfilerDecodeData)
  MAMBA_CUPTI_RESOLVE(cuptiRangeProfilerGetCounterDataInfo)
#undef MAMBA_CUPTI_RESOLVE
  return ok;
}

}  // namespace

struct CuptiCounters::State {
  Api api;
  CUpti_Profiler_Host_Object* host = nullptr;
  CUpti_RangeProfiler_Object* profiler = nullptr;
  std::vector<uint8_t> availability, config, counter_data;
  size_t passes = 0;
  std::string failed;  // set once a call fails: nothing more is counted

  // False with *why naming the call and CUPTI's reason when `r` is an error.
  bool Ok(CUptiResult r, const char* call, std::string* why) {
    if (r == CUPTI_SUCCESS) return true;
    const char* text = nullptr;
    if (api.cuptiGetResultString) api.cuptiGetResultString(r, &text);
    failed = std::string(call) + ": " + (text ? text : "error " + std::to_string(int(r)));
    if (r == CUPTI_ERROR_INSUFFICIENT_PRIVILEGES) {
      failed +=
          " (the GPU's performance counters are restricted to administrators: run as root "
          "or load the driver with NVreg_RestrictProfilingToAdminUsers=0)";
    }
    *why = failed;
    return false;
  }

  // An empty counter data image (ranges are decoded into it from the start).
  bool ResetCounterData(std::string* why) {
    CUpti_RangeProfiler_CounterDataImage_Initialize_Params p = {
        CUpti_RangeProfiler_CounterDataImage_Initialize_Params_STRUCT_SIZE};
    p.pRangeProfilerObject = profiler;
    p.counterDataSize = counter_data.size();
    p.pCounterData = counter_data.data();
    return Ok(api.cuptiRangeProfilerCounterDataImageInitialize(&p),
              "cuptiRangeProfilerCounterDataImageInitialize", why);
  }

  bool SetConfig(std::string* why) {
    CUpti_RangeProfiler_SetConfig_Params p = {CUpti_RangeProfiler_SetConfig_Params_STRUCT_SIZE};
    p.pRangeProfilerObject = profiler;
    p.configSize = config.size();
    p.pConfig = config.data();
    p.counterDataImageSize = counter_data.size();
    p.pCounterDataImage = counter_data.data();
    p.range = CUPTI_AutoRange;  // a range a kernel
    p.replayMode = CUPTI_KernelReplay;
    p.maxRangesPerPass = kMaxRanges;
    p.numNestingLevels = 1;
    p.minNestingLevel = 1;
    p.passIndex = 0;
    p.targetNestingLevel = 1;
    return Ok(api.cuptiRangeProfilerSetConfig(&p), "cuptiRangeProfilerSetConfig", why);
  }

  bool Setup(std::string* why) {
    if (!Load(api, why)) return false;
    // The runtime's context (made current by the first runtime call) is the one to profile.
    int device = 0;
    if (cudaFree(nullptr) != cudaSuccess || cudaGetDevice(&device) != cudaSuccess) {
      *why = "no CUDA device";
      return false;
    }
    void* get_current = nullptr;
    cudaDriverEntryPointQueryResult found;
    CUcontext ctx = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &get_current, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess ||
        reinterpret_cast<CUresult (*)(CUcontext*)>(get_current)(&ctx) != CUDA_SUCCESS || !ctx) {
      *why = "no current CUDA context";
      return false;
    }
    CUpti_Profiler_Initialize_Params init = {CUpti_Profiler_Initialize_Params_STRUCT_SIZE};
    if (!Ok(api.cuptiProfilerInitialize(&init), "cuptiProfilerInitialize", why)) return false;
    CUpti_Device_GetChipName_Params chip = {CUpti_Device_GetChipName_Params_STRUCT_SIZE};
    chip.deviceIndex = static_cast<size_t>(device);
    if (!Ok(api.cuptiDeviceGetChipName(&chip), "cuptiDeviceGetChipName", why)) return false;

    CUpti_RangeProfiler_Enable_Params enable = {CUpti_RangeProfiler_Enable_Params_STRUCT_SIZE};
    enable.ctx = ctx;
    if (!Ok(api.cuptiRangeProfilerEnable(&enable), "cuptiRangeProfilerEnable", why)) return false;
    profiler = enable.pRangeProfilerObject;

    // Which counters this context may read: the first call that needs the rights.
    CUpti_Profiler_GetCounterAvailability_Params avail = {
        CUpti_Profiler_GetCounterAvailability_Params_STRUCT_SIZE};
    avail.ctx = ctx;
    if (!Ok(api.cuptiProfilerGetCounterAvailability(&avail), "cuptiProfilerGetCounterAvailability",
            why)) {
      return false;
    }
    availability.resize(avail.counterAvailabilityImageSize);
    avail.pCounterAvailabilityImage = availability.data();
    if (!Ok(api.cuptiProfilerGetCounterAvailability(&avail), "cuptiProfilerGetCounterAvailability",
            why)) {
      return false;
    }

    // The configuration image: the metrics, scheduled into passes for this chip.
    CUpti_Profiler_Host_Initialize_Params host_init = {
        CUpti_Profiler_Host_Initialize_Params_STRUCT_SIZE};
    host_init.profilerType = CUPTI_PROFILER_TYPE_RANGE_PROFILER;
    host_init.pChipName = chip.pChipName;
    host_init.pCounterAvailabilityImage = availability.data();
    if (!Ok(api.cuptiProfilerHostInitialize(&host_init), "cuptiProfilerHostInitialize", why)) {
      return false;
    }
    host = host_init.pHostObject;
    std::vector<const char*> metrics(kCounterMetrics, kCounterMetrics + kNumCounterMetrics);
    CUpti_Profiler_Host_ConfigAddMetrics_Params add = {
        CUpti_Profiler_Host_ConfigAddMetrics_Params_STRUCT_SIZE};
    add.pHostObject = host;
    add.ppMetricNames = metrics.data();
    add.numMetrics = metrics.size();
    if (!Ok(api.cuptiProfilerHostConfigAddMetrics(&add), "cuptiProfilerHostConfigAddMetrics",
            why)) {
      return false;
    }
    CUpti_Profiler_Host_GetConfigImageSize_Params size = {
        CUpti_Profiler_Host_GetConfigImageSize_Params_STRUCT_SIZE};
    size.pHostObject = host;
    if (!Ok(api.cuptiProfilerHostGetConfigImageSize(&size), "cuptiProfilerHostGetConfigImageSize",
            why)) {
      return false;
    }
    config.resize(size.configImageSize);
    CUpti_Profiler_Host_GetConfigImage_Params image = {
        CUpti_Profiler_Host_GetConfigImage_Params_STRUCT_SIZE};
    image.pHostObject = host;
    image.configImageSize = config.size();
    image.pConfigImage = config.data();
    if (!Ok(api.cuptiProfilerHostGetConfigImage(&image), "cuptiProfilerHostGetConfigImage", why)) {
      return false;
    }
    CUpti_Profiler_Host_GetNumOfPasses_Params np = {
        CUpti_Profiler_Host_GetNumOfPasses_Params_STRUCT_SIZE};
    np.configImageSize = config.size();
    np.pConfigImage = config.data();
    if (!Ok(api.cuptiProfilerHostGetNumOfPasses(&np), "cuptiProfilerHostGetNumOfPasses", why)) {
      return false;
    }
    passes = np.numOfPasses;

    CUpti_RangeProfiler_GetCounterDataSize_Params data_size = {
        CUpti_RangeProfiler_GetCounterDataSize_Params_STRUCT_SIZE};
    data_size.pRangeProfilerObject = profiler;
    data_size.pMetricNames = metrics.data();
    data_size.numMetrics = metrics.size();
    data_size.maxNumOfRanges = kMaxRanges;
    data_size.maxNumRangeTreeNodes = kMaxRanges;
    if (!Ok(api.cuptiRangeProfilerGetCounterDataSize(&data_size),
            "cuptiRangeProfilerGetCounterDataSize", why)) {
      return false;
    }
    counter_data.resize(data_size.counterDataSize);
    return ResetCounterData(why) && SetConfig(why);
  }

  ~State() {
    if (profiler) {
      CUpti_RangeProfiler_Disable_Params p = {CUpti_RangeProfiler_Disable_Params_STRUCT_SIZE};
      p.pRangeProfilerObject = profiler;
      api.cuptiRangeProfilerDisable(&p);
    }
    if (host) {
      CUpti_Profiler_Host_Deinitialize_Params p = {
          CUpti_Profiler_Host_Deinitialize_Params_STRUCT_SIZE};
      p.pHostObject = host;
      api.cuptiProfilerHostDeinitialize(&p);
    }
    // The library stays loaded: CUPTI keeps callbacks registered with the driver.
  }
};

CuptiCounters::CuptiCounters(std::unique_ptr<State> s) : s_(std::move(s)) {}
CuptiCounters::~CuptiCounters() = default;

std::unique_ptr<CuptiCounters> CuptiCounters::Create(std::string* why) {
  auto s = std::make_unique<State>();
  if (!s->Setup(why)) return nullptr;
  return std::unique_ptr<CuptiCounters>(new CuptiCounters(std::move(s)));
}

int CuptiCounters::passes() const { return static_cast<int>(s_->passes); }

bool CuptiCounters::Begin(std::string* why) {
  if (!s_->failed.empty()) {
    *why = s_->failed;
    return false;
  }
  CUpti_RangeProfiler_Start_Params p = {CUpti_RangeProfiler_Start_Params_STRUCT_SIZE};
  p.pRangeProfilerObject = s_->profiler;
  return s_->Ok(s_->api.cuptiRangeProfilerStart(&p), "cuptiRangeProfilerStart", why);
}

KernelCounters CuptiCounters::End(std::string* why) {
  KernelCounters total;
  State& s = *s_;
  if (!s.failed.empty()) {
    *why = s.failed;
    return total;
  }
  if (cudaDeviceSynchronize() != cudaSuccess) {
    *why = s.failed = "the counted kernels failed";
    return total;
  }
  CUpti_RangeProfiler_Stop_Params stop = {CUpti_RangeProfiler_Stop_Params_STRUCT_SIZE};
  stop.pRangeProfilerObject = s.profiler;
  if (!s.Ok(s.api.cuptiRangeProfilerStop(&stop), "cuptiRangeProfilerStop", why)) return total;
  CUpti_RangeProfiler_DecodeData_Params decode = {
      CUpti_RangeProfiler_DecodeData_Params_STRUCT_SIZE};
  decode.pRangeProfilerObject = s.profiler;
  if (!s.Ok(s.api.cuptiRangeProfilerDecodeData(&decode), "cuptiRangeProfilerDecodeData", why)) {
    return total;
  }
  CUpti_RangeProfiler_GetCounterDataInfo_Params info = {
      CUpti_RangeProfiler_GetCounterDataInfo_Params_STRUCT_SIZE};
  info.pCounterDataImage = s.counter_data.data();
  info.counterDataImageSize = s.counter_data.size();
  if (!s.Ok(s.api.cuptiRangeProfilerGetCounterDataInfo(&info),
            "cuptiRangeProfilerGetCounterDataInfo", why)) {
    return total;
  }
  std::vector<const char*> metrics(kCounterMetrics, kCounterMetrics + kNumCounterMetrics);
  for (size_t range = 0; range < info.numTotalRanges; ++range) {
    double v[kNumCounterMetrics] = {};
    CUpti_Profiler_Host_EvaluateToGpuValues_Params eval = {
        CUpti_Profiler_Host_EvaluateToGpuValues_Params_STRUCT_SIZE};
    eval.pHostObject = s.host;
    eval.pCounterDataImage = s.counter_data.data();
    eval.counterDataImageSize = s.counter_data.size();
    eval.rangeIndex = range;
    eval.ppMetricNames = metrics.data();
    eval.numMetrics = metrics.size();
    eval.pMetricValues = v;
    if (!s.Ok(s.api.cuptiProfilerHostEvaluateToGpuValues(&eval),
              "cuptiProfilerHostEvaluateToGpuValues", why)) {
      return KernelCounters{};
    }
    total += KernelCounters{1, v[0], v[1], v[2], v[3], v[4]};
  }
  if (decode.numOfRangeDropped > 0) {
    *why = s.failed = "CUPTI dropped " + std::to_string(decode.numOfRangeDropped) +
                      " kernels of one op (more than " + std::to_string(kMaxRanges) + ")";
    return KernelCounters{};
  }
  // The next op's kernels are decoded into an empty image, from range 0.
  if (!s.ResetCounterData(why) || !s.SetConfig(why)) return KernelCounters{};
  return total;
}

}  // namespace mamba::profiling
