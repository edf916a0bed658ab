"""The whole GRPO step, vlmfast's trainer vs TRL's GRPOTrainer, side by side in one run, each in a fresh
process: the same tiny Qwen2.5-VL student, the same synthetic prompts with their images, 8 prompts x 8
samples, temperature 1, one update per rollout, no KL, the HF engine (transformers `generate`) in both, the same
reward function. Two cases:

- short: up to 20 new tokens, as sampled (the random student rarely ends early: every response about as long);
- long_tail: up to 256 new tokens, each response ended at a length drawn from a long tail (most 4-24 tokens, some
  24-64, one in 20 at the maximum), the same sequence of lengths in every trainer (an EOS forced by a logits
  processor patched into `generate`): what a geometry rollout looks like, where padding every row to the longest
  is most of the work. vlmfast runs padding-free (packed) and padded (model.packed_sequences: false).

Each row counts the tokens its update forwards computed and the real ones among them (computed / real = 1 when
nothing is padding).

    python -m bench.grpo_step                 # make bench-grpo: both cases
    python -m bench.grpo_step --case long_tail --steps 4

vlmfast's row splits its step into the trainer's own phases (timing/generate_s, logprobs_s, sync_s,
update_s); TRL runs in its venv (`.venv-trl`, made by `make bench-grpo`). Step time is the median over the
steps after the first (warm-up); peak memory is the process's peak RSS. TRL's step time moves with its sampled
completion lengths (0.6-0.7 s between runs), so the pair runs `--repeats` times, alternating, and the table
gives each trainer's median over the runs, their range, and the ratio of the medians. Rows go to
bench/results/grpo_step.jsonl, the table to grpo_step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
PROMPTS, GROUP, LR = 8, 8, 1e-5
CASES = {"short": 20, "long_tail": 256}  # max_new_tokens
PROVIDERS = {"short": ("vlmfast", "trl"), "long_tail": ("vlmfast", "vlmfast-padded", "trl")}
PHASES = ("generate", "logprobs", "sync", "update")


def long_tail_lengths(n: int, max_new: int, rng) -> list[int]:
    """Response lengths (EOS included): most short, some medium, one in 20 at max_new."""
    out = []
    for _ in range(n):
        u = rng.random()
        out.append(max_new if u < 0.05 else rng.randint(24, 64) if u < 0.2 else rng.randint(4, 24))
    return out


def _force_long_tail(max_new: int) -> None:
    """Every `generate` in this process ends each response at a long-tail length (one seeded sequence of draws,
    the same in every trainer's process)."""
    import random

    import torch
    from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

    rng = random.Random(0)
    own = GenerationMixin.generate
    last = {}  # the latest call's rows as its last step saw them: sequences, first new column, drawn lengths

    def drawn(input_ids):
        """(start, lengths) of a call's rows: a new batch draws its lengths; a call that continues rows of the
        latest one (vlmfast's HF engine goes on with the unfinished rows alone) keeps theirs."""
        prev = last.get("seqs")
        if prev is not None and input_ids.shape[1] == prev.shape[1] + 1:
            free, found = list(range(prev.shape[0])), []
            for row in input_ids[:, :-1]:
                match = next((r for r in free if torch.equal(prev[r], row)), None)
                if match is None:
                    break
                free.remove(match)
                found.append(match)
            else:
                return last["start"], last["lengths"][found]
        return input_ids.shape[1], torch.tensor(long_tail_lengths(input_ids.shape[0], max_new, rng))

    class EndAt(LogitsProcessor):
        def __init__(self, eos):
            self.eos, self.start, self.lengths = eos, None, None

        def __call__(self, input_ids, scores):
            if self.start is None:
                self.start, self.lengths = drawn(input_ids)
            last.update(seqs=input_ids.clone(), start=self.start, lengths=self.lengths)
            end = (input_ids.shape[1] - self.start + 1) >= self.lengths
            scores[end] = float("-inf")
            scores[end, self.eos] = 0.0
            scores[~end, self.eos] = float("-inf")  # no earlier end: the drawn length decides
            return scores

    def generate(self, *args, **kwargs):
        eos = self.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), EndAt(eos)])
        return own(self, *args, **kwargs)

    GenerationMixin.generate = generate


