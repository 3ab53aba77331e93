"""Helpers shared by the tests: paths to reference data and small random models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ttt.config import JobConfig, ModelConfig, TrainConfig, TTTConfig
from ttt.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
GOLDEN = DATA / "golden_tiny_fp32.npz"

torch.set_num_threads(2)


def small_job(seq_len: int = 24, *overrides: str) -> JobConfig:
    """A random tiny config where the window bites (T > W) and several inner steps happen."""
    model = ModelConfig(
        vocab_size=29,
        hidden_size=16,
        intermediate_size=24,
        num_layers=3,
        num_heads=2,
        suffix_len=2,
        window_size=8,
        rope_theta=1e4,
        bos_token_id=0,
    )
    ttt = TTTConfig(mini_batch_size=4, inner_lr=1.0, inner_lr_warmup_steps=0, inner_clip=1.0)
    job = JobConfig(
        model=model,
        ttt=ttt,
        train=TrainConfig(seq_len=seq_len, global_batch_size=2, total_steps=10),
        optim=dataclasses.replace(JobConfig().optim, warmup_steps=1),
    )
    return job.with_overrides(overrides)


def random_batch(job: JobConfig, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, job.model.vocab_size, (batch, job.train.seq_len + 1), generator=gen)
    tokens[:, 0] = job.model.bos_token_id
    tokens[0, job.train.seq_len // 2] = job.model.bos_token_id  # one masked target mid-sequence
    return tokens[:, :-1], tokens[:, 1:]


def random_model(job: JobConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(job.model).to(dtype)
    # Random norm gains too, so that every parameter shapes the output and its gradient is checked.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.3)
    return model


def generated(n: int):
    """Hypothesis settings for `n` examples, the same ones on every run (derandomized, no example database):
    CI sees what a developer saw."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
