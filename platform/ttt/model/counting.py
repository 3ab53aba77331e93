"""Parameter and FLOP counts from the config alone (no weights needed), for MFU and for model cards.

FLOPs count matrix multiplies only (2 per multiply-add), the convention of MFU reports. Attention counts
the keys each query really attends to (causal, at most W), not the masked ones a kernel may compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttt.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int
    prime: int
    """Prime MLPs with their two norms (all S suffix blocks)."""
    inner: int
    """Weights updated at test time: w1, w2, w3 of the prime MLPs."""

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, i, s = cfg.hidden_size, cfg.intermediate_size, cfg.suffix_len
    attention = 4 * d * d + 2 * cfg.head_dim  # q, k, v, o and the shared q/k norms
    block = attention + 3 * d * i + 4 * d  # + SwiGLU + four sandwich norms
    inner = s * 3 * d * i
    prime = inner + s * 2 * d
    embedding = cfg.vocab_size * d  # tied: counted once
    return ParamCounts(
        total=embedding + cfg.num_layers * block + prime + d,  # + final norm
        embedding=embedding,
        prime=prime,
        inner=inner,
    )


def mean_keys_per_query(seq_len: int, window: int | None) -> float:
    """Average number of keys a causal query attends to over positions 0..T−1."""
    w = seq_len if window is None else min(window, seq_len)
    # positions t < w see t+1 keys, the rest see w
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


@dataclass(frozen=True)
class FlopCounts:
    """Per token of the training context."""

    forward: float
    """One forward pass of the whole model."""
    train: float
    """Model FLOPs of one training step (forward + backward, + the inner loop's extra work for TTT)."""
    train_with_recompute: float
    """`train` plus the forward work redone by activation checkpointing (hardware FLOPs)."""


def flops_per_token(cfg: ModelConfig, seq_len: int, ttt_enabled: bool, recompute: str = "full") -> FlopCounts:
    """`recompute` is `ttt.recompute`: 'full' redoes the forward matmuls of every recomputed region;
    'selective' keeps them (it redoes only elementwise ops, which these counts leave out) and 'none'."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    keys = mean_keys_per_query(seq_len, cfg.effective_window)
    block = 2 * (4 * d * d + 3 * d * i) + 4 * d * keys  # projections + MLP + QKᵀ and PV
    prime = 2 * 3 * d * i
    head = 2 * d * cfg.vocab_size
    prefix = (cfg.num_layers - cfg.suffix_len) * block
    suffix = cfg.suffix_len * (block + prime) + head  # what runs inside the inner loop
    forward = prefix + suffix
    redo = recompute == "full"
    if not (ttt_enabled and cfg.suffix_len):
        # Plain training: backward ≈ 2× forward; full recomputation redoes one forward.
        return FlopCounts(forward, 3 * forward, 3 * forward + (forward if redo else 0))
    # Meta step: prefix forward + backward (3×). In the inner loop each mini-batch costs forward + inner
    # backward (1 + 2 = 3 units), and the outer backward differentiates both (2 × 3 = 6 units): 9×.
    # Full recomputation redoes the prefix forward and the 3 units of each inner step, once.
    train = 3 * prefix + 9 * suffix
    return FlopCounts(forward, train, train + (prefix + 3 * suffix if redo else 0))
