// Native CPU epilogue of the fused token statistics (../../vlmfast/ops/chunked.py is the caller).
//
// The chunked backend computes a block of logits z [R, C] (R token rows, C vocabulary columns) with
// one BLAS matmul; these ops reduce it to per-row statistics, or turn it into dz, in ONE pass, a
// few thousand columns at a time while they sit in L1 (the pure-PyTorch epilogue makes 6-10 passes
// and allocates [R, C] temporaries). Math: DESIGN section 3, in fp32, with fp64 row sums.
//
//   token_stats_accumulate_: fold a block of columns [c0, c0 + C) into per-row online sums (state)
//   token_stats_finish:      state -> lse, logp, entropy, kl, lse_t                 (per row)
//   token_stats_block:       the two above over a whole row block (C = V)
//   token_stats_block_grad:  z, y, zt, saved stats, upstream grads -> dz  (may write over z)
//
// Blocks of columns let the caller use tall GEMMs (all N rows x a slice of the vocabulary), which
// run ~1.5x faster on a CPU than the short-and-wide row blocks of the PyTorch path.
//
// Online form, per row, with a = z/T - m (m: running max of z/T) and at = zt/T - mt:
//   S0 = sum e^a, S1 = sum e^a a, T0 = sum e^at, T1 = sum e^at at,
//   D = sum e^a (a - at) (reverse KL), F = sum e^at (at - a) (forward KL)
//   lse = m + log S0, entropy = log S0 - S1/S0, lse_t = mt + log T0,
//   KL(p||q) = D/S0 - log S0 + log T0,  KL(q||p) = F/T0 - log T0 + log S0.
// Keeping the sums shifted (a, not z) keeps entropy and KL accurate when |z| ~ 1e4.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

#include "fast_exp.h"

