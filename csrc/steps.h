#pragma once
// Fused classifier-free guidance + sampler updates over float32 latents.
//
// Each update mirrors the Python reference (ldm_engine/sampling) operation by operation in float32, with
// the per-step scalars computed in double and rounded to float as PyTorch does for `tensor * python_float`,
// so that the native loop reproduces the reference trajectory to the last bit. Build with
// -ffp-contract=off: a fused multiply-add would round differently. The per-step scalars live in a
// StepCoef, computed on the host once per step and shared by the CPU loop and the CUDA kernels.
#include <cstddef>
#include <string>
#include <vector>

#ifdef __CUDACC__
#define LDM_HD __host__ __device__
#else
#define LDM_HD
#endif

namespace ldm {

enum class Prediction : int { Eps = 0, V = 1 };
enum class Sampler : int { DDIM = 0, Euler = 1, EulerAncestral = 2, DPMpp2M = 3, LCM = 4, TCD = 5 };

struct StepCoef {
  float a, s;                    // VP: sqrt(abar), sqrt(1 - abar) of the model output's noise level
  float c_x0, c_eps, c_noise;    // DDIM: x <- c_x0 x0 + c_eps eps + c_noise z
                                 // TCD: v = c_x0 x0 + c_eps eps at the intermediate timestep s, then renoised
  float sigma, v_out, v_x, dt;   // Euler: denoised and the step to the target sigma
  float up;                      // Euler ancestral: noise added after the step
  float c_x, c_d, two_r;         // DPM-Solver++(2M): x <- c_x x + c_d D, D = x0 + (x0 - prev) / two_r
                                 // LCM: v = c_x x + c_d x0 (c_skip, c_out of the boundary condition), renoised
  float second_order;            // DPM-Solver++(2M): 1 = use the multistep correction this step
  float in_scale;                // sigma-space samplers feed the model x / in_scale
  float renoise;                 // LCM / TCD: x <- renoise v + c_noise z when c_noise != 0 (else x <- v);
                                 // the record stays 16 floats (64 bytes) for the device table
};

// The guided model output at element i: u + g (c - u), or u when c is null.
LDM_HD inline float guided_at(const float* u, const float* c, float g, std::size_t i) {
  return c ? u[i] + g * (c[i] - u[i]) : u[i];
}

// One element of the update: x (in/out), prev (DPM-Solver's previous x0, in/out), o the guided output,
// z the noise (ancestral samplers).
LDM_HD inline void update_element(Sampler smp, Prediction pred, const StepCoef& k, float& x, float& prev, float o,
                                  float z) {
  if (smp == Sampler::DDIM || smp == Sampler::DPMpp2M || smp == Sampler::LCM || smp == Sampler::TCD) {
    float x0, eps;
    if (pred == Prediction::Eps) {
      x0 = (x - k.s * o) / k.a;
      eps = o;
    } else {
      x0 = k.a * x - k.s * o;
      eps = k.a * o + k.s * x;
    }
    if (smp == Sampler::DDIM) {
      float v = k.c_x0 * x0 + k.c_eps * eps;
      if (k.c_noise != 0.0f) v = v + k.c_noise * z;
      x = v;
    } else if (smp == Sampler::LCM || smp == Sampler::TCD) {
      float v = smp == Sampler::LCM ? k.c_x * x + k.c_d * x0 : k.c_x0 * x0 + k.c_eps * eps;
      if (k.c_noise != 0.0f) v = k.renoise * v + k.c_noise * z;
      x = v;
    } else {
      const float d = k.second_order != 0.0f ? x0 + (x0 - prev) / k.two_r : x0;
      x = k.c_x * x + k.c_d * d;
      prev = x0;
    }
  } else {
    const float d = pred == Prediction::Eps ? x - k.sigma * o : o * k.v_out + x / k.v_x;
    float v = x + (x - d) / k.sigma * k.dt;
    if (smp == Sampler::EulerAncestral) v = v + z * k.up;
    x = v;
  }
}

Sampler sampler_from_name(const std::string& name);  // throws std::invalid_argument for others

// Per-step scalars. DDIM uses abar / abar_prev (eta for its noise); the others sigma, sigma_next
// (and sigma_prev, second_order for DPM-Solver++).
StepCoef coefficients(Sampler smp, double abar, double abar_prev, double eta, double sigma, double sigma_next,
                      double sigma_prev, bool second_order);

// Per-step scalars of the consistency samplers at timestep t: abar at t and at the next timestep; TCD's
// abar at its intermediate timestep s; LCM's boundary-condition timestep scaling. `renoise`: fresh noise
// after this step (LCM: all but the last; TCD: gamma > 0, all but the last).
StepCoef consistency_coefficients(Sampler smp, double t, double abar, double abar_next, double abar_s,
                                  double timestep_scaling, bool renoise);

// CPU: the fused guidance + update over n latents; out_c null when not guided.
void fused_update(Sampler smp, Prediction pred, const StepCoef& k, float* x, float* prev, const float* out_u,
                  const float* out_c, float guidance, const float* noise, std::size_t n);

// Scale the model input of the sigma-space samplers: xin = x / in_scale.
void scale_input(const float* x, float* xin, std::size_t n, const StepCoef& k);

}  // namespace ldm
