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
from ttt.data.tokenizer import ByteTokenizer
from ttt.eval.niah import TASKS, build_trial, passage_filler
from ttt.eval.position import NiahSettings, load_for_eval, run_niah_for
from ttt.train.trainer import Trainer

LENGTHS, DEPTHS = (100, 120), (0.0, 0.5, 1.0)  # not multiples of b=16: rounded up to 112 and 128
CELLS = {(t, n, d) for t in ("passkey", "number") for n in (112, 128) for d in DEPTHS}
TOK = ByteTokenizer()


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
    assert list(rows[0]) == ["model", "task", "length", "depth", "accuracy", "trials", "scoring"]
    assert len(rows) == 2 * len(CELLS) and {r["scoring"] for r in rows} == {"likelihood"}
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


def test_greedy_scoring_of_model_and_baseline(runs, tmp_path, mlflow_server, capsys):
    out = tmp_path / "eval"
    args = ["--niah-lengths", "100", "--niah-depths", "0.5", "--niah-trials", "2", "--niah-tasks", "passkey"]
    assert (
        main(
            [
                *("eval", str(runs / "e2e"), "--suite", "niah", "--niah-scoring", "greedy", *args),
                *("--baseline", str(runs / "nottt"), "--output", str(out), "--tracking-uri", mlflow_server),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    for model in ("e2e", "nottt"):  # the baseline is scored the same way
        niah = report["niah"][model]
        assert niah["scoring"] == ["greedy"] and niah["accuracy"] is None and 0 <= niah["exact_match"] <= 1
        (cell,) = niah["cells"]
        assert cell["accuracy"] is None and cell["exact_match"] == niah["exact_match"] and cell["trials"] == 2
    with open(out / "niah.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["scoring"], r["length"]) for r in rows] == [
        ("e2e", "greedy", "112"),
        ("nottt", "greedy", "112"),
    ]
    assert (out / "niah_heatmap_greedy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "niah_heatmap.png").exists()
    run = MlflowClient(mlflow_server).get_run(report["mlflow_run_id"])
    metrics = run.data.metrics
    assert metrics["niah/greedy/accuracy"] == pytest.approx(report["niah"]["e2e"]["exact_match"])
    assert "niah/greedy/passkey/L112/depth0.5" in metrics and "baseline/nottt/niah/greedy/accuracy" in metrics
    assert "niah/accuracy" not in metrics and run.data.params["niah_scoring"] == "greedy"


def test_greedy_is_deterministic_and_is_streaming_generation(runs, monkeypatch):
    """The suite's decoder is `ttt.eval.generate.generate`, greedy, on the trial's prompt, for as many tokens
    as the answer has: its output equals a direct call on the checkpoint loaded by `load_model`."""
    import ttt.eval.generate as gen

    calls: list[tuple[list[int], int, list[int]]] = []
    real = gen.generate

    def spy(model, ttt, prompt, count, **kwargs):
        assert kwargs == {"greedy": True}
        calls.append((list(prompt), count, out := real(model, ttt, prompt, count, **kwargs)))
        return out

    monkeypatch.setattr(gen, "generate", spy)
    loaded = load_for_eval(str(runs / "e2e"), device="cpu")
    settings = NiahSettings(lengths=(100,), depths=(0.5,), trials=2, tasks=("passkey",), scoring="greedy")
    first = run_niah_for(loaded, settings)
    seen = list(calls)
    assert run_niah_for(loaded, settings).cells == first.cells and calls[len(seen) :] == seen
    # The trials as run_niah seeds them (length 100 rounded up to b=16: 112).
    trials = [
        build_trial(
            TASKS["passkey"], TOK, 112, seed=f"0/passkey/112/0.5/{i}", depth=0.5, filler=passage_filler(TOK)
        )
        for i in range(2)
    ]
    assert [(prompt, count) for prompt, count, _ in seen] == [(t.prefix, len(t.answer)) for t in trials]
    assert (
        first.cells[0].exact_match
        == sum(out == t.answer for (_, _, out), t in zip(seen, trials, strict=True)) / 2
    )
    model, job = gen.load_model(str(runs / "e2e"), "cpu")
    assert real(model, job.ttt, trials[0].prefix, len(trials[0].answer), greedy=True) == seen[0][2]


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
        (["--niah-scoring", "beam"], "--niah-scoring: 'beam' is not 'likelihood', 'greedy' or 'both'"),
    ],
)
def test_bad_niah_input_is_one_line(runs, capsys, args, words):
    assert main(["eval", str(runs / "e2e"), "--suite", "niah", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], lines


def test_unknown_suite_part(runs, capsys):
    assert main(["eval", str(runs / "e2e"), "--suite", "loss,needles"]) == 2
    assert "unknown part 'needles'" in capsys.readouterr().err
