#pragma once
// Host launchers of the CUDA fused-update kernels; all pointers are device pointers, all launches go
// on `stream` (the stream a CUDA graph is being captured on).
#include <cuda_runtime.h>

#include <cstddef>

#include "steps.h"

namespace ldm {
namespace cuda {

// t_out <- timesteps[*step]; in_scale <- table[*step].in_scale
void select_step(const float* timesteps, const int* step, float* t_out, const StepCoef* table, float* in_scale,
                 cudaStream_t stream);
void scale_input(const float* x, float* xin, const float* in_scale, std::size_t n, cudaStream_t stream);
void fused_update(int sampler, int prediction, const StepCoef* table, const int* step, float* x, float* prev,
                  const float* out, bool guided, const float* guidance, const float* noise, std::size_t n,
                  cudaStream_t stream);
void advance(int* step, cudaStream_t stream);  // *step += 1

}  // namespace cuda
}  // namespace ldm
