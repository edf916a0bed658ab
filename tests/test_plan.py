"""`vlmfast plan`: parameter counts from the meta-device model agree with the published model cards, the
model states follow DeepSpeed's per-parameter accounting, and a recipe that cannot fit exits 2 naming its
largest component; every shipped 7B recipe fits 8 GPUs of 80 GB. The measured calibration on CPU:
test_plan_calibration.py."""

from pathlib import Path

import pytest

from vlmfast.plan import GiB, ModelSize, main, model_size, model_states_bytes, parse_bytes

ROOT = Path(__file__).resolve().parents[1]

# the "Model size" the Hugging Face model cards give for Qwen/Qwen2.5-VL-*-Instruct
PUBLISHED = {"Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9, "Qwen/Qwen2.5-VL-7B-Instruct": 8.29e9,
             "Qwen/Qwen2.5-VL-32B-Instruct": 33.5e9, "Qwen/Qwen2.5-VL-72B-Instruct": 73.4e9}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_match_the_model_cards(name):
    assert model_size(name).params == pytest.approx(PUBLISHED[name], rel=5e-3)


def test_tiny_counts_and_freezing():
    from vlmfast.models import tiny_vlm

    model = tiny_vlm("student")[0]
    size = model_size("tiny:student", freeze_vision=True)
    assert size.params == sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.model.visual.named_parameters() if not n.startswith("merger."))
    assert size.trainable == size.params - vision


def test_model_states_per_parameter():
    size = ModelSize(params=10**9, trainable=10**9, largest_layer=10**8, hidden=1, layers=1, vocab=1)
    # mixed precision: 16-bit weights + fp32 master weights, Adam m and v and fp32 grads, 16-bit grads
    assert model_states_bytes(size, 0, 8, "bf16") == 20 * 10**9
    assert model_states_bytes(size, 0, 8, "fp32") == 16 * 10**9
    # ZeRO-3 on 8 GPUs: 18 bytes per parameter sharded, plus the largest layer gathered in fp32
    assert model_states_bytes(size, 3, 8, "bf16") == 18 * 10**9 // 8 + 4 * 10**8
    frozen = ModelSize(params=10**9, trainable=5 * 10**8, largest_layer=10**8, hidden=1, layers=1, vocab=1)
    assert model_states_bytes(frozen, 3, 8, "bf16") == 18 * 5 * 10**8 // 8 + 4 * 10**8 + 2 * 5 * 10**8 // 8


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("1.5gb") == 1.5e9 and parse_bytes("123") == 123


RECIPES_7B = sorted((ROOT / "recipes").glob("qwen25vl7b_*.yaml"))


@pytest.mark.parametrize("path", RECIPES_7B, ids=[p.stem for p in RECIPES_7B])
def test_every_shipped_7b_recipe_fits_8_gpus_of_80gb(path, capsys):
    assert main(["--config", str(path), "--gpus", "8", "--gpu-memory", "80GiB"]) == 0, capsys.readouterr().err
    assert "DOES NOT FIT" not in capsys.readouterr().out


