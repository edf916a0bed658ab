"""The whole GRPO step, vlmfast's trainer vs TRL's GRPOTrainer, side by side in one run, each in a fresh
process: the same tiny Qwen2.5-VL student, the same synthetic prompts with their images, 8 prompts x 8
samples, up to 20 new tokens, temperature 1, one update per rollout, no KL, the HF engine (transformers
`generate`) in both, the same reward function.

    python -m bench.grpo_step                 # make bench-grpo
    python -m bench.grpo_step --steps 4

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
PROMPTS, GROUP, NEW_TOKENS, LR = 8, 8, 20, 1e-5
PHASES = ("generate", "logprobs", "sync", "update")


def _task(tmp: str, n: int):
    from vlmfast.data.synthetic import build_task

    return build_task(tmp, sizes={"train": n, "val": 4, "ood": 4}, seed=0)


def run_vlmfast(steps: int, threads: int) -> dict:
    from vlmfast.config import load_config
    from vlmfast.train import run

    with tempfile.TemporaryDirectory() as tmp:
        paths = _task(tmp, PROMPTS * steps)
        cfg = load_config(raw={
            "run": {"name": "bench", "out_dir": tmp, "seed": 0, "threads": threads, "checkpoint_every": 10**6},
            "model": {"path": "tiny:student"},
            "data": {"train": str(paths["train"]), "val": str(paths["val"])},
            "eval": {"every": 10**6, "at_start": False, "probes": 0, "num_problems": 1, "n_samples": 1, "k": [1],
                     "max_new_tokens": 1},
            "stages": [{"type": "grpo", "name": "grpo", "steps": steps, "lr": LR, "batch_size": PROMPTS,
                        "group_size": GROUP, "max_new_tokens": NEW_TOKENS, "temperature": 1.0}]})
        run(cfg)
        recs = [json.loads(x) for x in (Path(tmp) / "bench" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"][1:]  # the first step warms up
    row = {"provider": "vlmfast", "step_s": statistics.median(r["step_time_s"] for r in train),
           "peak_mb": max(r["peak_mem_mb"] for r in train),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train)}
    row.update({p: statistics.median(r[f"timing/{p}_s"] for r in train) for p in PHASES})
    return row


def run_trl(steps: int, threads: int) -> dict:
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
                          num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0,
                          learning_rate=LR, max_steps=steps, logging_steps=1, report_to=[], save_strategy="no",
                          use_cpu=True, bf16=False, beta=0.0, seed=0, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=proc, callbacks=[Timer()])
        trainer.train()
    return {"provider": "trl", "step_s": statistics.median(step_times[1:]),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _in_fresh_process(provider: str, python: str, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [python, "-m", "bench.grpo_step", "--worker", provider, "--out", str(out), "--steps", str(steps),
               "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode != 0 or not out.exists():
            return {"provider": provider, "error": (res.stderr or res.stdout)[-1500:]}
        return json.loads(out.read_text())


def _per_provider(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["provider"], []).append(r)
    return out


def table(rows: list[dict]) -> str:
    r0 = rows[0]
    by = _per_provider(rows)
    runs = max(len(v) for v in by.values())
    lines = [f"# The GRPO step: vlmfast vs TRL (measured {r0['timestamp']}, {r0['device']}, torch {r0['torch']})", "",
             f"Tiny Qwen2.5-VL student, {PROMPTS} prompts x {GROUP} samples, up to {NEW_TOKENS} new tokens, HF "
             f"generate in both, median step after a warm-up, fresh process each, {runs} runs alternating "
             "(`python -m bench.grpo_step`): the median over the runs, [min, max] beside it.", "",
             "| trainer | step | runs | vs TRL | generate | logprobs | sync | update | peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ok = {p: [r for r in v if "error" not in r] for p, v in by.items()}
    trl = statistics.median(r["step_s"] for r in ok["trl"]) if ok.get("trl") else None
    for provider, good in ok.items():
        if not good:
            err = by[provider][-1]["error"].strip().splitlines()[-1][:120]
            lines.append(f"| {provider} | failed: {err} ||||||||")
            continue
        steps = [r["step_s"] for r in good]
        step = statistics.median(steps)
        vs = f"{trl / step:.2f}x" if trl else "-"
        phases = [f"{statistics.median(r[p] for r in good):.3f} s" if p in good[0] else "-" for p in PHASES]
        lines.append(f"| {provider} | {step:.3f} s [{min(steps):.3f}, {max(steps):.3f}] | {len(good)} | {vs} | "
                     + " | ".join(phases) + f" | {statistics.median(r['peak_mb'] for r in good):.0f} MB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grpo_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the pair, alternating (default 3)")
    ap.add_argument("--worker", choices=("vlmfast", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        row = (run_vlmfast if args.worker == "vlmfast" else run_trl)(args.steps, args.threads)
        Path(args.out).write_text(json.dumps(row))
        return 0
    rows = compare(args.steps, args.threads, args.repeats)
    print(table(rows))
    return 0


def compare(steps: int = 10, threads: int = 2, repeats: int = 3) -> list[dict]:
    """Both trainers' rows, `repeats` runs each, alternating (written to bench/results/grpo_step.jsonl and
    grpo_step.md); `make bench` runs it for its end-to-end section."""
    from ._runner import RESULTS, append_rows, environment

    env = environment("cpu", threads)
    rows = []
    for run in range(repeats):
        rows.append({**_in_fresh_process("vlmfast", sys.executable, steps, threads), "run": run})
        rows.append({**(_in_fresh_process("trl", str(TRL_PYTHON), steps, threads) if TRL_PYTHON.exists()
                        else {"provider": "trl", "error": "TRL's venv is missing: make bench-grpo makes it"}),
                     "run": run})
    rows = [{**r, **env, "prompts": PROMPTS, "group": GROUP, "max_new_tokens": NEW_TOKENS} for r in rows]
    append_rows(RESULTS / "grpo_step.jsonl", rows)
    (RESULTS / "grpo_step.md").write_text(table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(main())
