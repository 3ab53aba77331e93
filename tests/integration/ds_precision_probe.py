"""Run in a fresh process by test_distributed: one DeepSpeed meta step of the tiny model in bf16 on CPU,
printing the dtypes of the parameters and of the inner (fast-weight) gradients, and the loss, as JSON."""

from __future__ import annotations

import json
import sys

import torch

from ttt.config import preset
from ttt.distributed.deepspeed_engine import DeepSpeedEngine
from ttt.model.transformer import Transformer
from ttt.model.ttt import MetaLearner


def main(stage: int, bf16: bool) -> None:
    job = preset("tiny").with_overrides([f"scale.zero_stage={stage}", "train.global_batch_size=2"])
    torch.manual_seed(0)
    learner = MetaLearner(Transformer(job.model), job.ttt)
    engine = DeepSpeedEngine(learner, job, bf16=bf16)
    inner_dtypes: set[str] = set()
    grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):  # the inner loop's gradients are taken with create_graph
        grads = grad(outputs, inputs, *args, **kwargs)
        if kwargs.get("create_graph"):
            inner_dtypes.update(str(g.dtype) for g in grads)
        return grads

    torch.autograd.grad = spy
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, job.model.vocab_size, (2, job.train.seq_len + 1), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = engine.micro_step(tokens[:, :-1], tokens[:, 1:], 0, True)
    engine.apply()
    print(json.dumps({
        "loss": loss,
        "params": sorted({str(p.dtype) for p in learner.parameters()}),
        "inner": sorted(inner_dtypes),
    }))  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "bf16")
