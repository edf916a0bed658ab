"""The study across seeds: every arm as a mean with its interval over seeds, and each published claim's
verdict from a paired test across seeds (runs/<study>/report.md; each seed's own report is seed<k>/report.md).

Verdict rule: for each seed s a claim's paired statistic d_s, computed from that seed's runs only (e.g. sft_early's
OOD accuracy minus sft_over's); their mean and 95% t-interval over seeds (df = seeds - 1), and the paired t-test's
p-value against the threshold. The claims are decided together by Holm's step-down rule at 5% family-wise
(study_stats.py): a decided claim *holds* on its side of the threshold, is *contradicted* on the other, and the rest
are *inside the noise* (always, with fewer than two seeds).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .report import handoff_step, read_run, series
from .study_report import _endpoint, _pass_keys, pipelines, stage1_endpoint
from .study_stats import family_verdicts, interval, t95, two_sided_p, verdict  # noqa: F401 (t95, verdict: tests)

BAND = 0.10  # "a narrow band": the warm-starts' in-domain accuracies within 0.10 of each other
SPREAD_TARGET = 0.05  # across-seed standard deviation of an arm's Stage-1 in-domain accuracy the study aims for
PLATEAU_TOL = 0.05  # "flat": reward and accuracy move less than this over the last quarter of Stage 2
STAGE1 = ("sft_early", "sft_over", "opd", "sft_gentle")


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def seed_endpoints(paths: dict[str, Path]) -> dict[str, dict]:
    """One seed's evaluations: each warm-start at the Stage-1 endpoint handed to Stage 2 (key: its name), each
    pipeline at its Stage-2 endpoint (key: "sft_early → grpo"), with the Stage-2 run's records for the plateau."""
    out = {}
    for row in pipelines(paths):
        first = row["model"].split(" ")[0]
        out.setdefault(first, stage1_endpoint(row))
        if row["stage2"]:
            out[row["model"]] = {**_endpoint(row["stage2"]), "_run": row["stage2"], "_before": stage1_endpoint(row)}
    return out


def _range(ev: dict, arms, key) -> float | None:
    vals = [_num(ev.get(a, {}).get(key)) for a in arms]
    return None if None in vals or not vals else max(vals) - min(vals)


def claims(per_seed: dict[int, dict]) -> list[dict]:
    """Each claim's per-seed statistic (seeds where it can be computed), threshold and side."""
    some = next(iter(per_seed.values()), {})
    grpo = [k for k in some if k.endswith("→ grpo")]
    pass_keys = _pass_keys([e for ev in per_seed.values() for e in ev.values() if isinstance(e, dict)])
    kmax = pass_keys[-1] if pass_keys else None
    out = []

    def add(key, name, text, fn, threshold=0.0, side=">"):
        vals = {s: fn(ev) for s, ev in per_seed.items()}
        out.append({"key": key, "claim": name, "statistic": text, "threshold": threshold, "side": side,
                    "values": {s: v for s, v in vals.items() if v is not None}})

    def diff(a, b, key):
        return lambda ev: (None if _num(ev.get(a, {}).get(key)) is None or _num(ev.get(b, {}).get(key)) is None
                           else ev[a][key] - ev[b][key])

    add("narrow_band", "The warm-starts end Stage 1 in a narrow in-domain band",
        f"max - min of the four warm-starts' in-domain accuracy, below {BAND}",
        lambda ev: _range(ev, STAGE1, "val/accuracy"), BAND, "<")
    add("opd_entropy", "OPD enters RL with higher entropy than SFT",
        "OPD's entropy on own samples minus the higher of sft_early's and sft_over's, above 0",
        lambda ev: (None if None in [_num(ev.get(a, {}).get("val/entropy")) for a in ("opd", "sft_early", "sft_over")]
                    else ev["opd"]["val/entropy"] - max(ev["sft_early"]["val/entropy"],
                                                         ev["sft_over"]["val/entropy"])))
    if kmax and grpo:
        def narrowed(ev):
            before = [_num(ev[k]["_before"].get(kmax)) for k in grpo if k in ev]
            after = [_num(ev[k].get(kmax)) for k in grpo if k in ev]
            if None in before + after or len(before) < 2:
                return None
            return (max(before) - min(before)) - (max(after) - min(after))
        add("pass_gone", f"The {kmax.split('/')[1]} advantage between warm-starts is gone after RL",
            f"spread of the GRPO pipelines' {kmax.split('/')[1]} before RL minus after, above 0", narrowed)
    add("early_ood", "Early-stopped SFT generalises better out of domain than over-trained SFT",
        "sft_early's OOD accuracy minus sft_over's, above 0", diff("sft_early", "sft_over", "ood/accuracy"))

    def stabler(ev):
        cw, dpo = ev.get("sft_gentle → cw_dpo"), ev.get("sft_gentle → dpo")
        if not cw or not dpo:
            return None
        deltas = [_num(x.get("val/accuracy")) for x in (cw, cw["_before"], dpo, dpo["_before"])]
        return None if None in deltas else (deltas[0] - deltas[1]) - (deltas[2] - deltas[3])
    add("cooling_stable", "The cooling weight makes preference training more stable than DPO",
        "CW-DPO's change of in-domain accuracy minus DPO's (same warm-start), above 0", stabler)
    return out


