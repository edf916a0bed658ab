"""Models: load a VLM (Qwen2.5-VL first) by hub name or local path with its processor; the tiny-model
factory for CPU work; the trunk/head split the fused losses need; freezing.

Trunk/head split: `trunk_hidden(model, **batch)` runs the model to its last hidden state [B, T, H]
(the lm_head is never applied, so [B, T, V] logits never exist), and `call_head(model, hidden, fn)`
runs `fn(hidden, lm_head_weight)` AS the lm_head module's forward. Going through the module is what
makes it work under DeepSpeed ZeRO-3: its hooks gather the partitioned weight before the forward and
again before the backward of that module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import shutil
import tempfile
from pathlib import Path

import torch

from .packing import pack, packs, unpack
from .ranks import reduce_over_ranks
from .rope_index import use_prefix_rope_index
from .zero import forward_as, frozen_weight, is_partitioned

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Tiny Qwen2.5-VL architectures that train in minutes on 2 CPU cores (see ../shared/PLATFORM.md):
# head_dim 32 everywhere (vLLM's CPU attention needs >= 32), mrope_section sums to head_dim / 2.
TINY_SIZES = {
    "student": dict(hidden=64, layers=2, heads=2, vision_hidden=64, vision_depth=2, vision_heads=2),
    "teacher": dict(hidden=96, layers=3, heads=3, vision_hidden=64, vision_depth=2, vision_heads=2),
}


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts` with the Qwen chat special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer, image_size: int = 84):
    """The Qwen2.5-VL processor around `tokenizer`; images keep their size up to image_size^2 pixels."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    pixels = dict(min_pixels=28 * 28, max_pixels=image_size * image_size)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                               tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(**pixels),
                               chat_template=CHAT_TEMPLATE)


def tiny_config(size: str, tokenizer):
    from transformers import Qwen2_5_VLConfig

    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose from {list(TINY_SIZES)}")
    s = TINY_SIZES[size]
    head_dim = s["hidden"] // s["heads"]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=4 * s["hidden"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
                  num_heads=s["vision_heads"], out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[s["vision_depth"] - 1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg, k, text[k])
    return cfg


def tiny_vlm(size: str = "student", *, processor=None, texts: list[str] | None = None, seed: int = 0,
             image_size: int = 84):
    """A Qwen2.5-VL-architecture model with random weights and its processor (tokenizer trained on
    `texts`, by default the synthetic task's corpus). Pass `processor` to share one vocabulary."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    if processor is None:
        if texts is None:
            from .data.synthetic import corpus

            texts = corpus()
        processor = build_processor(build_tokenizer(texts), image_size=image_size)
    cfg = tiny_config(size, processor.tokenizer)
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                                               bos_token_id=cfg.bos_token_id)
    model.config._attn_implementation = "sdpa"
    use_matmul_patch_embed(model)
    use_prefix_rope_index(model)
    return model, processor


class PatchConv3d(torch.nn.Conv3d):
    """A patch-embedding Conv3d (kernel = stride = input size) computed as the one matmul it is.

    Same parameters and state dict as the Conv3d it replaces; on CPU the convolution's backward is
    most of the tiny vision tower's time, the matmul's is not.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != tuple(self.kernel_size) or self.groups != 1:
            return super().forward(x)
        out = torch.nn.functional.linear(x.flatten(1), self.weight.flatten(1), self.bias)
        return out.view(x.shape[0], self.out_channels, 1, 1, 1)


def use_matmul_patch_embed(model) -> int:
    """Swap every patch-embedding Conv3d (kernel == stride) for PatchConv3d; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Conv3d and tuple(m.kernel_size) == tuple(m.stride) and m.padding == (0, 0, 0):
            m.__class__ = PatchConv3d
            n += 1
    return n


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def save_pretrained(model, processor, path) -> Path:
    """Save model + processor atomically (temp dir, then rename): a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_attn_implementation(device, compute_dtype: str = "bfloat16") -> str:
    """flash-attention 2 on CUDA when installed and the forward runs in 16 bits (it refuses fp32: "FlashAttention
    only support fp16 and bf16 data type" at the first forward), else SDPA."""
    cuda = torch.device(device).type == "cuda"
    half = compute_dtype in ("bfloat16", "float16")
    return "flash_attention_2" if cuda and half and importlib.util.find_spec("flash_attn") else "sdpa"


