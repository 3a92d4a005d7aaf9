// Python bindings of ldm_engine._C.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "guidance.h"

namespace py = pybind11;

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;

py::array_t<float> guidance_combine(FloatArray uncond, FloatArray cond, float scale) {
  if (uncond.ndim() != cond.ndim() || uncond.size() != cond.size()) {
    throw std::invalid_argument("guidance_combine: uncond and cond must have the same shape, got sizes " +
                                std::to_string(uncond.size()) + " and " + std::to_string(cond.size()));
  }
  for (py::ssize_t d = 0; d < uncond.ndim(); ++d) {
    if (uncond.shape(d) != cond.shape(d)) {
      throw std::invalid_argument("guidance_combine: uncond and cond must have the same shape");
    }
  }
  py::array_t<float> out(std::vector<py::ssize_t>(uncond.shape(), uncond.shape() + uncond.ndim()));
  {
    py::gil_scoped_release release;
    ldm::guidance_combine(uncond.data(), cond.data(), scale, out.mutable_data(),
                          static_cast<std::size_t>(uncond.size()));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native helpers of ldm_engine's sampling loop";
  m.def("guidance_combine", &guidance_combine, py::arg("uncond"), py::arg("cond"), py::arg("scale"),
        "Classifier-free guidance uncond + scale * (cond - uncond) on float32 arrays of one shape.");
  m.def("cuda_compiled", []() {
#ifdef LDM_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA sources were compiled into this build.");
}
