// bf16 x bf16 -> fp32 GEMM with vdpbf16ps (AVX512-BF16), blocked as GotoBLAS/BLIS do.
//
// vdpbf16ps multiplies 16 pairs of bf16 from each operand and adds each pair's two products to an fp32 lane:
// acc[n] += a[k] * b[k][n] + a[k+1] * b[k+1][n]. So both operands are packed as k-pairs (one u32 holds
// elements k and k+1):
//   A as tiles of kMR rows:      Ap[tile][pair][kMR]  (a u32 broadcast per row),
//   B as panels of kNR columns:  Bp[panel][pair][kNR] (two zmm loads per pair).
// The micro-kernel keeps a kMR x kNR fp32 tile of C in 24 zmm registers across a block of kKC pairs and
// touches C once per block. Loops (per thread, over its share of the columns):
//   for each block of kKC pairs:  pack B's block (kKC pairs x the thread's columns)
//     for each block of kMC rows: pack A's block (in L2)
//       for each column panel:    for each row tile: micro-kernel (B's panel stays in L1/L2 across tiles)
// Packing reads either layout an operand can have (row-major or a transposed view), so h W^T and dz^T h
// need no transposed copy, and zero-pads ragged edges (rows, columns, an odd K), so the micro-kernel has
// one shape. Measured on the development machine (2 Zen 4 cores): 340-370 GFLOP/s on the fused head's
// three GEMMs, ~0.9x torch.mm's bf16-output oneDNN kernel (docs/platform.md).

#include "gemm_bf16_avx512.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace vlmfast {
namespace {

constexpr int kMR = 12;        // rows of C per micro-kernel (12 x 2 accumulators + 2 B + 1 broadcast <= 32 zmm)
constexpr int kNR = 32;        // columns of C per micro-kernel (two zmm of fp32)
constexpr int64_t kKC = 256;   // k-pairs per block: B's panel 32 KB, A's tile 12 KB
constexpr int64_t kMC = 96;    // rows per packed block of A (96 KB, in L2)

#define VLMFAST_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// dst[p * width + i] = the pair (k, k+1), k = 2 (k0 + p), of line i (a row of A or a column of B) for
// p < pairs and i < width; zero for lines >= lines and for k + 1 >= K. A line's elements are s_k apart,
// lines s_line apart.
VLMFAST_AVX512BF16 void pack_pairs(const uint16_t* src, int64_t s_line, int64_t s_k, int64_t lines, int64_t K,
                                   int64_t k0, int64_t pairs, int width, uint32_t* dst) {
  const bool odd_tail = K % 2 == 1 && k0 + pairs == (K + 1) / 2;  // the last pair has no second element
  if (s_k == 1) {  // each line's pairs are contiguous: copy them, a line at a time
    for (int i = 0; i < width; ++i) {
      if (i >= lines) {
        for (int64_t p = 0; p < pairs; ++p) dst[p * width + i] = 0;
        continue;
      }
      const uint16_t* line = src + i * s_line + 2 * k0;
      const int64_t full = pairs - (odd_tail ? 1 : 0);
      for (int64_t p = 0; p < full; ++p) std::memcpy(&dst[p * width + i], line + 2 * p, 4);
      if (odd_tail) dst[(pairs - 1) * width + i] = line[2 * (pairs - 1)];
    }
    return;
  }
  // lines are contiguous (s_line == 1): interleave row k and row k + 1, 16 lines at a time (the maskz forms
  // of the widening and the shift: GCC 12 warns about the unmasked ones' undefined pass-through register)
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t k = 2 * (k0 + p);
    const uint16_t* lo_row = src + k * s_k;
    const bool has_hi = k + 1 < K;
    for (int c = 0; c < width; c += 16) {
      const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, lines - c));
      const __mmask16 in = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      const __m512i lo = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(in, lo_row + c));
      const __m512i hi = has_hi
          ? _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(in, lo_row + s_k + c))
          : _mm512_setzero_si512();
      const int w = std::min(16, width - c);
      const __mmask16 out = w >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << w) - 1);
      const __m512i pairs_u32 = _mm512_or_si512(lo, _mm512_maskz_slli_epi32(0xFFFF, hi, 16));
      _mm512_mask_storeu_epi32(dst + p * width + c, out, pairs_u32);
    }
  }
}