def load_model(name_or_path, *, dtype="float32", attn_implementation="auto", gradient_checkpointing=False,
               liger=False, device="cpu", freeze_vision=False, freeze_projector=False, freeze_llm=False,
               load_in_4bit=False):
    """Load a VLM and its processor by hub name or local path (the same code path for both).

    Qwen2.5-VL is the first target; Qwen2-VL and Qwen3-VL load through the same auto classes.
    `liger=True` patches RMSNorm/RoPE/SwiGLU with Liger kernels (CUDA only). `load_in_4bit`: the language model's
    linear layers in NF4 through bitsandbytes (QLoRA's base; the vision tower and lm_head stay in `dtype`).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    local = Path(str(name_or_path))
    if str(name_or_path).startswith((".", "/")) and not local.exists():
        raise FileNotFoundError(f"model path {local} does not exist")
    if attn_implementation == "auto":
        attn_implementation = default_attn_implementation(device, dtype)
    if liger:
        if torch.device(device).type != "cuda":
            raise ValueError("liger=True needs a CUDA device (its Triton kernels do not run on the CPU)")
        _apply_liger(name_or_path)
    quantized = {}
    if load_in_4bit:  # bitsandbytes quantizes as the weights land on the device: this rank's
        current = torch.cuda.current_device() if torch.device(device).type == "cuda" else None
        quantized = {"quantization_config": nf4_config(dtype), "device_map": device_map_of(device, current)}
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=_DTYPES[dtype],
                                                        attn_implementation=attn_implementation, **quantized)
    processor = AutoProcessor.from_pretrained(name_or_path)
    if load_in_4bit:
        one_4bit_path(model)
    use_matmul_patch_embed(model)
    use_prefix_rope_index(model)
    if not is_partitioned(model):  # zero.Init already placed its partitions
        model.to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    freeze(model, vision=freeze_vision, projector=freeze_projector, llm=freeze_llm)
    return model, processor


def device_map_of(device, current_cuda: int | None) -> dict:
    """from_pretrained's device_map for a model loaded whole on this rank's device: on CUDA the index itself, the one
    the trainer made current (LOCAL_RANK's), as TRL's QLoRA examples pass `{"": PartialState().local_process_index}`
    (never a device string whose index depends on what is current while accelerate dispatches)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return {"": current_cuda}
    return {"": str(device)}


def nf4_config(dtype: str):
    """QLoRA's 4-bit base (Dettmers et al. 2023): NF4 with double quantization, computing in `dtype`; the vision tower
    and the head are not quantized (transformers matches `llm_int8_skip_modules` against module names)."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("model.lora.load_in_4bit needs bitsandbytes (pip install 'bitsandbytes>=0.50'), which is not "
                         "installed")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=_DTYPES[dtype], llm_int8_skip_modules=["lm_head", "model.visual"])


def one_4bit_path(model) -> None:
    """Every 4-bit layer computes as training does (dequantize, then matmul in the compute dtype): bitsandbytes' CPU
    backend would otherwise repack a layer's weight in place at its first no-grad eval forward for a bf16
    AVX512-BF16 kernel, so generation would score tokens differently from training, and the repacked weight no
    longer dequantizes as a 4-bit weight (lora.dense)."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _apply_liger(name_or_path) -> None:
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    import liger_kernel.transformers as lk

    patch = {"qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl", "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
             "qwen3_vl": "apply_liger_kernel_to_qwen3_vl"}.get(model_type)
    if patch is None or not hasattr(lk, patch):
        raise ValueError(f"no Liger patch for model type {model_type!r}")
    # the loss is vlmfast's fused op: never let Liger replace the lm_head / cross entropy
    fn = getattr(lk, patch)
    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    params = inspect.signature(fn).parameters
    fn(**{k: v for k, v in wanted.items() if k in params})


def vision_tower(model):
    return model.model.visual


def freeze(model, *, vision=False, projector=False, llm=False) -> None:
    """Freeze the vision tower (without its merger), the projector (the merger), or the LLM
    (language model + lm_head)."""
    visual = vision_tower(model)
    if vision:
        for name, p in visual.named_parameters():
            if not name.startswith("merger."):
                p.requires_grad_(False)
    if projector:
        visual.merger.requires_grad_(False)
    if llm:
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)


# collate() outputs that are not model inputs
NOT_MODEL_INPUTS = ("labels", "truncated", "prompt_lengths", "response_lengths")


def trunk_hidden(model, **batch) -> torch.Tensor:
    """Last hidden states [B, T, H] of the language model (after its final norm), images included;
    the lm_head is not applied. An image repeated in consecutive rows is encoded once (shared_images). A model
    with packing on (packing.use_packed_forward) runs the batch's real tokens only, packed into one row; its
    hidden states come back in the batch's layout, zeros at the pads."""
    batch = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    if packs(model) and batch.get("attention_mask") is not None:
        inputs, real = pack(model, batch)
        return unpack(model.model(**shared_images(model, inputs), use_cache=False).last_hidden_state, real)
    return model.model(**shared_images(model, batch), use_cache=False).last_hidden_state


