"""The meta-gradient: fp64 finite differences, recomputation, per-sequence independence, second order."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ttt.model.ttt as ttt_loop
from tests.helpers import random_batch, random_model, small_job
from ttt.model.ttt import sequence_loss

# T = 24 > W = 8, six inner steps of b = 4, clip 2.5 between the smallest and largest inner-gradient norms.
CLIPPED = ("ttt.inner_clip=2.5",)


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_meta_gradient_matches_fp64_finite_differences():
    job = small_job(24, *CLIPPED)
    model = random_model(job, dtype=torch.float64)
    inputs, targets = random_batch(job)
    out = sequence_loss(model, inputs, targets, job.ttt)
    norms = out.inner_grad_norms
    assert (norms > job.ttt.inner_clip).any() and (norms < job.ttt.inner_clip).any(), "clip must be active"
    assert job.train.seq_len > job.model.window_size
    out.loss.backward()
    grad = _flat_grad(model)

    params = list(model.parameters())
    base = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(1)
    eps = 1e-7  # central differences: error ∝ eps² (2e-5 at 1e-6, 2e-7 at 1e-7 on this model)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]

        def loss_at(sign: float, direction: list[torch.Tensor]) -> float:
            with torch.no_grad():
                for p, b, d in zip(params, base, direction, strict=True):
                    p.copy_(b + sign * eps * d)
            return sequence_loss(model, inputs, targets, job.ttt).loss.item()

        numeric = (loss_at(1.0, direction) - loss_at(-1.0, direction)) / (2 * eps)
        analytic = float(grad @ torch.cat([d.flatten() for d in direction]))
        assert analytic == pytest.approx(numeric, rel=1e-5)


def test_finite_differences_tell_first_order_apart():
    # The same check must fail for the first-order shortcut, or it could not catch one.
    job = small_job(24, *CLIPPED)
    model = random_model(job, dtype=torch.float64)
    inputs, targets = random_batch(job)
    exact = torch.autograd.grad(sequence_loss(model, inputs, targets, job.ttt).loss, list(model.parameters()))
    approx = torch.autograd.grad(
        sequence_loss(model, inputs, targets, job.ttt, first_order=True).loss, list(model.parameters())
    )
    exact, approx = torch.cat([g.flatten() for g in exact]), torch.cat([g.flatten() for g in approx])
    assert (exact - approx).norm() / exact.norm() > 0.05


POLICIES = ("none", "selective", "full")


@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("enabled", "first_order"), [(True, False), (True, True), (False, False)])
def test_recomputation_gives_the_same_loss_and_gradients(enabled, first_order, dtype, recompute):
    job = small_job(24, *CLIPPED)
    losses, grads = {}, {}
    for policy in ("none", recompute):
        model = random_model(job, dtype=dtype)
        inputs, targets = random_batch(job)
        cfg = dataclasses.replace(job.ttt, recompute=policy, enabled=enabled)
        out = sequence_loss(model, inputs, targets, cfg, first_order=first_order)
        out.loss.backward()
        losses[policy], grads[policy] = out.loss.detach(), _flat_grad(model)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert (losses[recompute] - losses["none"]).abs() <= tol * losses["none"].abs()
    rel = (grads[recompute] - grads["none"]).norm() / grads["none"].norm()
    assert rel <= tol


@pytest.mark.parametrize("recompute", POLICIES)
def test_inner_gradients_require_grad(monkeypatch, recompute):
    seen = []
    real_grad = torch.autograd.grad

    def spy(*args, **kwargs):
        grads = real_grad(*args, **kwargs)
        seen.append([g.requires_grad for g in grads])
        return grads

    monkeypatch.setattr(ttt_loop.torch.autograd, "grad", spy)
    job = small_job(24)
    model = random_model(job)
    cfg = dataclasses.replace(job.ttt, recompute=recompute)
    out = sequence_loss(model, *random_batch(job), cfg)
    chunks = job.train.seq_len // job.ttt.mini_batch_size
    assert len(seen) == chunks  # one inner gradient per mini-batch in the forward: nothing run twice
    out.loss.backward()  # a recomputed step takes its inner gradient again, second order too
    assert len(seen) == chunks * (1 if recompute == "none" else 2)
    assert all(all(flags) for flags in seen)


@pytest.mark.parametrize("first_order", [False, True])
def test_updated_fast_weights_depend_on_outer_weights_through_the_inner_gradient(first_order):
    # F_1 = F_0 − η·clip(g_0): only with second order does F_1 depend on the embedding (through g_0).
    job = small_job(8)
    model = random_model(job)
    inputs, targets = random_batch(job)
    h = model.run_prefix(inputs).detach()  # the path through the chunk inputs is cut: only g_0 remains
    fast = [
        ttt_loop.PrimeWeights(*(w.unsqueeze(0).expand(2, *w.shape) for w in p)) for p in model.prime_weights()
    ]
    step = ttt_loop._InnerStep(model, lr=1.0, clip=1.0, outer=True, second_order=not first_order)
    new_fast, *_ = step(h[:, :4], targets[:, :4], targets[:, :4] != 0, fast, [None, None])
    dep = torch.autograd.grad(new_fast[0].gate.sum(), model.embed.weight, allow_unused=True)[0]
    has_path = dep is not None and bool(dep.abs().sum() > 0)
    assert has_path != first_order


def test_detached_inner_gradients_are_refused(monkeypatch):
    real_grad = torch.autograd.grad

    def detaching(*args, **kwargs):  # what a compiled suffix without double backward would do
        return tuple(g.detach() for g in real_grad(*args, **kwargs))

    monkeypatch.setattr(ttt_loop.torch.autograd, "grad", detaching)
    job = small_job(8)
    with pytest.raises(RuntimeError, match="first order"):
        sequence_loss(random_model(job), *random_batch(job), job.ttt)


def test_each_sequence_has_its_own_fast_weights():
    # Sequence 0 alone and in a batch of two: same losses and same gradient contribution (sum, not mean).
    job = small_job(16, *CLIPPED)
    inputs, targets = random_batch(job, batch=2)
    model = random_model(job)
    together = sequence_loss(model, inputs, targets, job.ttt)
    alone = sequence_loss(model, inputs[:1], targets[:1], job.ttt)
    torch.testing.assert_close(together.chunk_losses[0], alone.chunk_losses[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(together.inner_grad_norms[0], alone.inner_grad_norms[0], rtol=1e-5, atol=1e-6)


def test_evaluation_without_grad_still_adapts_and_keeps_no_graph():
    job = small_job(24, *CLIPPED)
    model = random_model(job)
    inputs, targets = random_batch(job)
    train = sequence_loss(model, inputs, targets, job.ttt)
    with torch.no_grad():
        evaluated = sequence_loss(model, inputs, targets, job.ttt)
    assert evaluated.loss.grad_fn is None and not evaluated.loss.requires_grad
    torch.testing.assert_close(evaluated.chunk_losses, train.chunk_losses.detach(), rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    job = small_job(24)
    model = random_model(job)
    inputs, targets = random_batch(job)
    with pytest.raises(ValueError, match="not divisible by mini_batch_size 4"):
        sequence_loss(model, inputs[:, :-1], targets[:, :-1], job.ttt)
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        sequence_loss(model, inputs, targets[:1], job.ttt)


def test_zero_inner_lr_gives_the_no_ttt_gradient():
    # With η_in = 0 the meta objective is the ablation's objective, so their gradients must agree: the two
    # code paths (inner loop over chunks vs one full-sequence pass) train the same thing.
    job = small_job(24, "ttt.inner_lr=0", "ttt.inner_lr_init=0")
    model = random_model(job, dtype=torch.float64)
    inputs, targets = random_batch(job)
    params = list(model.parameters())
    meta = torch.autograd.grad(sequence_loss(model, inputs, targets, job.ttt).loss, params)
    static_cfg = dataclasses.replace(job.ttt, enabled=False)
    static = torch.autograd.grad(sequence_loss(model, inputs, targets, static_cfg).loss, params)
    for a, b in zip(meta, static, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
