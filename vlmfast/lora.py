"""LoRA for every stage, through peft: adapters on the language model's linear layers (and, by choice, the vision
tower's and the projector's), the base frozen and shared as the reference.

    apply_lora(model, settings)      adapters injected in place (the model keeps its class: trunk_hidden, call_head
                                     and ZeRO-3's module hooks see the same modules), only they (and
                                     modules_to_save, a full vision tower or projector) trainable
    adapters_disabled(model)         the base model for the block: pi_ref with no second copy (TRL's
                                     `disable_adapter()` reference with peft, verl's `ref_in_actor`)
    served_tensors(model, ...)       what an engine serving the model holds, named as the base model's: every adapted
                                     layer's weight merged, W + (alpha / r) B A, one layer at a time (ZeRO-3 gathers
                                     that layer only: never a whole merged copy)
    merged_state_dict(state_dict)    an exported state dict (adapters and base) as the merged HF model's
    save_adapters(...)               the adapters in PEFT's format (`PeftModel.from_pretrained` loads them)
    dense(param)                     a QLoRA base weight (4-bit, bitsandbytes) dequantized as its layer computes it,
                                     for the merged export and the engine

Adapted layers are peft's `lora.Linear` (forward: base(x) + B(A(dropout(x))) x alpha / r); the lm_head is never one:
the fused head takes one weight (see docs/training.md "LoRA"), train it whole with modules_to_save.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

ADAPTER = "default"  # peft's adapter name: one adapter per model
LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = ("frozen", "lora", "full")  # what model.lora.vision / projector choose
# where each part's modules live in Qwen2-VL / Qwen2.5-VL / Qwen3-VL under transformers 5
# (a text model's decoder layers are model.layers)
LLM_SCOPE = r"model\.(?:language_model\.)?layers\."
VISION_SCOPE, PROJECTOR_SCOPE = r"model\.visual\.blocks\.", r"model\.visual\.merger\."


def check_settings(lora, bad) -> None:
    """model.lora's values, each error naming its key (config.validate runs it)."""
    if lora.r < 1:
        bad("model.lora.r", f"must be >= 1, got {lora.r}")
    if lora.alpha <= 0:
        bad("model.lora.alpha", f"must be > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        bad("model.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    targets = lora.target_modules
    if targets != "all-linear" and (not isinstance(targets, list) or not targets
                                    or not all(isinstance(t, str) and t for t in targets)):
        bad("model.lora.target_modules", f"a list of module names (e.g. {list(LLM_LINEAR[:4])}) or all-linear, "
            f"got {targets!r}")
    if targets != "all-linear" and "lm_head" in targets:
        bad("model.lora.target_modules", "the lm_head takes no adapter: the fused head reads one weight (an adapted "
            "head would be copied whole, W + BA, every step); train it whole with modules_to_save: [lm_head]")
    for key in ("vision", "projector"):
        if getattr(lora, key) not in PARTS:
            bad(f"model.lora.{key}", f"must be one of {PARTS}, got {getattr(lora, key)!r}")
    if lora.handoff not in ("merged", "adapters"):
        bad("model.lora.handoff", f"must be merged or adapters, got {lora.handoff!r}")
    if not isinstance(lora.modules_to_save, list) or not all(isinstance(m, str) and m for m in lora.modules_to_save):
        bad("model.lora.modules_to_save", f"a list of module names (e.g. [lm_head]), got {lora.modules_to_save!r}")


def target_pattern(model, lora) -> str:
    """peft's `target_modules` for `model` as one regular expression over whole module names: in the language
    model, the linear layers named by target_modules (all-linear: every one); in the vision blocks and the
    projector, every linear layer when that part is LoRA's."""
    scopes = [(LLM_SCOPE, None if lora.target_modules == "all-linear" else lora.target_modules)]
    scopes += [(scope, None) for scope, part in ((VISION_SCOPE, lora.vision), (PROJECTOR_SCOPE, lora.projector))
               if part == "lora"]
    parts = []
    for scope, wanted in scopes:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and re.match(scope, n)})
        if wanted is not None:
            missing = sorted(set(wanted) - set(leaves))
            if missing:
                raise ValueError(f"model.lora.target_modules: the language model has no linear layer named "
                                 f"{missing} (its linear layers: {leaves})")
            leaves = list(wanted)
        if leaves:
            parts.append(rf"{scope}.*\.({'|'.join(map(re.escape, leaves))})")
    return "|".join(f"(?:{p})" for p in parts)


