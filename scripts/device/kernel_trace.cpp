// A CUPTI injection library that writes every kernel's start and end (device clock, ns), stream
// and launch order to a CSV, for seeing how the layer's two branches overlap (nsys does not run
// on the device machine). Used by scripts/device/kernel_trace.sh:
//   CUDA_INJECTION64_PATH=libkernel_trace.so OMNIMOE_TRACE_CSV=out.csv <program>
// Columns: correlation (launch order), stream, start_ns, end_ns, grid (blocks), name.
#include <cupti.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace {

std::FILE* out = nullptr;
std::mutex out_mutex;
constexpr size_t kBufferBytes = 8 << 20;

void check(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return;
  const char* msg = nullptr;
  cuptiGetResultString(r, &msg);
  std::fprintf(stderr, "kernel_trace: %s failed: %s\n", what, msg ? msg : "?");
  std::exit(1);
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = kBufferBytes;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(out_mutex);
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
    std::fprintf(out, "%u,%u,%llu,%llu,%lld,\"%s\"\n", k->correlationId, k->streamId,
                 static_cast<unsigned long long>(k->start),
                 static_cast<unsigned long long>(k->end),
                 static_cast<long long>(k->gridX) * k->gridY * k->gridZ, k->name);
  }
  std::free(buffer);
}

void finish() {
  cuptiActivityFlushAll(1);
  std::lock_guard<std::mutex> lock(out_mutex);
  std::fclose(out);
}

}  // namespace

extern "C" int InitializeInjection(void) {
  const char* path = std::getenv("OMNIMOE_TRACE_CSV");
  out = std::fopen(path ? path : "kernel_trace.csv", "w");
  if (!out) {
    std::fprintf(stderr, "kernel_trace: cannot open %s\n", path ? path : "kernel_trace.csv");
    return 0;
  }
  std::fprintf(out, "correlation,stream,start_ns,end_ns,grid,name\n");
  check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed),
        "cuptiActivityRegisterCallbacks");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "cuptiActivityEnable");
  std::atexit(finish);
  return 1;
}
