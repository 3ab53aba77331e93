"""Outer learning-rate schedule and optimiser (spec §4.4)."""

from __future__ import annotations

import math

import pytest
import torch

from ttt.config import OptimConfig
from ttt.train.schedule import build_optimizer, lr_at

CFG = OptimConfig(lr=3e-3, end_lr=1e-5, warmup_steps=10)


def test_warmup_starts_at_zero_and_is_linear():
    assert lr_at(CFG, 100, 0) == 0.0
    assert lr_at(CFG, 100, 5) == pytest.approx(1.5e-3)
    assert lr_at(CFG, 100, 10) == pytest.approx(3e-3)


def test_cosine_reaches_end_lr_at_total_steps():
    assert lr_at(CFG, 100, 55) == pytest.approx(1e-5 + (3e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(CFG, 100, 100) == pytest.approx(1e-5)
    assert lr_at(CFG, 100, 150) == pytest.approx(1e-5)


def test_scheduler_drives_the_optimizer_from_lr_zero():
    model = torch.nn.Linear(3, 3)
    optimizer, scheduler = build_optimizer(model, CFG, total_steps=100)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == 0.0 and seen[10] == pytest.approx(3e-3)
    assert [pytest.approx(lr_at(CFG, 100, s)) for s in range(12)] == seen


def test_weight_decay_reaches_every_parameter():
    model = torch.nn.LayerNorm(4)  # a gain vector: decayed too, as in the reference
    optimizer, _ = build_optimizer(
        model, OptimConfig(lr=1.0, warmup_steps=0, weight_decay=0.1), total_steps=10
    )
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.1
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(
        p.numel() for p in model.parameters()
    )
