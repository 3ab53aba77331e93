"""Every recipe loads, and the paper's recipes carry the spec's hyperparameters (§5.1, §5.2)."""

from __future__ import annotations

import pytest

from ttt.config import recipe_names, resolve

# size: pretraining (steps, global batch, lr), extension-32k (steps, global batch)
PRETRAIN = {
    "125m": (4800, 64, 3e-3),
    "350m": (13500, 64, 1.5e-3),
    "760m": (29000, 64, 1.25e-3),
    "1b": (50000, 64, 1e-3),
    "3b": (52000, 128, 8e-4),
}
EXTENSION = {"125m": (120, 32), "350m": (337, 32), "760m": (725, 32), "1b": (1250, 32), "3b": (1300, 64)}


def test_recipe_set_is_complete():
    names = set(recipe_names())
    expected = {"tiny-cpu", "tiny-cpu-nottt", *(f"3b-ext-128k-{v}" for v in ("e2e", "fa", "swa"))}
    for size in PRETRAIN:
        for v in ("e2e", "fa", "swa"):
            expected |= {f"{size}-pretrain-8k-{v}", f"{size}-ext-32k-{v}"}
    assert names == expected


@pytest.mark.parametrize("size", PRETRAIN)
def test_pretraining_recipes(size):
    steps, batch, lr = PRETRAIN[size]
    for variant in ("e2e", "fa", "swa"):
        job = resolve(f"{size}-pretrain-8k-{variant}")
        assert (job.train.seq_len, job.train.total_steps, job.train.global_batch_size) == (8192, steps, batch)
        assert (job.optim.lr, job.optim.warmup_steps, job.optim.end_lr) == (lr, steps // 10, 1e-5)
        assert (job.optim.beta1, job.optim.beta2, job.optim.weight_decay, job.optim.grad_clip) == (
            0.9,
            0.95,
            0.1,
            1.0,
        )
        assert job.model.rope_theta == 5e5
        assert job.ttt.enabled == (variant == "e2e")
        assert job.model.attention == ("full" if variant == "fa" else "swa")
    e2e = resolve(f"{size}-pretrain-8k-e2e")
    assert (e2e.model.window_size, e2e.ttt.mini_batch_size, e2e.ttt.inner_lr, e2e.ttt.inner_clip) == (
        8192,
        1024,
        1.0,
        1.0,
    )
    assert (e2e.ttt.inner_lr_init, e2e.ttt.inner_lr_warmup_steps) == (0.1, steps // 10)


@pytest.mark.parametrize("size", EXTENSION)
def test_extension_recipes(size):
    steps, batch = EXTENSION[size]
    for variant in ("e2e", "fa", "swa"):
        job = resolve(f"{size}-ext-32k-{variant}")
        assert (job.train.seq_len, job.train.total_steps, job.train.global_batch_size) == (
            32768,
            steps,
            batch,
        )
        assert (job.optim.lr, job.optim.warmup_steps) == (4e-4, steps // 10)
        assert job.train.init_from == f"runs/{size}-pretrain-8k-{variant}"
        assert job.model.rope_theta == (2e6 if variant == "fa" else 5e5)
    e2e = resolve(f"{size}-ext-32k-e2e")
    assert (e2e.ttt.inner_lr_init, e2e.ttt.inner_lr_warmup_steps, e2e.ttt.mini_batch_size) == (1.0, 0, 1024)
    assert e2e.train.seq_len // e2e.ttt.mini_batch_size == 32  # inner steps per sequence


def test_128k_recipes():
    for variant in ("e2e", "fa", "swa"):
        job = resolve(f"3b-ext-128k-{variant}")
        assert (job.train.seq_len, job.train.global_batch_size, job.train.total_steps) == (131072, 16, 1300)
        assert job.model.rope_theta == (1e7 if variant == "fa" else 5e5)
    assert resolve("3b-ext-128k-e2e").train.seq_len // 1024 == 128


def test_tiny_cpu_recipes_are_the_demo_pair():
    e2e, ablation = resolve("tiny-cpu"), resolve("tiny-cpu-nottt")
    assert e2e.model == ablation.model and e2e.ttt.enabled and not ablation.ttt.enabled
    assert e2e.data.path == ablation.data.path == "bundled:stdlib"
    assert e2e.train.seq_len > e2e.model.window_size
