#include "guidance.h"

#include "steps.h"

namespace ldm {

void guidance_combine(const float* uncond, const float* cond, float scale, float* out, std::size_t n) {
  // The same guided output the fused updates use; out may alias an input, so no __restrict__.
  for (std::size_t i = 0; i < n; ++i) out[i] = guided_at(uncond, cond, scale, i);
}

}  // namespace ldm
