// One float32 row of the fused norms, for callers that own their buffers (the decoder step); the same row
// kernels as flashgen::rms_norm_fwd / layer_norm_fwd. With r: h = x + r is written to h (which may alias x or
// r) and normalized; without: x is normalized. y = norm(h) * w (+ b).
#pragma once

#include <cstdint>

namespace flashgen::cpu {

float rms_norm_row(const float* x, const float* r, float* h, float* y, const float* w, float eps, int64_t n);
void layer_norm_row(const float* x, const float* r, float* h, float* y, const float* w, const float* b, float eps,
                    int64_t n);

}  // namespace flashgen::cpu
