// 16-bit GEMMs with an fp32 result on the CPU: out[M, N] (+)= a[M, K] @ b[K, N], a and b bf16 (or fp16),
// products accumulated and stored in fp32.
//
// torch.mm on bf16 runs oneDNN's avx512_bf16 kernels (~2.6x fp32 on the development machine) but rounds
// its result to bf16: logits and gradient partial sums must not be rounded, and torch has no CPU out_dtype.
// ATen's cpublas::brgemm takes bf16 x bf16 -> fp32 with an optional accumulate; given plain (non-VNNI)
// row-major operands it runs ATen's bf16 x bf16 -> fp32 GEMM, the one exported entry point to it. On the
// development machine (AMD, no AMX) that GEMM runs at fp32 speed, not oneDNN's bf16 speed (docs/platform.md).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

namespace vlmfast {
namespace {

void check_operand(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, op, ": ", name,
              " must be row-major (inner stride 1), got strides ", t.strides());
}

template <typename T>
void run(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::native::cpublas::brgemm(M, N, K, std::max<int64_t>(a.stride(0), K), std::max<int64_t>(b.stride(0), N),
                              std::max<int64_t>(out.stride(0), N), accumulate, a.const_data_ptr<T>(),
                              b.const_data_ptr<T>(), out.data_ptr<float>(), /*is_vnni=*/false);
}

void mm_wide_(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  check_operand("mm_wide_", out, "out");
  check_operand("mm_wide_", a, "a");
  check_operand("mm_wide_", b, "b");
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
  if (a.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(out, a, b, accumulate);
  } else {
    run<at::Half>(out, a, b, accumulate);
  }
}

// out[j, i] = src[i, j], converted to out's dtype: the GEMM's operands are row-major, so W's block of
// columns (for h W^T) and dz (for dz^T h) are transposed first. torch's strided copy of a transposed
// 16-bit view runs at ~1 GB/s here (an element at a time); tiles that fit in L1 make it a memory pass.
template <typename S, typename D>
void transpose_tiles(const S* src, int64_t src_ld, D* out, int64_t out_ld, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  at::parallel_for(0, row_tiles * col_tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = (t / col_tiles) * kTile, j0 = (t % col_tiles) * kTile;
      const int64_t i1 = std::min(rows, i0 + kTile), j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) out[j * out_ld + i] = static_cast<D>(static_cast<float>(src[i * src_ld + j]));
    }
  });
}

template <typename S>
void transpose_from(at::Tensor& out, const at::Tensor& src) {
  const auto* s = src.const_data_ptr<S>();
  const int64_t sl = std::max<int64_t>(src.stride(0), src.size(1)), ol = std::max<int64_t>(out.stride(0), out.size(1));
  if (out.scalar_type() == at::kBFloat16) {
    transpose_tiles(s, sl, out.data_ptr<at::BFloat16>(), ol, src.size(0), src.size(1));
  } else {
    transpose_tiles(s, sl, out.data_ptr<at::Half>(), ol, src.size(0), src.size(1));
  }
}

void transpose_into_(at::Tensor out, const at::Tensor& src) {
  check_operand("transpose_into_", out, "out");
  check_operand("transpose_into_", src, "src");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf,
              "transpose_into_: out must be bfloat16 or float16, got ", out.scalar_type());
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == out.scalar_type(),
              "transpose_into_: src must be float32 or out's dtype, got ", src.scalar_type());
  TORCH_CHECK(out.size(0) == src.size(1) && out.size(1) == src.size(0), "transpose_into_: out ", out.sizes(),
              " is not the transpose of src ", src.sizes());
  switch (src.scalar_type()) {
    case at::kFloat: transpose_from<float>(out, src); break;
    case at::kBFloat16: transpose_from<at::BFloat16>(out, src); break;
    default: transpose_from<at::Half>(out, src); break;
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vlmfast, m) {
  m.def("mm_wide_(Tensor(a!) out, Tensor a, Tensor b, bool accumulate) -> ()");
  m.def("transpose_into_(Tensor(a!) out, Tensor src) -> ()");
}

TORCH_LIBRARY_IMPL(vlmfast, CPU, m) {
  m.impl("mm_wide_", &mm_wide_);
  m.impl("transpose_into_", &transpose_into_);
}

}  // namespace vlmfast
