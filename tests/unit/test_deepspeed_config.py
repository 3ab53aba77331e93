"""The DeepSpeed config a job asks for (pure function; no DeepSpeed needed)."""

from __future__ import annotations

import pytest

from ttt.config import ConfigError, preset
from ttt.distributed.deepspeed_config import deepspeed_config


def test_batch_split_clipping_and_stage():
    job = preset("125m").with_overrides(
        ["train.grad_accum_steps=2", "scale.workers=8", "scale.zero_stage=3", "optim.grad_clip=0.5"]
    )
    cfg = deepspeed_config(job, world_size=8, bf16=True)
    assert cfg["train_batch_size"] == 64
    assert cfg["train_micro_batch_size_per_gpu"] * 8 * cfg["gradient_accumulation_steps"] == 64
    assert cfg["gradient_clipping"] == 0.5  # explicit: DeepSpeed's default of 1.0 would hide a recipe's value
    assert cfg["zero_optimization"] == {"stage": 3}
    # bf16 through autocast, parameters kept fp32: DeepSpeed's "bf16" mode would make fast weights bf16.
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in cfg


def test_default_stage_with_several_workers_is_two():
    job = preset("tiny").with_overrides(["scale.workers=2"])
    assert (
        job.scale.uses_deepspeed and deepspeed_config(job, 2, bf16=False)["zero_optimization"]["stage"] == 2
    )
    assert not preset("tiny").scale.uses_deepspeed  # one worker, no stage: plain PyTorch


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["scale.zero_stage=5"], "scale.zero_stage"),
        (["scale.workers=3"], "train.global_batch_size"),
        (["scale.workers=0"], "scale.workers"),
        (["storage.root=gs://bucket/runs"], "storage.root"),
        (["storage.root=s3://"], "storage.root"),
        (["scale.zero_stage=3", "ttt.recompute=none"], "ttt.recompute"),
        (["scale.zero_stage=3", "ttt.checkpoint=false"], "ttt.recompute"),  # the legacy key
    ],
)
def test_bad_scale_and_storage_are_config_errors(overrides, field):
    with pytest.raises(ConfigError) as info:
        preset("tiny").with_overrides(overrides)
    assert info.value.field == field
