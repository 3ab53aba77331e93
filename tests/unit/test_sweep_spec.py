"""The sweep spec: grid and random expansion, invalid combinations, and bad sweeps rejected with the field
named, as a sweep file and as a TTTSweep manifest."""

from __future__ import annotations

import math

import pytest
import yaml

from ttt.config import ConfigError, resolve
from ttt.sweep.spec import OBJECTIVE_METRICS, expand, from_dict, from_resource, load_any

BASE = resolve("tiny-cpu")  # T=256, W=64, b=32


def sweep(*parameters: dict, **extra) -> dict:
    return {"name": "s", "parameters": list(parameters), **extra}


def error_of(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        expand(from_dict(data), BASE)
    return info.value


# -- expansion --------------------------------------------------------------------------------------


def test_grid_is_the_product_of_the_values_in_order():
    spec = from_dict(
        sweep(
            {"name": "model.window_size", "values": [32, 64]},
            {"name": "ttt.mini_batch_size", "values": [16, 32]},
        )
    )
    trials = expand(spec, BASE).trials
    assert [t.params for t in trials] == [
        {"model.window_size": 32, "ttt.mini_batch_size": 16},
        {"model.window_size": 32, "ttt.mini_batch_size": 32},
        {"model.window_size": 64, "ttt.mini_batch_size": 16},
        {"model.window_size": 64, "ttt.mini_batch_size": 32},
    ]
    assert [t.index for t in trials] == [0, 1, 2, 3]
    assert (trials[1].config.model.window_size, trials[1].config.ttt.mini_batch_size) == (32, 32)
    assert trials[1].overrides == ["model.window_size=32", "ttt.mini_batch_size=32"]
    assert trials[1].label() == "window_size=32, mini_batch_size=32"


def test_range_grids_are_typed_like_the_field():
    spec = from_dict(
        sweep(
            {"name": "optim.lr", "min": 1e-4, "max": 1e-2, "num": 3, "scale": "log"},
            {"name": "train.total_steps", "min": 100, "max": 200, "step": 50},
        )
    )
    trials = expand(spec, BASE).trials
    lrs = sorted({t.params["optim.lr"] for t in trials})
    steps = sorted({t.params["train.total_steps"] for t in trials})
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-2]) and all(isinstance(x, float) for x in lrs)
    assert steps == [100, 150, 200] and all(isinstance(x, int) for x in steps)
    assert trials[0].config.optim.lr == pytest.approx(1e-4) and len(trials) == 9


def test_int_ranges_round_and_merge_neighbours():
    spec = from_dict(sweep({"name": "train.total_steps", "min": 100, "max": 101, "num": 5}))
    assert [t.params["train.total_steps"] for t in expand(spec, BASE).trials] == [100, 101]


def test_random_search_draws_max_trials_deterministically_from_the_seed():
    data = sweep(
        {"name": "optim.lr", "min": 1e-4, "max": 1e-2, "scale": "log"},
        {"name": "model.window_size", "values": [32, 64, 128]},
        algorithm="random",
        max_trials=6,
        seed=3,
    )
    first = [t.params for t in expand(from_dict(data), BASE).trials]
    again = [t.params for t in expand(from_dict(data), BASE).trials]
    other = [t.params for t in expand(from_dict({**data, "seed": 4}), BASE).trials]
    assert len(first) == 6 and first == again and first != other
    for params in first:
        assert 1e-4 <= params["optim.lr"] <= 1e-2 and params["model.window_size"] in (32, 64, 128)
    # log-uniform: the draws spread over the decades rather than bunching near the top
    logs = [math.log10(p["optim.lr"]) for p in first]
    assert min(logs) < -3


def test_invalid_combinations_are_listed_together_or_skipped():
    # b must divide T=256 and be at most W: (32, 64) breaks the second rule, 48 the first.
    data = sweep(
        {"name": "model.window_size", "values": [32, 64]},
        {"name": "ttt.mini_batch_size", "values": [32, 48, 64]},
    )
    err = error_of(data)
    assert err.field == "parameters" and "3 combination(s) are invalid" in err.message
    assert "model.window_size=32, ttt.mini_batch_size=64: ttt.mini_batch_size" in err.message
    assert "ttt.mini_batch_size=48: train.seq_len: 256 is not divisible" in err.message
    assert "skip_invalid" in err.message
    expansion = expand(from_dict({**data, "skip_invalid": True}), BASE)
    assert [t.params for t in expansion.trials] == [
        {"model.window_size": 32, "ttt.mini_batch_size": 32},
        {"model.window_size": 64, "ttt.mini_batch_size": 32},
        {"model.window_size": 64, "ttt.mini_batch_size": 64},
    ]
    assert [t.index for t in expansion.trials] == [0, 1, 2] and len(expansion.skipped) == 3
    assert "mini_batch_size" in expansion.skipped[0][1]


