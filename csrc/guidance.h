#pragma once
#include <cstddef>

namespace ldm {

// Classifier-free guidance (Ho & Salimans 2022): out = uncond + scale * (cond - uncond), elementwise
// over n floats. `out` may alias either input.
void guidance_combine(const float* uncond, const float* cond, float scale, float* out, std::size_t n);

}  // namespace ldm
