"""The fused-loss quickstart (`vlmfast quickstart`): train a tiny causal transformer end to end with
the fused token statistics as its loss, on a task it can learn in about a minute on 2 CPU cores.

Task: reverse a string of digits ("<s> 3 1 4 = 4 1 3 </s>"); the loss is the mean NLL of the
response tokens (the prompt is ignore_index), computed by `vlmfast.token_stats` from the trunk's last
hidden states and the lm_head weight, so the [tokens, vocab] logits are never materialised. Every
log step also records the policy entropy on the response tokens; greedy exact-match accuracy is
evaluated on held-out strings. Writes metrics.jsonl, curves.png and summary.md to the run directory.

The main job (`make demo`) is the warm-start study: vlmfast/study.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .arguments import positive_int
from .ops import token_stats

DIGITS, EQ, BOS, EOS, PAD = 10, 10, 11, 12, 13
VOCAB = 14


def make_batch(n: int, gen: torch.Generator, min_len=3, max_len=6):
    """input ids [n, T] and targets [n, T] (next token; -100 outside the response)."""
    T = 2 * max_len + 3
    ids = torch.full((n, T), PAD)
    tgt = torch.full((n, T), -100)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    for i, k in enumerate(lengths.tolist()):
        d = torch.randint(0, DIGITS, (k,), generator=gen)
        seq = torch.cat([torch.tensor([BOS]), d, torch.tensor([EQ]), d.flip(0), torch.tensor([EOS])])
        ids[i, : len(seq)] = seq
        resp = slice(k + 1, 2 * k + 2)  # positions predicting the reversed digits and EOS
        tgt[i, resp] = seq[k + 2 : 2 * k + 3]
    return ids, tgt, lengths


def build_model(hidden=64, layers=2, heads=4):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(cfg)


@torch.no_grad()
def greedy_accuracy(model, n: int, gen: torch.Generator) -> float:
    ids, _, lengths = make_batch(n, gen)
    correct = 0
    for k in sorted(set(lengths.tolist())):
        rows = (lengths == k).nonzero().squeeze(1)
        seq = ids[rows, : k + 2]  # <s> digits =
        for _ in range(k + 1):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        want = ids[rows, k + 2 : 2 * k + 3]
        correct += (seq[:, k + 2 :] == want).all(1).sum().item()
    return correct / n


def _plot(records, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in records if "loss" in r])
    axes[0].set(title="response NLL (fused token_stats)", xlabel="step", yscale="log")
    axes[1].plot(steps, [r["entropy"] for r in records if "loss" in r], color="tab:orange")
    axes[1].set(title="policy entropy on response tokens (nats)", xlabel="step")
    ev = [r for r in records if "accuracy" in r]
    axes[2].plot([r["step"] for r in ev], [r["accuracy"] for r in ev], marker="o", color="tab:green")
    axes[2].set(title="greedy exact-match accuracy (held out)", xlabel="step", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir="runs/quickstart", steps=600, batch=64, lr=3e-3, eval_every=100, seed=0) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen, eval_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))

    # The fused op must agree with materialised logits before we trust it to train.
    ids, tgt, _ = make_batch(batch, gen)
    hidden = model.model(input_ids=ids).last_hidden_state
    fused = token_stats(hidden, model.lm_head.weight, tgt, outputs=("logp",)).logp
    logits = model.lm_head(hidden).float()
    naive = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt != -100)
    check = (fused - naive).abs().max().item()
    if check > 1e-4:
        raise RuntimeError(f"fused token_stats disagrees with materialised logits by {check}")

    records, t0, last_acc = [], time.time(), float("nan")
    metrics_path = out / "metrics.jsonl"
    with metrics_path.open("w") as log, tqdm(range(1, steps + 1), desc="demo: SFT with fused loss") as bar:
        for step in bar:
            ids, tgt, _ = make_batch(batch, gen)
            hidden = model.model(input_ids=ids).last_hidden_state  # [B, T, H]: trunk only
            stats = token_stats(hidden, model.lm_head.weight, tgt, outputs=("logp", "entropy"))
            n_resp = (tgt != -100).sum()
            loss = -stats.logp.sum() / n_resp  # mean response-token NLL
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            rec = {"step": step, "loss": loss.item(), "entropy": (stats.entropy.sum() / n_resp).item(),
                   "lr": sched.get_last_lr()[0], "time_s": round(time.time() - t0, 3)}
            if step % eval_every == 0 or step == steps:
                model.eval()
                rec["accuracy"] = last_acc = greedy_accuracy(model, 256, eval_gen)
                eval_gen.manual_seed(seed + 1)  # the same held-out strings at every evaluation
                model.train()
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.3f}", H=f"{rec['entropy']:.3f}",
                            acc=f"{last_acc:.2f}")
    _plot(records, out / "curves.png")
    final = records[-1]
    summary = {
        "steps": steps, "final_loss": final["loss"], "final_entropy": final["entropy"],
        "final_accuracy": final["accuracy"], "fused_vs_materialised_max_abs_diff": check,
        "wall_time_s": round(time.time() - t0, 1), "torch": torch.__version__,
    }
    (out / "summary.md").write_text(
        "# vlmfast demo: digit reversal with the fused SFT loss\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in summary.items())
        + "\n\n![curves](curves.png)\n"
    )
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vlmfast quickstart", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--steps", type=positive_int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out: {args.out} is a file, not a folder")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    s = run(args.out, steps=args.steps, seed=args.seed)
    print(json.dumps(s, indent=1))
    print(f"wrote {args.out}/metrics.jsonl, curves.png, summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