def test_overrides_apply_to_every_trial_before_its_values():
    spec = from_dict(
        sweep({"name": "ttt.mini_batch_size", "values": [16, 32]}, overrides=["train.total_steps=70"])
    )
    assert {t.config.train.total_steps for t in expand(spec, BASE).trials} == {70}


# -- bad sweeps: each error names the field ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        # the acceptance's four
        (sweep({"name": "model.window_size", "values": [32]}, colour="red"), "colour", "unknown key"),
        (sweep({"name": "model.window_size", "values": []}), "parameters[0].values", "empty"),
        (
            sweep(
                {"name": "model.window_size", "values": [32]},
                {"name": "optim.lr", "min": 0.1, "max": 0.01, "num": 2},
            ),
            "parameters[1].min",
            "greater than max",
        ),
        (
            sweep({"name": "model.window_size", "values": [32]}, objective={"metric": "val/accuracy"}),
            "objective.metric",
            "not logged by the trainer",
        ),
        # and more
        (sweep({"name": "optim.lr", "values": [0.1], "colour": 1}), "parameters[0].colour", "unknown key"),
        (
            sweep({"name": "optim.lr", "values": [0.1]}, {"name": "optim.lr", "values": [0.2]}),
            "parameters[1].name",
            "swept twice",
        ),
        (sweep({"name": "optim.lr", "values": [0.1], "min": 0.1, "max": 1}), "parameters[0]", "not both"),
        (
            sweep({"name": "optim.lr", "min": 0, "max": 1, "num": 3, "scale": "log"}),
            "parameters[0].min",
            "positive",
        ),
        (sweep({"name": "optim.lr", "min": 0.1, "max": 1}), "parameters[0]", "step or num"),
        (sweep({"name": "optim.lr", "max": 1}), "parameters[0]", "both min and max"),
        (sweep(), "parameters", "at least 1"),
        (sweep({"name": "optim.lr", "values": [0.1]}, name="Bad Name"), "name", "pattern"),
        (
            sweep({"name": "optim.lr", "values": [0.1]}, parallelism=0),
            "parallelism",
            "greater than or equal to 1",
        ),
    ],
)
def test_bad_sweeps_are_rejected_naming_the_field(data, field, words):
    with pytest.raises(ConfigError) as info:
        from_dict(data, source="s")
    assert info.value.field == field, str(info.value)
    assert words in str(info.value)


def test_unknown_objective_lists_the_metrics_the_trainer_logs():
    with pytest.raises(ConfigError) as info:
        from_dict(sweep({"name": "optim.lr", "values": [0.1]}, objective={"metric": "loss"}))
    assert all(metric in info.value.message for metric in OBJECTIVE_METRICS)


@pytest.mark.parametrize(
    ("name", "field", "words"),
    [
        ("model.window_sise", "parameters[0].name", "did you mean 'model.window_size'"),
        ("model", "parameters[0].name", "section"),
        ("nonsense.field", "parameters[0].name", "unknown key"),
    ],
)
def test_a_swept_field_must_be_a_config_field(name, field, words):
    err = error_of(sweep({"name": name, "values": [1]}))
    assert err.field == field and words in err.message


def test_a_grid_larger_than_max_trials_is_refused():
    err = error_of(sweep({"name": "model.window_size", "values": [32, 64, 128]}, max_trials=2))
    assert err.field == "max_trials" and "3 combinations" in err.message


def test_a_value_the_field_cannot_take_is_an_invalid_combination():
    err = error_of(sweep({"name": "ttt.mini_batch_size", "values": [32, "big"]}))
    assert err.field == "parameters" and "mini_batch_size=big" in err.message


# -- the TTTSweep form ------------------------------------------------------------------------------


def manifest(**spec) -> dict:
    return {
        "apiVersion": "ttt.dev/v1alpha1",
        "kind": "TTTSweep",
        "metadata": {"name": "wb"},
        "spec": {
            "template": {"recipe": "tiny-cpu"},
            "parameters": [{"name": "model.window_size", "values": [32, 64]}],
            **spec,
        },
    }