namespace vlmfast {
namespace {

enum KlMode : int64_t { kNoKl = 0, kReverse = 1, kForward = 2 };

constexpr int64_t kBlock = 2048;  // columns per inner block: 8 KB of fp32, stays in L1

template <typename T>
VLMFAST_INLINE float to_f(T v) {
  return static_cast<float>(v);
}

// Max of z over [0, n), as float.
template <typename T>
inline float block_max(const T* z, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, to_f(z[j]));
  return m;
}

// A logit of -inf (a bias that masks vocabulary) becomes this floor after scaling: e^(floor - m) is 0, so a masked
// column adds nothing, and the products with it (e a, p log p) are 0 instead of 0 x -inf = NaN. The same floor as
// ops/floor.py LOGIT_FLOOR and the Triton kernels.
constexpr float kLogitFloor = -1e30f;

VLMFAST_INLINE float scaled(float z, float inv_t) {
  const float s = z * inv_t;
  return s < kLogitFloor ? kLogitFloor : s;  // not fmax: a NaN stays NaN (bad input stays visible)
}

// float -> T for the gradient store. bf16 rounds to nearest even with bit arithmetic (vectorises;
// c10's conversion has a NaN branch that does not). Inputs are finite (checked before any work).
template <typename T>
VLMFAST_INLINE T from_f(float v) {
  return T(v);
}

template <>
VLMFAST_INLINE c10::BFloat16 from_f<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

// One row's online state; a row of the [R, 9] fp64 `state` tensor (same field order).
struct RowSums {
  double m = -INFINITY, s0 = 0, s1 = 0;   // student
  double mt = -INFINITY, t0 = 0, t1 = 0;  // teacher
  double cross = 0;                       // D (reverse) or F (forward)
  double z_y = 0;                         // the target's z/T, once its column has been seen
  double target_seen = 0;                 // 1 once it has: finish() rejects a target outside the vocabulary
};
constexpr int64_t kStateWidth = sizeof(RowSums) / sizeof(double);
static_assert(kStateWidth == 9, "RowSums must be 9 doubles: the state tensor is [R, 9]");

// Move one side's running max m to m_new: its a = z/T - m shift by delta = m - m_new and its e^a
// scale by e^delta. The cross term (D = sum e^a (a - at) or F = sum e^at (at - a)) rescales when it
// is weighted by this side's e^a, and otherwise only shifts with this side's a.
inline void shift_max(double& m, double& s0, double& s1, double m_new, double& cross, bool cross_weighted_here,
                      double other_s0) {
  const double delta = m - m_new, scale = std::exp(delta);
  cross = cross_weighted_here ? scale * (cross + delta * s0) : cross - delta * other_s0;
  s1 = scale * (s1 + delta * s0);
  s0 *= scale;
  m = m_new;
}

// Raise one side's running max to cover a block of n logits (first block: just set it); returns it
// as the float that the block's loop subtracts.
template <typename T>
float raise_max(const T* zb, int64_t n, float inv_t, double& m, double& s0, double& s1, double& cross,
                bool cross_weighted_here, double other_s0) {
  const double bm = static_cast<double>(scaled(block_max(zb, n), inv_t));
  if (bm > m) {
    if (s0 > 0) shift_max(m, s0, s1, bm, cross, cross_weighted_here, other_s0);
    m = bm;
  }
  return static_cast<float>(m);
}

// Fold V columns of one row (and of its teacher row) into r.
template <typename T>
void accumulate_row(RowSums& r, const T* z, const T* zt, int64_t V, float inv_t, int64_t kl_mode) {
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    const T* zb = z + j0;
    const float m = raise_max(zb, n, inv_t, r.m, r.s0, r.s1, r.cross, kl_mode == kReverse, r.t0);
    float s0 = 0, s1 = 0;
    if (zt == nullptr) {
#pragma omp simd reduction(+ : s0, s1)
      for (int64_t j = 0; j < n; ++j) {
        const float a = scaled(to_f(zb[j]), inv_t) - m;
        const float e = fast_exp(a);
        s0 += e;
        s1 += e * a;
      }
      r.s0 += s0;
      r.s1 += s1;
      continue;
    }
    const T* ztb = zt + j0;
    const float mt = raise_max(ztb, n, inv_t, r.mt, r.t0, r.t1, r.cross, kl_mode == kForward, r.s0);
    float t0 = 0, t1 = 0, cross = 0;
    const bool reverse = kl_mode == kReverse;
#pragma omp simd reduction(+ : s0, s1, t0, t1, cross)
    for (int64_t j = 0; j < n; ++j) {
      const float a = scaled(to_f(zb[j]), inv_t) - m;
      const float at = scaled(to_f(ztb[j]), inv_t) - mt;
      const float e = fast_exp(a), et = fast_exp(at);
      s0 += e;
      s1 += e * a;
      t0 += et;
      t1 += et * at;
      cross += reverse ? e * (a - at) : et * (at - a);
    }
    r.s0 += s0;
    r.s1 += s1;
    r.t0 += t0;
    r.t1 += t1;
    r.cross += cross;
  }
}

void check_block(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(z.dim() == 2, name, " must be [rows, vocab], got ", z.sizes());
  TORCH_CHECK(z.stride(1) == 1, name, " must be contiguous along the vocabulary");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16 || z.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", z.scalar_type());
}

void check_rows(const at::Tensor& t, int64_t R, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == R && t.scalar_type() == dtype,
              name, " must be a CPU ", dtype, " tensor of shape [", R, "], got ", t.scalar_type(), " ",
              t.sizes());
}

void check_inputs(const at::Tensor& z, const at::Tensor& target, const std::optional<at::Tensor>& zt,
                  int64_t kl_mode) {
  check_block(z, "logits");
  check_rows(target, z.size(0), at::kLong, "target");
  TORCH_CHECK(kl_mode == kNoKl || kl_mode == kReverse || kl_mode == kForward, "kl_mode must be 0, 1 or 2");
  TORCH_CHECK(zt.has_value() == (kl_mode != kNoKl), "teacher_logits must be given exactly when kl_mode != 0");
  if (zt.has_value()) {
    check_block(*zt, "teacher_logits");
    TORCH_CHECK(zt->sizes() == z.sizes() && zt->scalar_type() == z.scalar_type(),
                "teacher_logits must match logits in shape and dtype: ", zt->sizes(), " ", zt->scalar_type(),
                " vs ", z.sizes(), " ", z.scalar_type());
  }
}

// Rows per parallel task: at least ~32k columns of work, so small vocabularies do not pay the
// thread hand-off per row.
int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

