"""ZeRO-3 as it runs at 7B: every parameter partitioned, so nothing outside a module may read its weights.

Under ZeRO-3 a parameter holds only its rank's shard: `p.shape` is `[0]` outside a gather, and only the
owning module's forward (through DeepSpeed's hooks) sees it whole. What the trainer needs besides that:

- `partitioned_loading(ds_config)`: `from_pretrained` inside it loads straight into partitions
  (transformers' zero.Init path), so a 7B policy, its reference or a 32B teacher never exists whole on a rank.
- `frozen_engine(model, ds_config)`: a reference or teacher as its own DeepSpeed engine without an optimizer,
  partitioned like the policy under ZeRO-3 (never a deep copy: that fails on partitioned parameters).
- `gathered_for_generation(engine)`: every parameter gathered once for a whole `generate` call, the ZeRO-3
  hooks off meanwhile (otherwise each decoding step re-gathers every layer: the "ZeRO-3 generate is
  extremely slow" trap). Costs the full model in its working dtype on every rank for the call
  (7B in bf16: 15.2 GB); `deepspeed.gather_for_generation: false` keeps it partitioned instead.
- `frozen_weight(param)`: a frozen model's weight as a plain tensor that outlives the call, for the OPD
  teacher's head, which the student's fused loss needs in its forward and again in its backward.
- `engine_forward(engine, fn)`: a training forward run as the engine's own forward. DeepSpeed keeps its
  gradient-accumulation count there: a forward that bypasses the engine makes every micro-step's ZeRO-3
  gradient overwrite the one before instead of adding to it.
"""

from __future__ import annotations

import contextlib

import torch


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when `model`'s parameters are ZeRO-3 parameters (whole or not at this moment)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def partitioned_loading(ds_config: dict | None):
    """Inside: `from_pretrained` builds the model under deepspeed.zero.Init (ZeRO-3 configs only)."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)  # transformers reads it through a weak reference: keep it alive
    try:
        yield
    finally:
        del keep


def frozen_engine(model: torch.nn.Module, ds_config: dict):
    """A DeepSpeed engine around a frozen model: no optimizer, ZeRO-3 partitioned when the policy is,
    plain (stage 0, same precision) otherwise. Returns the engine; its `.module` is the model."""
    import deepspeed

    model.eval().requires_grad_(False)
    zero = dict(ds_config.get("zero_optimization", {}))
    if zero.get("stage") != 3:
        zero = {"stage": 0}
    config = {**ds_config, "zero_optimization": zero}
    config.pop("gradient_clipping", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _zero3_offload(engine):
    """The object that owns the ZeRO-3 module hooks of a DeepSpeed engine (with or without optimizer)."""
    opt = getattr(engine, "optimizer", None)
    offload = getattr(opt, "parameter_offload", opt)
    if offload is None or not hasattr(offload, "forward_hooks"):
        raise TypeError(f"{type(engine).__name__} is not a ZeRO-3 DeepSpeed engine")
    return offload


@contextlib.contextmanager
def gathered_for_generation(engine):
    """Gather every parameter of a ZeRO-3 engine's module once and switch its hooks off for the block
    (DeepSpeed's own unwrap_model_for_generation, made exception-safe): the block runs a plain model."""
    import deepspeed

    offload = _zero3_offload(engine)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        # the root module's start-of-forward hook too: while ZeRO-3's module trace is incomplete (a stage's first
        # steps) its reset_step checks the trace against every rank's (a broadcast), and ranks decoding different
        # numbers of tokens (each stops when its own samples end) would wait on each other forever
        root = getattr(offload, "fwd_pre_hook", None)
        start_of_forward = None if root is None else offload.module._forward_pre_hooks.get(root.id)
        if root is not None:
            root.remove()
        try:
            yield engine.module
        finally:
            if start_of_forward is not None:
                offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start_of_forward)
            # the generation's forwards are no training trace (TRL's add_hooks does the same)
            coordinator = offload.get_param_coordinator()
            if not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()
            offload._register_deepspeed_module(offload.module)


def gathered(params: list):
    """Under ZeRO-3, the parameters whole inside the block (a collective: every rank enters it); otherwise
    nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def frozen_weight(param: torch.Tensor) -> torch.Tensor:
    """A frozen parameter as a plain tensor: itself when whole; under ZeRO-3 gathered and copied (the
    copy lives as long as its user: the OPD teacher's head, V x H_t, for one step)."""
    if not hasattr(param, "ds_id"):
        return param.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()


def engine_forward(engine, fn):
    """fn() run as `engine`'s forward (`engine()` with fn as the module's forward for the call).

    The trainer's forward is not `model(**batch)`: it runs the trunk and the fused head separately. It must
    still pass through `engine.forward`, which starts each micro-step: ZeRO-3 counts micro-steps there and
    copies (rather than adds) a gradient partition at micro-step 0, so without it only the last micro-batch of
    an accumulated update would survive; ZeRO-1/2 clear the previous step's accumulators there.
    """
    with forward_as(engine.module, fn):
        return engine()


@contextlib.contextmanager
def forward_as(module: torch.nn.Module, fn):
    """Inside: `module(...)` runs fn as its forward, through the module's hooks (DeepSpeed's among them);
    after: the class's forward again."""
    module.forward = fn
    try:
        yield module
    finally:
        del module.forward
