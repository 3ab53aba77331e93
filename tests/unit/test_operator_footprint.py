"""The operator's process stays small: it runs in a pod with a 512Mi limit, and closing a sweep (plots,
summary, MLflow) must not pull in the trainer's stack (torch, Ray, DeepSpeed).

Each check runs in a fresh interpreter, so that what this test session imported does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SWEEP = yaml.safe_load((ROOT / "jobs" / "examples" / "sweep-tiny-cpu.yaml").read_text())
HEAVY = ("torch", "ray", "deepspeed", "triton")
# Peak RSS of the sweep-closing path, measured with the CPU wheels: about 210 MiB; 390 MiB while it still
# imported torch (through ttt.sweep.local), against the chart's 512Mi limit for the whole operator.
RSS_BUDGET_MIB = 300

# Runs first in the child: any import of the trainer's stack fails loudly, naming the importer.
BLOCK_HEAVY = textwrap.dedent(
    f"""
    import importlib.abc, sys
    class _NoTrainerStack(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ImportError(f"the operator imported {{name}}")
    sys.meta_path.insert(0, _NoTrainerStack())
    """
)


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
            "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY),
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
        f"""
        HEAVY = {HEAVY!r}
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
        f"""
        HEAVY = {HEAVY!r}
        import json, sys
        from pathlib import Path
        from ttt_operator import sweep_tracking, sweeps

        sweep = json.loads(sys.argv[1])
        sweep["metadata"].update(namespace="ns", uid="uid")
        uri = (Path(sys.argv[2]) / "mlruns").as_uri()
        spec, expansion = sweeps.trials_of(sweep)
        parent = sweep_tracking.open_parent(uri, "sweeps", spec, expansion, "tiny-w-b")
        children = {{
            t.index: {{
                "metadata": {{"name": f"tiny-w-b-t{{t.index}}"}},
                "status": {{"phase": "Succeeded", "metrics": {{spec.objective.metric: 3.0 - t.index / 10}},
                           "progress": {{"step": 150}}}},
            }}
            for t in expansion.trials
        }}
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
