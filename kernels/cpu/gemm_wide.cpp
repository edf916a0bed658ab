// 16-bit GEMMs with an fp32 result on the CPU: out[M, N] (+)= a[M, K] @ b[K, N], a and b bf16 (or fp16),
// products accumulated and stored in fp32.
//
// torch.mm on bf16 runs oneDNN's avx512_bf16 kernels (~2.6x fp32 on the development machine) but rounds
// its result to bf16: logits and gradient partial sums must not be rounded, and torch has no CPU out_dtype.
// So bf16 runs our own vdpbf16ps GEMM where the CPU has AVX512-BF16 (gemm_bf16_avx512.cpp: either operand
// row-major or a transposed view). fp16, and bf16 on other CPUs, go to ATen's cpublas::brgemm with plain
// row-major operands (a transposed view is copied row-major first): ATen's 16-bit x 16-bit -> fp32 GEMM,
// which runs at fp32 speed without AMX (docs/platform.md). VLMFAST_WIDE_GEMM=brgemm forces that path (tests).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "gemm_bf16_avx512.h"

namespace vlmfast {
namespace {

// out must be row-major; a and b may also be transposed views (one unit stride; a size-1 dimension's stride
// is free): the bf16 GEMM packs either layout, brgemm's path copies a transposed one row-major first
void check_operand(const at::Tensor& t, const char* name, bool transposed_ok) {
  TORCH_CHECK(t.device().is_cpu(), "mm_wide_: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, "mm_wide_: ", name, " must be 2-D, got shape ", t.sizes());
  const bool row_major = t.stride(1) == 1 || t.size(1) <= 1;
  if (transposed_ok) {
    TORCH_CHECK(row_major || t.stride(0) == 1 || t.size(0) <= 1, "mm_wide_: ", name,
                " must be row-major or a transposed view (one stride 1), got strides ", t.strides());
  } else {
    TORCH_CHECK(row_major, "mm_wide_: ", name, " must be row-major (inner stride 1), got strides ", t.strides());
  }
}

Bf16View view_of(const at::Tensor& t) {
  return {reinterpret_cast<const uint16_t*>(t.const_data_ptr()), t.size(0), t.size(1),
          t.size(0) <= 1 ? 1 : t.stride(0), t.size(1) <= 1 ? 1 : t.stride(1)};
}

bool use_avx512_bf16(at::ScalarType dtype) {
  const char* forced = std::getenv("VLMFAST_WIDE_GEMM");  // read per call (tests switch it): ~100 ns
  return dtype == at::kBFloat16 && gemm_bf16_avx512_supported() &&
         (forced == nullptr || std::strcmp(forced, "brgemm") != 0);
}

// out[j, i] = src[i, j]: brgemm takes row-major operands, so a transposed view (W's block of columns for
// h W^T, dz for dz^T h) is copied row-major first. torch's strided copy of a transposed 16-bit view runs at
// ~1 GB/s here (an element at a time); tiles that fit in L1 make it a memory pass.
template <typename T>
void transpose_tiles(const T* src, int64_t src_ld, T* out, int64_t out_ld, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  at::parallel_for(0, row_tiles * col_tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = (t / col_tiles) * kTile, j0 = (t % col_tiles) * kTile;
      const int64_t i1 = std::min(rows, i0 + kTile), j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) out[j * out_ld + i] = src[i * src_ld + j];
    }
  });
}

template <typename T>
at::Tensor row_major(const at::Tensor& t) {
  if (t.stride(1) == 1 || t.size(1) <= 1) return t;
  at::Tensor out = at::empty({t.size(0), t.size(1)}, t.options());  // t^T is row-major with rows t.stride(1) apart
  transpose_tiles(t.const_data_ptr<T>(), t.stride(1), out.data_ptr<T>(), t.size(1), t.size(1), t.size(0));
  return out;
}

template <typename T>
void run_brgemm(at::Tensor& out, const at::Tensor& a_any, const at::Tensor& b_any, bool accumulate) {
  const at::Tensor a = row_major<T>(a_any), b = row_major<T>(b_any);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::native::cpublas::brgemm(M, N, K, std::max<int64_t>(a.stride(0), K), std::max<int64_t>(b.stride(0), N),
                              std::max<int64_t>(out.stride(0), N), accumulate, a.const_data_ptr<T>(),
                              b.const_data_ptr<T>(), out.data_ptr<float>(), /*is_vnni=*/false);
}

void mm_wide_(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  check_operand(out, "out", /*transposed_ok=*/false);
  check_operand(a, "a", /*transposed_ok=*/true);
  check_operand(b, "b", /*transposed_ok=*/true);
  TORCH_CHECK(out.scalar_type() == at::kFloat, "mm_wide_: out must be float32, got ", out.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
              "mm_wide_: a and b must both be bfloat16 or both float16, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(0) && out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "mm_wide_: shapes do not chain: out ", out.sizes(), " = a ", a.sizes(), " @ b ", b.sizes());
  if (out.numel() == 0) return;
  if (a.size(1) == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  if (use_avx512_bf16(a.scalar_type())) {
    gemm_bf16_avx512(view_of(a), view_of(b), out.data_ptr<float>(), std::max<int64_t>(out.stride(0), out.size(1)),
                     accumulate);
  } else if (a.scalar_type() == at::kBFloat16) {
    run_brgemm<at::BFloat16>(out, a, b, accumulate);
  } else {
    run_brgemm<at::Half>(out, a, b, accumulate);
  }
}

std::string wide_gemm_path(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return "none";
  return use_avx512_bf16(dtype) ? "avx512_bf16" : "brgemm";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vlmfast, m) {
  m.def("mm_wide_(Tensor(a!) out, Tensor a, Tensor b, bool accumulate) -> ()");
  m.def("wide_gemm_path(ScalarType dtype) -> str", &wide_gemm_path);  // no tensor: not dispatched
}

TORCH_LIBRARY_IMPL(vlmfast, CPU, m) {
  m.impl("mm_wide_", &mm_wide_);
}

}  // namespace vlmfast