def peft_config(lora, pattern: str, base: str | None = None):
    """The peft.LoraConfig of these settings (also what save_adapters writes for `PeftModel.from_pretrained`)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern,
                      modules_to_save=list(lora.modules_to_save) or None, base_model_name_or_path=base, bias="none")


def apply_lora(model, lora):
    """Inject `lora`'s adapters into `model` in place (peft); returns it. Every base parameter is frozen, then
    modules_to_save and a `full` vision tower / projector are made trainable again. A setting this model cannot
    take raises ValueError naming its key."""
    from peft import inject_adapter_in_model

    names = dict(model.named_modules())
    missing = [m for m in lora.modules_to_save if m not in names]
    if missing:
        raise ValueError(f"model.lora.modules_to_save: no module {missing} in {type(model).__name__}")
    pattern = target_pattern(model, lora)
    config = peft_config(lora, pattern)
    # modules_to_save are trained whole in place, without peft's wrapper around them (the fused head calls
    # lm_head's own forward, which ZeRO-3 hooks); save_adapters writes them as peft's modules_to_save
    config.modules_to_save = None
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.vlmfast_lora, model.vlmfast_lora_pattern = lora, pattern  # what save_adapters reads
    for name in lora.modules_to_save:
        names[name].requires_grad_(True)
    visual = getattr(model.model, "visual", None)
    if lora.vision == "full":
        for name, p in visual.named_parameters():
            if not name.startswith("merger."):
                p.requires_grad_(True)
    if lora.projector == "full":
        visual.merger.requires_grad_(True)
    return model


def has_lora(model) -> bool:
    return getattr(model, "vlmfast_lora", None) is not None


def lora_layers(model) -> list:
    """[(module name, peft lora layer)] in module order ([] without LoRA: peft is not imported)."""
    if not has_lora(model):
        return []
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


class AdaptersOff:
    """pi_ref of a LoRA policy: the policy itself, read with its adapters off (StageContext.referencing)."""

    def __init__(self, model):
        self.model = model


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model inside the block (every adapter off: each adapted layer computes its base layer alone)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def dense(param: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A parameter's values as a plain tensor: a 4-bit weight (bitsandbytes' Params4bit, load_in_4bit) dequantized as
    its layer's forward does and cast to `dtype` (the model's), any other detached."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return param.detach()
    import bitsandbytes.functional as bnb

    return bnb.dequantize_4bit(param.data, state).to(dtype or state.dtype)


def is_quantized(model) -> bool:
    return any(getattr(p, "quant_state", None) is not None for p in model.parameters())


def float_dtype(model) -> torch.dtype:
    """The dtype of the model's unquantized weights (what a 4-bit one is exported and served as)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def base_name(name: str) -> str:
    """A parameter's name in the base model (peft puts an adapted layer's own weights under `.base_layer`)."""
    return name.replace(".base_layer.", ".")


def served_tensors(model, *, changed_only: bool) -> list:
    """[(name in the base model, parameters to gather, value())]: each tensor an engine serving `model` holds, in
    parameter order. An adapted layer's weight is merged (value() reads its base weight and adapters, gathered);
    `changed_only` keeps the tensors training changes (adapted layers and trainable parameters), else all. Without
    LoRA: the parameters themselves."""
    adapted = {f"{n}.base_layer.weight": m for n, m in lora_layers(model)}
    dtype = float_dtype(model)
    adapter_params = {id(p) for _, m in lora_layers(model) for p in (*m.lora_A.parameters(), *m.lora_B.parameters())}
    out = []
    for name, p in model.named_parameters():
        if id(p) in adapter_params:
            continue
        layer = adapted.get(name)
        if layer is not None:
            A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            out.append((base_name(name), [p, A, B],
                        lambda p=p, A=A, B=B, layer=layer: merged(layer, dense(p, dtype), A, B)))
        elif p.requires_grad or not changed_only:
            out.append((base_name(name), [p], lambda p=p: dense(p, dtype)))
    return out


