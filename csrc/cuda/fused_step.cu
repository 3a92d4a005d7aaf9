// CUDA twin of the CPU fused update (steps.h): guidance + sampler update in one pass over the latents.
// Everything a step varies (its coefficients, the timestep, the guidance scale) is read from device
// memory through a device-side step counter, so one captured CUDA graph [timestep select -> denoiser ->
// fused update -> advance] replays every step of every run of its shape bucket without recapture.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/fused_step.h"
#include "steps.h"

namespace ldm {
namespace cuda {
namespace {

__global__ void select_step_kernel(const float* timesteps, const int* step, float* t_out, const StepCoef* table,
                            float* in_scale_out) {
  const int i = *step;
  *t_out = timesteps[i];
  *in_scale_out = table[i].in_scale;
}

__global__ void scale_input_kernel(const float* x, float* xin, const float* in_scale, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) xin[i] = x[i] / *in_scale;
}

__global__ void fused_update_kernel(int sampler, int prediction, const StepCoef* table, const int* step, float* x,
                                    float* prev, const float* out, int guided, const float* guidance,
                                    const float* noise, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const StepCoef k = table[*step];
  const float o = guided_at(out, guided ? out + n : nullptr, *guidance, i);
  float unused = 0.0f;
  update_element(static_cast<Sampler>(sampler), static_cast<Prediction>(prediction), k, x[i], prev ? prev[i] : unused,
                 o, noise ? noise[i] : 0.0f);
}

__global__ void advance_kernel(int* step) { *step += 1; }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

unsigned blocks(std::size_t n) { return static_cast<unsigned>((n + 255) / 256); }

}  // namespace

void select_step(const float* timesteps, const int* step, float* t_out, const StepCoef* table, float* in_scale,
                 cudaStream_t stream) {
  select_step_kernel<<<1, 1, 0, stream>>>(timesteps, step, t_out, table, in_scale);
  check(cudaGetLastError(), "select_step");
}

void scale_input(const float* x, float* xin, const float* in_scale, std::size_t n, cudaStream_t stream) {
  scale_input_kernel<<<blocks(n), 256, 0, stream>>>(x, xin, in_scale, n);
  check(cudaGetLastError(), "scale_input");
}

void fused_update(int sampler, int prediction, const StepCoef* table, const int* step, float* x, float* prev,
                  const float* out, bool guided, const float* guidance, const float* noise, std::size_t n,
                  cudaStream_t stream) {
  fused_update_kernel<<<blocks(n), 256, 0, stream>>>(sampler, prediction, table, step, x, prev, out, guided ? 1 : 0,
                                                     guidance, noise, n);
  check(cudaGetLastError(), "fused_update");
}

void advance(int* step, cudaStream_t stream) {
  advance_kernel<<<1, 1, 0, stream>>>(step);
  check(cudaGetLastError(), "advance");
}

}  // namespace cuda
}  // namespace ldm
