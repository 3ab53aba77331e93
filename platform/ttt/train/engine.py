"""What one optimisation step does, behind one interface: plain PyTorch in a single process, or a
DeepSpeed ZeRO engine over several ranks (`ttt.distributed.deepspeed_engine`). The trainer only calls
`micro_step` for each micro-batch and `apply` once per outer step."""

from __future__ import annotations

import math

import torch

from ttt.config import JobConfig
from ttt.model.ttt import MetaLearner
from ttt.train.schedule import build_optimizer


class NonFiniteGradient(Exception):
    def __init__(self, norm: float):
        self.norm = norm
        super().__init__(f"gradient norm {norm}")


class LocalEngine:
    """One process: AdamW + schedule, global-norm clip; checkpoints are single files."""

    sharded_checkpoints = False
    rank = 0
    world_size = 1

    def __init__(self, learner: MetaLearner, job: JobConfig):
        self.learner = learner
        self.job = job
        self.optimizer, self.scheduler = build_optimizer(learner.model, job.optim, job.train.total_steps)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, step: int, last: bool) -> float:
        loss, _ = self.learner(inputs, targets, step=step)
        (loss / self.job.train.grad_accum_steps).backward()
        return loss.item()

    def apply(self) -> float:
        """Clip, step, advance the schedule; refuses (before stepping) a non-finite gradient."""
        clip = self.job.optim.grad_clip if self.job.optim.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.learner.parameters(), clip))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradient(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def mean(self, value: float) -> float:
        return value

    def mean_and_any(self, value: float, flag: bool) -> tuple[float, bool]:
        """The step's loss averaged over ranks, and whether any rank raised `flag` (one all-reduce)."""
        return value, flag

    def all_true(self, flag: bool) -> bool:
        return flag

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def state_dict(self) -> dict:
        return {
            "model": self.learner.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, payload: dict) -> None:
        self.learner.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
