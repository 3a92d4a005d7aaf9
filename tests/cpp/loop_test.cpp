// A native unit test of the schedule tables and the loop's step formulas, driven by
// tests/test_native_loop.py: it reads a plan and start latents from a text file, runs the loop with a
// deterministic fake denoiser and noise source, and prints the tables and final latents for the Python
// reference to check.
//
//   loop_test <case-file>
// case file lines: sampler prediction guided guidance eta / n_steps / timesteps / abar / abar_prev /
//                  n_sigmas / sigmas / n_latent / latents [/ n_abar_s abar_s (TCD) / timestep_scaling (LCM)]
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "loop.h"
#include "schedule.h"

namespace {

// out = [0.9 x + 0.01 step ; 0.8 x - 0.02 step] (uncond ; cond), in float32 as the Python twin computes it.
class FakeDenoiser : public ldm::Denoiser {
 public:
  explicit FakeDenoiser(bool guided) : guided_(guided) {}
  const float* operator()(int step, double, const float* x, std::size_t n) override {
    out_.assign(guided_ ? 2 * n : n, 0.0f);
    // the scalars are formed in double and rounded once, as torch does with python-float operands
    const float a = static_cast<float>(0.01 * step), b = static_cast<float>(0.02 * step);
    for (std::size_t i = 0; i < n; ++i) {
      out_[i] = 0.9f * x[i] + a;
      if (guided_) out_[n + i] = 0.8f * x[i] - b;
    }
    return out_.data();
  }

 private:
  bool guided_;
  std::vector<float> out_;
};

// Exactly representable pseudo-noise in [-1, 1): ((i * 7919 + k * 104729) % 1000) / 500 - 1.
class FakeNoise : public ldm::NoiseSource {
 public:
  const float* draw(std::size_t n) override {
    buf_.resize(n);
    for (std::size_t i = 0; i < n; ++i) buf_[i] = static_cast<float>(((i * 7919 + k_ * 104729) % 1000) / 500.0 - 1.0);
    ++k_;
    return buf_.data();
  }

 private:
  std::size_t k_ = 0;
  std::vector<float> buf_;
};

template <typename T>
std::vector<T> read_vec(std::istream& in) {
  std::size_t n;
  in >> n;
  std::vector<T> v(n);
  for (auto& x : v) in >> x;
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: loop_test <case-file>\n");
    return 2;
  }
  std::ifstream in(argv[1]);
  ldm::LoopPlan plan;
  std::string pred;
  in >> plan.sampler >> pred >> plan.guided >> plan.guidance >> plan.eta;
  plan.prediction = pred == "v" ? ldm::Prediction::V : ldm::Prediction::Eps;
  plan.timesteps = read_vec<double>(in);
  plan.abar = read_vec<double>(in);
  plan.abar_prev = read_vec<double>(in);
  plan.sigmas = read_vec<double>(in);
  std::vector<float> x = read_vec<float>(in);
  if (!in) {
    std::fprintf(stderr, "loop_test: malformed case file\n");
    return 2;
  }
  std::size_t n_s;
  if (in >> n_s) {  // optional: the consistency samplers' extra inputs
    plan.abar_s.resize(n_s);
    for (auto& a : plan.abar_s) in >> a;
    in >> plan.timestep_scaling;
    if (!in) {
      std::fprintf(stderr, "loop_test: malformed abar_s / timestep_scaling in the case file\n");
      return 2;
    }
  }
  FakeDenoiser den(plan.guided);
  FakeNoise noise;
  ldm::run_loop(plan, x.data(), x.size(), den, &noise);
  std::printf("latents");
  for (float v : x) std::printf(" %.9g", v);
  std::printf("\nalphas_cumprod");
  for (double v : ldm::alphas_cumprod("scaled_linear", 0.00085, 0.012, 1000)) std::printf(" %.17g", v);
  for (const char* spacing : {"leading", "trailing", "linspace"}) {
    std::printf("\n%s", spacing);
    for (auto t : ldm::spaced_timesteps(7, 1000, spacing, 1)) std::printf(" %lld", static_cast<long long>(t));
  }
  std::printf("\n");
  return 0;
}
