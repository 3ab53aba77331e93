"""The fused chunk-attention kernels against materialised attention, on the shape the meta step runs.

One suffix chunk of the meta step: b queries against [W-key cache ‖ b new keys], differentiated twice
(the inner gradient, then the outer gradient of it). For each implementation (`triton`, `materialized`):

- accuracy: output, first derivatives and second derivatives (of a random linear functional of the first)
  in the chosen dtype, as the worst error relative to the largest entry of the fp64 materialised
  reference; the materialised path in the same dtype is the yardstick for what that dtype allows;
- time (CUDA): forward; forward + first-order backward; the meta pattern (forward, gradients with
  create_graph, backward of them), median of repeats; peak memory of the meta pattern.

    python benchmarks/kernels.py --device cuda                      # 1 x 12 heads, b=1024, W=8192, d=64, bf16
    TRITON_INTERPRET=1 python benchmarks/kernels.py --device cpu    # small fp32 shape, accuracy only
    python benchmarks/kernels.py --compile                          # no GPU: registers and spills on sm_90
No Ray, DeepSpeed or MLflow needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from results import write_block
from ttt.model.attention import chunk_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def _inputs(args, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (args.batch, args.heads)
    q = torch.randn(*shape, args.chunk, args.head_dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(*shape, args.window + args.chunk, args.head_dim, generator=gen, dtype=torch.float64)
            for _ in range(2))  # fmt: skip
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _orders(kernel, tensors, window, seed=1):
    """Output, first derivatives (w.r.t. q, k, v) and second derivatives (w.r.t. q, k, v, dO)."""
    out = chunk_attention(*tensors, window, kernel)
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out).requires_grad_()
    first = torch.autograd.grad(out, tensors, go, create_graph=True)
    weights = [torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g) for g in first]
    functional = sum((g * w).sum() for g, w in zip(first, weights, strict=True))
    second = torch.autograd.grad(functional, [*tensors, go])
    return [out], list(first), list(second)


def _rel_errors(ours, ref) -> list[float]:
    return [
        max(float((a.detach().double() - b).abs().max() / b.abs().max()) for a, b in zip(x, y, strict=True))
        for x, y in zip(ours, ref, strict=True)
    ]


def accuracy(args, device) -> dict[str, list[float]]:
    dtype = DTYPES[args.dtype]
    ref = _orders("materialized", _inputs(args, torch.float64, device), args.window)
    return {
        kernel: _rel_errors(_orders(kernel, _inputs(args, dtype, device), args.window), ref)
        for kernel in ("triton", "materialized")
    }


def timings(args, device) -> dict[str, dict[str, float]]:
    return {kernel: _time_kernel(args, device, kernel) for kernel in ("triton", "materialized")}


def _time_kernel(args, device, kernel: str) -> dict[str, float]:
    q, k, v = _inputs(args, DTYPES[args.dtype], device)
    go = torch.randn_like(q)

    def attend():
        return chunk_attention(q, k, v, args.window, kernel)

    def forward():
        with torch.no_grad():
            attend()

    def first_order():
        torch.autograd.grad(attend(), (q, k, v), go)

    def meta():
        grads = torch.autograd.grad(attend(), (q, k, v), go, create_graph=True)
        torch.autograd.grad(sum(g.float().square().sum() for g in grads), (q, k, v))

    row = {name: _median_ms(fn, args.repeats) for name, fn in
           (("forward", forward), ("first_order", first_order), ("meta", meta))}  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    meta()
    row["meta_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: compilation and autotuning
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def render(args, device, errors, times) -> str:
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    lines = [
        f"# Chunk attention: {args.batch} x {args.heads} heads, b={args.chunk} queries over "
        f"W+b={args.window + args.chunk} keys, d={args.head_dim}, {args.dtype}, {where}",
        "",
        "Worst error relative to the largest entry of the fp64 materialised reference:",
        "",
        "| kernel | output | first derivatives | second derivatives |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {e[0]:.1e} | {e[1]:.1e} | {e[2]:.1e} |" for k, e in errors.items()]
    if times:
        ref = times["materialized"]
        lines += [
            "",
            "| kernel | forward (ms) | fwd + bwd (ms) | meta: fwd, bwd, double bwd (ms) | meta peak (MiB) "
            "| meta time / materialized |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {t['forward']:.2f} | {t['first_order']:.2f} | {t['meta']:.2f} "
            f"| {t['meta_peak_mib']:.0f} | {t['meta'] / ref['meta']:.2f} |"
            for k, t in times.items()
        ]
    return "\n".join(lines) + "\n"


def compile_table(arch: int) -> str:
    """ptxas's report for each kernel in bf16 at the block sizes the CUDA path launches (no GPU needed)."""
    from ttt.model.chunk_attention import compile_report

    lines = [
        f"# Chunk-attention kernels compiled for sm_{arch} in bf16 (ptxas, no GPU needed)",
        "",
        "| head dim | kernel | rows x keys, warps | registers | spill stores (bytes) | shared memory (KiB) |",
        "|---|---|---|---|---|---|",
    ]
    for head_dim in (64, 128):
        for b in compile_report(arch, torch.bfloat16, head_dim):
            rows, keys, warps = b.block
            lines.append(
                f"| {head_dim} | `{b.name}` | {rows} x {keys}, {warps} | {b.registers} | {b.spill_bytes} "
                f"| {b.shared_bytes / 1024:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, help="default 12 on CUDA (125m), 2 on CPU")
    parser.add_argument("--chunk", type=int, help="queries b (default 1024 on CUDA, 32 on CPU)")
    parser.add_argument("--window", type=int, help="cached keys W (default 8192 on CUDA, 64 on CPU)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--write", help="also write the tables as Markdown to this file")
    parser.add_argument(
        "--compile", type=int, nargs="?", const=90, metavar="ARCH",
        help="only compile the kernels for sm_ARCH (default 90) and report registers and spills",
    )  # fmt: skip
    args = parser.parse_args()
    if args.compile:
        table = compile_table(args.compile)
        print(table)
        if args.write:
            write_block(args.write, "kernel_builds", table, "Chunk-attention kernels compiled (`--compile`)")
        return
    gpu = args.device == "cuda"
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("on CPU the kernels run in Triton's interpreter: set TRITON_INTERPRET=1")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.heads = args.heads or (12 if gpu else 2)
    args.chunk = args.chunk or (1024 if gpu else 32)
    args.window = args.window or (8192 if gpu else 64)
    device = torch.device(args.device)

    table = render(args, device, accuracy(args, device), timings(args, device) if gpu else None)
    print(table)
    if args.write:
        write_block(args.write, "kernels", table, "Chunk-attention kernels (`benchmarks/kernels.py`)")


if __name__ == "__main__":
    main()
