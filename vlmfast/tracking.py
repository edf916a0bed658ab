"""Where a run's records go besides metrics.jsonl: `run.report_to`, one small adapter per tracker.

    tensorboard (default)  events in <run dir>/tensorboard/<stage>
    wandb, trackio         one run named after run.name (project "vlmfast"), the recipe as its config
    mlflow                 one run named after run.name, the recipe's keys as params
    none                   metrics.jsonl only

Every tracker sees each stage's metrics under "<stage>/<metric>" on the stage's own steps (train and eval
records alike). A tracker that is not installed is a config error before any work starts. A resumed run logs into
the run it started (wandb's run id and mlflow's, kept in <run dir>/trackers.json); a run started over, a new one.
The steps a resumed run replays (past its checkpoint) reach each tracker once: TensorBoard purges what the killed run
wrote there; wandb and mlflow, which cannot take a point back, are not sent again the records the killed run sent (a
resumed run reproduces them).
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

IDS_FILE = "trackers.json"  # the trackers' run ids: a resumed run logs into the run it started

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow", "none")
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def missing(names: list[str]) -> list[str]:
    """The trackers in `names` whose package is not installed."""
    return [n for n in names if n in _MODULES and importlib.util.find_spec(_MODULES[n]) is None]


def record_key(record: dict) -> tuple:
    """What names a record among a run's: its stage, step and kind (a train and an eval record share a step)."""
    return record.get("stage_index", -1), record.get("step", 0), record.get("kind")


def scalars(record: dict) -> dict[str, float]:
    """"<stage>/<metric>" -> value for every number of a record (its step and stage index excepted)."""
    return {f"{record['stage']}/{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "stage_index")}


class TensorBoard:
    """Each stage's events in tensorboard/<stage>/ (TensorBoard shows a run per stage, each on its own steps). A
    resumed stage's writer purges the steps past its checkpoint (`purge_step`: TensorBoard drops what the killed run
    wrote there), so the replayed steps appear once; a purge is per folder, hence a folder per stage."""

    def __init__(self, run_dir: Path, name: str, config: dict, resume_at: tuple[int, int] | None = None):
        self.root, self.resume_at, self.writers = run_dir / "tensorboard", resume_at, {}

    def log(self, record: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        stage = record["stage"]
        if stage not in self.writers:
            resumed = self.resume_at is not None and record.get("stage_index") == self.resume_at[0]
            self.writers[stage] = SummaryWriter(str(self.root / stage),
                                                purge_step=self.resume_at[1] + 1 if resumed else None)
        for k, v in scalars(record).items():
            self.writers[stage].add_scalar(k, v, record["step"])
        self.writers[stage].flush()


class WandbLike:
    """wandb, and trackio (the same API): each stage's metrics on its own step axis."""

    def __init__(self, module_name: str, run_dir: Path, name: str, config: dict, ids: dict):
        import importlib

        self.mod = importlib.import_module(module_name)
        kwargs = {"project": "vlmfast", "name": name, "config": config}
        if module_name == "wandb":  # the same id on a resume: wandb continues that run instead of starting another
            ids.setdefault("wandb", uuid.uuid4().hex[:12])
            kwargs.update(dir=str(run_dir), id=ids["wandb"], resume="allow")
        self.mod.init(**kwargs)
        self.stages = set()

    def log(self, record: dict) -> None:
        stage = record["stage"]
        if stage not in self.stages and hasattr(self.mod, "define_metric"):
            self.mod.define_metric(f"{stage}/step")
            self.mod.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.mod.log({**scalars(record), f"{stage}/step": record["step"]})


class MLflow:
    def __init__(self, run_dir: Path, name: str, config: dict, ids: dict):
        import mlflow

        self.mlflow = mlflow
        if "mlflow" in ids:  # a resume: the run it started (its params are logged already)
            mlflow.start_run(run_id=ids["mlflow"])
            return
        ids["mlflow"] = mlflow.start_run(run_name=name).info.run_id
        mlflow.log_params({k: str(v)[:250] for k, v in _flat(config).items()})

    def log(self, record: dict) -> None:
        # mlflow's metric names take letters, digits and _-./ and space: pass@k -> pass_at_k
        self.mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in scalars(record).items()}, step=record["step"])


class NotAgain:
    """A tracker that does not take points back (wandb, trackio, mlflow), sent only the records it has not had: after a
    resume the killed run's records past the checkpoint are replayed, with the same numbers."""

    def __init__(self, tracker, sent: set):
        self.tracker, self.sent = tracker, sent

    def log(self, record: dict) -> None:
        if record_key(record) not in self.sent:
            self.tracker.log(record)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(_flat(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def open_trackers(names: list[str], run_dir: Path, name: str, config: dict, *,
                  resume_at: tuple[int, int] | None = None, sent: set = frozenset()) -> list:
    """The trackers of `names` (run.report_to), opened for this run; resumed from the checkpoint at (stage index,
    step) `resume_at`, in the runs it opened before, which hold the records `sent` (record_key) already."""
    path = Path(run_dir) / IDS_FILE
    ids = json.loads(path.read_text()) if resume_at is not None and path.exists() else {}
    # what every earlier attempt sent past a checkpoint: a second resume from an earlier checkpoint than the killed
    # run's last records would resend what the first killed run had sent
    sent = set(sent) | {tuple(k) for k in ids.get("sent", [])}
    ids["sent"] = sorted(sent, key=str)
    made = []
    for n in names:
        if n == "tensorboard":
            made.append(TensorBoard(run_dir, name, config, resume_at))
        elif n in ("wandb", "trackio"):
            made.append(NotAgain(WandbLike(n, run_dir, name, config, ids), sent))
        elif n == "mlflow":
            made.append(NotAgain(MLflow(run_dir, name, config, ids), sent))
    path.write_text(json.dumps(ids))
    return made