def test_a_recipe_that_cannot_fit_exits_2_naming_its_largest_component(capsys):
    # without micro-batches: the whole update of 16 prompts x 5 samples x ~3k tokens per GPU in one forward
    grpo = str(ROOT / "recipes" / "qwen25vl7b_geo3k_grpo.yaml")
    rc = main(["--config", grpo, "stages.0.micro_batch_size=null"])
    captured = capsys.readouterr()
    assert rc == 2 and "does not fit: stage grpo" in captured.err and "activations" in captured.err
    assert "policy states" in captured.out
    # micro-batches of 8 of the 80 sequences: a tenth of the activations (they are linear in tokens)
    from vlmfast.config import load_config
    from vlmfast.plan import plan

    def activations(micro):
        cfg = load_config(grpo, [f"stages.0.micro_batch_size={micro}"])
        return plan(cfg, gpus=8, gpu_memory=80 * GiB)[0].update["activations"]

    assert activations("null") == pytest.approx(10 * activations(8), rel=1e-6)

    def by_budget(tokens):  # whole sequences up to a token budget: the activations of that many tokens
        cfg = load_config(grpo, ["stages.0.micro_batch_size=null", f"stages.0.max_tokens_per_micro_batch={tokens}"])
        return plan(cfg, gpus=8, gpu_memory=80 * GiB)[0].update["activations"]

    assert by_budget(8192) == pytest.approx(2 * by_budget(4096), rel=1e-6)
    assert by_budget(10**6) == pytest.approx(activations("null"), rel=1e-6)  # above the whole update: the update
    assert by_budget(16) == pytest.approx(by_budget(32), rel=1e-6)  # below one sequence: one sequence alone
    from vlmfast.config import ConfigError
    from vlmfast.plan import check_fits

    opd = str(ROOT / "recipes" / "qwen25vl7b_geo3k_opd_grpo.yaml")
    check_fits(load_config(opd, ["stages.1.batch_size=8"]), gpus=8, gpu_memory=80 * GiB)  # the OPD stage fits
    cfg = load_config(opd, ["stages.0.vllm_memory_share=0.7"])
    with pytest.raises(ConfigError, match="stage opd needs .* largest component is vLLM"):
        check_fits(cfg, gpus=8, gpu_memory=80 * GiB)


def test_sft_recipe_stage_fits_and_bad_input_is_named(capsys):
    sft = str(ROOT / "recipes" / "qwen25vl7b_geo3k_sft_grpo.yaml")
    assert main(["--config", sft, "stages.1.batch_size=8"]) == 0
    assert "sft: peak" in capsys.readouterr().out
    assert main(["--config", sft, "--gpu-memory", "lots"]) == 2
    assert "plan error" in capsys.readouterr().err
    for option, value in (("--gpus", "0"), ("--gpus", "-8"), ("--prompt-tokens", "0")):  # argparse: exit 2
        with pytest.raises(SystemExit) as e:
            main(["--config", sft, option, value])
        assert e.value.code == 2 and f"argument {option}: must be >= 1" in capsys.readouterr().err


def test_fused_op_buffers_hold_the_one_pass_band_the_kernels_plan():
    """At the 7B head (H >= one_pass.TRITON_MIN_HIDDEN) the plan counts the band token_loss really allocates on the
    Triton backend (budget_rows: fp32 logits and their bf16 dz), twice for a loss over groups (a band may stretch to
    a preference pair); below, token_stats' dz chunk."""
    import torch

    from vlmfast.ops import one_pass
    from vlmfast.plan import fused_op_bytes

    V, H, tokens = 152064, 3584, 100_000
    dw = 2 * 4 * V * H
    meta = torch.empty(tokens, H, dtype=torch.bfloat16, device="meta"), torch.empty(V, H, device="meta")
    band = one_pass.budget_rows("triton", tokens, *meta) * V  # logits of one band
    assert abs(fused_op_bytes(V, H, tokens, 2) - dw - band * (4 + 2)) <= 6 * V  # rows rounded down
    stretched = fused_op_bytes(V, H, tokens, 2, grouped=True) - dw
    assert abs(stretched - one_pass.GROUP_STRETCH * band * (4 + 2)) <= 6 * V * one_pass.GROUP_STRETCH
    with_teacher = fused_op_bytes(V, H, tokens, 2, teacher_head=True) - dw  # a fused teacher's band of fp32 logits
    assert abs(with_teacher - band * (4 + 4 + 2)) <= 10 * V
    assert fused_op_bytes(V, 896, 10, 2) == 2 * 4 * V * 896 + 10 * V * 2  # token_stats' dz chunk (H < 2048)


