"""The models a run trains and reads, as DeepSpeed wants them: DeepSpeed's config from the recipe, the policy loaded
from a checkpoint (a tiny model, a hub name or a local folder; ZeRO-3 partitioned while it loads), and a frozen
reference or teacher as its own optimizer-less engine."""

from __future__ import annotations

from .config import Config, ConfigError
from .data.loading import image_pixels
from .lora import adapter_base, apply_lora, is_adapter_folder, load_adapters
from .models import default_attn_implementation, load_model, tiny_vlm
from .packing import use_packed_forward
from .zero import frozen_engine, partitioned_loading


def ds_config(cfg: Config, micro_batch: int, micro_steps: int = 1) -> dict:
    """DeepSpeed's config; `micro_steps` backward passes per trainer step (GRPO's micro-batches) multiply
    deepspeed.grad_accum into DeepSpeed's gradient accumulation."""
    d = cfg.deepspeed
    zero = {"stage": d.zero_stage}
    if d.zero_stage:
        zero.update({k: getattr(d, k) for k in ("overlap_comm", "reduce_bucket_size") if getattr(d, k) is not None})
    if d.zero_stage == 3:
        zero.update({k: getattr(d, k) for k in ("stage3_param_persistence_threshold", "stage3_max_live_parameters",
                                                "stage3_prefetch_bucket_size") if getattr(d, k) is not None})
        if d.zero_hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = d.zero_hpz_partition_size
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": d.grad_accum * micro_steps,
        "gradient_clipping": d.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def load_policy(cfg: Config, path: str | None, device: str, processor=None):
    """A model + processor from `path` (default model.path): tiny:student / tiny:teacher, a hub name
    or a local checkpoint. Under ZeRO-3 a checkpoint loads straight into its partitions (a tiny model
    is built whole and partitioned by deepspeed.initialize: zero.Init would draw other random weights).
    With model.lora: new adapters on it, or, when `path` is an adapter folder (lora.handoff: adapters), its
    base with those adapters."""
    path = path or cfg.model.path
    lora = cfg.model.lora
    adapters = lora is not None and is_adapter_folder(path)
    try:
        model, proc = load_model_and_processor(cfg, adapter_base(path) if adapters else path, device, processor,
                                               load_in_4bit=lora is not None and lora.load_in_4bit)
    except ValueError as e:  # bitsandbytes missing
        raise ConfigError(str(e)) from None
    if lora is not None:
        try:  # a setting this model cannot take, or adapters made for another, named
            apply_lora(model, lora)
            if adapters:
                load_adapters(model, path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    image_pixels(cfg, proc)
    return model, proc


def load_model_and_processor(cfg: Config, path: str, device: str, processor=None, load_in_4bit: bool = False):
    """The model (every forward padding-free unless model.packed_sequences is false) and its processor; the language
    model's linear layers in 4 bits with `load_in_4bit` (QLoRA's base)."""
    m = cfg.model
    if path.startswith("tiny:"):
        model, proc = tiny_vlm(path[5:], seed=cfg.run.seed, processor=processor)
        from .models import freeze

        freeze(model, vision=m.freeze_vision, projector=m.freeze_projector, llm=m.freeze_llm)
        model = model.to(device)
    else:
        attn = m.attn_implementation
        if attn == "auto":  # DeepSpeed's bf16 runs fp32 weights' forward in bf16
            attn = default_attn_implementation(device, "bfloat16" if cfg.deepspeed.precision == "bf16" else m.dtype)
        with partitioned_loading(ds_config(cfg, 1)):
            model, proc = load_model(path, dtype=m.dtype, attn_implementation=attn,
                                     gradient_checkpointing=m.gradient_checkpointing, liger=m.liger, device=device,
                                     freeze_vision=m.freeze_vision, freeze_projector=m.freeze_projector,
                                     freeze_llm=m.freeze_llm, load_in_4bit=load_in_4bit)
    use_packed_forward(model, m.packed_sequences)
    return model, proc


def frozen_model(cfg: Config, path: str | None, device: str, processor, micro: int):
    """A reference or teacher: loaded from `path` (never copied from the policy), frozen, as its own
    DeepSpeed engine without optimizer, ZeRO-3 partitioned when the policy is. Returns the engine."""
    return frozen_engine(load_model_and_processor(cfg, path or cfg.model.path, device, processor)[0],
                         ds_config(cfg, micro))
