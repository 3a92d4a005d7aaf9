#pragma once
// Noise-schedule tables of the DDPM family (Ho et al. 2020), in double precision.
#include <cstdint>
#include <string>
#include <vector>

namespace ldm {

// alpha-bar(t), t = 0..T-1, for "scaled_linear" (linear in sqrt(beta): SD's and the LDM code's
// "linear") or "linear" betas.
std::vector<double> alphas_cumprod(const std::string& beta_schedule, double beta_start, double beta_end, int T);

// Descending integer timesteps of the discrete samplers: "leading" (+ offset), "trailing", "linspace".
std::vector<int64_t> spaced_timesteps(int steps, int T, const std::string& spacing, int offset);

// sigma(t) = sqrt((1 - abar) / abar) interpolated linearly at (possibly fractional) timesteps, then 0.
std::vector<double> sigmas_at(const std::vector<double>& alphas_cumprod, const std::vector<double>& timesteps);

}  // namespace ldm
