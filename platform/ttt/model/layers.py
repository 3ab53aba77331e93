"""Building blocks: RMSNorm, interleaved rotary embeddings, SwiGLU.

Every op here must support double backward: the suffix blocks are differentiated twice (the inner gradient
is itself differentiated by the outer one), so no fused kernels without a double-backward formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Norms and rotations run in fp32 (fp64 stays fp64 for finite-difference checks), as the reference does.
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _upcast(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RotaryTable:
    """cos/sin of position · θ^(−2i/d) for i < d/2, grown on demand.

    The table is sized by the positions actually asked for, so a context shorter than the window plus a
    mini-batch can never index past its end (the reference's table of 2·T rows yields NaN there).
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        cos, sin = self._tables.get((device, dtype), (None, None))
        if cos is None or cos.shape[0] < length:
            size = max(length, 2 * cos.shape[0] if cos is not None else 0)
            # Angles in fp64, then rounded once: positions up to 10^6 keep full fp32 precision.
            inv_freq = self.theta ** (
                -torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim
            )
            angles = torch.arange(size, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
            self._tables[(device, dtype)] = (cos, sin)
        return cos[:length], sin[:length]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [..., T, d] by the angles of cos/sin [T, d/2]."""
    xf = _upcast(x)
    even, odd = xf[..., 0::2], xf[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) ⊙ up(x)) with [out, in] weights, shared [O, I] or per sequence [B, O, I].

    Functional so that the prime MLP can run on per-sequence fast weights, and so that DeepSpeed ZeRO-3
    sees the Parameters used directly by their owner module.
    """
    if gate.dim() == 2:
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    h = F.silu(torch.matmul(x, gate.transpose(-1, -2))) * torch.matmul(x, up.transpose(-1, -2))
    return torch.matmul(h, down.transpose(-1, -2))


class SwiGLU(nn.Module):
    """The normal MLP: gate (w1), up (w3), down (w2), bias-free."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Through the submodules, not their .weight: ZeRO-3 gathers a weight only inside its owner's forward.
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
