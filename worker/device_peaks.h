// The device's peaks for the profiling report's roofline, measured rather than taken from a table:
// a large copy (bytes read + written a second) and a large GEMM (FLOP/s), each the best of three
// runs on random data. Takes about a second on a GPU.
#pragma once

#include "profiling/report.h"
#include "worker/backend.h"

namespace mamba {

profiling::Peaks MeasurePeaks(Backend& be);

}  // namespace mamba
