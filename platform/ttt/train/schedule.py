"""Outer optimiser and learning-rate schedule (spec §4.4)."""

from __future__ import annotations

import math

import torch

from ttt.config import OptimConfig


def lr_at(cfg: OptimConfig, total_steps: int, step: int) -> float:
    """Learning rate of update number `step` (0-based): linear from 0 over the warm-up, then cosine down
    to end_lr exactly at total_steps. The very first update uses lr 0, as in the reference."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(step - cfg.warmup_steps, total_steps - cfg.warmup_steps) / (total_steps - cfg.warmup_steps)
    return cfg.end_lr + (cfg.lr - cfg.end_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with decoupled weight decay on every parameter (norm gains and the tied embedding included)."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    peak = cfg.lr if cfg.lr > 0 else 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(cfg, total_steps, step) / peak
    )
    return optimizer, scheduler