def test_a_manifest_gives_the_same_trials_as_a_sweep_file(tmp_path):
    spec, template = from_resource(
        manifest(maxTrials=4, earlyStopping={"method": "median", "gracePeriod": 2})
    )
    assert spec.name == "wb" and spec.max_trials == 4 and template == {"recipe": "tiny-cpu"}
    assert spec.early_stopping.method == "median" and spec.early_stopping.grace_period == 2
    path = tmp_path / "wb.yaml"
    path.write_text(yaml.safe_dump(manifest()))
    spec, base = load_any(str(path))
    assert base == BASE
    assert [t.params for t in expand(spec, base).trials] == [
        {"model.window_size": 32},
        {"model.window_size": 64},
    ]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"maxTrials": 0}, "spec.maxTrials"),
        ({"earlyStopping": {"gracePeriod": 0}}, "spec.earlyStopping.gracePeriod"),
        ({"skipInvalid": "perhaps"}, "spec.skipInvalid"),
        ({"objective": {"metric": "val/accuracy"}}, "spec.objective.metric"),
        ({"parameters": [{"name": "model.window_size", "values": []}]}, "spec.parameters[0].values"),
    ],
)
def test_manifest_errors_name_the_resource_field(spec, field):
    with pytest.raises(ConfigError) as info:
        from_resource(manifest(**spec))
    assert info.value.field == field, str(info.value)


def test_a_manifest_needs_a_template():
    data = manifest()
    del data["spec"]["template"]
    with pytest.raises(ConfigError, match=r"spec\.template"):
        from_resource(data)


def test_a_sweep_file_needs_a_base(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep({"name": "optim.lr", "values": [0.1]})))
    with pytest.raises(ConfigError) as info:
        load_any(str(path))
    assert info.value.field == "base"


def test_the_bundled_sweep_is_a_valid_two_by_two_grid():
    from tests.helpers import ROOT

    spec, base = load_any(str(ROOT / "jobs" / "examples" / "sweep-tiny-cpu.yaml"))
    trials = expand(spec, base).trials
    assert len(trials) == 4 and spec.parallelism == 2 and spec.objective.metric == "val/loss_past_window"
    assert {(t.config.model.window_size, t.config.ttt.mini_batch_size) for t in trials} == {
        (32, 16),
        (32, 32),
        (64, 16),
        (64, 32),
    }


# -- what a local sweep checks and builds before anything starts ------------------------------------


def test_trial_configs_run_under_the_sweep_folder_as_children_of_the_parent(tmp_path):
    from ttt.sweep.local import trial_configs

    spec = from_dict(
        sweep({"name": "model.window_size", "values": [32, 64]}, {"name": "optim.lr", "values": [0.001]})
    )
    configs = trial_configs(spec, expand(spec, BASE), str(tmp_path), "http://127.0.0.1:5000", "parent123")
    assert [c.tracking.run_name for c in configs] == ["s-t0-ws32-lr0.001", "s-t1-ws64-lr0.001"]
    first = configs[0]
    assert first.storage.root == str(tmp_path / "s") and first.model.window_size == 32
    assert first.tracking.uri == "http://127.0.0.1:5000" and first.tracking.parent_run_id == "parent123"
    assert first.tracking.tags == {"ttt.sweep": "s", "ttt.trial": "0"} and not first.tracking.system_metrics


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"early_stopping": {"method": "asha"}}, "needs evaluations during training"),
        (
            {"early_stopping": {"method": "median"}, "overrides": ["train.eval_every=300"]},
            "train.eval_every=300 for 300 steps",
        ),
        (
            {
                "early_stopping": {},
                "objective": {"metric": "val/loss_no_ttt"},
                "overrides": ["train.eval_every=10"],
            },
            "measured only when a trial ends",
        ),
    ],
)
def test_early_stopping_needs_an_objective_measured_during_training(extra, words):
    from ttt.sweep.local import check_local

    spec = from_dict(sweep({"name": "ttt.mini_batch_size", "values": [16, 32]}, **extra))
    with pytest.raises(ConfigError) as info:
        check_local(spec, expand(spec, BASE))
    assert info.value.field == "early_stopping" and words in info.value.message


def test_a_local_sweep_trains_each_trial_in_one_process():
    from ttt.sweep.local import check_local

    spec = from_dict(sweep({"name": "ttt.mini_batch_size", "values": [16]}, overrides=["scale.workers=2"]))
    with pytest.raises(ConfigError, match=r"scale\.workers: trial 0 asks for 2 workers"):
        check_local(spec, expand(spec, BASE))
