"""Model pieces: RoPE convention, window mask, chunked vs full-sequence path, short contexts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.helpers import random_batch, random_model, small_job
from ttt.config import preset
from ttt.model.attention import fused_attention, materialized_attention, window_mask
from ttt.model.layers import RMSNorm, RotaryTable, apply_rope
from ttt.model.transformer import Transformer
from ttt.model.ttt import sequence_loss


def test_rope_rotates_adjacent_pairs_as_complex_numbers():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    cos, sin = RotaryTable(8, 1e4)(5, x.device, x.dtype)
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    freqs = 1e4 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    as_complex = torch.view_as_complex(x.view(1, 2, 5, 4, 2).contiguous())
    expected = torch.view_as_real(
        as_complex * torch.polar(torch.ones_like(pos * freqs), pos * freqs)
    ).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)


def test_rope_table_grows_on_demand():
    table = RotaryTable(4, 1e4)
    short, _ = table(3, torch.device("cpu"), torch.float32)
    long, _ = table(100, torch.device("cpu"), torch.float32)
    assert long.shape == (100, 2)
    torch.testing.assert_close(long[:3], short)


def test_rmsnorm_keeps_dtype_and_normalises():
    norm = RMSNorm(6, eps=1e-6)
    x = torch.randn(3, 6).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().pow(2).mean(-1), torch.ones(3), atol=2e-2, rtol=0)


def test_window_mask_counts_the_query_and_aligns_lower_right():
    mask = window_mask(2, 5, window=3, device=torch.device("cpu"))
    # queries are positions 3 and 4 of 0..4; each sees itself and the 2 keys before it
    assert mask.tolist() == [[False, True, True, True, False], [False, False, True, True, True]]
    assert window_mask(3, 3, None, torch.device("cpu")).tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]


@pytest.mark.parametrize("window", [None, 4, 11])
def test_fused_and_materialized_attention_agree(window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(fused_attention(q, k, v, window), materialized_attention(q, k, v, window))


@pytest.mark.parametrize("attention", ["swa", "full"])
def test_chunked_path_equals_full_sequence_path_without_ttt(attention):
    job = small_job(24, f"model.attention={attention}")
    assert job.train.seq_len > 2 * job.model.window_size
    model = random_model(job, dtype=torch.float64)
    inputs, _ = random_batch(job)
    with torch.no_grad():
        full = model(inputs)
        chunked = model.forward_chunked(inputs, job.ttt.mini_batch_size)
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-10)


def test_window_changes_the_output_past_the_window():
    job = small_job(24)
    model = random_model(job, dtype=torch.float64)
    inputs, _ = random_batch(job)
    with torch.no_grad():
        swa = model(inputs)
        model.window = None
        full = model(inputs)
    window = job.model.window_size
    torch.testing.assert_close(swa[:, :window], full[:, :window])
    assert (swa[:, window:] - full[:, window:]).abs().max() > 1e-3


def test_meta_loss_with_zero_inner_lr_is_the_no_ttt_loss():
    job = small_job(24, "ttt.inner_lr=0", "ttt.inner_lr_init=0")
    model = random_model(job, dtype=torch.float64)
    inputs, targets = random_batch(job)
    with torch.no_grad():
        meta = sequence_loss(model, inputs, targets, job.ttt)
        static = sequence_loss(model, inputs, targets, dataclasses.replace(job.ttt, enabled=False))
    torch.testing.assert_close(meta.chunk_losses, static.chunk_losses, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(meta.token_nll, static.token_nll, rtol=1e-10, atol=1e-10)


def test_short_context_gives_no_nan():
    # 2T < W + b: the reference's RoPE table (2T rows) would be indexed past its end and give NaN.
    job = small_job(8, "model.window_size=16", "ttt.mini_batch_size=4")
    assert 2 * job.train.seq_len < job.model.window_size + job.ttt.mini_batch_size
    model = random_model(job)
    out = sequence_loss(model, *random_batch(job), job.ttt)
    out.loss.backward()
    assert torch.isfinite(out.token_nll).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_fully_masked_chunk_gives_finite_gradients():
    job = small_job(8)
    model = random_model(job)
    inputs, targets = random_batch(job)
    targets[:, :4] = job.model.bos_token_id  # mini-batch 0 has no target left in the loss
    out = sequence_loss(model, inputs, targets, job.ttt)
    assert (out.chunk_losses[:, 0] == 0).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("variant", ["e2e", "nottt", "swa", "fa"])
def test_every_mode_trains_from_the_same_entry_point(variant):
    job = preset(f"tiny-{variant}").with_overrides(["train.seq_len=128", "ttt.mini_batch_size=32"])
    torch.manual_seed(0)
    model = Transformer(job.model)
    tokens = torch.randint(0, job.model.vocab_size, (2, 129))
    out = sequence_loss(model, tokens[:, :-1], tokens[:, 1:], job.ttt, step=0)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert out.chunk_losses.shape == (2, 4) and out.token_nll.shape == (2, 128)
    # near-uniform predictions at init: loss ≈ log V
    assert out.loss.item() == pytest.approx(math.log(job.model.vocab_size), rel=0.05)
    assert (out.inner_grad_norms is not None) == (variant == "e2e")
    has_prime = any(b.has_prime for b in model.layers)
    assert has_prime == (variant in ("e2e", "nottt"))


def test_bf16_autocast_keeps_second_order_and_fp32_gradients():
    job = small_job(24, "ttt.inner_clip=2.5")
    model = random_model(job)
    inputs, targets = random_batch(job)
    reference = sequence_loss(model, inputs, targets, job.ttt).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sequence_loss(model, inputs, targets, job.ttt)
    out.loss.backward()
    assert out.loss.dtype == torch.float32  # losses are computed from fp32-upcast logits
    assert out.loss.item() == pytest.approx(reference.item(), rel=2e-2)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