def _count_update_tokens() -> dict:
    """Tokens the trunk computes in forwards with a gradient (the update's) and the real ones among them."""
    import torch
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q

    counts = {"computed_tokens": 0, "real_tokens": 0}
    own = q.Qwen2_5_VLModel.forward

    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        if torch.is_grad_enabled() and input_ids is not None:
            counts["computed_tokens"] += input_ids.numel()
            counts["real_tokens"] += int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
        return own(self, input_ids, attention_mask, *args, **kwargs)

    q.Qwen2_5_VLModel.forward = forward
    return counts


def _task(tmp: str, n: int):
    from vlmfast.data.synthetic import build_task

    return build_task(tmp, sizes={"train": n, "val": 4, "ood": 4}, seed=0)


def run_vlmfast(steps: int, threads: int, case: str = "short", packed: bool = True) -> dict:
    from vlmfast.config import load_config
    from vlmfast.train import run

    counts = _count_update_tokens()
    if case == "long_tail":
        _force_long_tail(CASES[case])

    with tempfile.TemporaryDirectory() as tmp:
        paths = _task(tmp, PROMPTS * steps)
        cfg = load_config(raw={
            "run": {"name": "bench", "out_dir": tmp, "seed": 0, "threads": threads, "checkpoint_every": 10**6},
            "model": {"path": "tiny:student", "packed_sequences": packed},
            "data": {"train": str(paths["train"]), "val": str(paths["val"])},
            "eval": {"every": 10**6, "at_start": False, "probes": 0, "num_problems": 1, "n_samples": 1, "k": [1],
                     "max_new_tokens": 1},
            "stages": [{"type": "grpo", "name": "grpo", "steps": steps, "lr": LR, "batch_size": PROMPTS,
                        "group_size": GROUP, "max_new_tokens": CASES[case], "temperature": 1.0}]})
        run(cfg)
        recs = [json.loads(x) for x in (Path(tmp) / "bench" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"][1:]  # the first step warms up
    row = {"provider": "vlmfast" if packed else "vlmfast-padded", **counts,
           "step_s": statistics.median(r["step_time_s"] for r in train),
           "peak_mb": max(r["peak_mem_mb"] for r in train),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train)}
    row.update({p: statistics.median(r[f"timing/{p}_s"] for r in train) for p in PHASES})
    return row


def run_trl(steps: int, threads: int, case: str = "short") -> dict:
    """TRL's GRPOTrainer on the same model, prompts and reward (runs inside TRL's venv)."""
    import io
    import resource

    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vlmfast.data.formats import read_geometry3k
    from vlmfast.data.prompts import messages
    from vlmfast.models import tiny_vlm
    from vlmfast.rewards import score

    torch.set_num_threads(threads)
    counts = _count_update_tokens()
    if case == "long_tail":
        _force_long_tail(CASES[case])
    with tempfile.TemporaryDirectory() as tmp:
        exs = read_geometry3k(_task(tmp, PROMPTS * steps)["train"])
        model, proc = tiny_vlm("student", seed=0)
        model_dir = Path(tmp) / "model"
        model.save_pretrained(model_dir)
        proc.save_pretrained(model_dir)
        images = []
        for e in exs:
            buf = io.BytesIO()
            e.images[0].save(buf, format="PNG")
            images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        data = Dataset.from_dict({"prompt": [messages(e.problem) for e in exs], "image": images,
                                  "answer": [e.answer for e in exs]})

        def reward(completions, answer, **_):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [score(t, a).reward for t, a in zip(texts, answer)]

        step_times = []

        class Timer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t = time.perf_counter()

            def on_step_end(self, *a, **k):
                step_times.append(time.perf_counter() - self.t)

        args = GRPOConfig(output_dir=str(Path(tmp) / "out"), per_device_train_batch_size=PROMPTS * GROUP,
                          num_generations=GROUP, max_completion_length=CASES[case], temperature=1.0,
                          learning_rate=LR, max_steps=steps, logging_steps=1, report_to=[], save_strategy="no",
                          use_cpu=True, bf16=False, beta=0.0, seed=0, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=proc, callbacks=[Timer()])
        trainer.train()
    return {"provider": "trl", **counts, "step_s": statistics.median(step_times[1:]),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _in_fresh_process(provider: str, python: str, steps: int, threads: int, case: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [python, "-m", "bench.grpo_step", "--worker", provider, "--out", str(out), "--steps", str(steps),
               "--threads", str(threads), "--case", case]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode != 0 or not out.exists():
            return {"provider": provider, "error": (res.stderr or res.stdout)[-1500:]}
        return json.loads(out.read_text())


def _per_provider(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["provider"], []).append(r)
    return out


CASE_TEXT = {"short": "up to 20 new tokens as sampled (every response about as long)",
             "long_tail": "up to 256 new tokens, lengths from a long tail (most 4-24, some 24-64, 1 in 20 at 256; the "
                          "same lengths in every trainer)"}


def table(rows: list[dict], case: str) -> str:
    """One case's table: step time (median over runs, [min, max]), ratio to TRL, vlmfast's phases, the update's
    tokens computed over real ones, peak RSS."""
    by = _per_provider([r for r in rows if r.get("case", "short") == case])
    runs = max(len(v) for v in by.values())
    lines = [f"## {case}: {PROMPTS} prompts x {GROUP} samples, {CASE_TEXT[case]}", "",
             f"{runs} runs alternating, each trainer's median over them, [min, max] beside it.", "",
             "| trainer | step | runs | vs TRL | generate | logprobs | sync | update | update tokens computed / real "
             "| peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ok = {p: [r for r in v if "error" not in r] for p, v in by.items()}
    trl = statistics.median(r["step_s"] for r in ok["trl"]) if ok.get("trl") else None
    for provider, good in ok.items():
        if not good:
            err = by[provider][-1]["error"].strip().splitlines()[-1][:120]
            lines.append(f"| {provider} | failed: {err} |||||||||")
            continue
        steps = [r["step_s"] for r in good]
        step = statistics.median(steps)
        vs = f"{trl / step:.2f}x" if trl else "-"
        phases = [f"{statistics.median(r[p] for r in good):.3f} s" if p in good[0] else "-" for p in PHASES]
        waste = (f"{sum(r['computed_tokens'] for r in good) / sum(r['real_tokens'] for r in good):.2f}"
                 if good[0].get("real_tokens") else "-")
        lines.append(f"| {provider} | {step:.3f} s [{min(steps):.3f}, {max(steps):.3f}] | {len(good)} | {vs} | "
                     + " | ".join(phases) + f" | {waste} | {statistics.median(r['peak_mb'] for r in good):.0f} MB |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict]) -> str:
    r0 = rows[0]
    head = [f"# The GRPO step: vlmfast vs TRL (measured {r0['timestamp']}, {r0['device']}, torch {r0['torch']})", "",
            "Tiny Qwen2.5-VL student, HF generate in both, median step after a warm-up, each run a fresh process "
            "(`python -m bench.grpo_step`). vlmfast runs padding-free (packed sequences) unless its row says padded.",
            ""]
    cases = [c for c in CASES if any(r.get("case", "short") == c for r in rows)]
    return "\n".join(head) + "\n".join(table(rows, c) + "" for c in cases)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grpo_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating (default 3)")
    ap.add_argument("--case", choices=(*CASES, "all"), default="all")
    ap.add_argument("--worker", choices=("vlmfast", "vlmfast-padded", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if args.worker == "trl":
            row = run_trl(args.steps, args.threads, args.case)
        else:
            row = run_vlmfast(args.steps, args.threads, args.case, packed=args.worker == "vlmfast")
        Path(args.out).write_text(json.dumps(row))
        return 0
    rows = compare(args.steps, args.threads, args.repeats, [*CASES] if args.case == "all" else [args.case])
    print(report(rows))
    return 0


def compare(steps: int = 10, threads: int = 2, repeats: int = 3, cases=("short",)) -> list[dict]:
    """Every trainer's rows for each case, `repeats` runs each, alternating (written to
    bench/results/grpo_step.jsonl and grpo_step.md); `make bench` runs it for its end-to-end section."""
    from ._runner import RESULTS, append_rows, environment

    env = environment("cpu", threads)
    rows = []
    for case in cases:
        for run in range(repeats):
            for provider in PROVIDERS[case]:
                if provider == "trl" and not TRL_PYTHON.exists():
                    row = {"provider": "trl", "error": "TRL's venv is missing: make bench-grpo makes it"}
                else:
                    python = str(TRL_PYTHON) if provider == "trl" else sys.executable
                    row = _in_fresh_process(provider, python, steps, threads, case)
                rows.append({**row, "run": run, "case": case, **env, "prompts": PROMPTS, "group": GROUP,
                             "max_new_tokens": CASES[case]})
    append_rows(RESULTS / "grpo_step.jsonl", rows)
    (RESULTS / "grpo_step.md").write_text(report(rows))
    return rows


if __name__ == "__main__":
    sys.exit(main())