def test_phases_are_what_the_trainer_keeps_alive_together():
    """vLLM's share only while it is awake (rollout, evaluation), never beside the update's activations; with
    vllm.offload_optimizer the rollout keeps only the 16-bit weight shards of the policy's states; the HF engine
    instead gathers the policy and holds generate's KV cache; a checkpoint's export gathers one module at a time."""
    from vlmfast.config import load_config
    from vlmfast.plan import plan

    grpo = str(ROOT / "recipes" / "qwen25vl7b_geo3k_grpo.yaml")
    size = model_size("Qwen/Qwen2.5-VL-7B-Instruct", freeze_vision=True)
    (p,) = plan(load_config(grpo), gpus=8, gpu_memory=80 * GiB)
    assert list(p.phases) == ["update", "rollout", "evaluation", "checkpoint"]
    assert "vLLM (weights + KV cache)" not in p.update and "activations" not in p.phases["rollout"]
    assert p.phases["rollout"]["vLLM (weights + KV cache)"] == int(0.5 * 80 * GiB)
    (off,) = plan(load_config(grpo, ["vllm.offload_optimizer=true"]), gpus=8, gpu_memory=80 * GiB)
    assert off.phases["rollout"]["policy states"] == 2 * size.params // 8  # bf16 weight shards stay
    assert off.update == p.update
    (hf,) = plan(load_config(grpo, ["stages.0.engine=hf"]), gpus=8, gpu_memory=80 * GiB)
    assert hf.phases["rollout"]["policy gathered for generate"] == 2 * size.params
    # 64 rows of 1024 + 2048 tokens: 28 layers of bf16 keys and values of 4 heads x 128
    assert hf.phases["rollout"]["generate buffers"] == 64 * 3072 * 28 * 2 * 512 * 2 + 16 * 64 * 152064 * 4
    # the export gathers a module at a time: the largest is the 7B's embedding or head, 152064 x 3584
    assert p.phases["checkpoint"]["largest module gathered for the export"] == 2 * 152064 * 3584


def _longest_prompt_by_hand(cfg) -> int:
    """Each prompt through the processor one at a time, its input_ids counted: the chat template and the image
    tokens, as the model sees them."""
    from vlmfast.data.loading import load_data
    from vlmfast.data.prompts import messages
    from vlmfast.models import tiny_vlm

    processor = tiny_vlm("student")[1]
    longest = 0
    for examples in load_data(cfg).values():
        for e in examples:
            text = processor.apply_chat_template(messages(e.problem),
                                                 add_generation_prompt=True, tokenize=False)
            ids = processor(text=[text], images=e.images or None, return_tensors="pt")["input_ids"]
            longest = max(longest, ids.shape[1])
    return longest


def test_the_plan_prices_the_longest_prompt_of_the_recipes_data(tmp_path, capsys):
    """Without --prompt-tokens the plan reads the recipe's data as the trainer does (image tokens at the run's pixel
    limits); without the data here, the longest prompt vllm.max_model_len admits; else an assumption it names."""
    from vlmfast.config import load_config
    from vlmfast.plan import DEFAULT_PROMPT_TOKENS, recipe_prompt_tokens

    tiny = [str(ROOT / "recipes" / "tiny_sft_grpo.yaml"), f"run.out_dir={tmp_path}",
            "data.synthetic.train=24", "data.synthetic.val=4", "data.synthetic.ood=4"]
    cfg = load_config(tiny[0], tiny[1:])
    tokens, source = recipe_prompt_tokens(cfg)
    assert tokens == _longest_prompt_by_hand(cfg) and "recipe's data (32 prompts)" in source
    # the run's pixel limit: images resized to at most 2 x 28 x 28 pixels, at most 2 image tokens each
    smaller, _ = recipe_prompt_tokens(load_config(tiny[0], tiny[1:] + ["vllm.image_max_pixels=1568"]))
    assert tokens - 9 <= smaller <= tokens - 7  # 84 x 84 px: 3 x 3 merged patches = 9 tokens; now 1 or 2
    assert main(["--config", *tiny[:1], "--gpus", "1", *tiny[1:]]) == 0
    assert f"prompts of {tokens} tokens: the longest prompt" in capsys.readouterr().out

    grpo = str(ROOT / "recipes" / "qwen25vl7b_geo3k_grpo.yaml")  # a hub dataset: not read
    assert recipe_prompt_tokens(load_config(grpo, ["vllm.max_model_len=4096"])) == (
        4096 - 2048, "the longest prompt vllm.max_model_len=4096 admits (the recipe's data is not on this machine)")
    tokens, source = recipe_prompt_tokens(load_config(grpo))
    assert tokens == DEFAULT_PROMPT_TOKENS and source.startswith("assumed") and "--prompt-tokens" in source
    from vlmfast.plan import plan

    short, long = (plan(load_config(grpo), gpus=8, gpu_memory=80 * GiB, prompt_tokens=n)[0] for n in (512, 4096))
    assert long.update["activations"] > short.update["activations"]


