"""The fused chunk-attention kernels (Triton; on CPU through TRITON_INTERPRET=1, set in tests/conftest.py):
forward, backward and double backward against the fp64 materialised reference and finite differences,
inside the meta step, and against the official golden meta-gradient."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import ttt.model.chunk_attention as chunk_mod
from tests.helpers import GOLDEN, random_batch, random_model, small_job
from ttt.config import ConfigError
from ttt.model.attention import (
    chunk_attention,
    fused_attention,
    materialized_attention,
    resolve_prefix_kernel,
)
from ttt.model.chunk_attention import resolve_chunk_kernel, triton_chunk_attention
from ttt.model.ttt import sequence_loss
from ttt.parity import run_parity

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, heads, queries m, keys n, head dim, window): the first chunk (m = n), a chunk after a full cache
# with the window biting, full attention, ragged sizes that leave partial blocks (the interpreter uses
# 16-wide blocks), a head dim that is not a power of two, and a window of one key.
SHAPES = [
    (1, 2, 16, 16, 16, 8),
    (2, 1, 16, 48, 16, 32),
    (1, 2, 20, 37, 12, None),
    (1, 1, 33, 50, 16, 20),
    (1, 1, 17, 17, 8, 1),
]


def _inputs(batch, heads, m, n, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, size, d, generator=gen, dtype=dtype) for size in (m, n, n))
    return [t.to(DEVICE).requires_grad_() for t in (q, k, v)]


def _max_error(ours, ref) -> float:
    return max(float((a - b).detach().abs().max()) for a, b in zip(ours, ref, strict=True))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_order_matches_the_materialized_reference_in_fp64(shape):
    *sizes, window = shape
    fused, ref = _inputs(*sizes), _inputs(*sizes)
    out, expected = triton_chunk_attention(*fused, window), materialized_attention(*ref, window)
    assert _max_error([out], [expected]) < 1e-12

    # First order, with the output gradient itself a differentiable input (it is, inside the meta step).
    go = torch.randn_like(expected).requires_grad_()
    grads = torch.autograd.grad(out, fused, go, create_graph=True)
    ref_grads = torch.autograd.grad(expected, ref, go, create_graph=True)
    assert _max_error(grads, ref_grads) < 1e-12
    assert all(g.requires_grad for g in grads)  # the double backward is in the graph, not detached

    # Second order: a random linear functional of (dq, dk, dv), differentiated w.r.t. q, k, v and dO.
    weights = [torch.randn_like(g) for g in grads]

    def functional(gs):
        return sum((g * w).sum() for g, w in zip(gs, weights, strict=True))

    second = torch.autograd.grad(functional(grads), [*fused, go])
    ref_second = torch.autograd.grad(functional(ref_grads), [*ref, go])
    assert _max_error(second, ref_second) < 1e-11


@pytest.mark.parametrize("block", [(32, 16), (16, 32), (64, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_blocks_of_unequal_sizes(block, monkeypatch):
    # The GPU launches rows and keys in blocks of different sizes (128 x 64, 64 x 64, 32 x 32): the block
    # ranges each program walks must not depend on the two being equal.
    monkeypatch.setattr(chunk_mod, "_blocks", lambda *args: (*block, 1))
    for *sizes, window in [(1, 1, 40, 72, 16, 24), (1, 1, 33, 33, 16, None), (1, 1, 20, 90, 16, 70)]:
        fused, ref = _inputs(*sizes), _inputs(*sizes)
        out, expected = triton_chunk_attention(*fused, window), materialized_attention(*ref, window)
        go = torch.randn_like(expected).requires_grad_()
        grads = torch.autograd.grad(out, fused, go, create_graph=True)
        ref_grads = torch.autograd.grad(expected, ref, go, create_graph=True)
        weights = [torch.randn_like(g) for g in grads]
        second = torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, weights, strict=True)), fused)
        ref_second = torch.autograd.grad(
            sum((g * w).sum() for g, w in zip(ref_grads, weights, strict=True)), ref
        )
        assert _max_error([out, *grads, *second], [expected, *ref_grads, *ref_second]) < 1e-11


def test_gradcheck_and_gradgradcheck_against_finite_differences():
    q, k, v = _inputs(1, 1, 5, 9, 4, seed=1)  # few elements: every one is perturbed twice per check

    def attend(q, k, v):
        return triton_chunk_attention(q, k, v, 6)

    assert torch.autograd.gradcheck(attend, (q, k, v))
    assert torch.autograd.gradgradcheck(attend, (q, k, v))


def test_unused_gradients_are_treated_as_zero():
    # The inner loop differentiates w.r.t. part of the inputs only: the double backward then gets None
    # for the others' upstream gradients.
    fused, ref = _inputs(1, 1, 16, 32, 16), _inputs(1, 1, 16, 32, 16)
    out, expected = triton_chunk_attention(*fused, 16), materialized_attention(*ref, 16)
    (dq,) = torch.autograd.grad(out.square().sum(), fused[0], create_graph=True)
    (ref_dq,) = torch.autograd.grad(expected.square().sum(), ref[0], create_graph=True)
    second = torch.autograd.grad(dq.sum(), fused)
    assert _max_error(second, torch.autograd.grad(ref_dq.sum(), ref)) < 1e-12


def test_a_third_derivative_is_refused_clearly():
    q, k, v = _inputs(1, 1, 16, 16, 16)
    (dq,) = torch.autograd.grad(triton_chunk_attention(q, k, v, 8).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no third derivative"):
        torch.autograd.grad(dq.square().sum(), q, create_graph=True)


def test_meta_gradient_through_the_kernels_equals_the_materialized_one(monkeypatch):
    calls = {"double": 0}
    double = chunk_mod._AttentionBackward.backward

    def counting(ctx, *grads):
        calls["double"] += 1
        return double(ctx, *grads)

    monkeypatch.setattr(chunk_mod._AttentionBackward, "backward", staticmethod(counting))
    job = small_job(24, "ttt.inner_clip=2.5")
    inputs, targets = random_batch(job)
    grads = {}
    for kernel in ("materialized", "triton"):
        cfg = dataclasses.replace(job.model, chunk_kernel=kernel)
        model = random_model(dataclasses.replace(job, model=cfg), dtype=torch.float64).to(DEVICE)
        out = sequence_loss(model, inputs.to(DEVICE), targets.to(DEVICE), job.ttt)
        out.loss.backward()
        grads[kernel] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert calls["double"] > 0, "the fused double backward never ran"
    torch.testing.assert_close(grads["triton"], grads["materialized"], rtol=1e-10, atol=1e-12)


def test_golden_meta_gradient_with_the_kernels():
    report = run_parity(GOLDEN, device=DEVICE, overrides=["model.chunk_kernel=triton"])
    failing = {k: v for k, v in report["checks"].items() if not v["ok"]}
    assert not failing and report["ok"]
    assert report["checks"]["grad"]["max_rel"] < 1e-4


def test_kernel_choice_is_resolved_per_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_chunk_kernel("auto", cpu) == "materialized"
    assert resolve_chunk_kernel("materialized", cpu) == "materialized"
    assert resolve_prefix_kernel("auto", cpu, torch.float32) == "sdpa"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match=r"model\.chunk_kernel.*CUDA"):
        resolve_chunk_kernel("triton", cpu)
    with pytest.raises(ConfigError, match=r"model\.prefix_kernel.*flash-attn"):
        resolve_prefix_kernel("flash", cpu, torch.bfloat16)
    with pytest.raises(ConfigError, match=r"model\.chunk_kernel"):
        small_job(24, "model.chunk_kernel=fastest")


def test_mismatched_inputs_are_refused():
    q, k, v = _inputs(1, 1, 16, 16, 16)
    with pytest.raises(TypeError, match="share a dtype"):
        triton_chunk_attention(q, k.float(), v, 8)
    with pytest.raises(ValueError, match="queries but only"):
        triton_chunk_attention(k, q[:, :, :8], v[:, :, :8], 8)
    assert torch.equal(chunk_attention(q, k, v, 8, "materialized"), materialized_attention(q, k, v, 8))


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [16, 40])
def test_flex_prefix_kernel_matches_sdpa(window):
    # The block mask's semantics, checked with eager flex (forward only: flex has no CPU backward, so
    # the resolver allows it on CUDA only, where it is compiled).
    q, k, v = (t.detach().float() for t in _inputs(1, 2, 48, 48, 16))
    out, expected = fused_attention(q, k, v, window, "flex"), fused_attention(q, k, v, window, "sdpa")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"model\.prefix_kernel.*CUDA"):
        resolve_prefix_kernel("flex", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_compile_for_hopper_without_spills(head_dim, tmp_path):
    # Triton ships the CUDA compiler, so every kernel is compiled here for sm_90 (H100/H200) in bf16 with
    # the block sizes the GPU path launches; ptxas must fit each in registers. A fresh process: the
    # interpreter setting of this one would hand the compiler interpreted functions.
    code = (
        "import dataclasses, json, torch\n"
        "from ttt.model.chunk_attention import compile_report\n"
        f"print(json.dumps([dataclasses.asdict(b) for b in compile_report(90, torch.bfloat16, {head_dim})]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, and leave no cache in the home folder
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    builds = json.loads(out.stdout.strip().splitlines()[-1])
    names = ["_forward", "_backward_q", "_backward_kv", "_double_q", "_double_kv"]
    assert [b["name"] for b in builds] == names
    for build in builds:
        assert build["spill_bytes"] == 0 and 0 < build["registers"] <= 255, build
        assert build["shared_bytes"] <= 227 * 1024, build  # Hopper's shared memory per block