def _quarters(run: dict, key: str, steps: int) -> tuple[list, list]:
    """A train series' values in the third and the last quarter of a run's steps."""
    x, y = series(run, "train", key)
    return ([v for s, v in zip(x, y) if steps / 2 < s <= 3 * steps / 4],
            [v for s, v in zip(x, y) if s > 3 * steps / 4])


def plateau(run: dict, key: str, steps: int) -> float | None:
    """Change of `key` over the last quarter of a Stage-2 run. Train records (reward, one per step): the mean of
    the last quarter minus the mean of the quarter before. Eval records (accuracy, a few per run): the
    least-squares slope through the evaluations of the run's second half times a quarter of the steps, so one
    evaluation's wobble (a step can flip a few greedy answers) counts a fraction of what a trend does; None
    with fewer than three evaluations there."""
    q3, q4 = _quarters(run, key, steps)
    if q3 or q4:
        return sum(q4) / len(q4) - sum(q3) / len(q3) if q3 and q4 else None
    x, y = series(run, "eval", key)
    half = [(s, v) for s, v in zip(x, y) if s >= steps / 2]
    if len(half) < 3:
        return None
    mx, my = sum(s for s, _ in half) / len(half), sum(v for _, v in half) / len(half)
    slope = sum((s - mx) * (v - my) for s, v in half) / sum((s - mx) ** 2 for s, _ in half)
    return slope * steps / 4


def plateau_noise(run: dict, key: str, steps: int) -> float | None:
    """Two standard errors of plateau()'s difference of quarter means (train series with two or more values in
    each quarter; None otherwise): a change inside it is the steps' own batch-to-batch noise, not a trend."""
    q3, q4 = _quarters(run, key, steps)
    if len(q3) < 2 or len(q4) < 2:
        return None
    return 2 * math.sqrt(statistics.variance(q3) / len(q3) + statistics.variance(q4) / len(q4))


def _cell(values: list[float], digits=3) -> str:
    if not values:
        return "–"
    mean, lo, hi, sd = interval(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.2f}, {hi:.2f}] sd {sd:.3f}"


METRICS = (("val/accuracy", "in-domain acc"), ("ood/accuracy", "OOD acc"), ("val/entropy", "entropy (own samples)"))


def arm_table(per_seed: dict[int, dict], n_eval: int | None) -> str:
    arms = list(next(iter(per_seed.values()), {}))
    pass_keys = _pass_keys([e for ev in per_seed.values() for e in ev.values() if isinstance(e, dict)])
    cols = list(METRICS) + ([(pass_keys[-1], pass_keys[-1].split("/")[1])] if pass_keys else [])
    lines = ["| model (endpoint) | " + " | ".join(t for _, t in cols) + " | seeds |",
             "|---|" + "---|" * (len(cols) + 1)]
    for arm in arms:
        if arm == "teacher":
            continue
        cells = []
        for key, _ in cols:
            vals = [v for ev in per_seed.values() if (v := _num(ev.get(arm, {}).get(key))) is not None]
            cells.append(_cell(vals))
        label = arm if "→" in arm else f"{arm} (Stage 1)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(per_seed)} |")
    return "\n".join(lines)


def spread_lines(per_seed: dict[int, dict]) -> list[str]:
    out = []
    for arm in STAGE1:
        vals = [v for ev in per_seed.values() if (v := _num(ev.get(arm, {}).get("val/accuracy"))) is not None]
        if len(vals) >= 2:
            sd = interval(vals)[3]
            ok = "meets" if sd <= SPREAD_TARGET else "EXCEEDS"
            out.append(f"- {arm}: across-seed sd of Stage-1 in-domain accuracy {sd:.3f} ({ok} the {SPREAD_TARGET} "
                       f"target); per seed " + ", ".join(f"{v:.2f}" for v in vals))
    return out


