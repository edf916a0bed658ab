"""LoRA (vlmfast/lora.py): the adapted model against the same model merged by hand (W + alpha / r B A, written here),
the adapters-off reference against the base model, the merged export loaded by transformers and the adapters by
peft, the weights an engine is sent, the recipe keys, the plan, and a tiny SFT -> GRPO -> CW-DPO recipe that trains
with one model in memory and resumes to the same numbers after a kill."""

import copy
import gc
import io
import json

import pytest
import torch
from PIL import Image

from vlmfast.config import ConfigError, LoraSettings, load_config
from vlmfast.data.collate import collate
from vlmfast.data.synthetic import generate
from vlmfast.lora import adapters_disabled, apply_lora, lora_layers, served_tensors
from vlmfast.models import NOT_MODEL_INPUTS, head_token_stats, tiny_vlm, trunk_hidden

R, ALPHA = 4, 12.0


@pytest.fixture(scope="module")
def batch():
    _, proc = tiny_vlm("student", seed=0)
    rows = generate("train", 3, seed=0)
    imgs = [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rows]
    return collate(proc, [r["problem"] for r in rows], imgs,
                   ["<think>three</think> \\boxed{3}", "<think>red</think> \\boxed{red}", "\\boxed{1}"])


def adapted(seed=0, **settings):
    """(the tiny student with adapters whose B is not zero, a copy of the model before them)."""
    model, proc = tiny_vlm("student", seed=seed)
    base = copy.deepcopy(model)
    apply_lora(model, LoraSettings(**{"r": R, "alpha": ALPHA, **settings}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at 0 (the adapted model IS the base): give the adapters something to add
        for _, layer in lora_layers(model):
            B = layer.lora_B["default"].weight
            B.copy_(0.05 * torch.randn(B.shape, generator=g))
    return model, base, proc


def nll(model, batch):
    """The SFT loss through the fused head: mean NLL of the response tokens."""
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    labels = batch["labels"][:, 1:]
    stats = head_token_stats(model, trunk_hidden(model, **inputs)[:, :-1], labels, outputs=("logp",))
    return -(stats.logp * (labels != -100)).sum() / (labels != -100).sum()


def test_only_the_adapters_and_the_chosen_parts_train():
    model, base, _ = adapted(vision="frozen", projector="full", modules_to_save=["lm_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for n in trainable:
        assert ".lora_" in n or n.startswith(("model.visual.merger.", "lm_head.")), n
    adapted_layers = {n for n, _ in lora_layers(model)}
    assert adapted_layers == {n for n, m in base.named_modules() if n.startswith("model.language_model.layers.")
                              and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj")}
    vision = adapted(vision="lora")[0]
    assert any(n.startswith("model.visual.blocks.") for n, _ in lora_layers(vision))
    assert not any(n.startswith("model.visual.merger.") for n, _ in lora_layers(vision))


def test_loss_and_gradients_equal_the_model_merged_by_hand(batch):
    model, base, _ = adapted(vision="lora", dropout=0.0)
    loss = nll(model, batch)
    loss.backward()
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    weights = {}
    for name, layer in lora_layers(model):  # W' = W + alpha / r * B @ A, by hand
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        W = modules[name].weight
        with torch.no_grad():
            W.add_(ALPHA / R * B @ A)
        weights[name] = W
    loss_merged = nll(merged, batch)
    loss_merged.backward()
    assert loss.item() == pytest.approx(loss_merged.item(), rel=1e-5)
    for name, layer in lora_layers(model):  # the chain rule through W' = W + s B A: dB = s G A^T, dA = s B^T G
        G, s = weights[name].grad, ALPHA / R
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(B.grad, s * G @ A.detach().T, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(A.grad, s * B.detach().T @ G, rtol=1e-4, atol=1e-7)


def test_the_adapters_off_reference_is_the_base_model(batch):
    model, base, _ = adapted()
    with torch.no_grad():
        with adapters_disabled(model) as ref:
            assert ref is model
            off = nll(model, batch)
        on, want = nll(model, batch), nll(base, batch)
    assert off.item() == want.item()  # the same computation: exactly the base's
    assert abs(on.item() - want.item()) > 1e-4  # and the adapters back on afterwards
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_the_exported_model_and_adapters_load_with_the_adapted_logits(batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlmfast.checkpoint import ADAPTER_DIR, save_hf

    model, _, proc = adapted(vision="lora", modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # a module trained whole travels with the adapters
    save_hf(model, proc, tmp_path / "hf", base="tiny:student")
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    with torch.no_grad():
        want = model(**inputs).logits
        merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
        assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**inputs).logits, want, rtol=1e-4, atol=1e-4)
        config = json.loads((tmp_path / "hf" / ADAPTER_DIR / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "tiny:student" and config["r"] == R
        peft_model = PeftModel.from_pretrained(tiny_vlm("student", seed=0)[0], tmp_path / "hf" / ADAPTER_DIR).eval()
        torch.testing.assert_close(peft_model(**inputs).logits, want, rtol=1e-4, atol=1e-4)


def test_an_engine_is_sent_the_merged_layers_under_the_base_names():
    model, base, _ = adapted(projector="full")
    base_params = dict(base.named_parameters())
    everything = {n: v() for n, _, v in served_tensors(model, changed_only=False)}
    assert set(everything) == set(base_params)  # the base model's names, no adapter tensors
    changed = {n for n, _, _ in served_tensors(model, changed_only=True)}
    adapted_weights = {f"{n}.weight" for n, _ in lora_layers(model)}
    merger = {n for n in base_params if n.startswith("model.visual.merger.")}
    assert changed == adapted_weights | merger
    for name, layer in lora_layers(model):
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(everything[f"{name}.weight"], base_params[f"{name}.weight"] + ALPHA / R * B @ A)


@pytest.mark.parametrize("settings, key", [
    ({"target_modules": ["q_proj", "lm_head"]}, "model.lora.target_modules"),
    ({"target_modules": []}, "model.lora.target_modules"),
    ({"vision": "half"}, "model.lora.vision"),
    ({"r": 0}, "model.lora.r"),
    ({"dropout": 1.0}, "model.lora.dropout"),
    ({"handoff": "copy"}, "model.lora.handoff"),
])
def test_bad_settings_name_their_key(settings, key):
    raw = {"model": {"lora": settings}, "data": {"synthetic": {}}, "stages": [{"type": "sft"}]}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(raw=raw)


def test_conflicting_keys_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"model\.freeze_vision"):
        load_config(raw={"model": {"lora": {}, "freeze_vision": True}, "data": {"synthetic": {}},
                         "stages": [{"type": "sft"}]})
    with pytest.raises(ConfigError, match=r"stages\[1\]\.type.*handoff: merged"):
        load_config(raw={"model": {"lora": {"handoff": "adapters"}}, "data": {"synthetic": {}},
                         "stages": [{"type": "sft"}, {"type": "dpo"}]})


def test_a_target_the_model_lacks_is_named_at_load(tmp_path):
    from vlmfast.policy import load_policy

    cfg = load_config(raw={"model": {"lora": {"target_modules": ["q_proj", "qkv_proj"]}}, "data": {"synthetic": {}},
                           "stages": [{"type": "sft"}]})
    with pytest.raises(ConfigError, match=r"no linear layer named \['qkv_proj'\]"):
        load_policy(cfg, None, "cpu")


def test_the_plan_counts_no_reference_copy_and_adapter_states_only():
    from vlmfast.plan import GiB, model_size, plan

    seven_b = "Qwen/Qwen2.5-VL-7B-Instruct"
    # adapters of rank 64 on 28 layers: r x (in + out) for q, o (3584 -> 3584), k, v (3584 -> 512), gate, up, down
    # (3584 <-> 18944)
    adapters = 28 * 64 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    size = model_size(seven_b, lora=LoraSettings(r=64))
    assert size.trainable == adapters
    stages = [{"type": "dpo", "batch_size": 8}]
    full = load_config(raw={"model": {"path": seven_b, "dtype": "bfloat16"},
                            "deepspeed": {"zero_stage": 3, "precision": "bf16"}, "data": {"synthetic": {}},
                            "stages": stages})
    lora = copy.deepcopy(full)
    lora.model.lora = LoraSettings(r=64)
    (pf,), (pl,) = plan(full, gpus=8, gpu_memory=80 * GiB), plan(lora, gpus=8, gpu_memory=80 * GiB)
    assert "reference engine" in pf.update and "reference engine" not in pl.update
    # the 16-bit base split over 8 GPUs, the largest layer gathered, and 16-18 B per adapter parameter / 8
    base = 2 * (size.params - adapters) / 8
    assert base < pl.update["policy states"] - 4 * size.largest_layer < base + 18 * adapters / 8 + 0.1 * GiB
    assert pl.update["policy states"] < 0.25 * pf.update["policy states"]
    # the head is frozen: the fused op keeps no fp32 gradient buffers of it (2 x 4 V H), unless trained whole
    assert pf.update["fused op buffers"] - pl.update["fused op buffers"] == 2 * 4 * 152064 * 3584
    lora.model.lora.modules_to_save = ["lm_head"]
    assert plan(lora, gpus=8, gpu_memory=80 * GiB)[0].update["fused op buffers"] == pf.update["fused op buffers"]


def _live_parameter_numel() -> int:
    gc.collect()
    return sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.nn.Parameter))


@pytest.mark.slow
def test_sft_grpo_cw_dpo_with_lora_trains_with_one_model_in_memory(tmp_path, monkeypatch):
    from vlmfast import policy
    from vlmfast.stages.context import StageContext
    from vlmfast.train import run

    stages = [{"type": "sft", "name": "sft", "steps": 3, "lr": 5e-3, "batch_size": 8},
              {"type": "grpo", "name": "grpo", "steps": 2, "lr": 1e-3, "batch_size": 2, "group_size": 4,
               "kl_coef": 0.1, "entropy_coef": 0.5, "max_new_tokens": 8},  # a gradient when every reward is 0
              {"type": "cw_dpo", "name": "cw_dpo", "steps": 2, "lr": 1e-3, "batch_size": 2, "max_new_tokens": 8}]
    raw = {"run": {"name": "lora", "out_dir": str(tmp_path), "checkpoint_every": 100, "threads": 2},
           "model": {"path": "tiny:student", "lora": {"r": 8, "alpha": 16, "vision": "lora"}},
           "data": {"synthetic": {"train": 32, "val": 4, "ood": 4}},
           "eval": {"every": 100, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 2},
           "stages": stages}
    frozen, seen = [], []
    monkeypatch.setattr(policy, "frozen_model", lambda *a, **k: frozen.append(a) or pytest.fail("a frozen copy"))
    referencing = StageContext.referencing

    def counted(ctx):  # at each use of pi_ref: every parameter alive in the process, against one model's
        seen.append((_live_parameter_numel(), sum(p.numel() for p in ctx.model.parameters())))
        return referencing(ctx)

    monkeypatch.setattr(StageContext, "referencing", counted)
    run(load_config(raw=raw))
    assert not frozen and len(seen) >= 4  # GRPO's KL (2 rollouts), CW-DPO (2 steps)
    for alive, one in seen:
        assert alive < 1.1 * one, (alive, one)  # one model (and its adapters), not a reference copy beside it
    recs = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    sft = [r["loss"] for r in train if r["stage"] == "sft"]
    assert sft[-1] < sft[0]  # the adapters learn
    grpo = [r for r in train if r["stage"] == "grpo"]
    assert grpo[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the stage start: no KL at step 1
    assert grpo[-1]["kl"] > 0  # and the adapters move away from it
    final = tmp_path / "lora" / "checkpoints" / "final-2" / "hf"
    assert (final / "adapter" / "adapter_model.safetensors").exists() and (final / "model.safetensors").exists()


def test_adapters_handed_on_load_as_their_base_with_them(batch, tmp_path):
    from vlmfast.checkpoint import ADAPTER_DIR, save_hf
    from vlmfast.policy import load_policy

    model, _, proc = adapted(modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    save_hf(model, proc, tmp_path / "hf", base="tiny:student")
    cfg = load_config(raw={"model": {"lora": {"r": R, "alpha": ALPHA, "modules_to_save": ["lm_head"],
                                              "handoff": "adapters"}},
                           "data": {"synthetic": {}}, "stages": [{"type": "sft"}, {"type": "grpo"}]})
    again, _ = load_policy(cfg, str(tmp_path / "hf" / ADAPTER_DIR), "cpu", proc)
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    other = load_config(raw={"model": {"lora": {"r": R, "alpha": ALPHA, "target_modules": ["q_proj"],  # fewer
                                              "handoff": "adapters"}},
                             "data": {"synthetic": {}}, "stages": [{"type": "sft"}]})
    misplaced = r"adapter tensor base_model\.model\.\S+_proj\.lora_[AB]\.weight has no place in this model"
    with pytest.raises(ConfigError, match=misplaced):
        load_policy(other, str(tmp_path / "hf" / ADAPTER_DIR), "cpu", proc)
    frozen_head = load_config(raw={"model": {"lora": {"r": R, "alpha": ALPHA, "handoff": "adapters"}},  # no lm_head
                                   "data": {"synthetic": {}}, "stages": [{"type": "sft"}]})
    with pytest.raises(ConfigError, match=r"base_model\.model\.lm_head\.weight trains lm_head whole, which "
                                          r"model\.lora\.modules_to_save does not list"):
        load_policy(frozen_head, str(tmp_path / "hf" / ADAPTER_DIR), "cpu", proc)


@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    from vlmfast.faults import FAIL_AT_ENV, SimulatedKill
    from vlmfast.train import run

    def recipe(name):
        return load_config(raw={
            "run": {"name": name, "out_dir": str(tmp_path), "checkpoint_every": 1, "threads": 2},
            "model": {"path": "tiny:student", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "projector": "full"}},
            "data": {"synthetic": {"train": 32, "val": 4, "ood": 4}},
            "eval": {"every": 100, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 0,
                     "at_start": False},
            "stages": [{"type": "sft", "name": "sft", "steps": 2, "lr": 5e-3, "batch_size": 4},
                       {"type": "dpo", "name": "dpo", "steps": 3, "lr": 5e-3, "batch_size": 2, "max_new_tokens": 6}]})

    run(recipe("whole"))
    monkeypatch.setenv(FAIL_AT_ENV, "1:2")  # killed inside DPO, after its step-2 checkpoint
    with pytest.raises(SimulatedKill):
        run(recipe("killed"))
    (states,) = (tmp_path / "killed" / "checkpoints" / "step-1-2" / "engine").glob("*model_states.pt")
    saved = set(torch.load(states, weights_only=False)["module"])
    assert saved and all(".lora_" in k or k.startswith("model.visual.merger.") for k in saved)  # no frozen base
    monkeypatch.delenv(FAIL_AT_ENV)
    run(recipe("killed"))

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]

    a, b = losses("whole"), losses("killed")
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for (stage, step, la), (_, _, lb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-5, abs=1e-6), (stage, step)


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    from vlmfast.models import save_pretrained

    model, proc = tiny_vlm("student", seed=0)
    return save_pretrained(model, proc, tmp_path_factory.mktemp("student") / "hf")


def qlora_config(path, **lora):
    return load_config(raw={"model": {"path": str(path), "lora": {"r": R, "alpha": ALPHA, "load_in_4bit": True,
                                                                  **lora}},
                            "data": {"synthetic": {}}, "stages": [{"type": "sft"}]})


def test_qlora_base_is_4bit_and_its_exports_are_the_dense_adapted_model(saved_student, batch, tmp_path):
    import bitsandbytes.functional as bnb
    from transformers import AutoModelForImageTextToText

    from vlmfast.checkpoint import save_hf
    from vlmfast.policy import load_policy

    model, proc = load_policy(qlora_config(saved_student), None, "cpu")
    q = model.model.language_model.layers[0].self_attn.q_proj
    assert type(q.base_layer).__name__ == "Linear4bit" and q.base_layer.weight.dtype == torch.uint8
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.visual.blocks[0].attn.qkv.weight.is_floating_point()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()
                                                                           if ".lora_" in n}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.copy_(0.05 * torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    loss = nll(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and q.lora_A["default"].weight.grad.abs().sum() > 0
    sent = {n: v() for n, _, v in served_tensors(model, changed_only=True)}
    W = bnb.dequantize_4bit(q.base_layer.weight.data, q.base_layer.weight.quant_state)
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight
    torch.testing.assert_close(sent["model.language_model.layers.0.self_attn.q_proj.weight"], W + ALPHA / R * B @ A)
    save_hf(model, proc, tmp_path / "hf", base=str(saved_student))
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    with torch.no_grad():
        dense = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
        assert getattr(dense.config, "quantization_config", None) is None
        assert all(p.is_floating_point() for p in dense.parameters())
        torch.testing.assert_close(dense(**inputs).logits, model.eval()(**inputs).logits, rtol=1e-4, atol=1e-4)
        # an eval forward without grad (generation) leaves the 4-bit weights as training reads them
        torch.testing.assert_close(bnb.dequantize_4bit(q.base_layer.weight.data, q.base_layer.weight.quant_state), W)


def test_a_4bit_base_loads_on_this_ranks_gpu():
    from vlmfast.models import device_map_of

    assert device_map_of("cuda", 3) == {"": 3}  # LOCAL_RANK 3's device, made current at start, not cuda:0
    assert device_map_of("cuda:1", 3) == {"": "cuda:1"} and device_map_of("cpu", None) == {"": "cpu"}


def test_qlora_is_refused_where_it_cannot_run(saved_student, monkeypatch):
    with pytest.raises(ConfigError, match=r"model\.lora\.load_in_4bit.*tiny model"):
        load_config(raw={"model": {"lora": {"load_in_4bit": True}}, "data": {"synthetic": {}},
                         "stages": [{"type": "sft"}]})
    with pytest.raises(ConfigError, match=r"model\.lora\.load_in_4bit.*ZeRO-3"):
        load_config(raw={"model": {"path": str(saved_student), "lora": {"load_in_4bit": True}},
                         "deepspeed": {"zero_stage": 3}, "data": {"synthetic": {}}, "stages": [{"type": "sft"}]})
    import importlib.util

    from vlmfast.policy import load_policy

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"load_in_4bit needs bitsandbytes \(pip install"):
        load_policy(qlora_config(saved_student), None, "cpu")


@pytest.mark.slow
def test_qlora_sft_then_dpo_trains_and_hands_on(saved_student, tmp_path):
    from vlmfast.train import run

    cfg = load_config(raw={
        "run": {"name": "qlora", "out_dir": str(tmp_path), "checkpoint_every": 100, "threads": 2},
        "model": {"path": str(saved_student), "lora": {"r": 8, "alpha": 16, "load_in_4bit": True}},
        "data": {"synthetic": {"train": 32, "val": 4, "ood": 4}},
        "eval": {"every": 100, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 0,
                 "at_start": False},
        "stages": [{"type": "sft", "name": "sft", "steps": 3, "lr": 5e-3, "batch_size": 8},
                   {"type": "dpo", "name": "dpo", "steps": 2, "lr": 1e-3, "batch_size": 2, "max_new_tokens": 6}]})
    run(cfg)
    recs = [json.loads(x) for x in (tmp_path / "qlora" / "metrics.jsonl").read_text().splitlines()]
    sft = [r["loss"] for r in recs if r["kind"] == "train" and r["stage"] == "sft"]
    assert sft[-1] < sft[0]
    dpo = next(r for r in recs if r["kind"] == "train" and r["stage"] == "dpo")
    assert dpo["loss"] == pytest.approx(0.6931, abs=1e-3)  # pi_ref (adapters off) is the stage start
    assert (tmp_path / "qlora" / "checkpoints" / "final-1" / "hf" / "adapter" / "adapter_config.json").exists()


def test_the_plan_counts_a_4bit_base_at_4_bits():
    from vlmfast.plan import GiB, plan

    seven_b = "Qwen/Qwen2.5-VL-7B-Instruct"
    lora = load_config(raw={"model": {"path": seven_b, "dtype": "bfloat16", "lora": {"r": 64}},
                            "deepspeed": {"zero_stage": 2, "precision": "bf16"}, "data": {"synthetic": {}},
                            "stages": [{"type": "dpo", "batch_size": 8}]})
    qlora = copy.deepcopy(lora)
    qlora.model.lora.load_in_4bit = True
    (pl,), (pq,) = plan(lora, gpus=8, gpu_memory=80 * GiB), plan(qlora, gpus=8, gpu_memory=80 * GiB)
    # the language model's linear weights, 28 layers of q, k, v, o, gate, up, down (no biases counted: weights only)
    linear = 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    saved = pl.update["policy states"] - pq.update["policy states"]
    assert saved == pytest.approx((2 - 4.127 / 8) * linear, rel=1e-3)


def test_scoring_passes_read_the_model_without_dropout(batch):
    """LoRA's dropout belongs to the training forward: pi_ref (adapters off) and pi_old score tokens in eval mode, the
    same log-probs every time, and the model is back in training mode after."""
    from types import SimpleNamespace

    from vlmfast.lora import AdaptersOff
    from vlmfast.models import eval_mode
    from vlmfast.stages.context import StageContext

    model, base, _ = adapted(dropout=0.5)
    model.train()
    with torch.no_grad():
        noisy = {nll(model, batch).item() for _ in range(3)}
        assert len(noisy) > 1  # the training forward drops adapter inputs
        with eval_mode(model):
            old = {nll(model, batch).item() for _ in range(3)}
        ctx = SimpleNamespace(reference=AdaptersOff(model))
        with StageContext.referencing(ctx) as ref:
            assert not ref.training
            ref_loss = nll(ref, batch).item()
    assert len(old) == 1 and ref_loss == nll(base.eval(), batch).item()
    assert model.training
