"""`ttt sweep` on this machine: each trial is the usual `Trainer`, run by Ray Tune in its own worker.

The driver checks every trial's config first (`spec.expand`), opens one MLflow parent run, and lets Tune
run the trials `parallelism` at a time: Tune's search space is just the list of trial indices, since
`expand` has already drawn every value. Each trial's MLflow run is a child of the parent. When a trial
ends the driver prints a line; at the end it writes the results table, the heatmap and the
loss-by-position overlay, logs them and the best trial's metrics to the parent run, and prints the best.

Early stopping (ASHA or the median rule) watches the objective at each periodic evaluation
(`train.eval_every`); a trial it stops keeps its MLflow run, ended as KILLED and tagged as stopped.
Running the same sweep again under the same root resumes its trials' runs (as `ttt train` resumes a run
of the same name) and makes them children of the new parent run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ttt.config import ConfigError, JobConfig, TrackingConfig
from ttt.errors import UserError
from ttt.storage import join, open_storage
from ttt.sweep.spec import OBJECTIVE_METRICS, Expansion, SweepSpec, Trial, expand
from ttt.tracking.logger import Tracker, default_tracking_uri, quiet_mlflow

# What a trial's final report carries, in the order of the results table: every possible objective.
FINAL_METRICS = tuple(OBJECTIVE_METRICS)
# Early stopping needs the objective before the end: these are only measured by the final evaluation.
END_ONLY = {"val/loss_no_ttt", "val/loss_past_window_no_ttt"}


@dataclass
class TrialOutcome:
    index: int
    params: dict[str, Any]
    run_name: str
    status: str = "not run"
    """completed, stopped (by early stopping), failed, interrupted (with the sweep), or not run."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The final metrics (a stopped trial: those of its last evaluation)."""
    steps: int = 0
    seconds: float = 0.0
    mlflow_run_id: str | None = None
    curve: list[float] | None = None
    window: int = 0
    error: str | None = None

    def objective(self, metric: str) -> float | None:
        value = self.metrics.get(metric)
        return value if value is not None and math.isfinite(value) else None


@dataclass
class SweepResult:
    name: str
    trials: list[TrialOutcome]
    skipped: list[tuple[dict[str, Any], str]]
    best: TrialOutcome | None
    metric: str
    goal: str
    parent_run_id: str | None
    tracking_uri: str
    root: str
    """The sweep's folder: its trials' run directories and sweep/ with the artifacts."""
    artifacts: dict[str, str]
    """Artifact name (sweep/heatmap.png, ...) → where it was written."""
    seconds: float

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.status in ("failed", "not run")]


# -- trial configs ----------------------------------------------------------------------------------


def run_name(spec: SweepSpec, trial: Trial) -> str:
    """`<sweep>-t<index>-<short label>`, e.g. tiny-wb-t3-ws64-mbs32: a run directory and MLflow name."""
    parts = []
    for name, value in trial.params.items():
        leaf = name.rsplit(".", 1)[-1]
        short = "".join(w[0] for w in leaf.split("_")) if "_" in leaf else leaf
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(short + re.sub(r"[^A-Za-z0-9.+-]", "", text))
    return f"{spec.name}-t{trial.index}-" + "-".join(parts)


def trial_configs(
    spec: SweepSpec, expansion: Expansion, root: str, tracking_uri: str, parent_run_id: str | None
) -> list[JobConfig]:
    """Each trial's config as its worker runs it: under the sweep's folder, a child of the parent run."""
    # Imported here: the launcher pulls in torch, and the operator imports this module to close sweeps.
    from ttt.distributed import launcher

    configs = []
    for trial in expansion.trials:
        cfg = trial.config
        tracking = dataclasses.replace(
            cfg.tracking,
            uri=tracking_uri,
            run_name=run_name(spec, trial),
            parent_run_id=parent_run_id,
            system_metrics=False,  # per-process CPU figures of a few trials sharing a machine say little
            tags={**cfg.tracking.tags, "ttt.sweep": spec.name, "ttt.trial": str(trial.index)},
        )
        storage = dataclasses.replace(cfg.storage, root=join(root, spec.name))
        configs.append(launcher.absolute_paths(dataclasses.replace(cfg, storage=storage, tracking=tracking)))
    return configs


