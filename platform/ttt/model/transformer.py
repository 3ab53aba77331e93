"""The TTT-E2E Transformer (spec §2): sandwich-normed Llama blocks, tied head, prime MLPs in the suffix.

    tokens ─► embed ─► prefix blocks 0..L−S−1 ─► suffix blocks L−S..L−1 ─► RMSNorm ─► logits = h · Eᵀ

A block is  x += post(Attn(pre(x)));  [suffix only: x += post'(PrimeMLP(pre'(x)))];  x += post(MLP(pre(x))).
The prime MLP weights are Parameters of the suffix block itself (their initial values are meta-learned);
the inner loop in `ttt.model.ttt` passes per-sequence fast copies of them through `prime`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ttt.config import ModelConfig
from ttt.model.attention import Attention, KVCache
from ttt.model.layers import RMSNorm, RotaryTable, SwiGLU, swiglu
from ttt.model.recompute import Recompute, checkpoint_block


class PrimeWeights(NamedTuple):
    """Prime MLP weights of one block, [out, in] each: shared [O, I] or per sequence [B, O, I]."""

    gate: torch.Tensor  # w1 [I, D]
    up: torch.Tensor  # w3 [I, D]
    down: torch.Tensor  # w2 [D, I]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, has_prime: bool):
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.attn_pre_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, cfg.num_heads, eps, cfg.prefix_kernel, cfg.chunk_kernel)
        self.attn_post_norm = RMSNorm(dim, eps)
        self.has_prime = has_prime
        if has_prime:
            self.prime_pre_norm = RMSNorm(dim, eps)
            self.prime_post_norm = RMSNorm(dim, eps)
            hidden = cfg.intermediate_size
            self.prime_gate = nn.Parameter(torch.empty(hidden, dim))
            self.prime_up = nn.Parameter(torch.empty(hidden, dim))
            self.prime_down = nn.Parameter(torch.empty(dim, hidden))
        self.mlp_pre_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, cfg.intermediate_size)
        self.mlp_post_norm = RMSNorm(dim, eps)

    def prime_weights(self) -> PrimeWeights:
        """The meta-learned initial fast weights (the Parameters themselves)."""
        return PrimeWeights(self.prime_gate, self.prime_up, self.prime_down)

    def _after_attention(self, x: torch.Tensor, prime: PrimeWeights | None) -> torch.Tensor:
        if self.has_prime:
            weights = prime if prime is not None else self.prime_weights()
            x = x + self.prime_post_norm(swiglu(self.prime_pre_norm(x), *weights))
        return x + self.mlp_post_norm(self.mlp(self.mlp_pre_norm(x)))

    def forward(
        self, x: torch.Tensor, rope: RotaryTable, window: int | None, prime: PrimeWeights | None = None
    ) -> torch.Tensor:
        """Whole sequence [B, T, D] through the fused attention path."""
        x = x + self.attn_post_norm(self.attn(self.attn_pre_norm(x), rope, window))
        return self._after_attention(x, prime)

    def forward_chunk(
        self,
        x: torch.Tensor,
        cache: KVCache | None,
        rope: RotaryTable,
        window: int | None,
        prime: PrimeWeights | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """One mini-batch [B, b, D] attending to the cached keys/values of earlier tokens."""
        attn_out, cache = self.attn.forward_chunk(self.attn_pre_norm(x), cache, rope, window)
        x = x + self.attn_post_norm(attn_out)
        return self._after_attention(x, prime), cache


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        first_suffix = cfg.num_layers - cfg.suffix_len
        self.layers = nn.ModuleList(Block(cfg, has_prime=i >= first_suffix) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta)
        self.window = cfg.effective_window
        self.reset_parameters()

    # -- structure ---------------------------------------------------------------------------------

    @property
    def prefix_layers(self) -> Sequence[Block]:
        return self.layers[: self.config.num_layers - self.config.suffix_len]

    @property
    def suffix_layers(self) -> Sequence[Block]:
        return self.layers[self.config.num_layers - self.config.suffix_len :]

    def prime_weights(self) -> list[PrimeWeights]:
        return [block.prime_weights() for block in self.suffix_layers]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std²) for every linear (normal and prime) and the embedding; norm gains 1."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            else:
                nn.init.normal_(param, mean=0.0, std=std)

    # -- pieces the inner loop composes ------------------------------------------------------------

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and the tied output projection: logits [.., V]."""
        return F.linear(self.final_norm(h), self.embed.weight)

    def _run_blocks(self, h: torch.Tensor, blocks: Sequence[Block], recompute: Recompute) -> torch.Tensor:
        # 'full' keeps only each block's input and redoes the block in the backward pass; 'selective' also
        # keeps its matmul and attention outputs (ttt.model.recompute).
        for block in blocks:
            h = checkpoint_block(block, h, self.rope, self.window, recompute=recompute)
        return h

    def run_prefix(self, tokens: torch.Tensor, recompute: Recompute = "none") -> torch.Tensor:
        """Embedding and the L−S prefix blocks, once over the whole sequence: [B, T] → [B, T, D]."""
        return self._run_blocks(self.embed_tokens(tokens), self.prefix_layers, recompute)

    def run_suffix_chunk(
        self,
        h: torch.Tensor,
        caches: Sequence[KVCache | None],
        prime: Sequence[PrimeWeights] | None = None,
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """Suffix blocks and head on one mini-batch of prefix outputs: logits [B, b, V] and new caches."""
        new_caches = []
        for j, block in enumerate(self.suffix_layers):
            h, cache = block.forward_chunk(
                h, caches[j], self.rope, self.window, None if prime is None else prime[j]
            )
            new_caches.append(cache)
        return self.head(h), new_caches

    # -- whole-sequence evaluation without test-time training --------------------------------------

    def forward(self, tokens: torch.Tensor, recompute: Recompute = "none") -> torch.Tensor:
        """Logits [B, T, V] with every block over the whole sequence and the prime MLPs static.
        `recompute`: per-block activation recomputation, 'none', 'selective' or 'full'."""
        return self.head(self._run_blocks(self.embed_tokens(tokens), self.layers, recompute))

    def forward_chunked(self, tokens: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """The same logits computed chunk by chunk through every block with KV caches (the reference's
        `pretrain` mode); equal to `forward` up to rounding, and the basis of streaming decoding."""
        h = self.embed_tokens(tokens)
        caches: list[KVCache | None] = [None] * len(self.layers)
        outputs = []
        for start in range(0, tokens.shape[1], chunk_size):
            x = h[:, start : start + chunk_size]
            for i, block in enumerate(self.layers):
                x, caches[i] = block.forward_chunk(x, caches[i], self.rope, self.window)
            outputs.append(self.head(x))
        return torch.cat(outputs, dim=1)
