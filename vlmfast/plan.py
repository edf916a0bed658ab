"""`vlmfast plan`: will a recipe fit the GPUs? Per-GPU memory by component, before anything launches.

    vlmfast plan --config recipes/qwen25vl7b_geo3k_grpo.yaml [--gpus 8 --gpu-memory 80GiB]

Parameter counts come from the model built on the meta device (no weights, no memory): a local
checkpoint's config.json, the tiny models, or the published configs of the Qwen2.5-VL sizes below (so a
plan needs no download). Per GPU, for each stage, the phases the trainer runs one after another, each the set of
tensors it keeps alive together (the peak is the largest):

- update (vLLM asleep: level 2 holds nothing): the policy's model states (DeepSpeed's own estimator for the ZeRO
  stage: 16-bit weights, fp32 master weights and Adam moments, gradients, the largest layer gathered), the frozen
  reference / teacher engines, activations of one forward (a GRPO update's micro_batch_size sequences, else the
  rank's whole batch), the fused op's buffers (fused_op_bytes) and the OPD teacher head's gathered copy;
- rollout (vLLM awake, the only phase it is): the states and frozen engines (the optimizer states on the host
  with vllm.offload_optimizer) and vLLM's memory share (weights and KV cache); or, with the HF engine, the
  policy gathered whole (ZeRO-3) and generate's buffers (its KV cache and a few [B, V] fp32 score rows);
- evaluation: as the rollout, on the evaluation's batch;
- checkpoint: the states and, for a hand-off checkpoint's HF export, one module gathered at a time (its largest).

Activations (activation_bytes) count what autograd keeps for a Qwen2-family decoder layer (RMSNorm, GQA attention
with flash / SDPA, SwiGLU MLP), checked against a fake-tensor count of 7B-shaped layers at 8 x 3072 tokens
(tests/test_plan_activations.py); a CPU run of a random-initialised ~0.45B model calibrates the whole update
phase (tests/test_plan_calibration.py: predicted vs measured peak).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field

from .arguments import positive_int
from .config import Config, ConfigError, check_ranks, generation_engine, load_config
from .stages import stage_of

GiB = 2**30
NF4_BYTES = 4.127 / 8  # bytes per 4-bit weight: NF4 codes plus double-quantized absmax (Dettmers et al. 2023)
DEFAULT_PROMPT_TOKENS = 1024  # priced when neither the data nor vllm.max_model_len says how long prompts are
# vlmfast/kernels/token_stats.py BWD_DZ_BYTES: the cap of the backward's dz chunk and of the one pass's band (they
# shrink when a quarter of the GPU's free memory is less: the plan prices the cap)
FUSED_DZ_BYTES = 1 * GiB

# Published configs (config.json of Qwen/Qwen2.5-VL-*-Instruct): only the sizes a parameter count needs.
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=None,
               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
               fullatt_block_indexes=[7, 15, 23, 31])
KNOWN_MODELS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                                        num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                                        tie_word_embeddings=True),
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                        tie_word_embeddings=False),
    "Qwen/Qwen2.5-VL-32B-Instruct": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                                         num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                                         tie_word_embeddings=False),
    "Qwen/Qwen2.5-VL-72B-Instruct": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                         num_key_value_heads=8, intermediate_size=29568, vocab_size=152064,
                                         tie_word_embeddings=False),
}


@dataclass
class ModelSize:
    params: int  # every parameter
    trainable: int  # after the recipe's freezing
    largest_layer: int  # the largest single parameter (what ZeRO-3 gathers at once, at least)
    hidden: int
    layers: int
    vocab: int
    intermediate: int = 0  # the MLP's width
    kv: int = 0  # key (and value) width: key-value heads x head size
    quantized: int = 0  # parameters held in 4 bits (model.lora.load_in_4bit: the language model's linear weights)


def _config_of(path: str):
    if path in KNOWN_MODELS:
        from transformers import Qwen2_5_VLConfig

        text = KNOWN_MODELS[path]
        vision = {**_VISION, "out_hidden_size": text["hidden_size"]}
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        rope = {"rope_type": "default", "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}
        return Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision,
                                tie_word_embeddings=text["tie_word_embeddings"])
    if path.startswith("tiny:"):
        from .models import tiny_vlm

        return tiny_vlm(path[5:])[0].config
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"model.path: no config for {path!r} offline (known without a download: "
                          f"{', '.join(KNOWN_MODELS)}, tiny:*, local checkpoints)") from e


def model_size(path: str, *, freeze_vision=False, freeze_projector=False, freeze_llm=False, lora=None) -> ModelSize:
    """Parameter counts of the model at `path`, built on the meta device (with `lora`'s adapters: trainable are
    they and what model.lora trains whole)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from .models import freeze

    config = _config_of(path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    freeze(model, vision=freeze_vision, projector=freeze_projector, llm=freeze_llm)
    if lora is not None:
        from .lora import apply_lora

        try:
            apply_lora(model, lora)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    four_bit = lora is not None and lora.load_in_4bit  # what nf4_config quantizes: not the vision tower, not the head
    quantized = sum(m.weight.numel() for n, m in model.named_modules() if four_bit and isinstance(m, torch.nn.Linear)
                    and n.startswith("model.language_model.") and ".lora_" not in n)
    return ModelSize(params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
                     largest_layer=max(p.numel() for p in params), hidden=text.hidden_size,
                     layers=text.num_hidden_layers, vocab=text.vocab_size, intermediate=text.intermediate_size,
                     kv=text.num_key_value_heads * head_dim, quantized=quantized)


def model_states_bytes(size: ModelSize, zero_stage: int, gpus: int, precision: str) -> int:
    """Per-GPU bytes of the policy's weights, gradients and Adam states (DeepSpeed's estimators for ZeRO
    2 and 3, no offload; frozen parameters hold 16-bit weights only)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    frozen = size.params - size.trainable
    if precision == "fp32":  # no 16-bit copy: fp32 weights, gradients and two Adam moments
        per = {0: 16 * size.params, 1: 8 * size.params + 8 * size.trainable // gpus,
               2: 4 * size.params + 12 * size.trainable // gpus, 3: 16 * size.trainable // gpus}
        return per[zero_stage] + (4 * frozen // gpus if zero_stage == 3 else 0)
    if zero_stage == 3:
        return estimate_zero3_model_states_mem_needs(size.trainable, size.largest_layer, num_gpus_per_node=gpus,
                                                     cpu_offload=False)[1] + 2 * frozen // gpus
    if zero_stage == 2:
        return estimate_zero2_model_states_mem_needs(size.trainable, num_gpus_per_node=gpus, cpu_offload=False)[1] \
            + 2 * frozen
    # ZeRO-1 shards the fp32 states only; ZeRO-0 shards nothing
    return 2 * size.params + 2 * size.trainable + (16 * size.trainable // (gpus if zero_stage == 1 else 1))


def layer_activation_bytes(size: ModelSize, word: int) -> int:
    """Bytes per token autograd keeps for one decoder layer (`word` bytes per 16- or 32-bit value): each RMSNorm
    its fp32 input and its normalised output (4h + w h, twice); attention q, rotated q, its output and o_proj's
    input (4 w h), k, v and rotated k (3 w kv); the SwiGLU MLP its gate and up projections, the activated gate and
    the product down_proj reads (4 w I)."""
    return 2 * (4 + word) * size.hidden + word * (4 * size.hidden + 3 * size.kv + 4 * size.intermediate)


def activation_bytes(size: ModelSize, tokens: int, checkpointing: bool, word: int) -> int:
    """One micro-batch of `tokens` tokens through the language model, kept for backward, at its peak: every
    layer's saved tensors (with gradient checkpointing: every layer's input, and one layer recomputed) plus the
    backward's transient gradients of the MLP's two widest tensors (2 w I)."""
    transient = 2 * word * size.intermediate
    if checkpointing:
        return tokens * (size.layers * word * size.hidden + layer_activation_bytes(size, word) + transient)
    return tokens * (size.layers * layer_activation_bytes(size, word) + transient)


def generate_bytes(size: ModelSize, rows: int, tokens: int, word: int) -> int:
    """HF generate on `rows` sequences of up to `tokens` tokens: the KV cache (keys and values of every layer) and
    the sampler's few [rows, V] fp32 score rows of one step (rollout/hf.py keeps one log-prob per token)."""
    return rows * tokens * size.layers * 2 * size.kv * word + 16 * rows * size.vocab * 4


