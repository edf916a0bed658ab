"""The study's report: every model at its Stage-1 and Stage-2 endpoints side by side, the figures,
and a summary generated from this run's numbers (including where they contradict the published
findings), plus everything needed to reproduce it.

    python -m vlmfast.study --report runs/tiny_study      (re-render from the run directories)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .report import handoff_step, read_run, series, stage_endpoints  # study runs have one stage: no step offsets

# (metric key, column title) of the main table
MAIN_METRICS = (("val/accuracy", "in-domain acc"), ("ood/accuracy", "OOD acc"),
                ("val/entropy", "entropy (own samples)"), ("val/entropy_answer", "entropy at answer"),
                ("val/diversity", "answer diversity"), ("val/ece", "ECE"))
STAGE2_TARGET = {"grpo": ("val/accuracy", "val/pass@1"), "cw_dpo": ("dlogp_neg", "val/accuracy"),
                 "dpo": ("dlogp_neg", "val/accuracy")}


def _endpoint(run) -> dict:
    """The run's final evaluation (its only stage)."""
    ends = stage_endpoints(run)
    return list(ends.values())[-1] if ends else {}


def _first_eval(run) -> dict:
    return next((r for r in run["records"] if r["kind"] == "eval"), {})


def stage1_endpoint(row) -> dict:
    """The model that enters Stage 2: the Stage-2 run's step-0 evaluation when it has one (with early
    stopping that is the best checkpoint, not the last evaluated step), else Stage 1's last evaluation."""
    if row["stage2"]:
        first = _first_eval(row["stage2"])
        if first.get("step") == 0:
            return first
    return _endpoint(row["stage1"])


def _f(v, digits=3) -> str:
    return "–" if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pass_keys(evals) -> list[str]:
    keys = {k for e in evals for k in e if k.startswith("val/pass@") and not k.endswith(("_lo", "_hi"))}
    return sorted(keys, key=lambda k: int(k.split("@")[1]))


def _with_interval(e: dict, k: str) -> str:
    if k not in e:
        return "–"
    if f"{k}_lo" in e:
        return f"{e[k]:.3f} [{e[k + '_lo']:.2f}, {e[k + '_hi']:.2f}]"
    return _f(e[k])


def pipelines(paths: dict[str, Path]) -> list[dict]:
    """One row per model: teacher, then each (warm-start -> stage 2) pair; warm-starts without a
    stage-2 child get a row of their own. `paths`: each run's directory by its name within a seed
    (teacher, sft_early, sft_early-grpo, ...)."""
    names = list(paths)
    runs = {n: read_run(p) for n, p in paths.items() if (Path(p) / "metrics.jsonl").exists()}
    rows = []
    if "teacher" in runs:
        rows.append({"model": "teacher", "stage1": runs["teacher"], "stage2": None})
    children = {n for n in runs if "-" in n}
    for n in names:
        if n in runs and n != "teacher" and "-" not in n:
            kids = [c for c in names if c in children and c.split("-")[0] == n]
            for c in kids:
                rows.append({"model": f"{n} → {c.split('-', 1)[1]}", "stage1": runs[n], "stage2": runs[c]})
            if not kids:
                rows.append({"model": n, "stage1": runs[n], "stage2": None})
    return rows


