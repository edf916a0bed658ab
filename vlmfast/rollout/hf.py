"""HF engine: transformers `generate` on the training model itself (CPU and GPU), batched.

The sampler log-probs come from the scores `generate` actually sampled from (after temperature,
top-k and top-p), so with top_k=0 and top_p=1 they equal a forward pass of the model at the same
temperature on the generated tokens.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from ..data.collate import batch_rows, collate, collate_token_responses, to_device
from ..models import eval_mode, every_rank_agrees, head_token_stats, shared_images, trunk_hidden
from .base import Completion, Sampling, check_batch, end_of_completion, vision_token_ids


class _TokenSampler:
    """Every decoding step of `generate` as argmax(scores this returns): greedy returns the log-softmax of the
    logits; sampling returns log softmax(warped logits) + Gumbel noise (the Gumbel-max trick: the argmax is a
    sample of softmax(warped logits)). With `row_seeds` the noise of row r comes from its own generator: a
    row's samples depend on its seed only, never on which other prompts share its batch (or rank), and every
    prompt of a batch is sampled in one `generate` call; without, from torch's global generator.

    Used as the logits processor of greedy `generate`. Per step it keeps only the chosen token's log-prob
    (a [B] vector): never the [B, V] scores of every step, which at B=64 and V=152064 are 39 MB per token
    (`output_scores=True` kept them: ~80 GB at 2048 tokens).
    """

    def __init__(self, sampling: Sampling, device, row_seeds: list[int] | None = None):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.greedy = sampling.greedy
        self.gens = None if row_seeds is None else [torch.Generator(device=device).manual_seed(int(sd))
                                                    for sd in row_seeds]
        self.warpers = []  # greedy: the plain log-softmax (temperature 1)
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                self.warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.chosen_logp: list[torch.Tensor] = []  # [B] per decoding step
        self.noise: list[torch.Tensor] = []  # uniforms drawn ahead, one [rows, V] per decoding step

    def _uniforms(self, rows: int, V: int, device) -> torch.Tensor:
        if self.gens is None:
            return torch.rand(rows, V, device=device)
        # a block of decoding steps per generator call (one call per row per step is most of the sampler's
        # time); the block depends on V alone, never on the batch, so a row's noise still depends on its seed only
        if not self.noise:
            steps = max(1, min(16, (1 << 20) // V))
            block = torch.empty(steps, len(self.gens), V, device=device)
            for r, g in enumerate(self.gens):
                torch.rand(steps, V, generator=g, device=device, out=block[:, r])
            self.noise = list(block.unbind(0))[::-1]
        return self.noise.pop()

    def __call__(self, input_ids, scores):
        s = scores.float()
        for w in self.warpers:
            s = w(input_ids, s)
        logp = torch.log_softmax(s, -1)
        if self.greedy:
            out = logp
        else:
            u = self._uniforms(s.shape[0], s.shape[-1], s.device)
            out = logp - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        self.chosen_logp.append(logp.gather(-1, out.argmax(-1, keepdim=True))[:, 0])
        return out

    def logprobs(self) -> torch.Tensor:
        """[B, steps]: the log-prob of each step's token under the distribution it was drawn from, since the last
        call (then forgotten)."""
        out, self.chosen_logp = torch.stack(self.chosen_logp, 1), []
        return out

    def keep(self, rows: torch.Tensor) -> None:
        """Only `rows` decode on: their generators and the noise already drawn for them carry over, so each row's
        noise stream is the one it would have had in an uninterrupted call."""
        if self.gens is not None:
            self.gens = [self.gens[i] for i in rows.tolist()]
        self.noise = [u[rows.to(u.device)] for u in self.noise]


class _HalfEnded:
    """A stopping criterion for `generate`: every row stops once half of the rows the call started with have ended
    (an end-of-turn or a vision token: the completion is cut there), so the engine can go on with the others alone
    instead of decoding finished rows to the longest one's end."""

    def __init__(self, start: int, end_ids: torch.Tensor):
        self.start, self.end_ids = start, end_ids

    def __call__(self, input_ids, scores, **kwargs):
        ended = torch.isin(input_ids[:, self.start :], self.end_ids).any(1)
        return ended | (2 * ended.sum() >= ended.numel())


def _cache_kwarg(model) -> str:
    # transformers renamed generate's and the models' `past_key_values` to `cache` (5.2x)
    return "cache" if "cache" in inspect.signature(type(model.model).forward).parameters else "past_key_values"


def _first_of_runs(batch: dict, copies: int) -> torch.Tensor | None:
    """The first row of each run of `copies` identical prompt rows, if the batch is made of such runs."""
    ids = batch["input_ids"]
    rows = ids.shape[0]
    if copies < 2 or rows % copies or ids.shape[1] < 2:
        return None
    first = torch.arange(0, rows, copies, device=ids.device)
    for k, v in batch.items():
        if k not in ("pixel_values", "image_grid_thw") and not torch.equal(v[first].repeat_interleave(copies, 0), v):
            return None
    if "mm_token_type_ids" in batch and batch["mm_token_type_ids"][:, -1].any():
        return None  # the token generation reads first must be text
    return first


