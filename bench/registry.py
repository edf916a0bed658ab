"""What the benchmark suite measures: language-model heads (hidden size H, vocabulary V) of the
models people post-train, token counts to sweep, and device peaks for the roofline."""

from __future__ import annotations

# name -> (H, V): the lm_head each op runs against
MODELS = {
    "cpu-small": (512, 32000),  # a small head that a 2-core CPU sweeps in seconds
    "qwen2-0.5b": (896, 151936),  # Qwen2/2.5-0.5B's head: CPU-sized, full Qwen vocabulary
    "qwen25vl-3b": (2048, 151936),
    "qwen25vl-7b": (3584, 152064),
    "qwen25vl-72b": (8192, 152064),
}
DEFAULT_MODELS = {"cpu": ["cpu-small", "qwen2-0.5b"], "cuda": ["qwen25vl-7b"]}
# tokens per case (N = B * T); the CPU sweep keeps `make bench` under 15 minutes on 2 cores
DEFAULT_TOKENS = {"cpu": {"cpu-small": [256, 1024], "qwen2-0.5b": [512]},
                  "cuda": {"*": [2048, 8192, 32768]}}
# ops per model when --ops is not given (all by default): on a CPU the full Qwen vocabulary costs ~30 s a
# case, so its default sweep keeps the three that show the pattern (plain CE, statistics, a policy loss)
DEFAULT_OPS = {"cpu": {"qwen2-0.5b": ["sft", "token_stats", "grpo"]}}
# input dtypes per model: every CPU case in fp32; the full-vocabulary head also in bf16 (the CPU's bf16 GEMMs
# run at ~2x fp32: issue 21), each compared with naive in its own dtype; GPUs in bf16
DEFAULT_DTYPES = {"cpu": {"*": ["float32"], "qwen2-0.5b": ["float32", "bfloat16"]}, "cuda": {"*": ["bfloat16"]}}
# dense bf16 tensor-core peak, TFLOP/s (for the roofline on GPUs; the CPU's is measured)
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def tokens_for(device: str, model: str) -> list[int]:
    table = DEFAULT_TOKENS[device]
    return table.get(model) or table.get("*") or [2048]


def dtypes_for(device: str, model: str) -> list[str]:
    table = DEFAULT_DTYPES[device]
    return table.get(model) or table["*"]


def ops_for(device: str, model: str, all_ops) -> list[str]:
    return DEFAULT_OPS.get(device, {}).get(model) or list(all_ops)


def head(model: str) -> tuple[int, int]:
    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    return MODELS[model]


# the losses vlmfast computes in one pass (token_loss: the gradients in the forward, 3 GEMMs; DPO's pairs and the
# gentle hinge's negatives as groups of tokens, whole in a band): every op but token_stats, whose backward takes any
# upstream gradient and recomputes the logits
ONE_PASS_OPS = ("sft", "sft_gentle", "opd", "grpo", "dpo", "cw_dpo")


def matmul_flops(n: int, h: int, v: int, mode: str, teacher_h: int = 0, one_pass: bool = False) -> float:
    """FLOPs of the head's GEMMs over n tokens: 2NHV forward; forward+backward with the logits recomputed
    in the backward is 8NHV (forward, recompute, dH, dW), in one pass 6NHV. A fused teacher head (OPD) adds
    its logits, computed in the forward and again in the backward's recompute: 2NH_tV and 4NH_tV (it gets no
    gradient), once in one pass."""
    if mode == "forward":
        return 2 * n * v * (h + teacher_h)
    if one_pass:
        return n * v * (6 * h + 2 * teacher_h)
    return n * v * (8 * h + 4 * teacher_h)


def runs_one_pass(op: str, provider: str, hidden_size: int) -> bool:
    """Whether a provider's path for op is the one-pass path: vlmfast's chunked backend on a one-pass loss, or its
    Triton backend from one_pass.TRITON_MIN_HIDDEN (below, token_stats' fused kernels recompute)."""
    from vlmfast.ops.one_pass import TRITON_MIN_HIDDEN

    if op not in ONE_PASS_OPS:
        return False
    return provider in ("vlmfast-chunked", "vlmfast-native") or (
        provider == "vlmfast-triton" and hidden_size >= TRITON_MIN_HIDDEN)
