// exp(x) for float, written so that GCC and Clang vectorise it inside `#pragma omp simd` loops
// (libm's expf is a function call per element and blocks vectorisation).
//
// Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, 2^n put into
// the exponent bits. About 1 ulp over the range used here (x <= 0 in the softmax epilogue).
// Inputs below -87.3 (where 2^n would leave the normal range) return 0; e^-87.3 ~ 1e-38.
#pragma once

#include <cstdint>
#include <cstring>

// Force inlining: a call per element would stop the loop from vectorising (GCC declines to inline
// it in some template instances on its own).
#if defined(__GNUC__)
#define VLMFAST_INLINE inline __attribute__((always_inline))
#else
#define VLMFAST_INLINE inline
#endif

namespace vlmfast {

VLMFAST_INLINE float fast_exp(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f;  // ln 2 split in two so that n * ln2_hi is exact
  const float ln2_lo = -2.12194440e-4f;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float xc = x > 88.0f ? 88.0f : (x < -88.0f ? -88.0f : x);  // keeps 2^n finite (and n an int: x may be -1e30)
  float n = (xc * log2e + shifter) - shifter;
  float r = xc - n * ln2_hi;
  r = r - n * ln2_lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

}  // namespace vlmfast
