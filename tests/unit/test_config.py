"""Config: presets, YAML, dotted overrides, and errors that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from ttt import config as c


def test_stdlib_platform_is_not_shadowed():
    import platform

    assert callable(platform.system) and platform.system()


@pytest.mark.parametrize("name", c.preset_names())
def test_every_preset_builds_and_round_trips_through_yaml(name):
    cfg = c.preset(name)
    assert c.from_yaml(c.to_yaml(cfg)) == cfg
    assert cfg.train.seq_len % cfg.ttt.mini_batch_size == 0


def test_paper_presets_follow_the_spec():
    e2e = c.preset("760m")
    assert (
        e2e.model.num_layers,
        e2e.model.hidden_size,
        e2e.model.intermediate_size,
        e2e.model.suffix_len,
    ) == (24, 1536, 3328, 6)
    assert (e2e.model.window_size, e2e.ttt.mini_batch_size, e2e.model.rope_theta) == (8192, 1024, 5e5)
    assert (e2e.optim.lr, e2e.optim.warmup_steps, e2e.ttt.inner_lr_warmup_steps) == (1.25e-3, 2900, 2900)
    fa = c.preset("760m-fa")
    assert (fa.model.attention, fa.model.suffix_len, fa.model.intermediate_size, fa.ttt.enabled) == (
        "full",
        0,
        4096,
        False,
    )
    assert c.preset("3b").train.global_batch_size == 128
    nottt = c.preset("125m-nottt")
    assert nottt.model == c.preset("125m").model and not nottt.ttt.enabled
    swa = c.preset("125m-swa")
    assert swa.model.attention == "swa" and swa.model.suffix_len == 0


def test_overrides_parse_typed_values():
    cfg = c.preset("tiny").with_overrides(
        ["ttt.mini_batch_size=64", "model.attention=full", "ttt.enabled=false", "optim.lr=1e-3"]
    )
    assert cfg.ttt.mini_batch_size == 64 and cfg.model.attention == "full"
    assert cfg.ttt.enabled is False and cfg.optim.lr == 1e-3


def test_yaml_can_start_from_a_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: 125m-fa\ntrain:\n  seq_len: 32768\nmodel:\n  rope_theta: 2.0e6\n")
    cfg = c.resolve(str(path), ["train.global_batch_size=32"])
    assert cfg.model.attention == "full" and cfg.model.rope_theta == 2e6
    assert (cfg.train.seq_len, cfg.train.global_batch_size) == (32768, 32)


def test_flatten_gives_dotted_keys():
    flat = c.flatten(c.preset("tiny"))
    assert flat["ttt.mini_batch_size"] == 32 and flat["model.window_size"] == 64
    sections = [getattr(c.JobConfig(), f.name) for f in dataclasses.fields(c.JobConfig)]
    assert len(flat) == sum(len(dataclasses.fields(s)) for s in sections)
    assert flat["tracking.run_name"] is None and flat["data.path"] == "bundled:stdlib"


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["train.seq_len=250"], "train.seq_len", "not divisible by ttt.mini_batch_size 32"),
        (["model.window_size=0"], "model.window_size", "greater than or equal to 1"),
        (["model.suffix_len=5"], "model.suffix_len", "more than the model's 4 layers"),
        (["ttt.minibatch_size=8"], "ttt.minibatch_size", "did you mean 'ttt.mini_batch_size'"),
        (["trian.seq_len=8"], "trian", "unknown key"),
        (["model.num_heads=3"], "model.num_heads", "not divisible by num_heads 3"),
        (["model.attention=linear"], "model.attention", "'swa' or 'full'"),
        (["model.suffix_len=0"], "ttt.enabled", "set model.suffix_len >= 1 or ttt.enabled=false"),
        (["ttt.mini_batch_size=many"], "ttt.mini_batch_size", "valid integer"),
        (["optim.warmup_steps=300"], "optim.warmup_steps", "leave no decay"),
        (["model.bos_token_id=300"], "model.bos_token_id", "outside the vocabulary"),
        (["ttt"], "ttt", "section.field=value"),
        (["ttt=3"], "ttt", "is a section"),
        (
            ["train.grad_accum_steps=3"],
            "train.global_batch_size",
            "not divisible by train.grad_accum_steps 3",
        ),
        (["train.precision=fp16"], "train.precision", "'auto', 'fp32' or 'bf16'"),
    ],
)
def test_bad_values_name_the_field(overrides, field, words):
    with pytest.raises(c.ConfigError) as info:
        c.preset("tiny").with_overrides(overrides)
    assert info.value.field == field
    assert words in str(info.value)


def test_unknown_yaml_key_and_bad_files(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 8\n")
    with pytest.raises(c.ConfigError, match=r"did you mean 'model\.hidden_size'"):
        c.load(path)
    path.write_text("model: [1, 2\n")
    with pytest.raises(c.ConfigError, match="not valid YAML"):
        c.load(path)
    with pytest.raises(c.ConfigError, match="cannot read config file"):
        c.load(tmp_path / "missing.yaml")
    with pytest.raises(c.ConfigError, match="did you mean '125m'"):
        c.resolve("125n")


def test_recompute_policies_and_the_legacy_checkpoint_key():
    preset, JobConfig, ConfigError = c.preset, c.JobConfig, c.ConfigError
    assert preset("tiny").with_overrides(["ttt.recompute=selective"]).ttt.recompute == "selective"
    assert preset("tiny").with_overrides(["ttt.checkpoint=true"]).ttt.recompute == "full"
    assert preset("tiny").with_overrides(["ttt.checkpoint=false"]).ttt.recompute == "none"
    data = preset("tiny").to_dict()
    assert "checkpoint" not in data["ttt"]
    del data["ttt"]["recompute"]
    data["ttt"]["checkpoint"] = False  # a config dumped before the rename (run directories, checkpoints)
    assert JobConfig.from_dict(data).ttt.recompute == "none"
    with pytest.raises(ConfigError, match=r"ttt\.recompute"):
        preset("tiny").with_overrides(["ttt.recompute=some"])
    with pytest.raises(ConfigError, match=r"old name of ttt\.recompute"):
        JobConfig.from_dict({**data, "ttt": {**data["ttt"], "recompute": "full"}})
    with pytest.raises(ConfigError, match="expected true or false"):
        preset("tiny").with_overrides(["ttt.checkpoint=full"])