def main_table(rows) -> str:
    head = "| model | " + " | ".join(t for _, t in MAIN_METRICS) + " |"
    lines = [head, "|---|" + "---|" * len(MAIN_METRICS)]
    for row in rows:
        s1 = stage1_endpoint(row)
        s2 = _endpoint(row["stage2"]) if row["stage2"] else None
        cells = []
        for k, _ in MAIN_METRICS:
            cells.append(f"{_f(s1.get(k))} → **{_f(s2.get(k))}**" if s2 is not None else _f(s1.get(k)))
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pass_table(rows) -> str:
    evals = [stage1_endpoint(r) for r in rows] + [_endpoint(r["stage2"]) for r in rows if r["stage2"]]
    keys = _pass_keys(evals)
    lines = ["| model | endpoint | " + " | ".join(k.split("/")[1] + " [95% CI]" for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for row in rows:
        for label, e in (("Stage 1", stage1_endpoint(row)), ("Stage 2", row["stage2"] and _endpoint(row["stage2"]))):
            if e:
                lines.append(f"| {row['model']} | {label} | " + " | ".join(_with_interval(e, k) for k in keys) + " |")
    return "\n".join(lines)


def _handed_on(run: dict, xs) -> int:
    """Where Stage 2's curves start: the step of the checkpoint Stage 1 handed on (early stopping's best), not its
    last evaluation."""
    step = handoff_step(run, run["stages"][-1]) if run["stages"] else None
    return step if step is not None else max(xs, default=0)


def _smooth(ys, k=10):
    out, acc = [], []
    for y in ys:
        acc.append(y)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def figures(rows, out: Path) -> list[tuple[str, str, str]]:
    """(title, file, caption) of each figure written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    students = [r for r in rows if r["model"] != "teacher"]

    def save(fig, name, title, caption):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((title, name, caption))

    # 1. entropy on own samples over Stage 1 then Stage 2, the RL entry marked
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "val/entropy", "all completion tokens"),
                           (axes[1], "val/entropy_answer", "answer tokens")):
        for i, row in enumerate(students):
            c = colours[i % len(colours)]
            x1, y1 = series(row["stage1"], "eval", key)
            end = _handed_on(row["stage1"], x1)
            ax.plot(x1, y1, "o-", color=c, markersize=3, label=row["model"])
            if row["stage2"]:
                x2, y2 = series(row["stage2"], "eval", key)
                ax.plot([end + x for x in x2], y2, "s--", color=c, markersize=3)
                ax.axvline(end, color=c, linestyle=":", linewidth=0.8)
        ax.set(title=f"Entropy on own samples ({label})", xlabel="step (Stage 1, then Stage 2 dashed)",
               ylabel="nats / token")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save(fig, "entropy.png", "Entropy over training",
         "Solid: Stage 1; dashed: Stage 2, starting at the dotted line (the entropy each warm-start enters RL "
         "with).")

    # 2. reward (GRPO, smoothed) and validation accuracy over both stages
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, row in enumerate(students):
        c = colours[i % len(colours)]
        x1, y1 = series(row["stage1"], "eval", "val/accuracy")
        end = _handed_on(row["stage1"], x1)
        axes[0].plot(x1, y1, "o-", color=c, markersize=3, label=row["model"])
        if row["stage2"]:
            x2, y2 = series(row["stage2"], "eval", "val/accuracy")
            axes[0].plot([end + x for x in x2], y2, "s--", color=c, markersize=3)
            xr, yr = series(row["stage2"], "train", "reward")
            if xr:
                axes[1].plot(xr, _smooth(yr), "-", color=c, label=row["model"])
    if "teacher" in rows[0]["model"]:
        x, y = series(rows[0]["stage1"], "eval", "val/accuracy")
        axes[0].plot(x, y, "k.-", markersize=3, label="teacher", alpha=0.6)
    axes[0].set(title="In-domain validation accuracy (greedy)", xlabel="step (Stage 1, then Stage 2 dashed)",
                ylabel="accuracy", ylim=(0, 1))
    axes[1].set(title="GRPO reward on its own rollouts (moving mean of 10)", xlabel="Stage-2 step",
                ylabel="mean reward")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save(fig, "reward_accuracy.png", "Reward and accuracy", "Greedy accuracy at every evaluation; GRPO's reward "
         "is the mean verifiable reward of the step's sampled groups.")

    # 3. Δlog p probes for the SFT / DPO / CW-DPO runs (Stage 1 SFT runs and the preference stages)
    panels = [(row["stage1"]["name"], row["stage1"]) for row in students if row["stage1"]["name"].startswith("sft")]
    panels = list(dict(panels).items()) + [(r["stage2"]["name"], r["stage2"]) for r in students
                                           if r["stage2"] and r["stage2"]["name"].endswith("dpo")]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharey=False, squeeze=False)
        for ax, (name, run) in zip(axes[0], panels):
            for key, style, label in (("dlogp_pos", "o-", "positives"), ("dlogp_neg", "s-", "negatives"),
                                      ("dlogp_greedy", "^-", "greedy")):
                x, y = series(run, "eval", key)
                ax.plot(x, y, style, markersize=3, label=label)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set(title=name, xlabel="step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("Δ mean token log-prob vs stage start")
        axes[0][0].legend(fontsize=7)
        save(fig, "dlogp.png", "Δlog p probes", "Change of the mean token log-prob of fixed probe responses since the "
             "run's start: gold answers (positives), dataset wrong answers (negatives), the model's greedy output.")

    # 4. pass@k curves before and after Stage 2
    with_s2 = [r for r in students if r["stage2"]]
    if with_s2:
        fig, axes = plt.subplots(1, len(with_s2), figsize=(2.8 * len(with_s2), 3.2), sharey=True, squeeze=False)
        for ax, row in zip(axes[0], with_s2):
            for e, style, label in ((stage1_endpoint(row), "o--", "Stage 1 end"), (_endpoint(row["stage2"]), "s-",
                                                                                   "Stage 2 end")):
                curve = e.get("pass_curves", {}).get("val/pass_curve")
                if curve:
                    ax.plot(range(1, len(curve) + 1), curve, style, markersize=3, label=label)
            ax.set(title=row["model"], xlabel="k", ylim=(0, 1.02))
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("pass@k (validation)")
        axes[0][0].legend(fontsize=7)
        save(fig, "pass_at_k.png", "pass@k before and after Stage 2", "Unbiased pass@k for k = 1..n from n samples "
             "per validation problem.")

    # 5. mean cooling weight over CW-DPO steps
    cw = [r for r in students if r["stage2"] and r["stage2"]["name"].endswith("cw_dpo")]
    if cw:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for row in cw:
            x, y = series(row["stage2"], "train", "cooling_weight_mean")
            ax.plot(x, y, "-", alpha=0.35, label=f"{row['model']} (per step)")
            ax.plot(x, _smooth(y), "-", label="moving mean of 10")
        ax.set(title="Mean cooling weight over CW-DPO steps", xlabel="step", ylabel="mean w_c", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "cooling_weight.png", "Cooling weight (CW-DPO)", "w_c = sigmoid((l̄ − l_floor)/τ_c) per negative: "
             "near 1 the negative is still likely and is pushed down at full strength, near 0 it is cooled.")
    return made


def _acc_halfwidth(e: dict, n: int | None) -> float:
    """Normal-approximation 95% half-width of an accuracy over n problems."""
    p = e.get("val/accuracy")
    if not isinstance(p, (int, float)) or not n:
        return float("nan")
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-9) / n)


def summary(rows, n_eval: int | None, chance: dict | None = None) -> str:
    """What this run's numbers show, sentence by sentence, from the numbers alone."""
    by = {r["model"].split(" ")[0]: r for r in rows}
    out = []
    if chance:
        c = chance["overall"]
        firsts = {k: stage1_endpoint(r).get("val/accuracy") for k, r in by.items()}
        firsts = {k: v for k, v in firsts.items() if isinstance(v, (int, float))}
        hw_c = 1.96 * math.sqrt(max(c * (1 - c), 1e-9) / n_eval) if n_eval else float("nan")
        above = [k for k, v in firsts.items() if v - c > hw_c]
        below = [k for k in firsts if k not in above]
        out.append(f"**Learning.** Chance (the training split's most common answer per question type) is {c:.2f} on "
                   f"the validation problems (±{hw_c:.2f} sampling interval). At the end of Stage 1 "
                   + ", ".join(f"{k} {v:.2f}" for k, v in firsts.items()) + "; "
                   + (f"{', '.join(above)} beat chance by more than the interval" if above else "none beats chance "
                      "by more than the interval")
                   + (f"; {', '.join(below)} {'does' if len(below) == 1 else 'do'} not." if below and above else "."))
    s1 = {k: stage1_endpoint(r) for k, r in by.items() if k != "teacher"}
    # the noise of a difference of two models' accuracies (each with its own sampling error): sqrt(2) x one's
    hw = math.sqrt(2) * max((_acc_halfwidth(e, n_eval) for e in s1.values()), default=float("nan"))
    accs = {k: e.get("val/accuracy") for k, e in s1.items() if isinstance(e.get("val/accuracy"), (int, float))}
    if len(accs) >= 2:
        lo, hi = min(accs, key=accs.get), max(accs, key=accs.get)
        spread = accs[hi] - accs[lo]
        narrow = spread <= hw
        out.append(f"**In domain, Stage 1.** The four warm-starts end between {accs[lo]:.2f} ({lo}) and "
                   f"{accs[hi]:.2f} ({hi}) validation accuracy, a spread of {spread:.2f}; "
                   + (f"that is within the ±{hw:.2f} sampling interval of a difference of two models on {n_eval} "
                      "problems, so they "
                      "end within a narrow band, as the published findings expect."
                      if narrow else f"that is wider than the ±{hw:.2f} sampling interval on {n_eval} problems, so "
                      "here they do NOT end within a narrow band (the published findings expect one)."))
    after = {r["model"]: _endpoint(r["stage2"]).get("val/accuracy") for r in rows if r["stage2"]}
    if after:
        best = max(after, key=lambda k: after[k] if isinstance(after[k], (int, float)) else -1)
        out.append("After Stage 2: " + ", ".join(f"{k} {_f(v, 2)}" for k, v in after.items())
                   + f" (best: {best}).")
    opd, sfts = s1.get("opd"), {k: s1[k] for k in ("sft_early", "sft_over") if k in s1}
    for key, what in (("val/entropy", "all completion tokens"), ("val/entropy_answer", "the answer tokens")):
        if opd and sfts and isinstance(opd.get(key), (int, float)):
            sft_vals = {k: e.get(key) for k, e in sfts.items() if isinstance(e.get(key), (int, float))}
            if not sft_vals:
                continue
            higher = all(opd[key] > v for v in sft_vals.values())
            lower = all(opd[key] < v for v in sft_vals.values())
            rel = "higher than" if higher else ("lower than" if lower else "between")
            verdict = ("as the published findings expect (OPD keeps the policy's entropy for RL)" if higher else
                       "which contradicts the published expectation that OPD enters RL with higher entropy than "
                       "SFT")
            out.append(f"**Entropy at RL entry ({what}).** OPD enters Stage 2 at {opd[key]:.3f} nats/token, {rel} "
                       + " and ".join(f"{k} ({v:.3f})" for k, v in sft_vals.items()) + f", {verdict}.")
            break
    early, over = s1.get("sft_early"), s1.get("sft_over")
    if early and over and isinstance(early.get("ood/accuracy"), (int, float)):
        d = over["ood/accuracy"] - early["ood/accuracy"]
        rel = "lower" if d < 0 else ("higher" if d > 0 else "the same")
        ood_hw = 1.96 * math.sqrt(2 * 0.25 / n_eval) if n_eval else float("nan")  # a difference of two accuracies
        noise = abs(d) <= ood_hw
        text = (f"**Early-stopped vs over-trained SFT out of domain.** sft_over reaches {over['ood/accuracy']:.2f} "
                f"OOD accuracy against sft_early's {early['ood/accuracy']:.2f} ({rel}, {d:+.2f})")
        if noise:
            text += (f"; the difference is inside the ±{ood_hw:.2f} sampling interval, so this run cannot tell them "
                     "apart.")
        elif d < 0:
            text += ", as the published findings expect (over-training costs generalisation)."
        else:
            text += ", which contradicts the published expectation that over-trained SFT generalises worse."
        ee, oe = early.get("val/entropy"), over.get("val/entropy")
        if isinstance(ee, (int, float)) and isinstance(oe, (int, float)):
            text += f" Entropy on own samples: sft_early {ee:.3f}, sft_over {oe:.3f} nats/token."
        out.append(text)
    changes = []
    for r in rows:
        if not r["stage2"]:
            continue
        kind = r["stage2"]["name"].split("-", 1)[-1]  # run "sft_gentle-cw_dpo" -> stage type cw_dpo
        a, b = stage1_endpoint(r), _endpoint(r["stage2"])
        for k in STAGE2_TARGET.get(kind, ()):
            before = a.get(k)
            if isinstance(before, (int, float)) and isinstance(b.get(k), (int, float)):
                changes.append(f"{r['model']}: {k} {before:.3f} → {b[k]:.3f}")
    if changes:
        out.append("**What Stage 2 changed (the metrics each targets).** " + "; ".join(changes) + ".")
    teacher = by.get("teacher")
    if teacher:
        t = _endpoint(teacher["stage1"])
        out.append(f"The teacher ends at {_f(t.get('val/accuracy'), 2)} in-domain and {_f(t.get('ood/accuracy'), 2)} "
                   "OOD accuracy.")
    return "\n\n".join(out)


def chance_rates(train_parquet, val_parquet) -> dict:
    """What 'beats chance' means: the validation accuracy of always giving the training split's most
    common answer for the question type; "overall" over all validation problems."""
    from collections import Counter

    import pyarrow.parquet as pq

    def rows(p):
        return pq.read_table(p, columns=["question_type", "answer"]).to_pylist()

    counts: dict[str, Counter] = {}
    for r in rows(train_parquet):
        counts.setdefault(r["question_type"] or "all", Counter())[r["answer"]] += 1
    majority = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    hits: dict[str, list[bool]] = {}
    for r in rows(val_parquet):
        t = r["question_type"] or "all"
        hits.setdefault(t, []).append(majority.get(t) == r["answer"])
    every = [h for v in hits.values() for h in v]
    return {"overall": sum(every) / len(every), **{k: sum(v) / len(v) for k, v in hits.items()}}


def write_report(study_dir, raw_study: dict, paths: dict[str, Path], meta: dict, *, seed: int | None = None) -> Path:
    """One seed's report (report.md and its figures in `study_dir`) from its runs' directories."""
    study_dir = Path(study_dir)
    base_seed = raw_study.get("base", {}).get("run", {}).get("seed", 0)
    rows = pipelines(paths)
    figs = figures(rows, study_dir)
    n_eval = (raw_study.get("base") or {}).get("eval", {}).get("num_problems")
    chance = meta.get("chance")
    title = raw_study.get("study", {}).get("name", study_dir.name) + ("" if seed is None else f", seed {seed}")
    parts = [f"# Warm-start study: {title}", "",
             "Every model at its Stage-1 endpoint → **Stage-2 endpoint** (greedy accuracy on "
             f"{n_eval or 'the'} validation / out-of-domain problems; entropy of the model's own samples).", ""]
    if chance:
        parts += ["Chance (the training split's most common answer per question type, scored on the validation "
                  "split): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in chance.items()) + ".", ""]
    parts += [main_table(rows), "", "## pass@k with bootstrap intervals", "", pass_table(rows), "",
              "## Summary (generated from this run's numbers)", "", summary(rows, n_eval, chance), ""]
    for title, name, caption in figs:
        parts += [f"## {title}", "", f"![{title}]({name})", "", caption, ""]
    env = meta.get("environment", {})
    parts += ["## Reproduce", "", f"- command: `python -m vlmfast.study --config {study_dir / 'study.yaml'}` (the "
              "whole recipe, overrides applied, saved beside this report; each run's exact training recipe is "
              "`<run>/study_recipe.yaml`)",
              f"- seeds: run seed {base_seed if seed is None else seed} (the teacher's: {base_seed}), data seed "
              f"{raw_study.get('base', {}).get('data', {}).get('synthetic', {}).get('seed', 0)}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in env.items()),
              f"- wall time per run (two at a time, {sum(meta.get('wall_s', {}).values()):.0f} s summed): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("wall_s", {}).items())
              + f"; the last invocation of the study took {meta.get('wall_s_total', 0):.0f} s (runs finished by an "
              "earlier invocation are reused)", ""]
    path = study_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    (study_dir / "report_meta.json").write_text(json.dumps(meta, indent=1))
    return path