def shared_prompt_prefill(model, batch: dict, copies: int, *, synced_ranks: bool = False) -> dict:
    """`generate` inputs for a batch whose rows come in runs of `copies` identical prompts (n samples each):
    every prompt but its last token goes through the model once, its KV cache repeated for the copies, so
    generation's prefill runs on one row per prompt instead of n (it then reads the last token only).

    Other batches get the plain inputs (images still encoded once per run: `shared_images`). With
    `synced_ranks` (a partitioned model gathering in every forward) all ranks take the same path.
    """
    from transformers import DynamicCache

    first = _first_of_runs(batch, copies) if hasattr(model, "model") else None
    if synced_ranks:
        first = first if every_rank_agrees(model, first is not None) else None
    if first is None:
        return shared_images(model, batch)
    unique = batch_rows(batch, first.tolist())  # the first row of each run, with its images
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):  # all but the last prompt token
        if k in unique:
            unique[k] = unique[k][:, :-1]
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers
        cache = DynamicCache()
    model.model(**shared_images(model, unique), use_cache=True, **{_cache_kwarg(model): cache})
    cache.batch_repeat_interleave(copies)
    if getattr(model.model, "rope_deltas", None) is not None:  # Qwen-VL: the 3D positions' offset, per row
        model.model.rope_deltas = model.model.rope_deltas.repeat_interleave(copies, 0)
    rest = {k: v for k, v in batch.items() if k != "pixel_values"}
    return {**rest, _cache_kwarg(model): cache}