def stopping_line(per_seed_paths: dict[int, dict[str, Path]]) -> str:
    """Where sft_early stopped and which step it handed on, per seed, against sft_over's steps: the early-vs-over
    claim compares a stopping rule with over-training only when the rule stopped sft_early well before."""
    parts = []
    for seed, paths in per_seed_paths.items():
        runs = {a: read_run(paths[a]) for a in ("sft_early", "sft_over")
                if a in paths and (Path(paths[a]) / "metrics.jsonl").exists()}
        if len(runs) < 2:
            continue
        last = {a: max((r["step"] for r in run["records"] if r["kind"] == "train"), default=0)
                for a, run in runs.items()}
        early = runs["sft_early"]
        handed = handoff_step(early, early["stages"][-1]) if early["stages"] else None
        parts.append(f"seed {seed}: sft_early ran {last['sft_early']} steps and handed on step {handed}, sft_over "
                     f"ran {last['sft_over']}")
    return ("Early stopping: " + "; ".join(parts) + ".") if parts else ""


def verdict_table(found: list[dict]) -> str:
    lines = ["| claim | statistic | per seed | mean [95% CI] | p | verdict (Holm) |", "|---|---|---|---|---|---|"]
    for c, said in zip(found, family_verdicts(found)):
        vals = list(c["values"].values())
        if not vals:
            lines.append(f"| {c['claim']} | {c['statistic']} | – | – | – | not measured |")
            continue
        mean, lo, hi, _ = interval(vals)
        ci = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" if len(vals) > 1 else f"{mean:+.3f}"
        per = ", ".join(f"{v:+.3f}" for v in vals)
        p = two_sided_p(vals, c["threshold"])
        lines.append(f"| {c['claim']} | {c['statistic']} | {per} | {ci} | {p:.3f} | **{said}** |")
    return "\n".join(lines)


def plateau_table(per_seed: dict[int, dict]) -> tuple[str, bool]:
    """Each Stage-2 pipeline's change over its last quarter, per seed; whether every one is flat."""
    lines = ["| pipeline | seed | reward change | its noise (2 SE) | accuracy change | flat |",
             "|---|---|---|---|---|---|"]
    every_flat = True
    for seed, ev in per_seed.items():
        for arm, e in ev.items():
            if "→" not in arm:
                continue
            run = e["_run"]
            steps = max((r["step"] for r in run["records"] if r["kind"] == "train"), default=0)
            reward = plateau(run, "reward", steps) if "grpo" in arm else None
            noise = (plateau_noise(run, "reward", steps) if "grpo" in arm else None) or 0.0
            acc = plateau(run, "val/accuracy", steps)
            flat = (acc is not None and abs(acc) <= PLATEAU_TOL
                    and (reward is None or abs(reward) <= max(PLATEAU_TOL, noise)))
            every_flat &= flat
            fmt = (lambda v: "–" if v is None else f"{v:+.3f}")
            lines.append(f"| {arm} | {seed} | {fmt(reward)} | {f'{noise:.3f}' if noise else '–'} | {fmt(acc)} | "
                         f"{'yes' if flat else 'no'} |")
    return "\n".join(lines), every_flat