// C[rows, cols] (+)= Ap (kMR x pairs) Bp (pairs x kNR): the full tile is computed (padding is zeros), only
// rows x cols of it stored.
VLMFAST_AVX512BF16 void micro_kernel(int64_t pairs, const uint32_t* ap, const uint32_t* bp, float* c, int64_t ldc,
                                     int rows, int cols, bool add) {
  __m512 acc[kMR][2];
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + p * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + p * kNR + 16);
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[p * kMR + r]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  for (int r = 0; r < rows; ++r) {
    float* row = c + r * ldc;
    __m512 x0 = acc[r][0], x1 = acc[r][1];
    if (add) {
      x0 = _mm512_add_ps(x0, _mm512_maskz_loadu_ps(m0, row));
      x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(m1, row + 16));
    }
    _mm512_mask_storeu_ps(row, m0, x0);
    _mm512_mask_storeu_ps(row + 16, m1, x1);
  }
}

// Packing buffers kept per thread from call to call: fresh megabytes per GEMM would cost page faults.
std::vector<uint32_t>& buffer(int which, size_t size) {
  thread_local std::vector<uint32_t> buffers[2];
  if (buffers[which].size() < size) buffers[which].resize(size);
  return buffers[which];
}

// Rows [m0, m1) x columns [n0, n1) of out.
void gemm_part(const Bf16View& a, const Bf16View& b, float* out, int64_t ldo, bool accumulate, int64_t m0,
               int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = a.cols, KP = (K + 1) / 2, nc = n1 - n0, panels = (nc + kNR - 1) / kNR;
  const int64_t kc_max = std::min(kKC, KP);
  uint32_t* bp = buffer(0, kc_max * panels * kNR).data();
  uint32_t* ap = buffer(1, kc_max * ((kMC + kMR - 1) / kMR) * kMR).data();
  for (int64_t k0 = 0; k0 < KP; k0 += kKC) {
    const int64_t pairs = std::min(kKC, KP - k0);
    for (int64_t j = 0; j < panels; ++j) {  // B's columns are its lines: s_line = s1, s_k = s0
      const int64_t c0 = n0 + j * kNR;
      pack_pairs(b.data + c0 * b.s1, b.s1, b.s0, std::min<int64_t>(kNR, n1 - c0), K, k0, pairs, kNR,
                 bp + j * pairs * kNR);
    }
    const bool add = accumulate || k0 > 0;
    for (int64_t r0 = m0; r0 < m1; r0 += kMC) {
      const int64_t mc = std::min(kMC, m1 - r0), tiles = (mc + kMR - 1) / kMR;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t t0 = r0 + t * kMR;
        pack_pairs(a.data + t0 * a.s0, a.s0, a.s1, std::min<int64_t>(kMR, m1 - t0), K, k0, pairs, kMR,
                   ap + t * pairs * kMR);
      }
      for (int64_t j = 0; j < panels; ++j)
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t row = r0 + t * kMR, col = n0 + j * kNR;
          micro_kernel(pairs, ap + t * pairs * kMR, bp + j * pairs * kNR, out + row * ldo + col, ldo,
                       static_cast<int>(std::min<int64_t>(kMR, m1 - row)),
                       static_cast<int>(std::min<int64_t>(kNR, n1 - col)), add);
        }
    }
  }
}

}  // namespace

bool gemm_bf16_avx512_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

void gemm_bf16_avx512(const Bf16View& a, const Bf16View& b, float* out, int64_t ldo, bool accumulate) {
  const int64_t M = a.rows, N = b.cols, panels = (N + kNR - 1) / kNR;
  const int64_t threads = at::get_num_threads();
  if (panels >= 2 * threads || M <= kMR) {  // split the columns: each thread packs only its share of B
    at::parallel_for(0, panels, 1, [&](int64_t j0, int64_t j1) {
      gemm_part(a, b, out, ldo, accumulate, 0, M, j0 * kNR, std::min(N, j1 * kNR));
    });
  } else {  // few columns, many rows: split the rows
    at::parallel_for(0, (M + kMR - 1) / kMR, 1, [&](int64_t t0, int64_t t1) {
      gemm_part(a, b, out, ldo, accumulate, t0 * kMR, std::min(M, t1 * kMR), 0, N);
    });
  }
}

}  // namespace vlmfast
