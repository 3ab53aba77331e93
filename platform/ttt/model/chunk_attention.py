"""Chunk attention that can be differentiated twice without materialising the probabilities.

The inner loop differentiates the suffix blocks once to get the fast-weight gradient, and the outer
backward differentiates that gradient again, so chunk attention needs a double backward. PyTorch's fused
kernels have none (environment notes: flash, efficient, cuDNN and flex fail or detach), so there are two
implementations, chosen by `model.chunk_kernel`:

* `materialized`: explicit fp32 softmax in PyTorch ops; autograd derives every order. Works everywhere.
* `triton`: `ChunkAttention`, an autograd.Function whose forward and backward are fused Triton kernels and
  whose backward is itself an autograd.Function with a fused double-backward kernel
  (`ttt.model.triton_attention`). Needs CUDA, or TRITON_INTERPRET=1 on CPU (tests).
* `auto`: `triton` on CUDA when Triton is installed, else `materialized`.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ttt.config import ConfigError

ChunkKernel = Literal["auto", "materialized", "triton"]


@functools.cache
def installed(package: str) -> bool:
    """Whether an optional package can be imported (asked once: this runs for every attention call)."""
    return importlib.util.find_spec(package) is not None


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA with Triton, or Triton's CPU interpreter."""
    if not installed("triton"):
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_chunk_kernel(kernel: ChunkKernel, device: torch.device) -> Literal["materialized", "triton"]:
    if kernel == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "materialized"
    if kernel == "triton" and not triton_usable(device):
        missing = not installed("triton")
        raise ConfigError(
            "model.chunk_kernel",
            "'triton' needs the triton package" if missing else
            f"'triton' runs on CUDA devices (or on CPU with TRITON_INTERPRET=1), not on {device.type}",
        )  # fmt: skip
    return kernel


# (rows, keys, warps) per kernel on CUDA for d ≤ 64, chosen with `compile_report` on sm_90: the largest
# tiles that compile without register spills in bf16 (`python benchmarks/kernels.py --compile` prints them).
# 4-byte operands (fp32 or fp64 checks) need twice the registers: smaller tiles. Tuning on a GPU may pick
# others; these are where spills start, not measured optima.
_CUDA_BLOCKS = {
    "_forward": (128, 64, 8),
    "_backward_q": (128, 64, 8),
    "_backward_kv": (64, 64, 8),
    "_double_q": (32, 32, 8),
    "_double_kv": (32, 32, 4),
}
_CUDA_BLOCKS_WIDE = {name: (16, 16, 4) for name in _CUDA_BLOCKS}


def _blocks(device: torch.device, kernel: str, dtype: torch.dtype, head_dim: int) -> tuple[int, int, int]:
    """(rows per block, keys per block, warps) for one kernel. The interpreter's small blocks keep tests
    quick and still cover multi-block loops."""
    if device.type != "cuda":
        return 16, 16, 1
    wide = dtype in (torch.float32, torch.float64)
    rows, keys, warps = (_CUDA_BLOCKS_WIDE if wide else _CUDA_BLOCKS)[kernel]
    if head_dim > 64:  # wider rows of q, k, v and the accumulators: halve the tile
        rows = max(16, rows // 2)
    return rows, keys, warps


def _constants(dtype: torch.dtype, head_dim: int) -> dict:
    """The compile-time arguments every kernel takes besides the block sizes."""
    import triton.language as tl

    fp64 = dtype == torch.float64
    return {
        "HEAD_DIM": head_dim,
        "BD": max(16, 1 << (head_dim - 1).bit_length()),
        "ACC": tl.float64 if fp64 else tl.float32,
        # Exact products for fp32/fp64 (no TF32); bf16/fp16 operands use tensor cores either way.
        "PREC": "ieee" if dtype in (torch.float32, torch.float64) else "tf32",
    }


class _Launch:
    """Shapes and compile-time settings shared by every kernel of one attention call. Every tensor is a
    contiguous [B·H, rows, d] (query-shaped: m rows, key-shaped: n rows), so two strides each describe all."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, window: int | None):
        from ttt.model import triton_attention as kernels

        self.kernels = kernels
        self.bh, self.m, self.d = q.shape
        self.n = k.shape[1]
        self.window = self.n + 1 if window is None else window
        self.scale = 1.0 / math.sqrt(self.d)
        self.device = q.device
        self.dtype = q.dtype
        self.stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.consts = _constants(q.dtype, self.d)
        self.strides = (self.m * self.d, self.d, self.n * self.d, self.d)

    def run(self, fn, over_keys: bool, *tensors):
        import triton

        bm, bn, warps = _blocks(self.device, fn.__name__, self.dtype, self.d)
        grid = (triton.cdiv(self.n if over_keys else self.m, bn if over_keys else bm), self.bh)
        try:
            fn[grid](
                *tensors, *self.strides, self.m, self.n, self.window, self.scale,
                BM=bm, BN=bn, num_warps=warps, **self.consts,
            )  # fmt: skip
        except Exception as exc:  # compilation or launch: say which kernel, and the way around it
            raise RuntimeError(
                f"Triton chunk-attention kernel {fn.__name__} failed on {self.device} "
                f"(d={self.d}, {self.consts['ACC']}): {exc}; model.chunk_kernel=materialized avoids it"
            ) from exc

    def stats(self) -> torch.Tensor:
        return torch.empty(self.bh, self.m, device=self.device, dtype=self.stat_dtype)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-2:]).contiguous()


class _AttentionBackward(torch.autograd.Function):
    """(q, k, v, o, lse, do) → (dq, dk, dv); its own backward is the fused double backward.
    `o` and `lse` enter as constants: the formulas account for their dependence on q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, o, lse, do, window):
        launch = _Launch(q, k, window)
        do = do.contiguous()
        delta = (do.to(launch.stat_dtype) * o.to(launch.stat_dtype)).sum(-1)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (q, k, v, do, lse, delta)
        launch.run(launch.kernels._backward_q, False, *common, dq)
        launch.run(launch.kernels._backward_kv, True, *common, dk, dv)
        ctx.save_for_backward(q, k, v, do, lse, delta)
        ctx.window = window
        return dq, dk, dv

    @staticmethod
    def backward(ctx, gq, gk, gv):
        if torch.is_grad_enabled():  # create_graph=True here would ask for a third derivative
            raise RuntimeError(
                "the fused chunk attention has no third derivative (TTT-E2E needs two); "
                "use model.chunk_kernel=materialized for higher orders"
            )
        q, k, v, do, lse, delta = ctx.saved_tensors
        launch = _Launch(q, k, ctx.window)
        gq = torch.zeros_like(q) if gq is None else gq.contiguous()
        gk = torch.zeros_like(k) if gk is None else gk.contiguous()
        gv = torch.zeros_like(v) if gv is None else gv.contiguous()
        rq, rdo, rk, rv = torch.empty_like(q), torch.empty_like(do), torch.empty_like(k), torch.empty_like(v)
        c_sum, e_sum = launch.stats(), launch.stats()
        common = (q, k, v, do, lse, delta, gq, gk, gv)
        launch.run(launch.kernels._double_q, False, *common, rq, rdo, c_sum, e_sum)
        launch.run(launch.kernels._double_kv, True, *common, c_sum, e_sum, rk, rv)
        return rq, rk, rv, None, None, rdo, None