def _takes_encoder_outputs(model) -> bool:
    inner = getattr(model, "model", None)
    return (hasattr(inner, "get_image_features")
            and "mm_encoder_outputs" in inspect.signature(inner.forward).parameters)


def every_rank_agrees(model, flag: bool) -> bool:
    """flag on every rank. Under ZeRO-3 the shared encode changes the order in which modules gather their
    parameters (vision tower before the embedding): ranks taking different paths would issue their
    collectives out of order, so all take the shared path or none (one all-reduce per forward)."""
    if not (is_partitioned(model) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return flag
    return bool(reduce_over_ranks(torch.tensor([int(flag)]), "min").item())


def shared_images(model, batch: dict) -> dict:
    """`batch` with each run of identical consecutive images through the vision tower once.

    A GRPO batch holds group_size samples of each prompt, and generation n copies of it: the same image
    in consecutive rows, which the model would encode (and backpropagate through) once per copy. The
    unique images are encoded once and their features handed to the model as transformers' precomputed
    `mm_encoder_outputs`, each copy a reference to its image's features (autograd sums the copies'
    gradients). Unchanged when nothing repeats or the model does not take precomputed features.
    """
    if not _takes_encoder_outputs(model):
        return batch
    pixels, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    unique, owner = [], []  # unique images (first index) and each image's place among them
    if pixels is not None and grid is not None:
        sizes = grid.prod(-1).tolist()
        chunks = pixels.split(sizes)
        for i, chunk in enumerate(chunks):
            j = unique[-1] if unique else None
            if j is None or not torch.equal(grid[j], grid[i]) or not torch.equal(chunks[j], chunk):
                unique.append(i)
            owner.append(len(unique) - 1)
    if not every_rank_agrees(model, len(unique) < len(owner)):  # every rank calls this, images or not
        return batch
    encoded = model.model.get_image_features(torch.cat([chunks[i] for i in unique]), grid[unique], return_dict=True)
    encoded.pooler_output = tuple(encoded.pooler_output[k] for k in owner)
    rest = {k: v for k, v in batch.items() if k != "pixel_values"}
    return {**rest, "mm_encoder_outputs": {"image": encoded}}


@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode for the block (generation, no-grad scoring passes: LoRA's dropout belongs to the training
    forward only, so a pass that scores tokens reads the model itself), then back as it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def dropout_off(model):
    """Every nn.Dropout of `model` (LoRA's included) at p = 0 for the block, then as it was; the model stays in train
    mode (gradient checkpointing runs only in train mode, so eval() is not the way)."""
    mods = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    before = [m.p for m in mods]
    for m in mods:
        m.p = 0.0
    try:
        yield model
    finally:
        for m, p in zip(mods, before):
            m.p = p


def head_vocab(model) -> int:
    """Rows of the lm_head (the vocabulary it scores), read from the module: under ZeRO-3 the weight
    itself is an empty shard outside a gather."""
    return model.lm_head.out_features


def call_head(model, hidden: torch.Tensor, fn):
    """Run fn(hidden, lm_head.weight[, lm_head.bias]) as the lm_head module's own forward.

    Under DeepSpeed ZeRO-3 the module's hooks gather its partitioned weight for this forward and
    again before its backward, exactly as for the plain `lm_head(hidden)` call it replaces.
    """
    head = model.lm_head

    def forward(h):
        return fn(h, head.weight) if head.bias is None else fn(h, head.weight, head.bias)

    with forward_as(head, forward):
        return head(hidden)


def frozen_head_weight(model) -> torch.Tensor:
    """A frozen model's lm_head weight as a plain tensor that outlives the call (under ZeRO-3 gathered
    and copied: V x H in its dtype), for a loss that needs another model's head (the OPD teacher's)."""
    if model.lm_head.bias is not None:
        raise ValueError("a teacher head with a bias is not supported by the OPD stage")
    return frozen_weight(model.lm_head.weight)


def head_token_stats(model, hidden: torch.Tensor, labels: torch.Tensor, **kwargs):
    """`token_stats(hidden, lm_head.weight, labels, bias=lm_head.bias, **kwargs)` run through `call_head`:
    the one way code outside the model reads log-probs or entropy of its head (ZeRO-3 safe)."""
    from .ops import TokenStats, token_stats

    def fn(h, w, b=None):  # a dict of tensors: DeepSpeed's hooks see (and can hook) every output
        return token_stats(h, w, labels, bias=b, **kwargs).as_dict()

    return TokenStats(**call_head(model, hidden, fn))
