// bf16 x bf16 -> fp32 GEMM on AVX512-BF16 (vdpbf16ps): see gemm_bf16_avx512.cpp.
#pragma once

#include <cstdint>

namespace vlmfast {

// A strided 16-bit matrix: element (i, j) at data[i * s0 + j * s1]; one of s0, s1 is 1.
struct Bf16View {
  const uint16_t* data;
  int64_t rows, cols, s0, s1;
};

// Whether this CPU runs vdpbf16ps (checked once at run time: the library is built for any x86-64).
bool gemm_bf16_avx512_supported();

// out[M, N] (+)= a[M, K] b[K, N] with out's rows ldo apart; products and sums in fp32. Threads: ATen's pool.
void gemm_bf16_avx512(const Bf16View& a, const Bf16View& b, float* out, int64_t ldo, bool accumulate);

}  // namespace vlmfast