def merged(layer, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """An adapted layer's merged weight W + (alpha / r) B A, in W's dtype: one addmm in fp32 (a 16-bit product on the
    CPU is slow and loses digits), no separate [out, in] product and sum (a sync merges every adapted layer)."""
    return torch.addmm(W.float(), B.float(), A.float(), alpha=layer.scaling[ADAPTER]).to(W.dtype)


def merged_state_dict(model, state_dict: dict) -> dict:
    """`state_dict` (every parameter of the LoRA model, whole and dense, on the host: checkpoint.export_state_dict) as
    the merged model's: each adapted layer's weight W + (alpha / r) B A under its base name, no adapter tensors."""
    out = dict(state_dict)
    for name, layer in lora_layers(model):
        W = out.pop(f"{name}.base_layer.weight")
        A, B = out.pop(f"{name}.lora_A.{ADAPTER}.weight"), out.pop(f"{name}.lora_B.{ADAPTER}.weight")
        out[f"{name}.weight"] = merged(layer, W, A, B)
    return {base_name(k): v for k, v in out.items()}


def adapter_state_dict(model, state_dict: dict) -> dict:
    """The adapters (and modules_to_save) of `state_dict` under PEFT's saved names: `base_model.model.` + the
    module path, without the adapter name (what `PeftModel.from_pretrained` reads)."""
    keep = tuple(f"{m}." for m in model.vlmfast_lora.modules_to_save)
    out = {}
    for k, v in state_dict.items():
        if ".lora_A." in k or ".lora_B." in k:
            out["base_model.model." + k.replace(f".{ADAPTER}.", ".")] = v
        elif k.startswith(keep):
            out["base_model.model." + k] = v
    return out


def save_adapters(model, state_dict: dict, path, base: str | None) -> Path:
    """The adapters in PEFT's format under `path` (adapter_config.json + adapter_model.safetensors) for the base
    model `base` (a hub name or folder)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    peft_config(model.vlmfast_lora, model.vlmfast_lora_pattern, base).save_pretrained(str(path))
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model, state_dict).items()}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def is_adapter_folder(path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def adapter_base(path) -> str:
    """The base model an adapter folder was trained on (its adapter_config.json)."""
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_adapters(model, path) -> None:
    """Set the injected adapters (and modules_to_save) of `model` from a PEFT adapter folder (save_adapters'). A
    tensor with no place in the model, or one trained whole that this model's modules_to_save do not list (it would
    load into a frozen module, silently), raises ValueError naming it. Under ZeRO-3 a module loaded into partitions
    (a modules_to_save of a checkpoint loaded by zero.Init) is written whole and re-partitioned from rank 0's copy,
    every rank reading the same file."""
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    trained_whole = tuple(f"{m}." for m in model.vlmfast_lora.modules_to_save)
    saved = load_file(str(Path(path) / "adapter_model.safetensors"))
    names = {k: re.sub(r"\.(lora_[AB])\.", rf".\1.{ADAPTER}.", k.removeprefix("base_model.model.")) for k in saved}
    for k, name in names.items():
        if name not in params:
            raise ValueError(f"{path}: adapter tensor {k} has no place in this model (another model or LoRA setting?)")
    for k, name in names.items():
        if ".lora_" not in name and not name.startswith(trained_whole):
            module = name.rsplit(".", 1)[0]
            raise ValueError(f"{path}: adapter tensor {k} trains {module} whole, which model.lora.modules_to_save "
                             f"does not list (it would load into the frozen module): add {module} to it")
    writes = [(params[name], saved[k]) for k, name in names.items()]
    partitioned = [p for p, _ in writes if hasattr(p, "ds_id")]
    with _gathered_for_writing(partitioned), torch.no_grad():
        for param, value in writes:
            param.copy_(value)


def _gathered_for_writing(params: list):
    """ZeRO-3 partitioned parameters whole inside the block, and partitioned again from rank 0's values at its end
    (DeepSpeed's GatheredParameters with modifier_rank=0, as transformers' ZeRO-3 state-dict loading writes them);
    nothing to do for whole ones."""
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