class ChunkAttention(torch.autograd.Function):
    """Fused attention of queries [B·H, m, d] (the last m positions) over keys/values [B·H, n, d]."""

    @staticmethod
    def forward(ctx, q, k, v, window):
        launch = _Launch(q, k, window)
        o, lse = torch.empty_like(q), launch.stats()
        launch.run(launch.kernels._forward, False, q, k, v, o, lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window = window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        # A Function call rather than inline kernels: under create_graph this records the node whose
        # backward is the double-backward kernel.
        dq, dk, dv = _AttentionBackward.apply(q, k, v, o.detach(), lse, do, ctx.window)
        return dq, dk, dv, None


def triton_chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
) -> torch.Tensor:
    """[B, H, m, d] queries against [B, H, n, d] keys/values, lower-right aligned, through the kernels."""
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-2] > k.shape[-2]:
        raise ValueError(f"{q.shape[-2]} queries but only {k.shape[-2]} keys (queries are the last keys)")
    out = ChunkAttention.apply(_flat(q), _flat(k), _flat(v), window)
    return out.view(q.shape)


# -- ahead-of-time compilation, without a GPU ------------------------------------------------------------

_STATS = {"LSE", "DELTA", "CSUM", "ESUM"}  # per-row statistics, in the accumulation dtype
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class KernelBuild:
    """What ptxas reports for one kernel compiled for a GPU architecture."""

    name: str
    block: tuple[int, int, int]  # rows, keys, warps
    registers: int
    spill_bytes: int  # spill stores
    shared_bytes: int


def compile_report(
    arch: int = 90, dtype: torch.dtype = torch.bfloat16, head_dim: int = 64
) -> list[KernelBuild]:
    """Compile every kernel for NVIDIA compute capability `arch` (90: H100/H200) with the block sizes the
    CUDA path launches, and read registers and spills from ptxas. Triton ships the CUDA compiler, so this
    needs no GPU: a CPU machine catches kernels that would not compile, or would spill, before a GPU run."""
    return [
        compile_kernel(name, _blocks(torch.device("cuda"), name, dtype, head_dim), arch, dtype, head_dim)
        for name in _CUDA_BLOCKS
    ]


def compile_kernel(
    name: str, block: tuple[int, int, int], arch: int, dtype: torch.dtype, head_dim: int
) -> KernelBuild:
    """One kernel, compiled for `arch` with (rows, keys, warps) = `block`. Must run without
    TRITON_INTERPRET: with it the kernels are interpreted functions, which cannot be compiled."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling the kernels needs TRITON_INTERPRET unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ttt.model import triton_attention as kernels

    fn = getattr(kernels, name)
    element, stats = _TRITON_TYPES[dtype], "fp64" if dtype == torch.float64 else "fp32"
    signature = {}
    for arg, param in zip(fn.arg_names, fn.params, strict=True):
        if param.is_constexpr:
            signature[arg] = "constexpr"
        elif arg.isupper():  # tensors are named in capitals
            signature[arg] = f"*{stats if arg in _STATS else element}"
        else:
            signature[arg] = "fp32" if arg == "scale" else "i32"
    rows, keys, warps = block
    constexprs = {**_constants(dtype, head_dim), "BM": rows, "BN": keys}
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps},
    )
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    return KernelBuild(name, block, registers, spills, compiled.metadata.shared)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill-store bytes) from `ptxas -v`, with the ptxas Triton ships."""
    import triton

    try:  # the one Triton itself uses for this architecture
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except (ImportError, AttributeError):  # another Triton version: the newest it ships
        found = sorted(Path(triton.__file__).parent.glob("backends/nvidia/bin/ptxas*"), reverse=True)
        if not found:
            raise RuntimeError("this Triton installation ships no ptxas") from None
        ptxas = str(found[0])
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # 'a': the Hopper-only instructions Triton emits
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        command = [ptxas, "-v", f"--gpu-name={gpu}", str(source), "-o", str(Path(tmp) / "kernel.o")]
        done = subprocess.run(command, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {log[-500:]}")
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output: {log[-300:]}")
    return int(registers.group(1)), int(spills.group(1))
