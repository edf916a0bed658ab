"""Every loss on this CPU: vlmfast (fused, chunked backend) vs the same loss written the way people
write it without vlmfast (materialised fp32 logits, log_softmax + gather), side by side in one run.
Forward + backward, time and peak memory, at N = B*T = 2048 tokens, H=896, V=151936 by default.

    python -m bench.losses_cpu [--n 2048 --h 896 --v 151936 --losses sft grpo ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._runner import add_common_arguments, append_rows, environment, measure, ratio_table, reset_peak_rss, run_case

RESULTS = Path(__file__).parent / "results" / "losses_cpu.jsonl"
LOSSES = ("sft", "sft_gentle", "opd", "grpo", "dpo", "cw_dpo")
SEQ_LEN = 256  # tokens per sequence: B = N / SEQ_LEN
PROMPT = 64  # prompt tokens per sequence (ignored by every loss)


def build(loss: str, n: int, h: int, v: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    B, T = max(2, n // SEQ_LEN), min(n, SEQ_LEN)
    B += B % 2  # DPO pairs
    x = {"hidden": torch.randn(B, T, h, generator=g), "weight": torch.randn(v, h, generator=g).div_(h**0.5)}
    labels = torch.randint(0, v, (B, T), generator=g)
    labels[:, :PROMPT] = -100
    x["labels"] = labels
    if loss == "opd":
        x["teacher"] = (torch.randn(B, T, h, generator=g), torch.randn(v, h, generator=g).div_(h**0.5))
    if loss == "grpo":
        x["old_logp"] = -torch.rand(B, T, generator=g) * 10
        x["ref_logp"] = -torch.rand(B, T, generator=g) * 10
        x["advantages"] = torch.randn(B, generator=g)
    if loss in ("dpo", "cw_dpo"):
        x["ref_c"] = -torch.rand(B // 2, generator=g) * 1000
        x["ref_r"] = -torch.rand(B // 2, generator=g) * 1000
    return x


def fused(loss: str, x: dict, backend: str = "chunked"):
    import vlmfast

    h, W, y = x["hidden"], x["weight"], x["labels"]
    kw = dict(backend=backend)
    if loss == "sft":
        return vlmfast.sft_loss(h, W, y, **kw)[0]
    if loss == "sft_gentle":
        B = h.shape[0] // 2
        return vlmfast.sft_gentle_negatives_loss(h[:B], W, y[:B], h[B:], y[B:], margin=50.0, **kw)[0]
    if loss == "opd":
        return vlmfast.opd_loss(h, W, y, teacher=x["teacher"], **kw)[0]
    if loss == "grpo":
        return vlmfast.grpo_loss(h, W, y, x["old_logp"], x["advantages"], ref_logp=x["ref_logp"], kl_coef=0.04,
                                 clip_high=0.28, **kw)[0]
    if loss == "dpo":
        return vlmfast.dpo_loss(h, W, y, x["ref_c"], x["ref_r"], beta=0.1, **kw)[0]
    return vlmfast.cw_dpo_loss(h, W, y, x["ref_c"], x["ref_r"], beta=0.1, tau_c=0.5, **kw)[0]


def naive(loss: str, x: dict):
    """The materialised-logits version: what a trainer computes without a fused op."""
    import torch
    import torch.nn.functional as F

    h, W, y = x["hidden"], x["weight"], x["labels"]
    mask = y != -100

    def logits(hh):
        return hh @ W.T  # [B, T, V] fp32

    def token_logp(hh, yy):
        lp = torch.log_softmax(logits(hh), -1).gather(-1, yy.clamp(min=0)[..., None])[..., 0]
        return lp * (yy != -100)

    if loss == "sft":
        return F.cross_entropy(logits(h).flatten(0, 1), y.flatten(), ignore_index=-100)
    if loss == "sft_gentle":
        B = h.shape[0] // 2
        pos = F.cross_entropy(logits(h[:B]).flatten(0, 1), y[:B].flatten(), ignore_index=-100)
        neg = F.cross_entropy(logits(h[B:]).flatten(0, 1), y[B:].flatten(), ignore_index=-100)
        return pos + 0.1 * torch.relu(50.0 - neg)
    if loss == "opd":
        lp = torch.log_softmax(logits(h), -1)
        lq = torch.log_softmax(x["teacher"][0] @ x["teacher"][1].T, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        return (kl * mask).sum() / mask.sum()
    if loss == "grpo":
        lp = token_logp(h, y)
        ratio = torch.exp((lp - x["old_logp"]) * mask)
        a = x["advantages"][:, None]
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
        d = (x["ref_logp"] - lp) * mask
        per_tok = pg + 0.04 * (torch.exp(d) - d - 1)
        return (per_tok * mask).sum() / mask.sum()
    S = token_logp(h, y).sum(-1)
    B = S.shape[0] // 2
    d_w, d_l = S[:B] - x["ref_c"], S[B:] - x["ref_r"]
    if loss == "dpo":
        return -F.logsigmoid(0.1 * (d_w - d_l)).mean()
    lbar = (S[B:] / mask[B:].sum(-1)).detach()
    w = torch.sigmoid((lbar - lbar.mean()) / 0.5)
    return -F.logsigmoid(0.1 * (d_w - w * d_l)).mean()


def worker(loss, provider, n, h, v, repeats, threads) -> dict:
    import torch

    torch.set_num_threads(threads)
    x = build(loss, n, h, v)
    x["hidden"].requires_grad_()
    x["weight"].requires_grad_()
    rss_inputs = reset_peak_rss()

    def step():
        out = fused(loss, x) if provider == "vlmfast" else naive(loss, x)
        out.backward()
        x["hidden"].grad = x["weight"].grad = None

    return measure(step, repeats=repeats, warmup=0, rss_inputs=rss_inputs)


def check_agreement(loss, h, v) -> float:
    """Loss and gradients of both providers on a 512-token slice must agree before timing."""
    import torch

    x = build(loss, 512, h, v)
    res = []
    for provider in ("vlmfast", "naive"):
        x2 = dict(x, hidden=x["hidden"].clone().requires_grad_(), weight=x["weight"].clone().requires_grad_())
        out = fused(loss, x2) if provider == "vlmfast" else naive(loss, x2)
        res.append((out.detach(), *torch.autograd.grad(out, (x2["hidden"], x2["weight"]))))
    err = max(((a - b).abs().max() / b.abs().max().clamp(min=1)).item() for a, b in zip(*res))
    if err > 1e-3:
        raise RuntimeError(f"{loss}: vlmfast and naive disagree (relative {err:.2e}); not timing them")
    return err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(ap, repeats=1, results=RESULTS)
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    ap.add_argument("--worker", nargs=2, metavar=("LOSS", "PROVIDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.n, args.h, args.v, args.repeats, args.threads)))
        return 0
    rows, env = [], environment(args.threads)
    for loss in args.losses:
        err = check_agreement(loss, args.h, args.v)
        for provider in ("naive", "vlmfast"):
            r = run_case("bench.losses_cpu", [loss, provider, "--n", str(args.n), "--h", str(args.h),
                                              "--v", str(args.v), "--repeats", str(args.repeats),
                                              "--threads", str(args.threads)])
            r.update(op=loss, provider=provider, mode="forward+backward", n=args.n, h=args.h, v=args.v,
                     dtype="float32", agreement_rel_err=err, **env)
            rows.append(r)
            print(f"  {loss:10} {provider:8} {r['time_s']:8.2f} s   peak above inputs "
                  f"{r['peak_above_inputs_mb']:7.0f} MB   (agreement {err:.1e})", flush=True)
    append_rows(args.out, rows)
    print(f"\nlosses, forward+backward, on {env['device']}, N={args.n}, H={args.h}, V={args.v}, fp32\n")
    print(ratio_table(rows, case_key="op", baseline="naive", candidate="vlmfast"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