class HFEngine:
    """`gather`: a context-manager factory entered once around each `generate` call; under ZeRO-3 the
    trainer passes `vlmfast.zero.gathered_for_generation` of its engine, so decoding runs on whole
    weights instead of re-gathering every layer at every token."""

    def __init__(self, model, processor, *, batch_size: int = 64, gather=None, synced_ranks: bool = False,
                 drop_finished: bool = True):
        self.model, self.processor, self.batch_size = model, processor, batch_size
        # a long-tailed rollout decodes its last tokens on the rows still going, not on the whole batch: generate
        # stops when half its rows have ended and continues the rest from their KV cache (never with synced_ranks:
        # every rank must then run as many forwards)
        self.drop_finished = drop_finished and not synced_ranks
        self.gather = gather or contextlib.nullcontext
        # a model left partitioned across ranks gathers in every forward: all ranks must run the same
        # number of decoding steps, until the last rank's last sequence ends (HF's synced_gpus)
        self.synced_ranks = synced_ranks
        tok = processor.tokenizer
        self.eos_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tok.pad_token_id
        self.vision_ids = vision_token_ids(tok)

    def sync_weights(self, model) -> None:
        """The HF engine samples from the trainer's own model: nothing to copy unless given another."""
        if model is not self.model:
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            self.model.load_state_dict(trainable, strict=False)

    @contextlib.contextmanager
    def awake(self, model=None, *, stale: bool = False, timed_sync=contextlib.nullcontext):
        """The engine interface's generation block (vllm_engine.VLLMEngine.awake): nothing sleeps here; synced
        when stale (a no-op for the trainer's own model)."""
        if stale and model is not None:
            with timed_sync():
                self.sync_weights(model)
        yield self

    def close(self) -> None:
        """Nothing of its own to free: it generates with the trainer's model."""

    @torch.no_grad()
    def generate(self, problems: list[str], images: list[list], n: int = 1, sampling: Sampling | None = None,
                 *, seeds: list[int] | None = None):
        """n completions per prompt. `seeds` (one per prompt) make each prompt's samples depend on its
        own seed only, not on the batch it shares: the same rollouts on 1 rank or 8."""
        check_batch(problems, images, n)
        sampling = sampling or Sampling()
        if seeds is not None and len(seeds) != len(problems):
            raise ValueError(f"{len(problems)} prompts but {len(seeds)} seeds")
        out: list[list[Completion]] = []
        per_batch = max(1, self.batch_size // n)
        device = next(self.model.parameters()).device
        rng = (torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
               if sampling.seed is not None else contextlib.nullcontext())
        with rng, eval_mode(self.model), self.gather():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for i in range(0, len(problems), per_batch):
                ps, ims = problems[i : i + per_batch], images[i : i + per_batch]
                rep_p = [p for p in ps for _ in range(n)]
                rep_i = [im for im in ims for _ in range(n)]
                # sample j of a prompt with seed s draws its noise from seed (s, j) alone
                row_seeds = None if seeds is None else [seeds[i + k] * 1009 + j for k in range(len(ps))
                                                        for j in range(n)]
                flat = self._generate_batch(rep_p, rep_i, sampling, row_seeds, copies=n)
                out += [flat[j * n : (j + 1) * n] for j in range(len(ps))]
        return out

    def _generate_batch(self, problems, images, sampling: Sampling, row_seeds=None, copies: int = 1
                        ) -> list[Completion]:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        device = next(self.model.parameters()).device
        batch = to_device(collate(self.processor, problems, images), device)
        # greedy decoding over the sampler's scores: it samples, and keeps one log-prob per token (no output_scores)
        sampler = _TokenSampler(sampling, device, row_seeds)
        kw = dict(eos_token_id=self.eos_id, pad_token_id=self.pad_id, return_dict_in_generate=True,
                  synced_gpus=self.synced_ranks, do_sample=False, temperature=None, top_p=None, top_k=None,
                  logits_processor=LogitsProcessorList([sampler]))
        # n copies of a prompt: its prefill once
        inputs = shared_prompt_prefill(self.model, batch, copies, synced_ranks=self.synced_ranks)
        B, steps = batch["input_ids"].shape[0], sampling.max_new_tokens
        new = torch.full((B, steps), self.pad_id, dtype=torch.long)
        logp = torch.zeros(B, steps)  # under the distribution each token was drawn from (greedy: T = 1)
        rows, done = torch.arange(B), 0  # the rows still decoding, and the tokens each has
        end_ids = torch.tensor([self.eos_id, *self.vision_ids], device=device)  # on the device once, not per token
        while True:
            stop = [_HalfEnded(inputs["input_ids"].shape[1], end_ids)] if self.drop_finished else []
            res = self.model.generate(**inputs, **kw, max_new_tokens=steps - done,
                                      stopping_criteria=StoppingCriteriaList(stop))
            got = res.sequences[:, inputs["input_ids"].shape[1] :].cpu()
            new[rows, done : done + got.shape[1]] = got
            logp[rows, done : done + got.shape[1]] = sampler.logprobs().cpu()
            done += got.shape[1]
            going = ~torch.isin(new[rows, :done], end_ids).any(1)
            if done >= steps or not going.any() or not self.drop_finished:
                break
            inputs = self._continued(inputs, res, going.nonzero()[:, 0], sampler)
            rows = rows[going]
        out = []
        for b in range(B):
            ids, finish = end_of_completion(new[b].tolist(), self.eos_id, self.vision_ids)
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
            out.append(Completion(token_ids=ids, text=text, logprobs=logp[b, : len(ids)].tolist(),
                                  finish_reason=finish))
        return out

    def _continued(self, inputs: dict, res, keep: torch.Tensor, sampler: _TokenSampler) -> dict:
        """`generate` inputs that continue rows `keep` of a stopped call from its KV cache (transformers continues
        from a cache: it feeds the uncached last token on), with their 3-D rope offsets and noise streams."""
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        device = res.sequences.device
        keep_dev = keep.to(device)
        cache.batch_select_indices(keep_dev)
        if getattr(self.model.model, "rope_deltas", None) is not None:  # Qwen-VL: per-row offsets of the positions
            self.model.model.rope_deltas = self.model.model.rope_deltas[keep_dev]
        sampler.keep(keep)
        seqs = res.sequences[keep_dev]
        mask = inputs["attention_mask"][keep_dev]
        mask = torch.cat([mask, mask.new_ones(len(keep), seqs.shape[1] - mask.shape[1])], 1)
        return {"input_ids": seqs, "attention_mask": mask, _cache_kwarg(self.model): cache}

    @torch.no_grad()
    def score(self, problems: list[str], images: list[list], response_ids: list[list[int]], *,
              temperature: float = 1.0) -> list[list[float]]:
        """Per-token log-probs of each response (token ids) under the engine's model at `temperature`."""
        check_batch(problems, images, 1)
        if len(response_ids) != len(problems):
            raise ValueError(f"{len(problems)} prompts but {len(response_ids)} responses")
        out = []
        device = next(self.model.parameters()).device
        with eval_mode(self.model):
            for i in range(0, len(problems), self.batch_size):
                sl = slice(i, i + self.batch_size)
                host = collate_token_responses(self.processor, problems[sl], images[sl], response_ids[sl])
                batch = to_device(host, device)
                hidden = trunk_hidden(self.model, **batch)  # it drops labels and bookkeeping itself
                logp = head_token_stats(self.model, hidden, batch["labels"], temperature=temperature,
                                        outputs=("logp",)).logp.cpu()  # one copy to the host
                for b, ids in enumerate(response_ids[sl]):
                    start = int(host["prompt_lengths"][b]) - 1
                    out.append(logp[b, start : start + len(ids)].tolist())
        return out
