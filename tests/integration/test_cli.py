"""`ttt train | eval | data prepare` as a user runs them: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.services import ROOT, TINY, free_port


def ttt(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_LOGGING_LEVEL="WARNING")
    return subprocess.run(
        [sys.executable, "-m", "ttt", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def tiny_args(tmp_path, text_dataset, *extra: str) -> list[str]:
    sets = [*TINY, f"data.path={text_dataset}", f"storage.root={tmp_path / 'runs'}", *extra]
    return [arg for item in sets for arg in ("--set", item)]


def test_sync_names_what_is_wrong_with_its_input(tmp_path):
    assert_one_line_error(ttt("sync", str(tmp_path / "nowhere")), "no run directory", "nowhere")
    journal = tmp_path / "run" / "mlflow-journal"
    journal.mkdir(parents=True)
    (journal / "meta.json").write_text("{not json")
    assert_one_line_error(ttt("sync", str(tmp_path / "run")), "meta.json", "is not a journal")
    (tmp_path / "done").mkdir()  # a run directory whose journal was delivered
    proc = ttt("sync", str(tmp_path / "done"))
    assert proc.returncode == 0 and json.loads(proc.stdout)["message"] == "nothing to deliver"


def test_train_then_eval_from_the_command_line(tmp_path, text_dataset):
    proc = ttt("train", "tiny", *tiny_args(tmp_path, text_dataset), "--run-name", "cli")
    assert proc.returncode == 0, proc.stderr
    assert "run cli: 6 steps" in proc.stdout and "validation loss" in proc.stdout
    assert "step 6/6" in proc.stderr  # plain progress lines when stderr is not a terminal
    proc = ttt("eval", str(tmp_path / "runs" / "cli"), "--sequences", "4", "--plot", str(tmp_path / "p.png"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["step"] == 6 and report["windows"] == 4 and report["loss_past_window"] > 0
    assert "loss_no_ttt" in report and (tmp_path / "p.png").stat().st_size > 0


def test_data_prepare_from_the_command_line(tmp_path):
    proc = ttt(
        "data",
        "prepare",
        str(ROOT / "jobs" / "recipes"),
        "--output",
        str(tmp_path / "ds"),
        "--val-every",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)
    assert meta["documents_val"] >= 1 and meta["tokens_train"] > 1000
    assert (tmp_path / "ds" / "train.npy").is_file()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "tiny-cpuu"], ["'tiny-cpuu'", "did you mean 'tiny-cpu'"]),
        (["train", "tiny-cpu", "--set", "ttt.mini_bach_size=8"], ["ttt.mini_bach_size", "did you mean"]),
        (["train", "tiny-cpu", "--set", "train.total_steps=ten"], ["train.total_steps", "valid integer"]),
        (["train", "tiny-cpu", "--set", "train.seq_len=100"], ["train.seq_len", "not divisible"]),
        (
            ["train", "tiny-cpu", "--set", "data.path=/no/such/dataset"],
            ["/no/such/dataset", "does not exist"],
        ),
        (["eval", "/no/such/run"], ["no checkpoint under /no/such/run/checkpoints"]),
    ],
)
def test_bad_input_is_one_line(args, words):
    assert_one_line_error(ttt(*args), *words)


def test_too_short_dataset(tmp_path, text_dataset):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a", "b"):
        (docs / f"{name}.txt").write_text("tiny")
    assert ttt("data", "prepare", str(docs), "--output", str(tmp_path / "short")).returncode == 0
    proc = ttt("train", "tiny", *tiny_args(tmp_path, text_dataset, f"data.path={tmp_path / 'short'}"))
    assert_one_line_error(proc, "fewer than one global batch")


def test_corrupt_checkpoint(tmp_path, text_dataset):
    broken = tmp_path / "runs" / "broken" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "step-00000003.pt").write_bytes(b"not a checkpoint")
    proc = ttt("train", "tiny", *tiny_args(tmp_path, text_dataset), "--run-name", "broken")
    assert_one_line_error(proc, "step-00000003.pt is corrupt or unreadable")
    assert_one_line_error(ttt("eval", str(broken / "step-00000003.pt")), "corrupt or unreadable")


def test_unwritable_output_directory(tmp_path, text_dataset):
    (tmp_path / "a-file").write_text("")
    proc = ttt(
        "train", "tiny", *tiny_args(tmp_path, text_dataset, f"storage.root={tmp_path / 'a-file' / 'runs'}")
    )
    assert_one_line_error(proc, "cannot write to", "a-file")


def test_unreachable_tracking_server(tmp_path, text_dataset):
    url = f"http://127.0.0.1:{free_port()}"
    proc = ttt("train", "tiny", *tiny_args(tmp_path, text_dataset), "--tracking-uri", url)
    assert_one_line_error(proc, "cannot reach the MLflow tracking server", url)
