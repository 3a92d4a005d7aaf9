#include "schedule.h"

#include <cmath>
#include <stdexcept>

namespace ldm {

std::vector<double> alphas_cumprod(const std::string& beta_schedule, double beta_start, double beta_end, int T) {
  if (T < 2) throw std::invalid_argument("alphas_cumprod: need at least 2 training timesteps");
  std::vector<double> out(T);
  double prod = 1.0;
  for (int i = 0; i < T; ++i) {
    const double f = static_cast<double>(i) / (T - 1);
    double beta;
    if (beta_schedule == "scaled_linear") {
      const double s = std::sqrt(beta_start) + f * (std::sqrt(beta_end) - std::sqrt(beta_start));
      beta = s * s;
    } else if (beta_schedule == "linear") {
      beta = beta_start + f * (beta_end - beta_start);
    } else {
      throw std::invalid_argument("alphas_cumprod: unknown beta schedule '" + beta_schedule +
                                  "'; use scaled_linear or linear");
    }
    prod *= 1.0 - beta;
    out[i] = prod;
  }
  return out;
}

std::vector<int64_t> spaced_timesteps(int steps, int T, const std::string& spacing, int offset) {
  if (steps < 1 || steps > T) {
    throw std::invalid_argument("spaced_timesteps: steps must be in [1, " + std::to_string(T) + "], got " +
                                std::to_string(steps));
  }
  std::vector<int64_t> ts(steps);
  for (int i = 0; i < steps; ++i) {
    const int k = steps - 1 - i;  // descending
    if (spacing == "leading") {
      ts[i] = static_cast<int64_t>(k) * (T / steps) + offset;
    } else if (spacing == "trailing") {
      // round(T - k' * T / steps) - 1 over k' = 0..steps-1, listed from the largest
      ts[i] = static_cast<int64_t>(std::nearbyint(T - static_cast<double>(i) * T / steps)) - 1;
    } else if (spacing == "linspace") {
      const double step = steps == 1 ? 0.0 : (T - 1.0) / (steps - 1);  // as numpy.linspace: k * step
      ts[i] = static_cast<int64_t>(std::nearbyint(k * step));
    } else {
      throw std::invalid_argument("spaced_timesteps: unknown spacing '" + spacing + "'; use leading, trailing or linspace");
    }
  }
  return ts;
}

std::vector<double> sigmas_at(const std::vector<double>& abar, const std::vector<double>& timesteps) {
  std::vector<double> out;
  out.reserve(timesteps.size() + 1);
  const int T = static_cast<int>(abar.size());
  auto sigma = [&](int t) { return std::sqrt((1.0 - abar[t]) / abar[t]); };
  for (double t : timesteps) {
    if (t < 0 || t > T - 1) throw std::invalid_argument("sigmas_at: timestep out of range");
    const int lo = static_cast<int>(std::floor(t));
    const int hi = lo + 1 < T ? lo + 1 : lo;
    const double w = t - lo;
    out.push_back((1.0 - w) * sigma(lo) + w * sigma(hi));
  }
  out.push_back(0.0);
  return out;
}

}  // namespace ldm