inline bool ignored(int64_t y, int64_t ignore_index) {
  TORCH_CHECK(y == ignore_index || y >= 0, "target id ", y, " is negative and is not ignore_index (",
              ignore_index, ")");
  return y == ignore_index;
}

at::Tensor new_state(int64_t R) {
  at::Tensor state = at::empty({R, kStateWidth}, at::TensorOptions().dtype(at::kDouble));
  const RowSums init;
  double* p = state.data_ptr<double>();
  for (int64_t i = 0; i < R; ++i) std::memcpy(p + i * kStateWidth, &init, sizeof(RowSums));
  return state;
}

void check_state(const at::Tensor& state, int64_t R) {
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kDouble && state.dim() == 2 &&
                  state.size(0) == R && state.size(1) == kStateWidth && state.is_contiguous(),
              "state must be a contiguous CPU float64 tensor of shape [", R, ", ", kStateWidth, "] (from "
              "token_stats_new_state), got ", state.scalar_type(), " ", state.sizes());
}

at::Tensor token_stats_new_state(int64_t rows) { return new_state(rows); }

void token_stats_accumulate_(at::Tensor state, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& teacher_logits, double inv_t, int64_t kl_mode,
                             int64_t ignore_index, int64_t col_offset) {
  check_inputs(logits, target, teacher_logits, kl_mode);
  const int64_t R = logits.size(0), C = logits.size(1);
  check_state(state, R);
  const int64_t* y = target.data_ptr<int64_t>();
  const float it = static_cast<float>(inv_t);
  double* sp = state.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_stats_accumulate_", [&] {
    const scalar_t* zp = logits.data_ptr<scalar_t>();
    const scalar_t* ztp = teacher_logits ? teacher_logits->data_ptr<scalar_t>() : nullptr;
    const int64_t zs = logits.stride(0), zts = teacher_logits ? teacher_logits->stride(0) : 0;
    at::parallel_for(0, R, grain_rows(C), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        if (ignored(y[i], ignore_index)) continue;  // its outputs stay 0
        const scalar_t* z = zp + i * zs;
        RowSums r;
        std::memcpy(static_cast<void*>(&r), sp + i * kStateWidth, sizeof(RowSums));
        accumulate_row(r, z, ztp ? ztp + i * zts : nullptr, C, it, kl_mode);
        const int64_t col = y[i] - col_offset;
        if (col >= 0 && col < C) {
          r.z_y = static_cast<double>(scaled(to_f(z[col]), it));
          r.target_seen = 1;
        }
        std::memcpy(sp + i * kStateWidth, &r, sizeof(RowSums));
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_finish(
    const at::Tensor& state, const at::Tensor& target, int64_t kl_mode, int64_t ignore_index) {
  const int64_t R = target.size(0);
  check_rows(target, R, at::kLong, "target");
  check_state(state, R);
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor lse = at::zeros({R}, opts), logp = at::zeros({R}, opts), entropy = at::zeros({R}, opts);
  at::Tensor kl = at::zeros({R}, opts), lse_t = at::zeros({R}, opts);
  const int64_t* y = target.data_ptr<int64_t>();
  const double* sp = state.data_ptr<double>();
  float *o_lse = lse.data_ptr<float>(), *o_logp = logp.data_ptr<float>(), *o_h = entropy.data_ptr<float>();
  float *o_kl = kl.data_ptr<float>(), *o_lse_t = lse_t.data_ptr<float>();
  for (int64_t i = 0; i < R; ++i) {
    if (ignored(y[i], ignore_index)) continue;
    RowSums s;
    std::memcpy(static_cast<void*>(&s), sp + i * kStateWidth, sizeof(RowSums));
    TORCH_CHECK(s.target_seen != 0, "target id ", y[i], " is outside the vocabulary (its column was never seen)");
    const double log_s0 = std::log(s.s0), row_lse = s.m + log_s0;
    o_lse[i] = static_cast<float>(row_lse);
    o_logp[i] = static_cast<float>(s.z_y - row_lse);
    o_h[i] = static_cast<float>(log_s0 - s.s1 / s.s0);
    if (kl_mode != kNoKl) {
      const double log_t0 = std::log(s.t0);
      o_lse_t[i] = static_cast<float>(s.mt + log_t0);
      o_kl[i] = static_cast<float>(kl_mode == kReverse ? s.cross / s.s0 - log_s0 + log_t0
                                                       : s.cross / s.t0 - log_t0 + log_s0);
    }
  }
  return {lse, logp, entropy, kl, lse_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_block(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& teacher_logits,
    double inv_t, int64_t kl_mode, int64_t ignore_index) {
  check_inputs(logits, target, teacher_logits, kl_mode);
  at::Tensor state = new_state(logits.size(0));
  token_stats_accumulate_(state, logits, target, teacher_logits, inv_t, kl_mode, ignore_index, 0);
  return token_stats_finish(state, target, kl_mode, ignore_index);
}

// Per-row constants of dz_j = p_j (base - gH logp_j [+ gK (logp_j - logq_j)]) [+ gK (p_j - q_j)]
// (DESIGN section 3 with the per-row terms folded into `base`).
struct RowGrad {
  float lse, lse_t, g_logp, g_h, g_kl, base;
};

template <int64_t kKl>
VLMFAST_INLINE float dz_elem(const RowGrad& g, float z, float zt, float inv_t) {
  const float lp = scaled(z, inv_t) - g.lse;
  const float p = fast_exp(lp);
  float c = g.base - g.g_h * lp;
  if (kKl == kReverse) c += g.g_kl * (lp - (scaled(zt, inv_t) - g.lse_t));
  if (kKl == kForward) return p * (c + g.g_kl) - g.g_kl * fast_exp(scaled(zt, inv_t) - g.lse_t);
  return p * c;
}

// dz of V columns of one row into `out` (which may be `z` itself: each element is read before it is
// written). y: the target's column in this block; outside [0, V) when it lies in another block.
template <int64_t kKl, typename T>
void grad_row(const T* z, const T* zt, T* out, int64_t V, int64_t y, const RowGrad& g, float inv_t) {
  const bool has_target = y >= 0 && y < V;
  // keep what the one-hot fix-up needs before the loop overwrites it
  const float z_y = has_target ? to_f(z[y]) : 0.0f, zt_y = has_target && zt ? to_f(zt[y]) : 0.0f;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float zt_j = kKl == kNoKl ? 0.0f : to_f(zt[j]);  // compile-time branch: no load without a teacher
    out[j] = from_f<T>(dz_elem<kKl>(g, to_f(z[j]), zt_j, inv_t) * inv_t);
  }
  // the one-hot term, added in fp32 after the p-terms (no cancellation as p_y -> 1)
  if (has_target) out[y] = from_f<T>((dz_elem<kKl>(g, z_y, zt_y, inv_t) + g.g_logp) * inv_t);
}

template <typename T>
void grad_row_dispatch(int64_t kl_mode, const T* z, const T* zt, T* out, int64_t V, int64_t y, const RowGrad& g,
                       float inv_t) {
  if (kl_mode == kReverse) return grad_row<kReverse>(z, zt, out, V, y, g, inv_t);
  if (kl_mode == kForward) return grad_row<kForward>(z, zt, out, V, y, g, inv_t);
  grad_row<kNoKl, T>(z, nullptr, out, V, y, g, inv_t);
}

void token_stats_block_grad(const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& teacher_logits, const at::Tensor& lse,
                            const at::Tensor& entropy, const at::Tensor& kl, const at::Tensor& lse_t,
                            const at::Tensor& g_logp, const at::Tensor& g_entropy, const at::Tensor& g_kl,
                            const at::Tensor& g_lse, double inv_t, int64_t kl_mode, int64_t ignore_index,
                            int64_t col_offset, at::Tensor grad_logits) {
  check_inputs(logits, target, teacher_logits, kl_mode);
  const int64_t R = logits.size(0), V = logits.size(1);
  check_block(grad_logits, "grad_logits");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type(),
              "grad_logits must match logits in shape and dtype");
  const at::Tensor* rows[] = {&lse, &entropy, &kl, &lse_t, &g_logp, &g_entropy, &g_kl, &g_lse};
  const char* names[] = {"lse", "entropy", "kl", "lse_t", "g_logp", "g_entropy", "g_kl", "g_lse"};
  for (int k = 0; k < 8; ++k) check_rows(*rows[k], R, at::kFloat, names[k]);
  const int64_t* y = target.data_ptr<int64_t>();
  const float it = static_cast<float>(inv_t);
  const float *s_lse = lse.data_ptr<float>(), *s_h = entropy.data_ptr<float>(), *s_kl = kl.data_ptr<float>();
  const float *s_lse_t = lse_t.data_ptr<float>(), *gl = g_logp.data_ptr<float>(), *gh = g_entropy.data_ptr<float>();
  const float *gk = g_kl.data_ptr<float>(), *gz = g_lse.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_stats_block_grad", [&] {
    const scalar_t* zp = logits.data_ptr<scalar_t>();
    const scalar_t* ztp = teacher_logits ? teacher_logits->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = grad_logits.data_ptr<scalar_t>();
    const int64_t zs = logits.stride(0), zts = teacher_logits ? teacher_logits->stride(0) : 0;
    const int64_t os = grad_logits.stride(0);
    at::parallel_for(0, R, grain_rows(V), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        scalar_t* out = op + i * os;
        if (ignored(y[i], ignore_index)) {
          std::fill(out, out + V, scalar_t(0));
          continue;
        }
        const scalar_t* z = zp + i * zs;
        const scalar_t* zt = ztp ? ztp + i * zts : nullptr;
        const float g_kl_row = kl_mode == kNoKl ? 0.0f : gk[i];
        RowGrad g{s_lse[i], s_lse_t[i], gl[i], gh[i], g_kl_row, gz[i] - gl[i] - gh[i] * s_h[i]};
        if (kl_mode == kReverse) g.base -= g_kl_row * s_kl[i];
        grad_row_dispatch(kl_mode, z, zt, out, V, y[i] - col_offset, g, it);
      }
    });
  });
}

}  // namespace