def check_local(spec: SweepSpec, expansion: Expansion) -> None:
    """What a local sweep cannot do, said before anything starts."""
    for trial in expansion.trials:
        if trial.config.scale.workers > 1:
            raise ConfigError(
                "scale.workers",
                f"trial {trial.index} asks for {trial.config.scale.workers} workers; a local sweep trains "
                "each trial in one process (set scale.workers=1, or run a TTTSweep)",
            )
    stopping = spec.early_stopping
    if stopping is None:
        return
    if spec.objective.metric in END_ONLY:
        raise ConfigError(
            "early_stopping",
            f"{spec.objective.metric} is measured only when a trial ends; early-stop on val/loss, "
            "val/loss_past_window or train/loss",
        )
    for trial in expansion.trials:
        train = trial.config.train
        if not 0 < train.eval_every < train.total_steps:
            raise ConfigError(
                "early_stopping",
                f"needs evaluations during training, but trial {trial.index} has train.eval_every="
                f"{train.eval_every} for {train.total_steps} steps: set train.eval_every in overrides",
            )


# -- the trial, inside a Tune worker -----------------------------------------------------------------


def _run_trial(config: dict, jobs: list[dict], report_evaluations: bool) -> None:
    import ray.tune

    from ttt.train.trainer import Trainer

    index = config["trial"]
    job = JobConfig.from_dict(jobs[index])
    latest: dict[str, float] = {}

    def on_metrics(metrics: dict[str, float], step: int) -> None:
        latest.update({k: float(v) for k, v in metrics.items() if k in FINAL_METRICS and v is not None})
        if report_evaluations and "val/loss" in metrics:
            # `step` counts updates done, the unit of the schedulers' grace period and max_t.
            ray.tune.report({**latest, "step": step + 1, "trial": index})

    result = Trainer(job, job.tracking.run_name, progress=False, on_metrics=on_metrics).fit()
    final = {"train/loss": latest.get("train/loss")}
    for prefix, ev in (("", result.final_eval), ("_no_ttt", result.final_eval_no_ttt)):
        if ev is not None:
            final[f"val/loss{prefix}"] = ev.loss
            final[f"val/loss_past_window{prefix}"] = ev.loss_past_window
    ray.tune.report(
        {
            **{k: v for k, v in final.items() if v is not None},
            "step": result.steps,
            "trial": index,
            "final": True,
            "mlflow_run_id": result.mlflow_run_id or "",
            "curve": result.final_eval.loss_by_position if result.final_eval else [],
            "train_seconds": result.train_seconds,
        }
    )


# -- the driver --------------------------------------------------------------------------------------


