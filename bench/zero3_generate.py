"""HF `generate` on a ZeRO-3 policy: gathered once per call vs left partitioned, against ZeRO-0, side by
side in one run on 2 CPU ranks (the `deepspeed` launcher, gloo), the same prompts and seeds:

    python -m bench.zero3_generate                     # 16 prompts x 4 samples x 32 new tokens per rank
    python -m bench.zero3_generate --prompts 4 --new-tokens 8 --repeats 1

- zero0: the policy whole on every rank (what ZeRO-0/1/2 generate with).
- zero3-gathered: `vlmfast.zero.gathered_for_generation` (the trainer's default under ZeRO-3): one gather of
  every parameter per generate call, hooks off; costs the whole model in its working dtype on every rank
  for the call (a 7B policy in bf16: 15.2 GB).
- zero3-partitioned (`deepspeed.gather_for_generation: false`): every layer gathered again at every
  decoding step, ranks in lock-step (HF's synced_gpus).

Every parameter is partitioned (persistence threshold 0), as a 7B model's are. The tiny policy makes this
the worst case for the per-step gathers relative to compute (a 7B layer's matmuls hide more of them), so
read the partitioned ratio as the collective overhead, not a 7B prediction. Each mode runs in its own
launch; rows go to bench/results/zero3_generate.jsonl and the table to bench/results/zero3_generate.md.
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

from ._runner import RESULTS, append_rows, environment

MODES = ("zero0", "zero3-gathered", "zero3-partitioned")


def worker(mode: str, prompts: int, new_tokens: int, samples: int, repeats: int, out: str) -> None:
    import io

    import deepspeed
    import torch
    from PIL import Image

    from vlmfast.data.synthetic import generate
    from vlmfast.models import tiny_vlm
    from vlmfast.rollout import HFEngine, Sampling
    from vlmfast.zero import gathered_for_generation

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model, proc = tiny_vlm("student", seed=0)
    zero = {"stage": 0} if mode == "zero0" else {"stage": 3, "stage3_param_persistence_threshold": 0}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    kw = {}
    if mode == "zero3-gathered":
        kw["gather"] = lambda: gathered_for_generation(engine)
    elif mode == "zero3-partitioned":
        kw["synced_ranks"] = world > 1
    gen = HFEngine(engine.module, proc, **kw)
    # each rank its own prompts, as in a rollout
    rows = generate("train", prompts * world, seed=0)[rank * prompts : (rank + 1) * prompts]
    problems = [r["problem"] for r in rows]
    images = [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rows]
    sampling = Sampling(temperature=1.0, max_new_tokens=new_tokens)
    seeds = list(range(rank * prompts, (rank + 1) * prompts))

    def once():
        torch.distributed.barrier()
        t = time.perf_counter()
        out = gen.generate(problems, images, n=samples, sampling=sampling, seeds=seeds)
        torch.distributed.barrier()
        return time.perf_counter() - t, sum(len(c.token_ids) for g in out for c in g)

    once()  # warm-up
    runs = [once() for _ in range(repeats)]
    if rank == 0:
        Path(out).write_text(json.dumps({"mode": mode, "seconds": statistics.median(t for t, _ in runs),
                                         "tokens_rank0": runs[0][1]}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.zero3_generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rank")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.prompts, args.new_tokens, args.samples, args.repeats, args.out)
        return 0
    rows, env = [], environment("cpu", 1)
    env["device"] = "cpu (2 ranks x 1 thread, gloo)"
    for mode in MODES:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                   str(_free_port()), "--module", "bench.zero3_generate", "--worker", mode, "--out", str(out),
                   "--prompts", str(args.prompts), "--samples", str(args.samples), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
            if res.returncode != 0 or not out.exists():
                print(res.stdout[-2000:], res.stderr[-3000:], file=sys.stderr)
                print(f"zero3_generate: the {mode} launch failed (exit {res.returncode})", file=sys.stderr)
                return 1
            row = json.loads(out.read_text())
        row.update(prompts_per_rank=args.prompts, samples=args.samples, max_new_tokens=args.new_tokens, **env)
        rows.append(row)
        print(f"{mode:>18}: {row['seconds']:.3f} s per generate call")
    base = rows[0]["seconds"]
    for r in rows:
        r["vs_zero0"] = r["seconds"] / base
    append_rows(RESULTS / "zero3_generate.jsonl", rows)
    (RESULTS / "zero3_generate.md").write_text(_table(rows))
    print(_table(rows))
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"# HF generate under ZeRO-3 (measured {r0['timestamp']}, {r0['device']}, torch {r0['torch']})", "",
             f"Tiny Qwen2.5-VL student, every parameter partitioned; {r0['prompts_per_rank']} prompts per rank x "
             f"{r0['samples']} samples x up to {r0['max_new_tokens']} new tokens, the same prompts and seeds in "
             "every mode; median of the timed calls, one launch per mode (`python -m bench.zero3_generate`).", "",
             "| mode | s per generate call | vs ZeRO-0 |", "|---|---:|---:|"]
    lines += [f"| {r['mode']} | {r['seconds']:.3f} | {r['vs_zero0']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