// The torch this was compiled against, in the file itself: vlmfast reads it before loading the
// library (loading runs the op registrations below, which must not meet another torch's ABI).
extern "C" __attribute__((used)) const char vlmfast_built_for_torch[] = "vlmfast-built-for-torch:" VLMFAST_TORCH_VERSION;

std::string torch_version() { return VLMFAST_TORCH_VERSION; }

TORCH_LIBRARY(vlmfast, m) {
  // the torch this was compiled against: vlmfast refuses to run it under another one
  m.def("torch_version() -> str", &torch_version);
  // a factory without tensor inputs: its kernel below is CompositeExplicitAutograd (every backend), so it takes a
  // fake implementation (vlmfast/ops/native.py) and torch.compile can trace it; a kernel given here would be
  // CompositeImplicitAutograd, which refuses one
  m.def("token_stats_new_state(int rows) -> Tensor");
  m.def(
      "token_stats_accumulate_(Tensor(a!) state, Tensor logits, Tensor target, Tensor? teacher_logits, float inv_t, "
      "int kl_mode, int ignore_index, int col_offset) -> ()");
  m.def(
      "token_stats_finish(Tensor state, Tensor target, int kl_mode, int ignore_index) -> (Tensor lse, Tensor logp, "
      "Tensor entropy, Tensor kl, Tensor lse_t)");
  m.def(
      "token_stats_block(Tensor logits, Tensor target, Tensor? teacher_logits, float inv_t, int kl_mode, "
      "int ignore_index) -> (Tensor lse, Tensor logp, Tensor entropy, Tensor kl, Tensor lse_t)");
  m.def(
      "token_stats_block_grad(Tensor logits, Tensor target, Tensor? teacher_logits, Tensor lse, Tensor entropy, "
      "Tensor kl, Tensor lse_t, Tensor g_logp, Tensor g_entropy, Tensor g_kl, Tensor g_lse, float inv_t, "
      "int kl_mode, int ignore_index, int col_offset, Tensor(a!) grad_logits) -> ()");
}

TORCH_LIBRARY_IMPL(vlmfast, CompositeExplicitAutograd, m) {
  m.impl("token_stats_new_state", &token_stats_new_state);
}

TORCH_LIBRARY_IMPL(vlmfast, CPU, m) {
  m.impl("token_stats_accumulate_", &token_stats_accumulate_);
  m.impl("token_stats_finish", &token_stats_finish);
  m.impl("token_stats_block", &token_stats_block);
  m.impl("token_stats_block_grad", &token_stats_block_grad);
}

}  // namespace vlmfast