@pytest.mark.parametrize("gpus", [8, 16, 32, 64])
@pytest.mark.parametrize("path", RECIPES_7B, ids=[p.stem for p in RECIPES_7B])
def test_shipped_7b_recipes_are_valid_from_8_to_64_ranks(path, gpus, capsys):
    """The trainer's rank check (config.check_ranks, run before anything loads) and the plan agree at every size a
    user scales to: the GRPO updates' micro-batches follow the rows a rank holds (20 at 32 ranks: 7, 7, 6)."""
    from vlmfast.config import check_ranks, load_config

    check_ranks(load_config(str(path)), gpus)
    assert main(["--config", str(path), "--gpus", str(gpus), "--prompt-tokens", "1024"]) == 0, capsys.readouterr().err


def test_the_plan_refuses_a_world_size_the_trainer_refuses(capsys):
    grpo = str(ROOT / "recipes" / "qwen25vl7b_geo3k_grpo.yaml")
    assert main(["--config", grpo, "--gpus", "48"]) == 2
    assert "stages[0].batch_size=128 is not divisible by the 48 ranks" in capsys.readouterr().err


def test_grpo_gets_the_largest_token_budget_that_fits(capsys):
    """On GPUs the trainer gives a GRPO stage without micro-batch settings the plan's largest token budget (its
    GPU branch, fit_to_gpu, reached here with the device's memory passed in): the budget fits, one step more does
    not; a stage with micro_batch_size, or whose whole update fits, keeps its settings."""
    from vlmfast.config import ConfigError, load_config
    from vlmfast.plan import BUDGET_STEP, check_fits, token_budgets
    from vlmfast.train import fit_to_gpu

    grpo = str(ROOT / "recipes" / "qwen25vl7b_geo3k_grpo.yaml")
    cfg = load_config(grpo, ["stages.0.micro_batch_size=null"])
    budgets = fit_to_gpu(cfg, 1024, gpus=8, gpu_memory=80 * GiB)
    (tokens,) = budgets.values()
    assert tokens % BUDGET_STEP == 0 and cfg.stages[0].max_tokens_per_micro_batch == tokens
    assert f"stages[0].max_tokens_per_micro_batch={tokens}: the largest token budget" in capsys.readouterr().out
    over = load_config(grpo, ["stages.0.micro_batch_size=null",
                              f"stages.0.max_tokens_per_micro_batch={tokens + BUDGET_STEP}"])
    with pytest.raises(ConfigError, match="largest component is activations"):
        check_fits(over, gpus=8, gpu_memory=80 * GiB, prompt_tokens=1024)
    assert token_budgets(load_config(grpo), gpus=8, gpu_memory=80 * GiB, prompt_tokens=1024) == {}
    whole = load_config(grpo, ["stages.0.micro_batch_size=null"])
    assert token_budgets(whole, gpus=8, gpu_memory=10**15, prompt_tokens=1024) == {}
