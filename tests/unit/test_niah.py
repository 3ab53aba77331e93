"""S-NIAH: the needle lands where asked, the scorer can both succeed and fail, bad positions are errors."""

from __future__ import annotations

import csv
import dataclasses
import re

import pytest
import torch

from tests.helpers import random_model, small_job
from ttt.data.tokenizer import ByteTokenizer
from ttt.errors import UserError
from ttt.eval.niah import (
    TASKS,
    NiahResult,
    aligned_length,
    build_trial,
    learner_loglik,
    run_niah,
    score_trials,
    stream_filler,
    ttt_block,
)
from ttt.eval.plots import niah_heatmap
from ttt.eval.position import (
    NiahSettings,
    SuiteResult,
    checkpoint_label,
    parse_suite,
    suite_metrics,
    write_suite,
)
from ttt.model.ttt import MetaLearner
from ttt.sweep.plots import figure_texts

TOK = ByteTokenizer()


def numbers_in(row: torch.Tensor) -> list[str]:
    return re.findall(r"\d+", TOK.decode(row.tolist()))


def reader(knows: bool):
    """A fake model that reads the context: the haystack has no digits, so the first number in a sequence
    is the needle's and the last is the candidate answer. `knows=True` puts all its probability on the
    needle's value (an oracle), `knows=False` on anything else (an adversary)."""

    def loglik(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
        for i, row in enumerate(tokens):
            found = numbers_in(row)
            if (found[0] == found[-1]) != knows:
                out[i] = -1.0
        return out

    return loglik


def writer(knows: bool):
    """A fake greedy decoder: the oracle writes out the needle's value (the prompt's only number), the
    adversary the same number of tokens of something else."""

    def generate(prompt: list[int], count: int) -> list[int]:
        if not knows:
            return TOK.encode("x" * count)
        (value,) = numbers_in(torch.tensor(prompt))  # the answer is not in the prompt, only the needle
        return TOK.encode(f" {value}")[:count]

    return generate


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_is_planted_at_the_requested_depth(task, depth):
    trial = build_trial(TASKS[task], TOK, 256, seed=7, depth=depth)
    needle_text = TASKS[task].needle.format(answer=trial.answer_text)
    assert trial.needle == TOK.encode(needle_text)
    assert trial.prefix[trial.needle_start : trial.needle_start + len(trial.needle)] == trial.needle
    assert len(trial.prefix) + len(trial.answer) == 256 + 1 and trial.prefix[0] == TOK.bos_token_id
    question = TOK.encode(TASKS[task].question)
    assert trial.prefix[-len(question) :] == question
    haystack = 256 - len(trial.needle) - len(question) - len(trial.answer)
    assert trial.needle_start == 1 + round(depth * haystack)
    if depth == 1.0:  # the needle ends right where the question starts
        assert trial.needle_start + len(trial.needle) == len(trial.prefix) - len(question)
    # The answer is the needle's value, the distractors are other values of the same token length.
    assert TOK.decode(trial.answer) == f" {trial.answer_text}"
    assert len(trial.answer_text) == TASKS[task].digits
    assert len({tuple(d) for d in trial.distractors}) == 4
    assert all(len(d) == len(trial.answer) and d != trial.answer for d in trial.distractors)
    # The needle's value appears exactly once in the context (the passage has no digits).
    assert numbers_in(torch.tensor(trial.prefix)) == [trial.answer_text]


def test_trials_are_seeded():
    a = build_trial(TASKS["passkey"], TOK, 200, seed="s/1", depth=0.5)
    assert a == build_trial(TASKS["passkey"], TOK, 200, seed="s/1", depth=0.5)
    assert a.answer != build_trial(TASKS["passkey"], TOK, 200, seed="s/2", depth=0.5).answer


def test_explicit_position_and_stream_filler():
    filler = stream_filler([TOK.bos_token_id, *TOK.encode("abc " * 50)], TOK.bos_token_id)
    trial = build_trial(TASKS["passkey"], TOK, 160, seed=1, position=10, filler=filler)
    assert trial.needle_start == 10 and trial.prefix[10 : 10 + len(trial.needle)] == trial.needle
    assert TOK.bos_token_id not in trial.prefix[1:]
    assert set(TOK.decode(trial.prefix[1:10])) <= set("abc ")


def test_oracle_ranks_the_true_answer_first_and_adversary_last():
    trials = [build_trial(TASKS["number"], TOK, 192, seed=i, depth=i / 5) for i in range(6)]
    good = score_trials(trials, reader(knows=True), batch_size=7)
    bad = score_trials(trials, reader(knows=False), batch_size=7)
    assert all(
        s.correct and s.rank == 0 and s.margin == pytest.approx(len(t.answer))
        for s, t in zip(good, trials, strict=True)
    )
    assert all(not s.correct and s.rank == 4 for s in bad)
    # A model that ignores the context ties every candidate: a miss, not a hit.
    flat = score_trials(trials, lambda tokens: torch.zeros(tokens.shape[0], tokens.shape[1] - 1))
    assert not any(s.correct for s in flat)


def test_exact_match_with_a_generate_function():
    trial = build_trial(TASKS["passkey"], TOK, 128, seed=3, depth=0.5)
    oracle = reader(knows=True)
    (hit,) = score_trials([trial], oracle, generate=lambda prompt, n: trial.answer)
    (miss,) = score_trials([trial], oracle, generate=lambda prompt, n: trial.distractors[0])
    assert hit.exact_match is True and miss.exact_match is False


def test_greedy_scoring_oracle_and_adversary():
    kwargs = dict(lengths=[128, 160], depths=[0, 1], trials=2, tasks=["passkey", "number"])
    good = run_niah(None, TOK, generate=writer(knows=True), **kwargs)
    assert good.scoring == ("greedy",) and good.mean("greedy") == 1.0
    assert all(c.exact_match == 1.0 and c.accuracy is None and c.mean_margin is None for c in good.cells)
    report = good.to_dict()
    assert report["scoring"] == ["greedy"] and report["exact_match"] == 1.0 and report["accuracy"] is None
    bad = run_niah(None, TOK, generate=writer(knows=False), **kwargs)
    assert bad.mean("greedy") == 0.0 and all(c.exact_match == 0.0 for c in bad.cells)
    # Both methods at once are independent: the ranking can be right while the decoding is wrong.
    both = run_niah(reader(knows=True), TOK, generate=writer(knows=False), **kwargs)
    assert both.scoring == ("likelihood", "greedy") and both.accuracy == 1.0 and both.mean("greedy") == 0.0
    likelihood = run_niah(reader(knows=True), TOK, **kwargs)
    assert likelihood.scoring == ("likelihood",) and likelihood.to_dict()["exact_match"] is None
    with pytest.raises(ValueError, match="loglik, generate or both"):
        run_niah(None, TOK, **kwargs)


def test_suite_files_and_metrics_per_scoring_method(tmp_path):
    kwargs = dict(lengths=[128], depths=[0, 1], trials=2, tasks=["passkey"])
    niah = {
        "e2e": run_niah(reader(knows=True), TOK, generate=writer(knows=True), **kwargs),
        "fa": run_niah(reader(knows=False), TOK, generate=writer(knows=False), **kwargs),
    }
    report = {"checkpoint": "e2e", "step": 6, "seq_len": 128, "suite": ["niah"]}
    result = SuiteResult("e2e", ("niah",), report, {}, 16, niah, 6, ["fa"])
    files = write_suite(result, tmp_path)
    assert {"heatmap", "heatmap_greedy", "csv", "report"} <= set(files)
    for name in ("niah_heatmap.png", "niah_heatmap_greedy.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(files["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "task", "length", "depth", "accuracy", "trials", "scoring"]
    assert len(rows) == 2 * 2 * 2  # models × scoring methods × cells
    for model, expected in (("e2e", 1.0), ("fa", 0.0)):
        for scoring in ("likelihood", "greedy"):
            mine = [r for r in rows if r["model"] == model and r["scoring"] == scoring]
            assert len(mine) == 2 and all(float(r["accuracy"]) == expected for r in mine)
    metrics = suite_metrics(result)
    assert metrics["niah/accuracy"] == 1.0 and metrics["niah/greedy/accuracy"] == 1.0
    assert metrics["niah/greedy/passkey/L128/depth1"] == 1.0 and metrics["niah/passkey/L128/depth1"] == 1.0
    assert metrics["baseline/fa/niah/greedy/accuracy"] == 0.0 and metrics["baseline/fa/niah/accuracy"] == 0.0
    # Greedy only: no likelihood files or metrics, nothing None.
    greedy = {k: run_niah(None, TOK, generate=writer(True), **kwargs) for k in ("e2e", "fa")}
    only = SuiteResult("e2e", ("niah",), dict(report), {}, 16, greedy, 6, ["fa"])
    files = write_suite(only, tmp_path / "greedy")
    assert "heatmap_greedy" in files and "heatmap" not in files
    assert not (tmp_path / "greedy" / "niah_heatmap.png").exists()
    metrics = suite_metrics(only)
    assert "niah/accuracy" not in metrics and None not in metrics.values()
    assert metrics["baseline/fa/niah/greedy/accuracy"] == 1.0


def test_accuracy_per_cell_and_lengths_are_multiples_of_b():
    seen: set[int] = set()

    def oracle(tokens: torch.Tensor) -> torch.Tensor:
        seen.add(tokens.shape[1] - 1)
        return reader(knows=True)(tokens)

    kwargs = dict(lengths=[130, 200], depths=[0, 0.5, 1], trials=3, block=16, tasks=["passkey", "number"])
    result = run_niah(oracle, TOK, **kwargs)
    cells = {(c.task, c.length, c.depth) for c in result.cells}
    assert cells == {(t, n, d) for t in ("passkey", "number") for n in (144, 208) for d in (0.0, 0.5, 1.0)}
    assert seen == {144, 208} and all(n % 16 == 0 for n in seen)
    assert all(c.accuracy == 1.0 and c.trials == 3 for c in result.cells) and result.chance == 0.2
    adversary = run_niah(reader(knows=False), TOK, **kwargs)
    assert adversary.accuracy == 0.0
    assert aligned_length(64, 16) == 64 and aligned_length(65, 16) == 80


@pytest.mark.parametrize("depth", [-0.1, 1.5, float("nan")])
def test_depth_outside_the_context_is_a_clear_error(depth):
    with pytest.raises(UserError, match=rf"needle depth {depth} is outside the context"):
        build_trial(TASKS["passkey"], TOK, 256, seed=0, depth=depth)
    with pytest.raises(UserError, match="needle depth"):
        run_niah(reader(True), TOK, lengths=[256], depths=[0.5, depth], trials=1)
    with pytest.raises(UserError, match="needle depth"):
        NiahSettings(depths=(depth,)).check()


def test_position_outside_the_context_is_a_clear_error():
    question = len(TOK.encode(TASKS["passkey"].question))
    for position in (0, 256 - question, 256, 10_000):
        with pytest.raises(UserError, match=rf"^needle position {position} is outside the context"):
            build_trial(TASKS["passkey"], TOK, 256, seed=0, position=position)
    with pytest.raises(UserError, match="too short for the number task"):
        build_trial(TASKS["number"], TOK, 64, seed=0, depth=0.5)


def test_other_bad_settings():
    with pytest.raises(UserError, match="unknown S-NIAH task 'needle'"):
        NiahSettings(tasks=("needle",)).check()
    with pytest.raises(UserError, match="--niah-trials: 0"):
        NiahSettings(trials=0).check()
    with pytest.raises(UserError, match="length 0"):
        NiahSettings(lengths=(0,)).check()
    with pytest.raises(UserError, match="--niah-scoring: 'beam' is not 'likelihood', 'greedy' or 'both'"):
        NiahSettings(scoring="beam").check()
    assert NiahSettings(scoring="both").methods == ("likelihood", "greedy")
    assert NiahSettings().methods == ("likelihood",)
    with pytest.raises(UserError, match="unknown part 'los'"):
        parse_suite("los,niah")
    assert parse_suite("loss, niah,loss") == ("loss", "niah")


def test_learner_loglik_is_the_models_token_likelihood():
    job = small_job(24)
    learner = MetaLearner(random_model(job), job.ttt)
    assert ttt_block(learner) == job.ttt.mini_batch_size
    tokens = torch.randint(1, job.model.vocab_size, (3, 25), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = job.model.bos_token_id
    got = learner_loglik(learner, torch.device("cpu"))(tokens)
    with torch.no_grad():
        _, out = learner(tokens[:, :-1], tokens[:, 1:])
    assert got.shape == (3, 24) and torch.allclose(got, -out.token_nll)
    static = MetaLearner(learner.model, dataclasses.replace(job.ttt, enabled=False))
    assert ttt_block(static) == 1
    assert learner_loglik(static, torch.device("cpu"))(tokens[:, :23]).shape == (3, 22)  # any length


def test_checkpoint_labels():
    assert checkpoint_label("runs/e2e") == "e2e"
    assert checkpoint_label("s3://bucket/runs/e2e/") == "e2e"
    assert checkpoint_label("runs/e2e/checkpoints/step-00000006.pt") == "e2e"
    assert checkpoint_label("model.pt") == "model"


def test_heatmap_is_annotated_and_labelled():
    result = run_niah(reader(True), TOK, lengths=[128, 192], depths=[0, 1], trials=2, tasks=["passkey"])
    fig = niah_heatmap({"e2e": result, "fa": NiahResult(result.cells, 4, "passage")}, "S-NIAH")
    texts = figure_texts(fig)
    assert texts.count("1.00\n(n=2)") == 8
    assert "context length (tokens)" in texts and any(t.startswith("needle depth") for t in texts)
    assert "e2e: passkey" in texts and "fa: passkey" in texts and "S-NIAH" in texts
    assert "accuracy (chance 0.20)" in texts
    # Greedy: its own values and label; cells not scored that way are left blank.
    both = run_niah(reader(True), TOK, generate=writer(False), lengths=[128], depths=[0], trials=2)
    texts = figure_texts(niah_heatmap({"e2e": both}, "S-NIAH greedy", "greedy"))
    assert "0.00\n(n=2)" in texts and "exact match of greedy decoding" in texts
    blank = figure_texts(niah_heatmap({"e2e": result}, "S-NIAH greedy", "greedy"))
    assert not any(t.endswith("(n=2)") for t in blank)
