// Shared by the standalone microbenchmarks (benchmarks/*.cu): the card they fill, and their
// timing (one warm-up launch, then the fastest of `reps` launches between CUDA events, in ms).
#pragma once
#include <cuda_runtime.h>

template <class Launch>
float best_time_ms(Launch launch, int reps = 5) {
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  launch();  // warm-up
  float best = 1e30f;
  for (int rep = 0; rep < reps; ++rep) {
    cudaEventRecord(t0);
    launch();
    cudaEventRecord(t1);
    cudaEventSynchronize(t1);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, t0, t1);
    best = ms < best ? ms : best;
  }
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  return best;
}

// The SM count (one CTA per SM) and a small device buffer the kernels write to only under an
// impossible condition, so that their products are not optimised away.
struct Card {
  int sms = 0;
  float* sink = nullptr;
  Card() {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cudaMalloc(&sink, 1024 * sizeof(float));
  }
};

inline double tflops(double macs, float ms) { return 2.0 * macs / (ms * 1e-3) / 1e12; }
