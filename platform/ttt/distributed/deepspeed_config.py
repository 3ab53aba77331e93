"""The DeepSpeed config for a job: a pure function, so what a run asks DeepSpeed for is easy to test."""

from __future__ import annotations

from typing import Any

from ttt.config import JobConfig


def deepspeed_config(job: JobConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    train = job.train
    micro = train.global_batch_size // (world_size * train.grad_accum_steps)
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": train.grad_accum_steps,
        # Set explicitly: DeepSpeed 0.19 clips at 1.0 when the key is absent, whatever the recipe says.
        "gradient_clipping": job.optim.grad_clip,
        "zero_optimization": {"stage": job.scale.effective_zero_stage},
        # bf16 compute with fp32 parameters (spec: fast weights, inner gradients and updates stay fp32).
        # DeepSpeed's "bf16" mode would store the parameters, and so the initial fast weights, in bf16.
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        # Our AdamW and schedule are passed in (the recipe's, with weight decay on every parameter).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
