"""vLLM's sequence budget: prompts whose tokens (image tokens included) plus the response budget exceed
vllm.max_model_len are dropped at load and counted; too few left is a config error naming the key; without a
given budget it is the longest prompt plus the longest response, and nothing is dropped."""

import pytest

from vlmfast.config import ConfigError, load_config
from vlmfast.data.budget import fit_to_budget, prompt_lengths
from vlmfast.data.collate import collate
from vlmfast.data.formats import read_geometry3k
from vlmfast.data.synthetic import build_task
from vlmfast.models import tiny_vlm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    build_task(root, sizes={"train": 24, "val": 6, "ood": 6}, seed=0)
    return {k: read_geometry3k(root / f"{k}.parquet") for k in ("train", "val", "ood")}


@pytest.fixture(scope="module")
def processor():
    return tiny_vlm("student", seed=0)[1]


def _cfg(max_model_len=None, batch_size=4):
    return load_config(raw={"vllm": {"max_model_len": max_model_len}, "eval": {"max_new_tokens": 16},
                            "data": {"synthetic": {"train": 24}},
                            "stages": [{"type": "grpo", "engine": "vllm", "batch_size": batch_size, "group_size": 2,
                                        "max_new_tokens": 24}]})


def test_prompt_lengths_count_image_tokens_and_ignore_the_batch(data, processor):
    lengths = prompt_lengths(processor, data["train"], batch_size=5)
    for e, n in zip(data["train"][:6], lengths):
        alone = collate(processor, [e.problem], [e.images])["input_ids"]
        assert n == alone.shape[1]
        image_tokens = int((alone == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
        assert image_tokens > 0 and n > image_tokens


def test_prompts_over_the_budget_are_dropped_and_counted(data, processor):
    lengths = {k: prompt_lengths(processor, v) for k, v in data.items()}
    kept, limit, dropped, longest = fit_to_budget(_cfg(), data, processor)  # no budget given: nothing dropped
    assert limit == max(max(lengths["train"]) + 24, max(lengths["val"]) + 16, max(lengths["ood"]) + 16)
    assert longest == max(max(v) for v in lengths.values())
    assert dropped == {"train": 0, "val": 0, "ood": 0} and kept["train"] == data["train"]
    cut = sorted(lengths["train"])[len(lengths["train"]) // 2] + 24  # the train median plus GRPO's responses
    kept, limit, dropped, longest = fit_to_budget(_cfg(cut), data, processor)
    assert limit == cut
    assert longest == max(max(prompt_lengths(processor, v), default=0) for v in kept.values())  # of the kept ones
    assert dropped["train"] == sum(n + 24 > cut for n in lengths["train"]) > 0
    assert all(n + 24 <= cut for n in prompt_lengths(processor, kept["train"]))
    assert dropped["val"] == sum(n + 16 > cut for n in lengths["val"])


def test_too_few_prompts_left_is_a_config_error(data, processor):
    shortest = min(prompt_lengths(processor, data["train"]))
    with pytest.raises(ConfigError, match=r"vllm.max_model_len: .* leave 0 of 24 'train' prompts \(need 4"):
        fit_to_budget(_cfg(shortest + 23), data, processor)
    with pytest.raises(ConfigError, match="need 24"):  # a batch larger than what fits
        fit_to_budget(_cfg(sorted(prompt_lengths(processor, data["train"]))[12] + 24, batch_size=24), data, processor)


def test_more_images_than_vllm_takes_per_prompt_is_a_config_error(data, processor):
    """vLLM refuses a prompt with more images than limit_mm_per_prompt (and the generate call with it): named at
    load with the example and the value that lets every prompt through."""
    import dataclasses

    three = dataclasses.replace(data["val"][2], images=data["val"][2].images * 3,
                                problem="<image><image>" + data["val"][2].problem)
    mixed = {**data, "val": data["val"][:2] + [three] + data["val"][3:]}
    with pytest.raises(ConfigError, match=rf"vllm.limit_mm_per_prompt: 1, but 'val' example {three.id} has 3 "
                                          r"images; set it to 3"):
        fit_to_budget(_cfg(), mixed, processor)
    cfg = _cfg()
    cfg.vllm.limit_mm_per_prompt = 3
    kept, *_ = fit_to_budget(cfg, mixed, processor)
    assert three in kept["val"]
