"""Causal (sliding-window) attention: a fused full-sequence path and a chunk path over a KV cache.

Two code paths compute the same function (spec §2.6):
* `Attention.forward`: the whole sequence at absolute positions 0..T−1 through a fused kernel. Used by the
  prefix blocks and by models without TTT; only ever differentiated once.
* `Attention.forward_chunk`: one mini-batch of b queries against [cache ‖ chunk], with RoPE applied at
  positions relative to the start of the cache. The cache holds keys after k-norm and *before* RoPE, and is
  never recomputed when the fast weights change. This path is differentiated twice (the inner gradient is
  itself differentiated), so it materialises the softmax explicitly: fused kernels have no double backward.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ttt.model.layers import RMSNorm, RotaryTable, apply_rope


class KVCache(NamedTuple):
    """Per block: the last ≤ W keys (post k-norm, pre-RoPE) and values, [B, H, n, d_h] each."""

    keys: torch.Tensor
    values: torch.Tensor


def window_mask(num_queries: int, num_keys: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [q, k] mask: the queries are the last `num_queries` of the `num_keys` positions (lower-right
    aligned); query q sees key k iff k ≤ q and q − k < window (the window counts the query itself)."""
    q = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    k = torch.arange(num_keys, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    return allowed


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Full-sequence causal attention, [B, H, T, d_h], via scaled_dot_product_attention (first order only)."""
    num = q.shape[-2]
    if window is None or window >= num:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(num, num, window, q.device))


def materialized_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Queries [B, H, b, d_h] against keys/values [B, H, n, d_h] (queries are the last b positions);
    logits and softmax in fp32, probabilities cast to the value dtype. Supports double backward."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = window_mask(q.shape[-2], k.shape[-2], window, q.device)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


class Attention(nn.Module):
    """Multi-head attention with QK-norm (one RMSNorm over d_h shared by the heads, before RoPE)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Features are head-major (h·d_h + j); returns q, k (normed, not rotated) and v as [B, H, T, d_h].
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = self.q_norm(heads(self.q_proj(x)))
        k = self.k_norm(heads(self.k_proj(x)))
        return q, k, heads(self.v_proj(x))

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(batch, length, -1))

    def forward(self, x: torch.Tensor, rope: RotaryTable, window: int | None) -> torch.Tensor:
        q, k, v = self._project(x)
        cos, sin = rope(x.shape[1], x.device, x.dtype)
        return self._output(fused_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, window))

    def forward_chunk(
        self, x: torch.Tensor, cache: KVCache | None, rope: RotaryTable, window: int | None
    ) -> tuple[torch.Tensor, KVCache]:
        q, k, v = self._project(x)
        if cache is not None:
            k = torch.cat((cache.keys, k), dim=2)
            v = torch.cat((cache.values, v), dim=2)
        num_keys, num_queries = k.shape[2], q.shape[2]
        # Relative positions: keys 0..n−1, queries n−b..n−1. RoPE only sees differences, so this equals
        # the absolute positions of the full-sequence path.
        cos, sin = rope(num_keys, x.device, x.dtype)
        q_rot = apply_rope(q, cos[num_keys - num_queries :], sin[num_keys - num_queries :])
        out = materialized_attention(q_rot, apply_rope(k, cos, sin), v, window)
        keep = num_keys if window is None else window
        return self._output(out), KVCache(k[:, :, -keep:], v[:, :, -keep:])
