"""`ttt.recompute`: what each policy recomputes, and that nothing runs twice in the forward pass."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ttt.model.ttt as ttt_loop
from tests.helpers import random_batch, random_model, small_job
from ttt.model.ttt import sequence_loss


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(recompute: str, enabled: bool = True) -> Counter[str]:
    job = small_job(24)
    model = random_model(job)
    cfg = dataclasses.replace(job.ttt, recompute=recompute, enabled=enabled)
    out = sequence_loss(model, *random_batch(job), cfg)
    with _OpCounter() as counter:
        out.loss.backward()
    return counter.counts


@pytest.mark.parametrize("enabled", [True, False])
def test_selective_recomputes_no_matmul_and_full_recomputes_them(enabled):
    none, selective, full = (_backward_ops(p, enabled) for p in ("none", "selective", "full"))
    matmuls = ("mm", "bmm", "addmm")
    assert all(selective[op] == none[op] for op in matmuls)
    assert sum(full[op] for op in matmuls) > sum(none[op] for op in matmuls)
    assert selective["mul"] > none["mul"]  # the cheap ops are recomputed


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_each_inner_step_runs_once_in_the_forward_and_once_more_in_the_backward(monkeypatch, recompute):
    calls = []
    real = ttt_loop._InnerStep.__call__
    monkeypatch.setattr(ttt_loop._InnerStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    job = small_job(24)
    out = sequence_loss(
        random_model(job), *random_batch(job), dataclasses.replace(job.ttt, recompute=recompute)
    )
    chunks = job.train.seq_len // job.ttt.mini_batch_size
    assert len(calls) == chunks
    out.loss.backward()
    assert len(calls) == chunks * (1 if recompute == "none" else 2)


def test_evaluation_never_recomputes(monkeypatch):
    job = small_job(24)
    with torch.no_grad():
        out = sequence_loss(
            random_model(job), *random_batch(job), dataclasses.replace(job.ttt, recompute="full")
        )
    assert out.loss.grad_fn is None


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_a_finished_step_leaves_no_recomputation_state_alive(recompute, monkeypatch):
    # The recomputed tensors' graph refers back to the list that holds them: a cycle through autograd nodes
    # that Python's GC cannot see, which once kept every step's graph alive (+230 MB per tiny step). Only
    # this step's frames are watched: another test may still hold a graph (and so its frames) on purpose.
    import gc
    import weakref

    from ttt.model import recompute as module

    frames: list[weakref.ref] = []
    init = module._Frame.__init__

    def watched(self, *args):
        init(self, *args)
        frames.append(weakref.ref(self))

    monkeypatch.setattr(module._Frame, "__init__", watched)
    job = small_job(24)
    out = sequence_loss(
        random_model(job), *random_batch(job), dataclasses.replace(job.ttt, recompute=recompute)
    )
    out.loss.backward()
    del out
    gc.collect()
    assert len(frames) == job.train.seq_len // job.ttt.mini_batch_size  # one per mini-batch
    assert [ref for ref in frames if ref() is not None] == []


def test_a_step_that_raises_lets_go_of_what_it_saved(monkeypatch):
    # The live list refers to saved outputs, whose nodes refer back to the frame: after an exception the
    # list must be gone, or the cycle outlives the step.
    from ttt.model import recompute as module

    frames = []
    init = module._Frame.__init__
    monkeypatch.setattr(module._Frame, "__init__", lambda self, *a: (init(self, *a), frames.append(self))[0])

    def failing(t):
        t.exp()  # saves its output
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        module.checkpoint_inner_step(failing, torch.randn(8, requires_grad=True), recompute="full")
    assert len(frames) == 1 and frames[0].count == 1 and frames[0].live is None