def run_sweep(
    spec: SweepSpec,
    base: JobConfig,
    *,
    root: str = "runs/sweeps",
    tracking_uri: str | None = None,
    parallelism: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run every trial of the sweep; raises ConfigError before anything starts if a trial is invalid."""
    started = time.perf_counter()
    expansion = expand(spec, base)
    check_local(spec, expansion)
    parallelism = min(parallelism or spec.parallelism, len(expansion.trials))
    root = root if root.startswith("s3://") else str(Path(root).resolve())
    uri = tracking_uri or base.tracking.uri or default_tracking_uri(root)
    say = (echo or _print) if progress else _silent
    names = [p.name for p in spec.parameters]

    quiet_mlflow()
    # MLflow prints a "View run" link when a run on a server ends: not between the table's lines.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    _prepare_data(expansion)
    parent = Tracker(TrackingConfig(uri=uri, experiment=base.tracking.experiment, system_metrics=False), root)
    parent_id = parent.start(
        None, spec.name, _parent_params(spec, expansion, parallelism), {"ttt.sweep": spec.name}
    )
    configs = trial_configs(spec, expansion, root, uri, parent_id)
    outcomes = [
        TrialOutcome(t.index, t.params, cfg.tracking.run_name or "", window=cfg.model.window_size)
        for t, cfg in zip(expansion.trials, configs, strict=True)
    ]
    say(_header(spec, expansion, parallelism, uri, parent_id))
    table = _Table(names, spec.objective.metric)
    say(table.header())
    try:
        _tune(spec, configs, outcomes, parallelism, join(root, spec.name), lambda o: say(table.row(o)))
        _finish_children(outcomes, configs)
        best = pick_best(outcomes, spec.objective.metric, spec.objective.goal)
        artifacts = _write_artifacts(spec, expansion, outcomes, best, join(root, spec.name), parent)
        if best is not None:
            parent.log_metrics({f"best/{k}": v for k, v in best.metrics.items()}, 0)
            parent.set_tags(
                {"ttt.sweep.best_trial": str(best.index), "ttt.sweep.best_run_id": best.mlflow_run_id or ""}
            )
    except BaseException:
        with contextlib.suppress(Exception):  # tidying up must not hide why the sweep ended
            _finish_children(outcomes, configs, interrupted=True)
        parent.end("KILLED")
        raise
    parent.end("FAILED" if best is None else "FINISHED")
    result = SweepResult(
        name=spec.name,
        trials=outcomes,
        skipped=expansion.skipped,
        best=best,
        metric=spec.objective.metric,
        goal=spec.objective.goal,
        parent_run_id=parent_id,
        tracking_uri=uri,
        root=join(root, spec.name),
        artifacts=artifacts,
        seconds=time.perf_counter() - started,
    )
    say(summary(result, names))
    return result


def _print(line: str) -> None:
    # Looked up at call time, and a module function: Tune pickles its callbacks, and Ray Train may have
    # replaced builtins.print in this process (a captured `print` would then no longer pickle).
    print(line, flush=True)


def _silent(line: str) -> None:
    pass


def pick_best(outcomes: list[TrialOutcome], metric: str, goal: str) -> TrialOutcome | None:
    """The best completed trial (a stopped trial's value comes from fewer steps: not comparable)."""
    done = [o for o in outcomes if o.status == "completed" and o.objective(metric) is not None]
    if not done:
        return None
    sign = 1.0 if goal == "minimize" else -1.0
    return min(done, key=lambda o: (sign * (o.objective(metric) or 0.0), o.index))


def _parent_params(spec: SweepSpec, expansion: Expansion, parallelism: int) -> dict[str, Any]:
    params: dict[str, Any] = {
        p.name: json.dumps(list(dict.fromkeys(t.params[p.name] for t in expansion.trials)))
        for p in spec.parameters
    }
    stopping = spec.early_stopping
    params |= {
        "sweep.algorithm": spec.algorithm,
        "sweep.objective": f"{spec.objective.metric} ({spec.objective.goal})",
        "sweep.trials": len(expansion.trials),
        "sweep.skipped": len(expansion.skipped),
        "sweep.parallelism": parallelism,
        "sweep.early_stopping": (
            f"{stopping.method} (grace {stopping.grace_period}, reduction {stopping.reduction_factor})"
            if stopping
            else "none"
        ),
        "sweep.base": spec.base or "",
        "sweep.overrides": " ".join(spec.overrides),
    }
    return params


def _prepare_data(expansion: Expansion) -> None:
    """Build or download each dataset once, here, rather than in every worker at the same time; a
    missing dataset fails the sweep before anything starts."""
    if os.environ.get("RAY_ADDRESS"):  # the workers are elsewhere: their caches are not ours
        return
    from ttt.data import open_dataset

    data = {t.config.data for t in expansion.trials}
    for path, splits in {(d.path, (d.train_split, d.val_split)) for d in data}:
        open_dataset(path, splits)


def _start_ray(cpus: int) -> bool:
    """A private cluster on loopback (as `ttt train --workers` starts), unless one is running or
    RAY_ADDRESS names one. True when this call started it."""
    from ttt.distributed import launcher

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        launcher.local_only_ray()
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
            log_to_driver=False,  # trials train silently; their errors come back through Tune
        )
    return True


def _tune(
    spec: SweepSpec,
    configs: list[JobConfig],
    outcomes: list[TrialOutcome],
    parallelism: int,
    sweep_root: str,
    on_end: Callable[[TrialOutcome], None],
) -> None:
    # Read by Tune in this process: no TensorBoard/CSV/JSON result files per trial (MLflow has it all),
    # no error when a result lacks the objective (a final evaluation may not measure it), and Ctrl-C
    # reaches us (Tune would otherwise swallow it and return as if the sweep had ended).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic console output, which verbose=0 mutes
    # Tune's result grid looks for those files and warns of each trial; the callback has the results.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    started_ray = _start_ray(max(parallelism, os.cpu_count() or 1))
    import ray
    from ray import tune

    try:
        # Each trial gets an equal share of the cluster's CPUs; Ray sets its thread count from it.
        per_trial = max(1, int(ray.cluster_resources().get("CPU", 1) // parallelism))
        trainable = tune.with_resources(
            tune.with_parameters(
                _run_trial,
                jobs=[c.to_dict() for c in configs],
                report_evaluations=spec.early_stopping is not None,
            ),
            {"cpu": per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(range(len(configs))))},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=parallelism, scheduler=_scheduler(spec, configs)
            ),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=join(sweep_root, "_ray"),
                verbose=0,
                callbacks=[_recorder(outcomes, on_end)],
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        tuner.fit()
    finally:
        if started_ray:
            ray.shutdown()


def _scheduler(spec: SweepSpec, configs: list[JobConfig]):
    stopping = spec.early_stopping
    if stopping is None:
        return None
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    # The grace period counts evaluations; the schedulers count updates (`step`).
    grace = stopping.grace_period * min(c.train.eval_every for c in configs)
    common = {
        "time_attr": "step",
        "metric": spec.objective.metric,
        "mode": "min" if spec.objective.goal == "minimize" else "max",
        "grace_period": grace,
    }
    if stopping.method == "asha":
        return ASHAScheduler(
            **common,
            max_t=max(c.train.total_steps for c in configs),
            reduction_factor=stopping.reduction_factor,
        )
    return MedianStoppingRule(**common, min_samples_required=2)


def _recorder(outcomes: list[TrialOutcome], on_end: Callable[[TrialOutcome], None]):
    """A Tune callback (in this process) that keeps each trial's latest result and announces its end."""
    from ray.tune import Callback

    class Recorder(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            outcome = outcomes[trial.config["trial"]]
            outcome.metrics = {k: float(result[k]) for k in FINAL_METRICS if result.get(k) is not None}
            outcome.steps = int(result.get("step", 0))
            outcome.seconds = float(result.get("time_total_s", 0.0))
            if result.get("final"):
                outcome.status = "completed"
                outcome.mlflow_run_id = result.get("mlflow_run_id") or None
                outcome.curve = list(result.get("curve") or []) or None
            else:
                outcome.status = "running"

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            outcome = outcomes[trial.config["trial"]]
            if outcome.status != "completed":  # ended by the scheduler before its final result
                outcome.status = "stopped"
            on_end(outcome)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            outcome = outcomes[trial.config["trial"]]
            outcome.status = "failed"
            outcome.error = _error_line(trial)
            on_end(outcome)

    return Recorder()


def _error_line(trial) -> str:
    """The trial's exception in one line (Tune keeps the whole traceback in the trial's folder)."""
    # Tune has just written the error beside the driver (its copy in storage comes later).
    error: Any = None
    with contextlib.suppress(Exception):
        import cloudpickle

        error = cloudpickle.loads(Path(trial.pickled_error_file).read_bytes())
    if error is None:
        with contextlib.suppress(Exception):
            error = Path(trial.error_file).read_text()
    cause = getattr(error, "cause", None) or error  # a RayTaskError wraps what the trial raised
    if isinstance(cause, UserError):
        text = str(cause)
    elif isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = str(cause or "unknown error")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if isinstance(cause, BaseException) else lines[-1])[:300] if lines else "unknown error"


def _finish_children(
    outcomes: list[TrialOutcome], configs: list[JobConfig], interrupted: bool = False
) -> None:
    """Tag each trial's run with how it ended. The run of a trial stopped early, or cut off by an
    interrupted sweep, ends KILLED: its worker was stopped mid-step and never closed it. A trial that
    never reported still wrote its run id to progress.json."""
    from mlflow.tracking import MlflowClient

    from ttt.train.report import read_progress

    client = MlflowClient(configs[0].tracking.uri) if configs else None
    for outcome, cfg in zip(outcomes, configs, strict=True):
        if outcome.mlflow_run_id is None:
            progress = read_progress(open_storage(join(cfg.storage.root, outcome.run_name))) or {}
            outcome.mlflow_run_id = progress.get("mlflow_run_id")
            outcome.steps = max(outcome.steps, int(progress.get("step") or 0))
        if client is None or outcome.mlflow_run_id is None:
            continue
        if interrupted and outcome.status in ("not run", "running"):
            outcome.status = "interrupted"  # it had started: it has a run
        client.set_tag(outcome.mlflow_run_id, "ttt.sweep.status", outcome.status)
        if outcome.status in ("stopped", "interrupted"):
            client.set_terminated(outcome.mlflow_run_id, "KILLED")


# -- results: table, CSV, pictures -------------------------------------------------------------------


class _Table:
    def __init__(self, names: list[str], metric: str):
        self.names = names
        self.metric = metric
        self.widths = [max(len(n.rsplit(".", 1)[-1]), 6) for n in names]

    def header(self) -> str:
        cols = [n.rsplit(".", 1)[-1].rjust(w) for n, w in zip(self.names, self.widths, strict=True)]
        return self._line("trial", cols, "status", self.metric, "steps", "time")

    def row(self, o: TrialOutcome) -> str:
        cols = [_cell(o.params.get(n)).rjust(w) for n, w in zip(self.names, self.widths, strict=True)]
        value = o.objective(self.metric)
        shown = f"{value:.4f}" if value is not None else "-"
        line = self._line(str(o.index), cols, o.status, shown, str(o.steps), f"{o.seconds:.0f}s")
        return line + (f"  {o.error}" if o.error else "")

    @staticmethod
    def _line(index: str, cols: list[str], status: str, value: str, steps: str, time: str) -> str:
        return f"{index:>5s}  {'  '.join(cols)}  {status:9s}  {value:>20s}  {steps:>5s}  {time:>6s}"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _header(spec: SweepSpec, expansion: Expansion, parallelism: int, uri: str, parent: str | None) -> str:
    lines = [
        f"sweep {spec.name}: {len(expansion.trials)} trials ({spec.algorithm}), {parallelism} at a time, "
        f"objective {spec.objective.metric} ({spec.objective.goal})"
        + (f", early stopping {spec.early_stopping.method}" if spec.early_stopping else ""),
        f"MLflow: parent run {parent} at {uri}",
    ]
    for params, why in expansion.skipped:
        lines.append(f"skipped {_label(params)}: {why}")
    return "\n".join(lines) + "\n"


def _label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_cell(v)}" for k, v in params.items())


def sorted_outcomes(result: SweepResult) -> list[TrialOutcome]:
    """Completed trials best first, then stopped ones, then the rest."""
    sign = 1.0 if result.goal == "minimize" else -1.0
    rank = {"completed": 0, "stopped": 1}

    def key(o: TrialOutcome):
        value = o.objective(result.metric)
        return (rank.get(o.status, 2), value is None, sign * value if value is not None else 0.0, o.index)

    return sorted(result.trials, key=key)


def summary(result: SweepResult, names: list[str]) -> str:
    table = _Table(names, result.metric)
    lines = ["", f"sweep {result.name}: all trials, best first ({result.seconds:.0f} s)", table.header()]
    lines += [table.row(o) for o in sorted_outcomes(result)]
    lines.append("")
    best = result.best
    if best is None:
        lines.append(f"best: none (no trial completed with {result.metric})")
    else:
        lines.append(
            f"best: trial {best.index} ({_label(best.params)}) {result.metric}="
            f"{best.objective(result.metric):.4f}  mlflow run {best.mlflow_run_id}"
        )
    lines.append(f"parent run {result.parent_run_id} at {result.tracking_uri}")
    lines += [f"  {name}: {where}" for name, where in result.artifacts.items()]
    return "\n".join(lines)


def results_csv(outcomes: list[TrialOutcome], names: list[str], metric: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "index",
            "run_name",
            "mlflow_run_id",
            *names,
            "status",
            "objective",
            "val/loss",
            "val/loss_past_window",
            "steps",
            "seconds",
        ]
    )
    for o in outcomes:
        writer.writerow(
            [
                o.index,
                o.run_name,
                o.mlflow_run_id or "",
                *(o.params.get(n) for n in names),
                o.status,
                _num(o.objective(metric)),
                _num(o.metrics.get("val/loss")),
                _num(o.metrics.get("val/loss_past_window")),
                o.steps,
                f"{o.seconds:.1f}",
            ]
        )
    return out.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(value)  # repr: the exact float MLflow holds


