"""The operator's process stays small: it runs in a pod with a 512Mi limit, and closing a sweep (plots,
summary, MLflow) must not pull in the trainer's stack (torch, Ray, DeepSpeed).

The operator image installs the distribution's base dependencies only (infra/operator.Dockerfile), so each
check runs in a fresh interpreter where every module that only the `train` extra brings (torch, Ray,
DeepSpeed, the MLflow server's pandas and SQLAlchemy, ...) cannot be imported: as if it were not installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
SWEEP = yaml.safe_load((ROOT / "jobs" / "examples" / "sweep-tiny-cpu.yaml").read_text())
HEAVY = ("torch", "ray", "deepspeed")
# Peak RSS of the sweep-closing path (MLflow file store): about 135 MiB here, 210 MiB where the train
# extra's optional modules (pandas, pyarrow) are importable, and 390 MiB while ttt.sweep.local still
# imported torch: against the chart's 512Mi limit for the whole operator.
RSS_BUDGET_MIB = 300


def _requirements_closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, followed through the installed packages' metadata."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        key = (name, tuple(sorted(req.extras)))
        if name == "ttt-platform" or key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (*req.extras, "")):
                todo.append(dep)
    return {name for name, _ in seen}


def train_only_modules() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _requirements_closure(project["dependencies"])
    train = _requirements_closure(project["dependencies"] + project["optional-dependencies"]["train"]) - base
    return {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if dists and all(d.lower().replace("_", "-") in train for d in dists)
    }


TRAIN_ONLY = train_only_modules()

# Runs first in the child: what only the train extra installs is absent. A None entry in sys.modules makes
# `import X` fail (the traceback names the importer) and importlib.util.find_spec("X") answer None, as
# for a module that is not installed (MLflow probes for SQLAlchemy that way).
BLOCK_HEAVY = textwrap.dedent(
    f"""
    import sys
    sys.modules.update(dict.fromkeys({sorted(TRAIN_ONLY)!r}))
    HEAVY = {HEAVY!r}
    """
)


def test_the_train_extra_holds_the_trainer_stack() -> None:
    assert set(HEAVY) <= TRAIN_ONLY
    assert "mlflow" not in TRAIN_ONLY  # the client comes with the base set (mlflow-skinny)


def run_child(body: str, tmp_path: Path) -> dict:
    code = (
        BLOCK_HEAVY
        + textwrap.dedent(body)
        + textwrap.dedent(
            """
        import json, re, sys
        from pathlib import Path
        # Peak RSS of this interpreter: VmHWM restarts at exec (ru_maxrss would count the forking pytest).
        peak_kib = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
        print(json.dumps({
            "heavy": sorted(m for m, module in sys.modules.items() if module and m.split(".")[0] in HEAVY),
            "rss_mib": peak_kib / 1024,
        }))
        """
        )
    )
    # MLflow's file store: a real store with no server to start (the operator talks HTTP to one).
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "MPLBACKEND": "Agg",
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(SWEEP), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_operator_imports_without_the_trainer_stack(tmp_path: Path) -> None:
    out = run_child(
        """
        import ttt_operator.__main__, ttt_operator.handlers
        """,
        tmp_path,
    )
    print(f"operator after import: max RSS {out['rss_mib']:.0f} MiB")
    assert out["heavy"] == []


def test_closing_a_sweep_stays_light(tmp_path: Path) -> None:
    """The whole path a finished TTTSweep takes: open the MLflow parent run, close it with every trial's
    outcome (results table, heatmap, loss-by-position overlay, best metrics), against a real MLflow store."""
    out = run_child(
        """
        import json, sys
        from pathlib import Path
        from ttt_operator import sweep_tracking, sweeps

        sweep = json.loads(sys.argv[1])
        sweep["metadata"].update(namespace="ns", uid="uid")
        uri = (Path(sys.argv[2]) / "mlruns").as_uri()
        spec, expansion = sweeps.trials_of(sweep)
        parent = sweep_tracking.open_parent(uri, "sweeps", spec, expansion, "tiny-w-b")
        children = {
            t.index: {
                "metadata": {"name": f"tiny-w-b-t{t.index}"},
                "status": {"phase": "Succeeded", "metrics": {spec.objective.metric: 3.0 - t.index / 10},
                           "progress": {"step": 150}},
            }
            for t in expansion.trials
        }
        sweep_tracking.close_parent(uri, parent, spec, expansion, children, 3)
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(parent)
        assert run.info.status == "FINISHED", run.info.status
        assert run.data.tags["ttt.sweep.best_trial"] == "3"
        names = sorted(a.path for a in client.list_artifacts(parent, "sweep"))
        assert names == ["sweep/heatmap.png", "sweep/loss_by_position.png", "sweep/results.csv",
                         "sweep/sweep.yaml"], names
        """,
        tmp_path,
    )
    print(f"operator after closing a sweep: max RSS {out['rss_mib']:.0f} MiB")
    assert out["heavy"] == []
    assert out["rss_mib"] < RSS_BUDGET_MIB


def test_training_without_the_train_extra_says_what_to_install(tmp_path: Path) -> None:
    """`pip install ttt-platform` (the operator's set) and then `ttt train`: one line, not a traceback."""
    code = BLOCK_HEAVY + "from ttt.cli import main\nsys.exit(main(['train', 'tiny-cpu']))\n"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TTT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("ttt: error: `ttt train` needs ") and "pip install 'ttt-platform[train]'" in line
