#include "steps.h"

#include <cmath>
#include <stdexcept>

namespace ldm {

Sampler sampler_from_name(const std::string& name) {
  if (name == "ddim") return Sampler::DDIM;
  if (name == "euler") return Sampler::Euler;
  if (name == "euler_a") return Sampler::EulerAncestral;
  if (name == "dpmpp_2m") return Sampler::DPMpp2M;
  if (name == "lcm") return Sampler::LCM;
  if (name == "tcd") return Sampler::TCD;
  throw std::invalid_argument("native loop: unsupported sampler '" + name +
                              "' (native: ddim, euler, euler_a, dpmpp_2m, lcm, tcd)");
}

StepCoef coefficients(Sampler smp, double abar, double abar_prev, double eta, double sigma, double sigma_next,
                      double sigma_prev, bool second_order) {
  StepCoef k{};
  auto f = [](double v) { return static_cast<float>(v); };
  if (smp == Sampler::DDIM) {
    const double std_ = eta * std::sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev));
    k.a = f(std::sqrt(abar));
    k.s = f(std::sqrt(1.0 - abar));
    k.c_x0 = f(std::sqrt(abar_prev));
    k.c_eps = f(std::sqrt(1 - abar_prev - std_ * std_));
    k.c_noise = eta > 0 ? f(std_) : 0.0f;
  } else if (smp == Sampler::DPMpp2M) {
    const double a_s = 1 / std::sqrt(sigma * sigma + 1), a_t = 1 / std::sqrt(sigma_next * sigma_next + 1);
    const double abar_s = a_s * a_s;
    auto lam = [](double sg) { return sg > 0 ? -std::log(sg) : INFINITY; };
    const double h = lam(sigma_next) - lam(sigma);
    const double phi = std::isfinite(h) ? -std::expm1(-h) : 1.0;
    k.a = f(std::sqrt(abar_s));
    k.s = f(std::sqrt(1.0 - abar_s));
    k.second_order = second_order ? 1.0f : 0.0f;
    k.two_r = second_order ? f(2 * ((lam(sigma) - lam(sigma_prev)) / h)) : 1.0f;
    k.c_x = f(sigma_next * a_t / (sigma * a_s));
    k.c_d = f(a_t * phi);
  } else {
    double target = sigma_next, up = 0.0;
    if (smp == Sampler::EulerAncestral) {
      up = std::sqrt(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma));
      target = std::sqrt(sigma_next * sigma_next - up * up);
    }
    k.sigma = f(sigma);
    k.v_out = f(-sigma / std::sqrt(sigma * sigma + 1));
    k.v_x = f(sigma * sigma + 1);
    k.dt = f(target - sigma);
    k.up = f(up);
    k.in_scale = f(std::sqrt(sigma * sigma + 1));
  }
  return k;
}

StepCoef consistency_coefficients(Sampler smp, double t, double abar, double abar_next, double abar_s,
                                  double timestep_scaling, bool renoise) {
  StepCoef k{};
  auto f = [](double v) { return static_cast<float>(v); };
  k.a = f(std::sqrt(abar));
  k.s = f(std::sqrt(1.0 - abar));
  double keep = abar_next, fresh = 1.0 - abar_next;  // LCM: x <- sqrt(abar_next) denoised + sqrt(1 - abar_next) z
  if (smp == Sampler::LCM) {
    const double sigma_data = 0.5, st = t * timestep_scaling, denom = st * st + sigma_data * sigma_data;
    k.c_x = f(sigma_data * sigma_data / denom);  // c_skip
    k.c_d = f(st / std::sqrt(denom));            // c_out
  } else {
    k.c_x0 = f(std::sqrt(abar_s));
    k.c_eps = f(std::sqrt(1.0 - abar_s));
    keep = abar_next / abar_s;  // TCD: forward diffusion from s to the next timestep
    fresh = 1.0 - keep;
  }
  if (renoise) {
    k.renoise = f(std::sqrt(keep));
    k.c_noise = f(std::sqrt(fresh));
  }
  return k;
}

void fused_update(Sampler smp, Prediction pred, const StepCoef& k, float* x, float* prev, const float* out_u,
                  const float* out_c, float guidance, const float* noise, std::size_t n) {
  float unused = 0.0f;
  for (std::size_t i = 0; i < n; ++i) {
    update_element(smp, pred, k, x[i], prev ? prev[i] : unused, guided_at(out_u, out_c, guidance, i),
                   noise ? noise[i] : 0.0f);
  }
}

void scale_input(const float* x, float* xin, std::size_t n, const StepCoef& k) {
  for (std::size_t i = 0; i < n; ++i) xin[i] = x[i] / k.in_scale;
}

}  // namespace ldm
