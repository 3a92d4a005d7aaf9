// Python bindings of ldm_engine._C. Latents cross the boundary as float32 buffers that alias the torch
// tensors (tensor.numpy() / torch.from_numpy): no copies.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "guidance.h"
#ifdef LDM_WITH_CUDA
#include "cuda/fused_step.h"
#endif
#include "loop.h"
#include "schedule.h"

namespace py = pybind11;

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;

void check_same_shape(const py::array& a, const py::array& b, const char* what) {
  bool same = a.ndim() == b.ndim();
  for (py::ssize_t d = 0; same && d < a.ndim(); ++d) same = a.shape(d) == b.shape(d);
  if (!same) throw std::invalid_argument(std::string(what) + ": uncond and cond must have the same shape");
}

py::array_t<float> guidance_combine(FloatArray uncond, FloatArray cond, float scale) {
  check_same_shape(uncond, cond, "guidance_combine");
  py::array_t<float> out(std::vector<py::ssize_t>(uncond.shape(), uncond.shape() + uncond.ndim()));
  {
    py::gil_scoped_release release;
    ldm::guidance_combine(uncond.data(), cond.data(), scale, out.mutable_data(),
                          static_cast<std::size_t>(uncond.size()));
  }
  return out;
}

// Calls the Python denoiser with a zero-copy view of the loop's input; keeps its output alive.
class PyDenoiser : public ldm::Denoiser {
 public:
  PyDenoiser(py::function fn, std::vector<py::ssize_t> shape, std::size_t expected)
      : fn_(std::move(fn)), shape_(std::move(shape)), expected_(expected) {}
  const float* operator()(int step, double t, const float* x_in, std::size_t n) override {
    py::array view(py::dtype::of<float>(), shape_, x_in, py::none());  // borrowed for the call only
    py::object res = fn_(step, t, view);
    if (!py::isinstance<py::array>(res)) {
      throw std::invalid_argument("denoiser must return a float32 array (tensor.numpy()), got " +
                                  std::string(py::str(py::type::handle_of(res))));
    }
    last_ = res.cast<FloatArray>();
    if (static_cast<std::size_t>(last_.size()) != expected_) {
      throw std::invalid_argument("denoiser returned " + std::to_string(last_.size()) + " values at step " +
                                  std::to_string(step) + ", expected " + std::to_string(expected_) +
                                  " (the latent shape" + std::string(expected_ == 2 * n ? ", times 2 for the CFG batch)" : ")"));
    }
    return last_.data();
  }

 private:
  py::function fn_;
  std::vector<py::ssize_t> shape_;
  std::size_t expected_;
  FloatArray last_;
};

class PyNoise : public ldm::NoiseSource {
 public:
  explicit PyNoise(py::function fn) : fn_(std::move(fn)) {}
  const float* draw(std::size_t n) override {
    last_ = fn_().cast<FloatArray>();
    if (static_cast<std::size_t>(last_.size()) != n) {
      throw std::invalid_argument("noise source returned " + std::to_string(last_.size()) + " values, expected " +
                                  std::to_string(n));
    }
    return last_.data();
  }

 private:
  py::function fn_;
  FloatArray last_;
};

FloatArray run_loop(py::array x, const std::string& sampler, const std::string& prediction,
                            std::vector<double> timesteps, std::vector<double> abar, std::vector<double> abar_prev,
                            std::vector<double> sigmas, bool guided, float guidance, double eta, py::function denoiser,
                            py::object noise, std::vector<double> abar_s, double timestep_scaling) {
  if (!py::isinstance<py::array_t<float>>(x) || !(x.flags() & py::array::c_style)) {
    throw std::invalid_argument("latents must be a C-contiguous float32 array, got dtype " +
                                std::string(py::str(x.dtype())));
  }
  if (prediction != "eps" && prediction != "v") {
    throw std::invalid_argument("native loop: prediction must be 'eps' or 'v', got '" + prediction + "'");
  }
  ldm::LoopPlan plan{sampler, prediction == "v" ? ldm::Prediction::V : ldm::Prediction::Eps,
                     std::move(timesteps), std::move(abar), std::move(abar_prev), std::move(sigmas), guided, guidance, eta,
                     std::move(abar_s), timestep_scaling};
  ldm::validate(plan);
  auto out = x.attr("copy")().cast<FloatArray>();  // the loop updates its own copy of the latents
  const std::size_t n = static_cast<std::size_t>(out.size());
  std::vector<py::ssize_t> shape(out.shape(), out.shape() + out.ndim());
  PyDenoiser den(std::move(denoiser), shape, guided ? 2 * n : n);
  std::unique_ptr<PyNoise> src;
  if (!noise.is_none()) src = std::make_unique<PyNoise>(noise.cast<py::function>());
  ldm::run_loop(plan, out.mutable_data(), n, den, src.get());
  return out;
}

