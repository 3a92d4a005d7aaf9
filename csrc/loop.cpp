#include "loop.h"

#include <stdexcept>

namespace ldm {

bool native_sampler(const std::string& name) {
  return name == "ddim" || name == "euler" || name == "euler_a" || name == "dpmpp_2m" || name == "lcm" || name == "tcd";
}

namespace {
bool discrete(const std::string& sampler) { return sampler == "ddim" || sampler == "lcm" || sampler == "tcd"; }
}  // namespace

void validate(const LoopPlan& p) {
  sampler_from_name(p.sampler);  // throws for samplers the native loop does not implement
  const std::size_t n = p.timesteps.size();
  if (n < 1) throw std::invalid_argument("native loop: the plan has no steps (steps must be >= 1)");
  if (discrete(p.sampler) && (p.abar.size() != n || p.abar_prev.size() != n)) {
    throw std::invalid_argument("native loop: " + p.sampler + " needs one alpha-bar and one target alpha-bar per step");
  }
  if (p.sampler == "tcd") {
    if (p.abar_s.size() != n) {
      throw std::invalid_argument("native loop: tcd needs one intermediate alpha-bar (abar_s) per step, got " +
                                  std::to_string(p.abar_s.size()) + " for " + std::to_string(n) + " steps");
    }
    if (!(p.eta >= 0.0 && p.eta <= 1.0)) throw std::invalid_argument("native loop: tcd's gamma (eta) must be in [0, 1]");
    for (double a : p.abar_s) {
      if (!(a > 0.0 && a <= 1.0)) throw std::invalid_argument("native loop: abar_s values must be in (0, 1]");
    }
  }
  if (!discrete(p.sampler) && p.sigmas.size() != n + 1) {
    throw std::invalid_argument("native loop: " + p.sampler + " needs steps + 1 sigmas, got " +
                                std::to_string(p.sigmas.size()) + " for " + std::to_string(n) + " steps");
  }
  for (std::size_t i = 0; i + 1 < p.sigmas.size(); ++i) {
    if (!(p.sigmas[i] > 0)) throw std::invalid_argument("native loop: sigmas before the last must be > 0");
  }
}

bool draws_noise(const LoopPlan& p, std::size_t i) {
  const Sampler smp = sampler_from_name(p.sampler);
  const bool last = i + 1 == p.timesteps.size();
  switch (smp) {
    case Sampler::EulerAncestral: return true;
    case Sampler::DDIM: return p.eta > 0;
    case Sampler::LCM: return !last;
    case Sampler::TCD: return p.eta > 0 && !last;
    default: return false;
  }
}

StepCoef step_coefficients(const LoopPlan& p, std::size_t i) {
  const Sampler smp = sampler_from_name(p.sampler);
  const std::size_t steps = p.timesteps.size();
  if (smp == Sampler::DDIM) return coefficients(smp, p.abar[i], p.abar_prev[i], p.eta, 0, 0, 0, false);
  if (smp == Sampler::LCM || smp == Sampler::TCD) {
    return consistency_coefficients(smp, p.timesteps[i], p.abar[i], p.abar_prev[i], smp == Sampler::TCD ? p.abar_s[i] : 1.0,
                                    p.timestep_scaling, draws_noise(p, i));
  }
  const bool second = smp == Sampler::DPMpp2M && i > 0 && i + 1 < steps;
  return coefficients(smp, 0, 0, 0, p.sigmas[i], p.sigmas[i + 1], i > 0 ? p.sigmas[i - 1] : 0.0, second);
}

void run_loop(const LoopPlan& p, float* x, std::size_t n, Denoiser& denoiser, NoiseSource* noise) {
  validate(p);
  const Sampler smp = sampler_from_name(p.sampler);
  const bool sigma_space = smp == Sampler::Euler || smp == Sampler::EulerAncestral;
  bool needs_noise = false;
  for (std::size_t i = 0; i < p.timesteps.size(); ++i) needs_noise = needs_noise || draws_noise(p, i);
  if (needs_noise && noise == nullptr) throw std::invalid_argument("native loop: this sampler needs a noise source");
  std::vector<float> xin(sigma_space ? n : 0), prev(smp == Sampler::DPMpp2M ? n : 0);
  for (std::size_t i = 0; i < p.timesteps.size(); ++i) {
    const StepCoef k = step_coefficients(p, i);
    const float* in = x;
    if (sigma_space) {
      scale_input(x, xin.data(), n, k);
      in = xin.data();
    }
    const float* raw = denoiser(static_cast<int>(i), p.timesteps[i], in, n);
    const float* z = draws_noise(p, i) ? noise->draw(n) : nullptr;  // drawn after the model call, as the reference
    fused_update(smp, p.prediction, k, x, prev.empty() ? nullptr : prev.data(), raw, p.guided ? raw + n : nullptr,
                 p.guidance, z, n);
  }
}

}  // namespace ldm
