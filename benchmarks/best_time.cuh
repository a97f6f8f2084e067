// Timing of the standalone microbenchmarks (benchmarks/*.cu): one warm-up launch, then the
// fastest of `reps` launches between CUDA events, in ms.
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