// The per-step scalars of a plan as a (steps, 16) float32 table: the layout of StepCoef, which the CUDA
// graph runner uploads once per run.
py::array_t<float> step_table(const std::string& sampler, std::vector<double> timesteps, std::vector<double> abar,
                              std::vector<double> abar_prev, std::vector<double> sigmas, double eta,
                              std::vector<double> abar_s, double timestep_scaling) {
  static_assert(sizeof(ldm::StepCoef) == 16 * sizeof(float), "StepCoef must be 16 floats");
  ldm::LoopPlan plan{sampler, ldm::Prediction::Eps, std::move(timesteps), std::move(abar), std::move(abar_prev),
                     std::move(sigmas), true, 1.0f, eta, std::move(abar_s), timestep_scaling};
  ldm::validate(plan);
  const auto n = static_cast<py::ssize_t>(plan.timesteps.size());
  py::array_t<float> out({n, static_cast<py::ssize_t>(16)});
  auto* dst = reinterpret_cast<ldm::StepCoef*>(out.mutable_data());
  for (py::ssize_t i = 0; i < n; ++i) dst[i] = ldm::step_coefficients(plan, static_cast<std::size_t>(i));
  return out;
}

#ifdef LDM_WITH_CUDA
template <typename T>
T* dev(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native helpers of ldm_engine's sampling loop";
  m.def("guidance_combine", &guidance_combine, py::arg("uncond"), py::arg("cond"), py::arg("scale"),
        "Classifier-free guidance uncond + scale * (cond - uncond) on float32 arrays of one shape.");
  m.def("run_loop", &run_loop, py::arg("x"), py::arg("sampler"), py::arg("prediction"), py::arg("timesteps"),
        py::arg("abar"), py::arg("abar_prev"), py::arg("sigmas"), py::arg("guided"), py::arg("guidance"),
        py::arg("eta"), py::arg("denoiser"), py::arg("noise"), py::arg("abar_s") = std::vector<double>{},
        py::arg("timestep_scaling") = 10.0,
        "Run a sampler natively: denoiser(step, t, x_in) -> raw outputs ([uncond; cond] when guided), "
        "fused guidance + update in C++. Returns the final latents. abar_s: TCD's intermediate alpha-bars; "
        "timestep_scaling: LCM's boundary condition.");
  m.def("step_table", &step_table, py::arg("sampler"), py::arg("timesteps"), py::arg("abar"), py::arg("abar_prev"),
        py::arg("sigmas"), py::arg("eta"), py::arg("abar_s") = std::vector<double>{}, py::arg("timestep_scaling") = 10.0,
        "Per-step coefficients of a plan, (steps, 16) float32 (StepCoef layout).");
#ifdef LDM_WITH_CUDA
  // Device-pointer launchers for CUDA-graph capture (pointers and the stream as integers).
  auto cuda = m.def_submodule("cuda", "CUDA fused-update kernels (device pointers as integers)");
  cuda.def("select_step", [](std::uintptr_t ts, std::uintptr_t step, std::uintptr_t t_out, std::uintptr_t table,
                             std::uintptr_t in_scale, std::uintptr_t stream) {
    ldm::cuda::select_step(dev<const float>(ts), dev<const int>(step), dev<float>(t_out),
                           dev<const ldm::StepCoef>(table), dev<float>(in_scale), reinterpret_cast<cudaStream_t>(stream));
  });
  cuda.def("scale_input", [](std::uintptr_t x, std::uintptr_t xin, std::uintptr_t in_scale, std::size_t n,
                             std::uintptr_t stream) {
    ldm::cuda::scale_input(dev<const float>(x), dev<float>(xin), dev<const float>(in_scale), n,
                           reinterpret_cast<cudaStream_t>(stream));
  });
  cuda.def("fused_update", [](int sampler, int prediction, std::uintptr_t table, std::uintptr_t step, std::uintptr_t x,
                              std::uintptr_t prev, std::uintptr_t out, bool guided, std::uintptr_t guidance,
                              std::uintptr_t noise, std::size_t n, std::uintptr_t stream) {
    ldm::cuda::fused_update(sampler, prediction, dev<const ldm::StepCoef>(table), dev<const int>(step), dev<float>(x),
                            dev<float>(prev), dev<const float>(out), guided, dev<const float>(guidance),
                            dev<const float>(noise), n, reinterpret_cast<cudaStream_t>(stream));
  });
  cuda.def("advance", [](std::uintptr_t step, std::uintptr_t stream) {
    ldm::cuda::advance(dev<int>(step), reinterpret_cast<cudaStream_t>(stream));
  });
#endif
  m.def("native_sampler", &ldm::native_sampler, py::arg("name"), "Whether the native loop implements this sampler.");
  m.def("alphas_cumprod", &ldm::alphas_cumprod, py::arg("beta_schedule"), py::arg("beta_start"), py::arg("beta_end"),
        py::arg("num_train_timesteps"), "alpha-bar table of a beta schedule (double precision).");
  m.def("spaced_timesteps", &ldm::spaced_timesteps, py::arg("steps"), py::arg("num_train_timesteps"),
        py::arg("spacing"), py::arg("offset"), "Descending timesteps of the discrete samplers.");
  m.def("sigmas_at", &ldm::sigmas_at, py::arg("alphas_cumprod"), py::arg("timesteps"),
        "Noise levels at (fractional) timesteps, followed by 0.");
  m.def("cuda_compiled", []() {
#ifdef LDM_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA sources were compiled into this build.");
}