def sweep_files(
    spec: SweepSpec,
    expansion: Expansion,
    outcomes: list[TrialOutcome],
    best: TrialOutcome | None,
    folder: Path,
) -> list[Path]:
    """results.csv, sweep.yaml, heatmap.png and loss_by_position.png, written into `folder` (the parent
    run's `sweep/` artifacts; the TTTSweep operator writes the same files)."""
    from ttt.sweep import plots

    names = [p.name for p in spec.parameters]
    metric, goal = spec.objective.metric, spec.objective.goal
    points = [
        plots.Point(
            o.params,
            o.objective(metric) if o.status == "completed" else None,
            None if o.status == "completed" else _note(o),
            best is not None and o.index == best.index,
        )
        for o in outcomes
    ] + [plots.Point(params, None, "invalid") for params, _ in expansion.skipped]
    curves = [
        plots.Curve(_label(o.params), o.curve, o.window, best is not None and o.index == best.index)
        for o in outcomes
        if o.curve
    ]
    title = f"sweep {spec.name}\n{metric} of each trial"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.csv").write_text(results_csv(outcomes, names, metric))
    (folder / "sweep.yaml").write_text(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
    plots.save_png(plots.objective_figure(points, names, metric, goal, title), folder / "heatmap.png")
    overlay = plots.curves_figure(curves, f"sweep {spec.name}: validation loss by position per trial")
    plots.save_png(overlay, folder / "loss_by_position.png")
    return sorted(folder.iterdir())


def _write_artifacts(
    spec: SweepSpec,
    expansion: Expansion,
    outcomes: list[TrialOutcome],
    best: TrialOutcome | None,
    sweep_root: str,
    parent: Tracker,
) -> dict[str, str]:
    """The sweep's files into <sweep folder>/sweep/ and the parent run."""
    storage = open_storage(sweep_root)
    written: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ttt-sweep-") as tmp:
        for path in sweep_files(spec, expansion, outcomes, best, Path(tmp) / "sweep"):
            storage.write_bytes(f"sweep/{path.name}", path.read_bytes())
            parent.log_artifact(path, "sweep")
            written[f"sweep/{path.name}"] = join(sweep_root, "sweep", path.name)
    return written


def _note(o: TrialOutcome) -> str:
    if o.status == "stopped":
        return f"stopped\nat step {o.steps}"
    return o.status


def describe(spec: SweepSpec, base: JobConfig) -> str:
    """`ttt sweep --dry-run`: the trials and the combinations left out, without starting anything."""
    expansion = expand(spec, base)
    check_local(spec, expansion)
    lines = [
        f"sweep {spec.name}: {len(expansion.trials)} trials ({spec.algorithm}), objective "
        f"{spec.objective.metric} ({spec.objective.goal}), parallelism {spec.parallelism}"
    ]
    for trial in expansion.trials:
        cfg = trial.config
        lines.append(
            f"  trial {trial.index}: {trial.label()}  ({cfg.train.total_steps} steps, "
            f"T={cfg.train.seq_len}, W={cfg.model.window_size}, b={cfg.ttt.mini_batch_size})"
        )
    for params, why in expansion.skipped:
        lines.append(f"  skipped {_label(params)}: {why}")
    return "\n".join(lines)
