"""Run directories -> a report people want to read: a table of every run x metric at the end of
each stage, and figures (entropy over steps, reward and accuracy curves, Δlog p probes, pass@k
curves, mean cooling weight), written as report.md + PNGs.

    python -m vlmfast.report runs/a runs/b ... --out runs/report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TABLE_METRICS = ("val/accuracy", "ood/accuracy", "val/entropy", "val/entropy_answer", "val/pass@1", "val/diversity",
                 "val/ece")


def read_run(run_dir) -> dict:
    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    stages = list(dict.fromkeys(r["stage"] for r in records))
    done = run_dir / "results.json"  # a finished run: each stage's last evaluation and the step it handed on
    results = json.loads(done.read_text()).get("results", {}) if done.exists() else {}
    return {"name": run_dir.name, "records": records, "stages": stages, "results": results}


def handoff_step(run: dict, stage: str) -> int | None:
    """The step of the weights `stage` handed on (its best evaluation's under early stopping, else its last)."""
    return run.get("results", {}).get(stage, {}).get("handoff_step")


def stage_endpoints(run: dict) -> dict:
    """{stage: the eval record of the weights it handed on}: under early stopping its best evaluation's (the step
    results.json names), else its last."""
    evals = [r for r in run["records"] if r["kind"] == "eval"]
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in evals):
        mine = [r for r in evals if r["stage"] == stage]
        step = handoff_step(run, stage)
        out[stage] = next((r for r in reversed(mine) if r["step"] == step), mine[-1])
    return out


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def table(runs: list[dict]) -> str:
    pass_keys = sorted({k for run in runs for e in stage_endpoints(run).values() for k in e
                        if k.startswith("val/pass@") and k[-3:] not in ("_lo", "_hi")})
    metrics = [m for m in TABLE_METRICS if m != "val/pass@1"] + pass_keys
    head = "| run | stage | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for run in runs:
        for stage, e in stage_endpoints(run).items():
            cells = []
            for m in metrics:
                v = e.get(m)
                if m.startswith("val/pass@") and v is not None and f"{m}_lo" in e:
                    cells.append(f"{v:.3f} [{e[m + '_lo']:.2f}, {e[m + '_hi']:.2f}]")
                else:
                    cells.append(_fmt(v))
            lines.append(f"| {run['name']} | {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def series(run, kind, key):
    """(global x, value) over all stages, steps offset so stages follow each other."""
    xs, ys, offset, last_stage, stage_len = [], [], 0, None, 0
    for r in run["records"]:
        if r["stage"] != last_stage:
            offset += stage_len
            last_stage, stage_len = r["stage"], 0
        stage_len = max(stage_len, r["step"])
        if r["kind"] == kind and isinstance(r.get(key), (int, float)):
            xs.append(offset + r["step"])
            ys.append(r[key])
    return xs, ys


def stage_starts(run) -> list[tuple[int, str]]:
    """(global step where each stage starts, stage name), matching series' offsets."""
    starts, offset, last_stage, stage_len = [], 0, None, 0
    for r in run["records"]:
        if r["stage"] != last_stage:
            offset += stage_len
            last_stage, stage_len = r["stage"], 0
            starts.append((offset, r["stage"]))
        stage_len = max(stage_len, r["step"])
    return starts


def pass_curve_endpoints(run: dict) -> list[tuple[str, dict, str]]:
    """(label, eval record, line style) of the pass@k curves a run's report compares: its last stage at its start
    (that stage's step-0 evaluation, else the previous stage's last: the weights it started from) and at its end.
    Not the run's first evaluation: before Stage 1 that is random weights, not where RL started."""
    evals = [r for r in run["records"] if r["kind"] == "eval" and r.get("pass_curves", {}).get("val/pass_curve")]
    if not evals:
        return []
    last = evals[-1]["stage"]
    mine = [r for r in evals if r["stage"] == last]
    before = [r for r in evals if r["stage"] != last]
    start = mine[0] if mine[0]["step"] == 0 else (before[-1] if before else None)
    return ([("start", start, "--")] if start is not None and start is not mine[-1] else []) + [("end", mine[-1], "-")]


def figures(runs: list[dict], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def panel(name, title, specs, ylabel):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        drawn = False
        for run in runs:
            for kind, key, style in specs:
                xs, ys = series(run, kind, key)
                if xs:
                    ax.plot(xs, ys, style, label=f"{run['name']}: {key}", markersize=3)
                    drawn = True
        if drawn:
            for x, stage in stage_starts(runs[0])[1:]:  # stage boundaries of the first run
                ax.axvline(x, color="grey", linestyle=":", linewidth=1)
                ax.text(x, ax.get_ylim()[1], f" {stage}", fontsize=7, va="top", color="grey")
            ax.set(title=title, xlabel="step (stages in sequence)", ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            made.append((title, name))
        plt.close(fig)

    panel("entropy.png", "Policy entropy over training", [("train", "entropy", "-"), ("eval", "val/entropy", "o--")],
          "nats")
    panel("reward_accuracy.png", "Reward and accuracy", [("train", "reward", "-"), ("eval", "val/accuracy", "o-"),
                                                          ("eval", "ood/accuracy", "s--")], "")
    panel("dlogp.png", "Δlog p probes", [("eval", "dlogp_pos", "o-"), ("eval", "dlogp_neg", "s-"),
                                         ("eval", "dlogp_greedy", "^-")], "Δ mean token log-prob")
    panel("cooling_weight.png", "Mean cooling weight (CW-DPO)", [("train", "cooling_weight_mean", "-")], "w_c")
    # pass@k curves: where the run's last stage started and where it ended
    fig, ax = plt.subplots(figsize=(7, 3.8))
    drawn = False
    for run in runs:
        for label, r, style in pass_curve_endpoints(run):
            curve = r["pass_curves"]["val/pass_curve"]
            ax.plot(range(1, len(curve) + 1), curve, style + "o", markersize=3,
                    label=f"{run['name']}: {label} ({r['stage']} step {r['step']})")
            drawn = True
    if drawn:
        ax.set(title="pass@k (validation)", xlabel="k", ylabel="pass@k", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "pass_at_k.png", dpi=110)
        made.append(("pass@k before and after", "pass_at_k.png"))
    plt.close(fig)
    return made


def build_report(run_dirs, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(d) for d in run_dirs]
    figs = figures(runs, out)
    parts = ["# vlmfast report", "", "## Every run at the end of each stage", "", table(runs), ""]
    for title, name in figs:
        parts += [f"## {title}", "", f"![{title}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    print(build_report(args.runs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