@dataclass
class StagePlan:
    name: str
    phases: dict = field(default_factory=dict)  # phase -> {component: bytes}, the tensors alive together

    @property
    def update(self) -> dict:
        return self.phases["update"]

    @property
    def peak(self) -> int:
        return max(sum(c.values()) for c in self.phases.values())

    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: sum(self.phases[k].values()))

    def largest(self) -> tuple[str, int]:
        return max(self.phases[self.peak_phase()].items(), key=lambda kv: kv[1])


def plan(cfg: Config, *, gpus: int, gpu_memory: int, prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> list[StagePlan]:
    """Per-GPU memory of every stage of the recipe, by phase and component, for prompts of `prompt_tokens` tokens
    (text and image tokens: `recipe_prompt_tokens`)."""
    m, d, e = cfg.model, cfg.deepspeed, cfg.eval
    size = model_size(m.path, freeze_vision=m.freeze_vision, freeze_projector=m.freeze_projector,
                      freeze_llm=m.freeze_llm, lora=m.lora)
    word = 4 if d.precision == "fp32" else 2
    states = model_states_bytes(size, d.zero_stage, gpus, d.precision)
    # QLoRA: NF4 with double quantization keeps about 4.13 bits per weight (ZeRO 0-2: the frozen base is not sharded)
    states -= int((word - NF4_BYTES) * size.quantized)
    if d.zero_stage == 3 and d.zero_hpz_partition_size > 1:  # ZeRO++'s secondary 16-bit shard within a node
        states += word * size.params // d.zero_hpz_partition_size
    # what vllm.offload_optimizer moves to the host while vLLM is awake: all but the 16-bit weights
    optimizer = states - word * size.params // (gpus if d.zero_stage == 3 else 1)
    frozen_share = gpus if d.zero_stage == 3 else 1  # a frozen engine is partitioned like the policy
    head_trains = not m.freeze_llm if m.lora is None else "lm_head" in m.lora.modules_to_save
    out = []
    for i, s in enumerate(cfg.stages):
        kind = stage_of(s)
        p = StagePlan(s.name or f"{i}-{s.type}")
        shared = {"policy states": states}
        if kind.needs_reference(s) and m.lora is None:  # LoRA's reference is the policy, its adapters off
            shared["reference engine"] = word * size.params // frozen_share
        teacher = model_size(kind.teacher(s)) if kind.teacher(s) else None
        if teacher is not None:
            shared["teacher engine"] = word * teacher.params // frozen_share
        tokens = kind.forward_tokens(s, gpus, prompt_tokens + s.max_new_tokens)  # the largest micro-batch's
        head_copy = teacher is not None and kind.teacher_head_copy(s)
        update = {**shared, "activations": activation_bytes(size, tokens, m.gradient_checkpointing, word),
                  "fused op buffers": fused_op_bytes(size.vocab, size.hidden, tokens, word, kind.grouped_loss(s),
                                                     head_copy, head_trains)}
        if head_copy:
            update["teacher head copy"] = word * teacher.vocab * teacher.hidden
        p.phases["update"] = update
        vllm = generation_engine(cfg, s) == "vllm"
        gen_rows = {"rollout": kind.rollout_rows(s, gpus), "evaluation": min(64, e.num_problems * e.n_samples)}
        gen_tokens = {"rollout": s.max_new_tokens, "evaluation": e.max_new_tokens}
        for phase in ("rollout", "evaluation") if kind.samples_in_training else ("evaluation",):
            comps = dict(shared)
            if vllm:  # awake only here: empty_cache -> wake -> sync -> generate -> sleep
                comps["vLLM (weights + KV cache)"] = int(s.vllm_memory_share * gpu_memory)
                if cfg.vllm.offload_optimizer:
                    comps["policy states"] -= optimizer
                if teacher is not None and kind.teacher_engine(s):
                    comps["teacher vLLM"] = int(cfg.vllm.teacher_memory_share * gpu_memory)
            else:
                if d.zero_stage == 3 and d.gather_for_generation:
                    comps["policy gathered for generate"] = word * size.params
                comps["generate buffers"] = generate_bytes(size, min(gen_rows[phase], 64),
                                                           prompt_tokens + gen_tokens[phase], word)
            p.phases[phase] = comps
        # the HF export gathers one module at a time (checkpoint.export_state_dict), vLLM asleep
        p.phases["checkpoint"] = {"policy states": states, "largest module gathered for the export":
                                  word * size.largest_layer}
        out.append(p)
    return out


def data_on_this_machine(cfg: Config) -> bool:
    """The recipe's data is the synthetic task or files here (a hub dataset is not read: it may download)."""
    from .data.loading import data_sources, is_hub_source

    sources = data_sources(cfg).values()
    return (cfg.data.synthetic is not None or bool(sources)) and not any(map(is_hub_source, sources))


def recipe_prompt_tokens(cfg: Config) -> tuple[int, str]:
    """(the longest prompt the plan prices, where that number comes from). As the trainer counts it (chat template
    and every image's tokens at the run's pixel limits, prompts over vllm.max_model_len dropped) when the data and
    the processor are on this machine; else the longest prompt vllm.max_model_len admits; else
    DEFAULT_PROMPT_TOKENS."""
    if data_on_this_machine(cfg):
        from .data.budget import fit_to_budget, longest_prompt
        from .data.loading import load_data, load_processor

        try:
            processor = load_processor(cfg, local_files_only=True)
        except OSError as e:
            reason = f"the processor of {cfg.model.path} is not on this machine ({str(e).splitlines()[0]})"
        else:
            data = load_data(cfg)
            if any(generation_engine(cfg, s) == "vllm" for s in cfg.stages):  # the trainer drops what vLLM cannot
                data, _, _, longest = fit_to_budget(cfg, data, processor)
            else:
                longest = longest_prompt(processor, data)
            prompts = sum(map(len, data.values()))
            return longest, f"the longest prompt of the recipe's data ({prompts} prompts)"
    else:
        reason = "the recipe's data is not on this machine"
    limit = cfg.vllm.max_model_len
    if limit:
        from .data.budget import response_budgets

        least = min(b for b in response_budgets(cfg).values())
        return limit - least, f"the longest prompt vllm.max_model_len={limit} admits ({reason})"
    return DEFAULT_PROMPT_TOKENS, f"assumed: {reason}; pass --prompt-tokens"


def fused_op_bytes(vocab: int, hidden: int, tokens: int, word: int, grouped: bool = False,
                   teacher_head: bool = False, head_trains: bool = True) -> int:
    """The fused head's buffers on a GPU: 2 x 4 V H for the head's fp32 gradient buffers (none when the head is
    frozen: the op computes no dW), plus, from
    one_pass.TRITON_MIN_HIDDEN, the one pass's band (fp32 logits and their dz in the input dtype, FUSED_DZ_BYTES of
    logits; a loss over groups of tokens, DPO's pairs or the gentle hinge's negatives, may stretch a band to
    one_pass.GROUP_STRETCH of them; a fused teacher head's fp32 logits of the band beside them) or, below,
    token_stats' dz chunk."""
    from .ops import one_pass

    dw = 2 * 4 * vocab * hidden if head_trains else 0
    if hidden < one_pass.TRITON_MIN_HIDDEN:
        return dw + min(FUSED_DZ_BYTES, tokens * vocab * word)
    logits = min(FUSED_DZ_BYTES * (one_pass.GROUP_STRETCH if grouped else 1), tokens * vocab * 4)
    return dw + logits * (2 if teacher_head else 1) + logits * word // 4


BUDGET_STEP = 256  # token budgets the plan picks are multiples of this


def token_budgets(cfg: Config, *, gpus: int, gpu_memory: int, prompt_tokens: int = DEFAULT_PROMPT_TOKENS
                  ) -> dict[int, int]:
    """{stage index: max_tokens_per_micro_batch} for each stage that can run in micro-batches and has neither it nor
    micro_batch_size set: the largest multiple of BUDGET_STEP whose update phase fits `gpu_memory` (at least one
    row: a sequence, or a pair's two; at most the whole update, which needs no budget and is left out)."""
    import dataclasses

    out = {}
    for i, s in enumerate(cfg.stages):
        if (stage_of(s).whole_batch_loss(s) or s.max_tokens_per_micro_batch is not None
                or s.micro_batch_size is not None):
            continue

        def update_bytes(budget, i=i, s=s):
            stages = list(cfg.stages)
            stages[i] = dataclasses.replace(s, max_tokens_per_micro_batch=budget)
            trial = dataclasses.replace(cfg, stages=stages)
            return sum(plan(trial, gpus=gpus, gpu_memory=gpu_memory, prompt_tokens=prompt_tokens)[i].update.values())

        sequence = prompt_tokens + s.max_new_tokens
        row = stage_of(s).sequences_per_row(s) * sequence
        whole = stage_of(s).forward_tokens(s, gpus, sequence)
        if update_bytes(whole) <= gpu_memory:
            continue  # the whole update fits in one forward
        lo, hi = 1, -(-whole // BUDGET_STEP)  # in steps; the update of hi steps does not fit
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if update_bytes(mid * BUDGET_STEP) <= gpu_memory else (lo, mid)
        out[i] = max(lo * BUDGET_STEP, row)
    return out


def check_fits(cfg: Config, *, gpus: int, gpu_memory: int, prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> None:
    """ConfigError naming the stage and its largest component when a stage cannot fit (`vlmfast train`
    runs this on GPUs with its data's longest prompt, before it loads any model)."""
    for p in plan(cfg, gpus=gpus, gpu_memory=gpu_memory, prompt_tokens=prompt_tokens):
        if p.peak > gpu_memory:
            name, b = p.largest()
            raise ConfigError(f"stage {p.name} needs {p.peak / GiB:.1f} GiB per GPU of {gpu_memory / GiB:.0f} "
                              f"(`vlmfast plan`); its largest component is {name} ({b / GiB:.1f} GiB)")


def parse_bytes(text: str) -> int:
    units = {"gib": GiB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "b": 1}
    t = text.strip().lower()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(float(t))


def format_plan(plans: list[StagePlan], gpus: int, gpu_memory: int, prompts: str = "") -> str:
    lines = [f"per-GPU memory on {gpus} GPUs of {gpu_memory / GiB:.0f} GiB (GiB; peak = the largest phase, each "
             "phase the tensors alive together)", *([prompts] if prompts else []), ""]
    for p in plans:
        lines.append(f"{p.name}: peak {p.peak / GiB:.1f} GiB {'fits' if p.peak <= gpu_memory else 'DOES NOT FIT'}")
        for phase, comps in p.phases.items():
            lines.append(f"  {phase:10s} {sum(comps.values()) / GiB:6.1f}  " + ", ".join(
                f"{k} {v / GiB:.1f}" for k, v in comps.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vlmfast plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=positive_int, default=8)
    ap.add_argument("--gpu-memory", default="80GiB")
    ap.add_argument("--prompt-tokens", type=positive_int, default=None,
                    help="prompt length (text + image tokens); default: the longest prompt of the recipe's data")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_ranks(cfg, args.gpus)  # the trainer's own rule for this many ranks
        budget = parse_bytes(args.gpu_memory)
        if args.prompt_tokens is None:
            tokens, source = recipe_prompt_tokens(cfg)
        else:
            tokens, source = args.prompt_tokens, "--prompt-tokens"
        with contextlib.redirect_stderr(sys.stderr):
            plans = plan(cfg, gpus=args.gpus, gpu_memory=budget, prompt_tokens=tokens)
    except (ConfigError, ValueError) as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plans, args.gpus, budget, f"prompts of {tokens} tokens: {source}"))
    worst = max(plans, key=lambda p: p.peak)
    if worst.peak > budget:
        name, b = worst.largest()
        print(f"does not fit: stage {worst.name} needs {worst.peak / GiB:.1f} GiB per GPU; its largest component is "
              f"{name} ({b / GiB:.1f} GiB)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
