"""`ttt eval --suite loss,position,niah` on a tiny trained model and a no-TTT baseline, logged to MLflow."""

from __future__ import annotations

import csv
import json

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.services import TINY
from tests.integration.test_cli import ttt
from ttt.cli import main
from ttt.config import resolve
from ttt.train.trainer import Trainer

LENGTHS, DEPTHS = (100, 120), (0.0, 0.5, 1.0)  # not multiples of b=16: rounded up to 112 and 128
CELLS = {(t, n, d) for t in ("passkey", "number") for n in (112, 128) for d in DEPTHS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_dataset, mlflow_server):
    """A tiny TTT-E2E model and its no-TTT ablation, six steps each."""
    root = tmp_path_factory.mktemp("eval-suite")
    common = [
        *TINY,
        f"data.path={text_dataset}",
        f"storage.root={root}",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=eval-suite-training",
    ]
    for preset, name in (("tiny", "e2e"), ("tiny-nottt", "nottt")):
        Trainer(resolve(preset, common), name, progress=False).fit()
    return root


def test_eval_suite_end_to_end(runs, tmp_path, mlflow_server):
    out = tmp_path / "eval"
    proc = ttt(
        "eval",
        str(runs / "e2e"),
        "--suite",
        "loss,position,niah",
        "--baseline",
        str(runs / "nottt"),
        "--sequences",
        "4",
        "--niah-lengths",
        ",".join(map(str, LENGTHS)),
        "--niah-depths",
        ",".join(map(str, DEPTHS)),
        "--niah-trials",
        "2",
        "--output",
        str(out),
        "--tracking-uri",
        mlflow_server,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert json.loads((out / "report.json").read_text()) == {
        k: v for k, v in report.items() if k != "mlflow_run_id"
    }
    assert report["step"] == 6 and report["loss"] > 0 and "loss_no_ttt" in report
    assert report["baselines"]["nottt"]["loss"] > 0
    for model in ("e2e", "nottt"):
        niah = report["niah"][model]
        assert niah["chance"] == 0.2 and 0.0 <= niah["accuracy"] <= 1.0
        assert {(c["task"], c["length"], c["depth"]) for c in niah["cells"]} == CELLS

    with open(out / "niah.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "task", "length", "depth", "accuracy", "trials"]
    assert len(rows) == 2 * len(CELLS)
    for model in ("e2e", "nottt"):
        mine = [r for r in rows if r["model"] == model]
        assert {(r["task"], int(r["length"]), float(r["depth"])) for r in mine} == CELLS
        assert all(0.0 <= float(r["accuracy"]) <= 1.0 and r["trials"] == "2" for r in mine)
    for png in ("loss_by_position.png", "niah_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(mlflow_server)
    run = client.get_run(report["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "ttt-eval"
    assert run.info.status == "FINISHED" and run.info.run_name == "eval-e2e"
    metrics = run.data.metrics
    assert metrics["loss"] == pytest.approx(report["loss"])
    assert metrics["niah/accuracy"] == pytest.approx(report["niah"]["e2e"]["accuracy"])
    assert "niah/passkey/L128/depth0.5" in metrics and "baseline/nottt/niah/accuracy" in metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {
        "eval/report.json",
        "eval/niah.csv",
        "eval/loss_by_position.png",
        "eval/niah_heatmap.png",
        "eval/loss_by_position.json",
    } <= artifacts


def test_default_suite_is_unchanged(runs, capsys):
    assert main(["eval", str(runs / "e2e"), "--sequences", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["suite"] == ["loss", "position"] and "niah" not in report
    assert report["windows"] == 4 and report["loss_past_window"] > 0 and "loss_no_ttt" in report


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--niah-depths", "0,1.5"], "needle depth 1.5 is outside the context"),
        (["--niah-depths", "0,half"], "--niah-depths: '0,half' is not a comma-separated list"),
        (["--niah-lengths", "64"], "S-NIAH context length 64 is too short for the passkey task"),
        (["--niah-trials", "0"], "--niah-trials: 0"),
    ],
)
def test_bad_niah_input_is_one_line(runs, capsys, args, words):
    assert main(["eval", str(runs / "e2e"), "--suite", "niah", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], lines


def test_unknown_suite_part(runs, capsys):
    assert main(["eval", str(runs / "e2e"), "--suite", "loss,needles"]) == 2
    assert "unknown part 'needles'" in capsys.readouterr().err
