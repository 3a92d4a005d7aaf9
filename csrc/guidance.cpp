#include "guidance.h"

namespace ldm {

void guidance_combine(const float* uncond, const float* cond, float scale, float* out, std::size_t n) {
  // A plain loop the compiler vectorizes; out may alias an input, so no __restrict__.
  for (std::size_t i = 0; i < n; ++i) {
    out[i] = uncond[i] + scale * (cond[i] - uncond[i]);
  }
}

}  // namespace ldm
