#pragma once
// The denoising loop, run natively: one denoiser call per step (the CFG batch), then the fused
// guidance + sampler update over the latents.
#include <cstddef>
#include <string>
#include <vector>

#include "steps.h"

namespace ldm {

// Returns the raw model output for input `x_in` (n floats) at step `step` / timestep `t`:
// 2n floats ([uncond; cond]) when guided, else n. The pointer stays valid until the next call.
class Denoiser {
 public:
  virtual ~Denoiser() = default;
  virtual const float* operator()(int step, double t, const float* x_in, std::size_t n) = 0;
};

// Standard normal noise of n floats, drawn in the reference's order (ancestral samplers, DDIM eta > 0).
class NoiseSource {
 public:
  virtual ~NoiseSource() = default;
  virtual const float* draw(std::size_t n) = 0;
};

struct LoopPlan {
  std::string sampler;            // "ddim", "euler", "euler_a", "dpmpp_2m" (Karras sigmas come in the plan), "lcm", "tcd"
  Prediction prediction = Prediction::Eps;
  std::vector<double> timesteps;  // the model's timestep at each step
  std::vector<double> abar;       // DDIM / LCM / TCD: alpha-bar at each step's timestep
  std::vector<double> abar_prev;  // DDIM / LCM / TCD: alpha-bar at the step's target (the next timestep)
  std::vector<double> sigmas;     // Euler / DPM-Solver: n + 1 noise levels ending at 0
  bool guided = true;
  float guidance = 7.5f;
  double eta = 0.0;               // DDIM's eta; TCD's gamma
  std::vector<double> abar_s;     // TCD: alpha-bar at each step's intermediate timestep floor((1 - gamma) t_next)
  double timestep_scaling = 10.0; // LCM: timestep scaling of the boundary condition
};

bool native_sampler(const std::string& name);

// Check a plan's consistency; throws std::invalid_argument naming the problem.
void validate(const LoopPlan& plan);

// The scalars of step i of a plan (shared by the CPU loop and the CUDA graph runner).
StepCoef step_coefficients(const LoopPlan& plan, std::size_t i);

// Whether step i draws fresh noise (after its model call, as the reference does).
bool draws_noise(const LoopPlan& plan, std::size_t i);

// Run every step over x (n floats, updated in place).
void run_loop(const LoopPlan& plan, float* x, std::size_t n, Denoiser& denoiser, NoiseSource* noise);

}  // namespace ldm
