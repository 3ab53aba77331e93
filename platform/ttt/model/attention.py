"""Causal (sliding-window) attention: a fused full-sequence path and a chunk path over a KV cache.

Two code paths compute the same function (spec §2.6):
* `Attention.forward`: the whole sequence at absolute positions 0..T−1 through a fused kernel. Used by the
  prefix blocks and by models without TTT; only ever differentiated once.
* `Attention.forward_chunk`: one mini-batch of b queries against [cache ‖ chunk], with RoPE applied at
  positions relative to the start of the cache. The cache holds keys after k-norm and *before* RoPE, and is
  never recomputed when the fast weights change. This path is differentiated twice (the inner gradient is
  itself differentiated), and PyTorch's fused kernels have no double backward: it either materialises the
  softmax explicitly or runs the Triton kernels of `ttt.model.chunk_attention`.

Which kernel runs is config (`model.prefix_kernel`, `model.chunk_kernel`), resolved per device.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ttt.config import ConfigError, ModelConfig
from ttt.model.chunk_attention import installed, resolve_chunk_kernel, triton_chunk_attention
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


def resolve_prefix_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """The full-sequence kernel to run: 'auto' picks flash-attn (CUDA, half precision, if installed),
    else flex on CUDA, else SDPA; explicit choices are checked so that a bad one fails with its name."""
    flash = device.type == "cuda" and installed("flash_attn")
    if kernel == "auto":
        if device.type != "cuda":
            return "sdpa"
        return "flash" if flash and dtype in (torch.bfloat16, torch.float16) else "flex"
    if kernel == "flash" and not flash:
        raise ConfigError(
            "model.prefix_kernel", f"'flash' needs a CUDA device and the flash-attn package, on {device}"
        )
    if kernel == "flex" and device.type != "cuda":
        raise ConfigError("model.prefix_kernel", f"'flex' has a backward on CUDA only, not on {device}")
    return kernel


def kernels_label(cfg: ModelConfig, device: torch.device, bf16: bool) -> str:
    """Which kernels a model config runs on `device`, e.g. 'prefix=flash chunk=triton' (for run tags)."""
    prefix = resolve_prefix_kernel(cfg.prefix_kernel, device, torch.bfloat16 if bf16 else torch.float32)
    return f"prefix={prefix} chunk={resolve_chunk_kernel(cfg.chunk_kernel, device)}"


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, kernel: str = "sdpa"
) -> torch.Tensor:
    """Full-sequence causal attention, [B, H, T, d_h], through a fused kernel (first order only)."""
    num = q.shape[-2]
    windowed = window is not None and window < num
    if kernel == "flash":
        return _flash_attention(q, k, v, window if windowed else None)
    if not windowed:  # plain causal: SDPA's flash / cuDNN kernels
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if kernel == "flex":
        return _flex_attention()(q, k, v, block_mask=_window_block_mask(num, window, q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(num, num, window, q.device))


def _flash_attention(q, k, v, window: int | None) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional (GPU extra); checked by resolve_prefix_kernel

    # flash-attn wants [B, T, H, d]; window_size=(left, right) counts keys besides the query itself.
    left = -1 if window is None else window - 1
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window_size=(left, 0)
    )
    return out.transpose(1, 2)


@functools.cache
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled, flex generates a fused kernel that skips masked blocks; eager it is a slow reference.
    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


@functools.lru_cache(maxsize=16)
def _window_block_mask(num: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(batch, head, q_idx, k_idx):
        return (k_idx <= q_idx) & (q_idx - k_idx < window)

    return create_block_mask(sliding, None, None, num, num, device=device)


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


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, kernel: str = "materialized"
) -> torch.Tensor:
    """Queries [B, H, b, d_h] (the last b positions) against [B, H, n, d_h]; supports double backward."""
    if resolve_chunk_kernel(kernel, q.device) == "triton":
        return triton_chunk_attention(q, k, v, window)
    return materialized_attention(q, k, v, window)


class Attention(nn.Module):
    """Multi-head attention with QK-norm (one RMSNorm over d_h shared by the heads, before RoPE)."""

    def __init__(
        self, dim: int, num_heads: int, eps: float, prefix_kernel: str = "auto", chunk_kernel: str = "auto"
    ):
        super().__init__()
        self.prefix_kernel = prefix_kernel
        self.chunk_kernel = chunk_kernel
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
        kernel = resolve_prefix_kernel(self.prefix_kernel, x.device, q.dtype)
        return self._output(
            fused_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, window, kernel)
        )

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
        out = chunk_attention(q_rot, apply_rope(k, cos, sin), v, window, self.chunk_kernel)
        keep = num_keys if window is None else window
        return self._output(out), KVCache(k[:, :, -keep:], v[:, :, -keep:])