def seeds_figure(per_seed: dict[int, dict], out: Path) -> str | None:
    """In-domain and OOD accuracy of every arm: one dot per seed, the mean and its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in next(iter(per_seed.values()), {}) if a != "teacher"]
    if not arms:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(arms) + 1.6), sharey=True)
    for ax, (key, title) in zip(axes, METRICS[:2]):
        for i, arm in enumerate(arms):
            vals = [v for ev in per_seed.values() if (v := _num(ev.get(arm, {}).get(key))) is not None]
            if not vals:
                continue
            ax.plot(vals, [i] * len(vals), "o", color="tab:blue", alpha=0.5, markersize=4)
            mean, lo, hi, _ = interval(vals)
            if len(vals) > 1:
                ax.plot([max(lo, 0), min(hi, 1)], [i, i], "-", color="black", linewidth=1)
            ax.plot([mean], [i], "|", color="black", markersize=12)
        ax.set(title=f"{title}: seeds (dots), mean and 95% CI", xlim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(arms)), [a if "→" in a else f"{a} (Stage 1)" for a in arms], fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "seeds.png", dpi=110)
    plt.close(fig)
    return "seeds.png"


def _pretrain_line(sdir: Path) -> str:
    if not (sdir / "pretrain" / "metrics.jsonl").exists():
        return ""
    e = _endpoint(read_run(sdir / "pretrain"))
    return (f" Pretrained student (every warm-start's start): names every shape of a scene, largest first, exactly "
            f"right on {e.get('val/accuracy', float('nan')):.3f} of the validation scenes.")


def write_study_report(sdir: Path, raw_study: dict, per_seed_paths: dict[int, dict[str, Path]], meta: dict) -> Path:
    sdir = Path(sdir)
    per_seed = {s: seed_endpoints(paths) for s, paths in per_seed_paths.items()}
    n_eval = (raw_study.get("base") or {}).get("eval", {}).get("num_problems")
    seeds = list(per_seed)
    found = claims(per_seed)
    plateaus, all_flat = plateau_table(per_seed)
    fig = seeds_figure(per_seed, sdir)
    teacher = next((ev.get("teacher") for ev in per_seed.values() if ev.get("teacher")), {})
    half = 1.96 * math.sqrt(0.25 / n_eval) if n_eval else float("nan")
    name = raw_study.get("study", {}).get("name", sdir.name)
    parts = [f"# Warm-start study: {name}, {len(seeds)} seeds", "",
             f"Seeds {', '.join(map(str, seeds))}: every warm-start and Stage-2 run trained once per seed (the seed "
             "sets the data order and every sample, and the initial student weights unless a pretrained student is "
             "shared); the teacher once, shared. Cells: "
             "the mean over seeds [its 95% t-interval] and the across-seed standard deviation. One evaluation's own "
             f"sampling interval on {n_eval} problems is at most ±{half:.3f} (greedy accuracy). Each seed's full "
             "report: " + ", ".join(f"[seed {s}](seed{s}/report.md)" for s in seeds) + ".", "",
             arm_table(per_seed, n_eval), "",
             f"Teacher: in-domain {teacher.get('val/accuracy', float('nan')):.3f}, OOD "
             f"{teacher.get('ood/accuracy', float('nan')):.3f}." + _pretrain_line(sdir), "",
             "## Seed spread of Stage 1", "", *spread_lines(per_seed), "", stopping_line(per_seed_paths), "",
             "## Verdicts (paired across seeds)", "",
             "Each claim's statistic is computed per seed from that seed's runs; p is the paired t-test's two-sided "
             "p-value against the threshold. The claims are decided together (Holm's step-down rule, 5% "
             f"family-wise over the {sum(bool(c['values']) for c in found)} measured): a decided claim *holds* on "
             "its side of the threshold and is *contradicted* on the other; the rest are *inside the noise*. A "
             "95% interval clear of the threshold is not enough alone: five claims tested at 5% each would show "
             "a false verdict in about 23% of studies where none is true.", "", verdict_table(found), "",
             "## Stage 2 at its plateau?", "",
             f"Change over the last quarter of each Stage-2 run (reward: mean of the last quarter minus the quarter "
             f"before, GRPO only, logged every step; accuracy: the least-squares slope through the evaluations of "
             f"the run's second half, times a quarter of the steps); flat when accuracy moves less than "
             f"{PLATEAU_TOL} and reward less than {PLATEAU_TOL} or than its own step-to-step noise (two standard "
             f"errors of the difference of the quarter means: a training batch's reward is a mean over its few "
             f"prompts). "
             + ("Every Stage-2 run is flat." if all_flat else "**Not every Stage-2 run is flat: the Stage-2 "
                "verdicts describe runs still moving.**"), "", plateaus, ""]
    if fig:
        parts += ["## Seeds", "", f"![seeds]({fig})", ""]
    env = meta.get("environment", {})
    parts += ["## Reproduce", "", f"- command: `python -m vlmfast.study --config {sdir / 'study.yaml'}`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in env.items()),
              f"- wall time: {meta.get('wall_s_total', 0):.0f} s for the last invocation; "
              f"{sum(meta.get('wall_s', {}).values()):.0f} s of runs summed", ""]
    path = sdir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    (sdir / "report_meta.json").write_text(json.dumps(meta, indent=1))
    (sdir / "verdicts.json").write_text(json.dumps(
        [{**c, "values": {str(k): v for k, v in c["values"].items()},
          "p": two_sided_p(list(c["values"].values()), c["threshold"]) if c["values"] else None, "verdict": said}
         for c, said in zip(found, family_verdicts(found))], indent=1))
    return path
