"""DeepSpeed ZeRO (stage 0-3) around the meta-learning module, for one or many ranks.

On CPU DeepSpeed runs with its CPU accelerator over gloo (DS_ACCELERATOR=cpu); inside Ray Train it reuses
the process group Ray created. Under ZeRO-3 the tied embedding and the prime weights are registered as
external parameters of the MetaLearner, whose forward holds the whole inner loop.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch

from ttt.config import JobConfig
from ttt.distributed.deepspeed_config import deepspeed_config
from ttt.model.ttt import MetaLearner
from ttt.train.engine import NonFiniteGradient
from ttt.train.schedule import build_optimizer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_environment(use_gpu: bool) -> None:
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed compiles a small C++ op on first use; keep it across runs.
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ttt-platform" / "torch_extensions")
    )


class DeepSpeedEngine:
    sharded_checkpoints = True

    def __init__(self, learner: MetaLearner, job: JobConfig, bf16: bool):
        prepare_environment(torch.cuda.is_available())
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():  # alone (no Ray): a one-process group from the usual variables
            for key, value in (
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", str(_free_port())),
                ("RANK", "0"),
                ("LOCAL_RANK", "0"),
                ("WORLD_SIZE", "1"),
            ):
                os.environ.setdefault(key, value)
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.job = job
        self.stage = job.scale.effective_zero_stage
        optimizer, scheduler = build_optimizer(learner.model, job.optim, job.train.total_steps)
        self.engine, *_ = deepspeed.initialize(
            model=learner,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(job, self.world_size, bf16),
        )
        self.learner = learner
        if self.stage == 3:
            for param in learner.external_parameters():
                deepspeed.zero.register_external_parameter(learner, param)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, step: int, last: bool) -> float:
        loss, _ = self.engine(inputs, targets, step=step)
        self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
        if not last:
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step count
        return loss.item()

    def apply(self) -> float:
        self.engine.step()  # the boundary: clip, optimizer step, schedule step, zero the gradients
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else 0.0
        if not torch.isfinite(torch.tensor(norm)):
            raise NonFiniteGradient(norm)
        return norm

    def discard_gradients(self) -> None:
        self.engine.zero_grad()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    def mean(self, value: float) -> float:
        return float(self.all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0]) / self.world_size

    def mean_and_any(self, value: float, flag: bool) -> tuple[float, bool]:
        total, flags = self.all_reduce_sum(torch.tensor([value, float(flag)], dtype=torch.float64)).tolist()
        return total / self.world_size, flags > 0

    def all_true(self, flag: bool) -> bool:
        """Whether every rank says yes (a checkpoint counts only if every rank wrote its part)."""
        return not self.mean_and_any(0.0, not flag)[1]

    def full_model_state(self) -> dict:
        """The unsharded model weights (collective under ZeRO-3: every rank must call it)."""
        if self.stage == 3:
            import deepspeed

            params = list(self.learner.model.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.learner.model.state_dict().items()}
        return {k: v.detach().clone() for k, v in self.learner.model.state_dict().items()}

    def save_shards(self, tag: str) -> Path:
        """This rank's DeepSpeed checkpoint files in a fresh local folder (collective)."""
        folder = Path(tempfile.mkdtemp(prefix=f"ttt-ckpt-r{self.rank}-"))
        self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
        return folder / tag

    def load_shards(self, folder: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=tag, load_module_strict=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint '{tag}' in {folder}")

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()
