"""`ttt import-official` on real Orbax checkpoints, written by orbax and laid out like the official ones."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from tests.helpers import random_model, small_job
from ttt import cli
from ttt.config import JobConfig, dump
from ttt.eval.generate import load_model, streaming_nll
from ttt.model import official
from ttt.model.orbax_import import OfficialImportError, find_weights, import_official, load_official
from ttt.model.transformer import Transformer
from ttt.model.ttt import sequence_loss
from ttt.parity import ABS_TOLERANCE, _abs_check
from ttt.train.checkpoint import load_checkpoint

LATEST, OLDER = 12, 7


def nest(flat: dict[str, np.ndarray]) -> dict:
    """Official dotted names → the nested dict the official code saves, with its None leaves."""
    tree: dict = {"language_model": {"model": {"lm_head": None, "step_index": {"init": None}}}}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def write_official(root: Path, steps: dict[int, dict[str, np.ndarray]]) -> Path:
    """`<root>/<step>/model_weights` and `opt_state`, through a CheckpointManager like the official code."""
    with ocp.CheckpointManager(root.absolute(), item_names=("model_weights", "opt_state")) as manager:
        for step, flat in steps.items():
            items = ocp.args.Composite(
                model_weights=ocp.args.StandardSave(nest(flat)),
                opt_state=ocp.args.StandardSave({"count": np.array(step, dtype=np.int32)}),
            )
            manager.save(step, args=items)
        manager.wait_until_finished()
    return root


@pytest.fixture(scope="module")
def golden_params(golden) -> dict[str, np.ndarray]:
    return official.normalize_keys(golden, "param/")


@pytest.fixture(scope="module")
def orbax_root(tmp_path_factory, golden_params) -> Path:
    # The older step holds other weights, so that loading it by mistake would show.
    older = {name: value * np.float32(0.5) for name, value in golden_params.items()}
    return write_official(tmp_path_factory.mktemp("official") / "run", {OLDER: older, LATEST: golden_params})


def model_from(state: dict[str, torch.Tensor], job: JobConfig) -> Transformer:
    model = Transformer(job.model)
    model.load_state_dict(state, strict=True)
    return model


def assert_matches_golden(model: Transformer, golden, golden_job, golden_tokens) -> None:
    """Same quantities and tolerance as `ttt parity` on the golden file."""
    job, step = golden_job
    with torch.no_grad():
        nottt = sequence_loss(model, *golden_tokens, dataclasses.replace(job.ttt, enabled=False))
        meta = sequence_loss(model, *golden_tokens, job.ttt, step=step)
    for ours, key in (
        (nottt.token_nll.numpy(), "nottt/token_nll"),
        (meta.chunk_losses.numpy(), "meta/loss_per_chunk"),
    ):
        check = _abs_check(ours, golden[key])
        assert check["ok"], (key, check)
        assert check["tolerance"] == ABS_TOLERANCE == 1e-5


def test_imported_model_reproduces_the_golden_losses(orbax_root, golden, golden_job, golden_tokens):
    loaded = load_official(orbax_root, golden_job[0].model)
    assert loaded.step == LATEST and loaded.source == orbax_root / str(LATEST) / "model_weights"
    assert all(t.dtype == torch.float32 for t in loaded.state.values())
    assert_matches_golden(model_from(loaded.state, golden_job[0]), golden, golden_job, golden_tokens)


def test_root_step_folder_and_weights_folder_give_the_same_weights(orbax_root, golden_job):
    cfg = golden_job[0].model
    weights = orbax_root / str(LATEST) / "model_weights"
    assert find_weights(orbax_root) == (weights, LATEST)
    assert find_weights(orbax_root / str(LATEST)) == (weights, LATEST)
    assert find_weights(weights) == (weights, LATEST)
    reference = load_official(orbax_root, cfg).state
    for path in (orbax_root / str(LATEST), weights):
        state = load_official(path, cfg).state
        assert all(torch.equal(state[name], reference[name]) for name in reference)


def test_step_picks_an_older_step_and_a_missing_one_is_named(orbax_root, golden_job, golden_params):
    older = load_official(orbax_root, golden_job[0].model, step=OLDER)
    assert older.step == OLDER
    wte = official.ROOT + "wte.weight"
    np.testing.assert_array_equal(older.state["embed.weight"].numpy(), golden_params[wte] * np.float32(0.5))
    with pytest.raises(OfficialImportError, match=r"no step 3; its steps are \[7, 12\]"):
        find_weights(orbax_root, step=3)
    with pytest.raises(OfficialImportError, match="is step 12, not --step 7"):
        find_weights(orbax_root / str(LATEST), step=OLDER)


def test_round_trip_of_another_architecture(tmp_path):
    """Any config: our weights → official tree → Orbax → import gives them back bit for bit."""
    job = small_job()
    model = random_model(job, seed=3)
    tree = official.from_state_dict(model.state_dict(), job.model)
    assert {name: value.shape for name, value in tree.items()} == official.official_shapes(job.model)
    root = write_official(tmp_path / "run", {5: tree})
    state = load_official(root, job.model).state
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(orbax_root, golden_job):
    wrong = dataclasses.replace(golden_job[0].model, intermediate_size=64)
    with pytest.raises(OfficialImportError) as info:
        load_official(orbax_root, wrong)
    message = str(info.value)
    assert "language_model/model/h/blocks/feed_forward/w1/weight has shape (4, 32, 48)" in message
    assert "the config expects (4, 32, 64)" in message
    assert "intermediate_size=48" in message  # what the checkpoint's sizes are


@pytest.mark.parametrize(("layers", "suffix"), [(5, 2), (4, 1), (4, 0)])
def test_a_different_number_of_blocks_is_refused(orbax_root, golden_job, layers, suffix):
    wrong = dataclasses.replace(golden_job[0].model, num_layers=layers, suffix_len=suffix)
    with pytest.raises(OfficialImportError, match="has 4 blocks, 2 of them with a prime MLP; the config has"):
        load_official(orbax_root, wrong)


def test_a_checkpoint_of_another_model_is_refused(tmp_path, golden_job):
    job = small_job()
    root = write_official(
        tmp_path / "run", {1: official.from_state_dict(random_model(job).state_dict(), job.model)}
    )
    with pytest.raises(OfficialImportError, match="has 3 blocks, 2 of them with a prime MLP"):
        load_official(root, golden_job[0].model)


def test_paths_that_are_not_official_checkpoints(tmp_path, golden_job):
    cfg = golden_job[0].model
    with pytest.raises(OfficialImportError, match="is not a folder"):
        load_official(tmp_path / "missing", cfg)
    (tmp_path / "plain" / "4799").mkdir(parents=True)
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(OfficialImportError, match="is not an official Orbax checkpoint"):
        load_official(tmp_path / "plain", cfg)
    broken = tmp_path / "broken" / "model_weights"
    broken.mkdir(parents=True)
    (broken / "_METADATA").write_text("not json")
    with pytest.raises(OfficialImportError, match=r"cannot read .* as an Orbax checkpoint"):
        load_official(tmp_path / "broken", cfg)


def test_without_orbax_the_error_says_what_to_install(orbax_root, golden_job, monkeypatch):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # makes `import orbax.checkpoint` fail
    with pytest.raises(OfficialImportError, match=r"pip install 'ttt-platform\[official\]'"):
        load_official(orbax_root, golden_job[0].model)


def test_import_writes_checkpoints_that_load_model_reads(
    orbax_root, tmp_path, golden, golden_job, golden_tokens
):
    job = golden_job[0]
    where, _ = import_official(orbax_root, job, str(tmp_path / "official.pt"))
    model, loaded_job = load_model(where, "cpu")
    assert loaded_job == job
    assert_matches_golden(model, golden, golden_job, golden_tokens)

    run_dir = tmp_path / "imported-run"
    where, _ = import_official(orbax_root, job, str(run_dir), step=OLDER)
    assert Path(where) == run_dir / "checkpoints" / "step-00000007.pt"
    assert load_checkpoint(str(run_dir))["state"]["step"] == OLDER
    with pytest.raises(OfficialImportError, match="already holds checkpoints"):
        import_official(orbax_root, job, str(run_dir))
    with pytest.raises(OfficialImportError, match="already exists"):
        import_official(orbax_root, job, str(tmp_path / "official.pt"))


def test_cli_imports_then_streams_the_checkpoint(
    orbax_root, tmp_path, golden, golden_job, golden_tokens, capsys
):
    job = golden_job[0]
    config = tmp_path / "official.yaml"
    dump(job, config)
    out = tmp_path / "run"
    assert cli.main(["import-official", str(orbax_root), str(out), "--config", str(config)]) == 0
    assert f"step-{LATEST:08d}.pt" in capsys.readouterr().out
    # What `ttt generate` does with it: load, prefill, then token by token (no TTT: the reference's nottt
    # run); most of the sequence is prefilled, since each streamed token costs a full pass.
    model, loaded = load_model(str(out), "cpu")
    inputs, targets = golden_tokens
    tokens = torch.cat((inputs[:1], targets[:1, -1:]), dim=1)[0]
    nll = streaming_nll(model, dataclasses.replace(loaded.ttt, enabled=False), tokens, len(tokens) - 8)
    assert _abs_check(nll.numpy(), golden["nottt/token_nll"][0])["ok"]

    args = ["import-official", str(orbax_root), str(tmp_path / "x.pt"), "--config", str(config)]
    code = cli.main([*args, "--set", "model.intermediate_size=64"])
    assert code == 2
    assert "feed_forward/w1/weight has shape (4, 32, 48)" in capsys.readouterr().err
