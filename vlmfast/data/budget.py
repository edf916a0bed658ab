"""The vLLM engine's sequence budget (`vllm.max_model_len`) and the prompts that fit it.

A prompt longer than the budget fails the whole `generate` call it is in (vLLM refuses the request), so prompts
over it are dropped when the data loads, with their count said, and a recipe left with too few is refused by
name. Without a given budget it is the longest prompt plus the longest response the recipe asks for: nothing
dropped, and no KV-cache room promised to sequences that cannot occur.

Prompt lengths are counted as the trainer sees them: the chat template and every image's tokens, through the
processor (with the run's image pixel limits).
"""

from __future__ import annotations

from .collate import collate


def prompt_lengths(processor, examples, *, batch_size: int = 64) -> list[int]:
    """Tokens of each example's prompt, image tokens included."""
    out = []
    for i in range(0, len(examples), batch_size):
        part = examples[i : i + batch_size]
        batch = collate(processor, [e.problem for e in part], [e.images for e in part])
        out += batch["attention_mask"].sum(1).tolist()
    return out


def longest_prompt(processor, data: dict) -> int:
    """The longest prompt (tokens, image tokens included) of every split in `data` ({split: examples})."""
    return max((max(prompt_lengths(processor, examples), default=0) for examples in data.values()), default=0)


def response_budgets(cfg) -> dict[str, int]:
    """The longest response each split is generated with: training prompts by the vLLM stages' max_new_tokens
    (an SFT stage only evaluates), every other split by the evaluation's."""
    from ..config import generation_engine
    from ..stages import stage_of

    train = [s.max_new_tokens for s in cfg.stages
             if generation_engine(cfg, s) == "vllm" and stage_of(s).samples_in_training]
    return {"train": max(train, default=0), "eval": cfg.eval.max_new_tokens}


def least_train_prompts(cfg) -> int:
    """The fewest training examples a recipe can run on: its largest step's batch of prompts."""
    from ..stages import stage_of

    return max((stage_of(s).prompts_per_step(s) for s in cfg.stages), default=1)


def check_images_per_prompt(cfg, data: dict) -> None:
    """A prompt with more images than vllm.limit_mm_per_prompt would fail the whole `generate` call it is in (vLLM
    refuses the request, as it does one over the budget): refused when the data loads, naming the example, the key
    and the value that lets every prompt through."""
    from ..config import ConfigError

    limit = cfg.vllm.limit_mm_per_prompt
    most = max(((len(e.images), split, e.id) for split, examples in data.items() for e in examples),
               default=(0, "", ""))
    if most[0] > limit:
        raise ConfigError(f"vllm.limit_mm_per_prompt: {limit}, but '{most[1]}' example {most[2]} has {most[0]} "
                          f"images; set it to {most[0]}")


def fit_to_budget(cfg, data: dict, processor) -> tuple[dict, int, dict[str, int], int]:
    """(data with the prompts that fit, the budget, {split: prompts dropped}, the longest prompt kept: what `vlmfast
    plan` and the trainer's fit check price, without counting every prompt again). Raises ConfigError when a split
    keeps fewer prompts than the recipe needs (training: its largest batch; an evaluation split: one)."""
    from ..config import ConfigError

    check_images_per_prompt(cfg, data)
    budgets = response_budgets(cfg)
    lengths = {split: prompt_lengths(processor, examples) for split, examples in data.items()}
    need = {split: budgets["train" if split == "train" else "eval"] for split in data}
    limit = cfg.vllm.max_model_len or max((max(ls, default=0) + need[split] for split, ls in lengths.items()),
                                          default=1)
    kept, dropped, longest_kept = {}, {}, 0
    for split, examples in data.items():
        fits = [n + need[split] <= limit for n in lengths[split]]
        kept[split] = [e for e, ok in zip(examples, fits) if ok]
        longest_kept = max([longest_kept] + [n for n, ok in zip(lengths[split], fits) if ok])
        dropped[split] = len(examples) - len(kept[split])
        least = least_train_prompts(cfg) if split == "train" else 1
        if len(kept[split]) < least:
            longest = max(lengths[split], default=0)
            raise ConfigError(f"vllm.max_model_len: {limit} tokens leave {len(kept[split])} of {len(examples)} "
                              f"'{split}' prompts (need {least}; the longest prompt is {longest} tokens, plus "
                              f"{need[split]} new tokens); raise it or lower the image pixels / max_new_tokens")
    return kept, limit, dropped, longest_kept
