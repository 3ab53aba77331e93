"""Time and peak memory of one TTT-E2E meta step (forward + second-order backward).

Two modes, each measurement in a fresh process (a clean allocator and high-water mark):

1. T-sweep (default): for each context length T (at a fixed mini-batch b), with `ttt.recompute=full` and
   `none`. With full recomputation only the carry (fast weights and KV caches) is kept per mini-batch, so
   memory should grow about linearly in T with a small slope; without it, every mini-batch's
   double-backward graph is kept.
2. `--compare-full`: for each shape T:b:W (train.seq_len, ttt.mini_batch_size, model.window_size), the
   meta step of `<size>` against the train step of the full-attention baseline `<size>-fa` at the same T
   and batch, under the config's precision (train.precision auto: bf16 autocast on CUDA, fp32 on CPU):
   time, tokens/s, MFU, peak memory and the meta / full-attention time ratio. Forward + backward only: no
   optimizer update, which costs the same for both models and is not what this compares.

3. `--policies`: the three `ttt.recompute` policies (none, selective, full) on one config, in one process,
   interleaved: R rounds of K steps of each policy, the order alternating every round; per round the ratios
   selective / none and full / none (paired, so that the machine's drift cancels), reported as median and
   IQR, plus the median s/step and each policy's peak memory.

Each measurement runs a warm-up step, then:
  * peak memory: the rise during one step over what is held before it (weights; gradients freed). On CPU
    the rise of the resident set (VmHWM reset just before the step), with glibc told to serve every large
    buffer by mmap so that freed activations go back to the OS and RSS tracks live tensors; on CUDA,
    torch.cuda.max_memory_allocated.
  * time: the median of a few further steps.

    python benchmarks/meta_step.py                    # tiny preset, T = 256..2048, prints a table
    python benchmarks/meta_step.py --write benchmarks/RESULTS.md
    python benchmarks/meta_step.py --policies --preset tiny --lengths 256 --batch 8 --rounds 10 --block 3
    python benchmarks/meta_step.py --compare-full --preset 125m --shapes 8192:1024:8192 32768:1024:8192 \\
        --batch 1 --device cuda [--set model.chunk_kernel=materialized] [--write benchmarks/RESULTS.md]
No Ray, DeepSpeed or MLflow needed (runs on a bare GPU box too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from results import write_block

COMPARE_HEADING = "Meta step vs full attention (`benchmarks/meta_step.py --compare-full`)"


# -- measuring one step (shared by both modes) -------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(job, batch: int, device: str):
    """The model and a batch of random tokens (the cost does not depend on the weights or the data)."""
    import torch

    from ttt.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(job.model).to(device)
    tokens = torch.randint(0, job.model.vocab_size, (batch, job.train.seq_len + 1), device=device)
    return model, tokens[:, :-1], tokens[:, 1:]


def _step_fn(model, inputs, targets, job, device: str, autocast=None) -> Callable[[], None]:
    """One forward + backward through `sequence_loss`: the meta step with TTT on, plain training off."""
    import contextlib

    import torch

    from ttt.model.ttt import sequence_loss

    context = autocast or contextlib.nullcontext

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with context():  # backward inside too, as the trainer's micro-step runs it
            sequence_loss(model, inputs, targets, job.ttt).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()  # time the kernels, not their launch

    return step


def _peak_bytes(model, step: Callable[[], None], device: str) -> int:
    """Peak rise of memory during one step over what is held before it (weights; gradients freed)."""
    import torch

    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) * 1024


def _median_seconds(step: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _warm_peak_time(model, step: Callable[[], None], device: str, repeats: int) -> tuple[int, float]:
    step()  # warm-up: one-time allocations, kernel selection and compilation
    return _peak_bytes(model, step, device), _median_seconds(step, repeats)


# -- mode 1: meta step against T, with full recomputation and without -----------------------------------


def measure(preset: str, seq_len: int, batch: int, recompute: str, repeats: int, device: str) -> dict:
    from ttt.config import preset as get_preset

    job = get_preset(preset).with_overrides([f"train.seq_len={seq_len}", f"ttt.recompute={recompute}"])
    model, inputs, targets = _build(job, batch, device)
    peak, seconds = _warm_peak_time(model, _step_fn(model, inputs, targets, job, device), device, repeats)
    return {
        "seq_len": seq_len,
        "recompute": recompute,
        "seconds": seconds,
        "peak_bytes": peak,
        "mini_batch": job.ttt.mini_batch_size,
        "window": job.model.window_size,
    }


# -- mode 2: meta step against the full-attention train step -------------------------------------------


def compare_job(preset: str, kind: str, shape: str, overrides: list[str]):
    """The config of one side of the comparison: `<size>` (meta) or `<size>-fa` (full) at shape T:b:W."""
    from ttt.config import preset as get_preset

    seq_len, mini_batch, window = shape.split(":")
    size = preset.partition("-")[0]
    # The baseline keeps its preset's one loss chunk per sequence; b is TTT's; full attention ignores W.
    chunk = mini_batch if kind == "meta" else seq_len
    name = size if kind == "meta" else f"{size}-fa"
    shaped = [f"train.seq_len={seq_len}", f"ttt.mini_batch_size={chunk}", f"model.window_size={window}"]
    return name, get_preset(name).with_overrides([*shaped, *overrides])


def _kernels(job, device, autocast) -> dict[str, str | None]:
    """The attention kernels this config resolves to on `device` (the chunk kernel only where TTT runs)."""
    import torch

    from ttt.model.attention import resolve_prefix_kernel
    from ttt.model.chunk_attention import resolve_chunk_kernel

    with autocast():  # q's dtype is what a linear layer yields under this precision
        dtype = (torch.ones(1, 1, device=device) @ torch.ones(1, 1, device=device)).dtype
    meta = job.ttt.enabled and job.model.suffix_len > 0
    return {
        "prefix_kernel": resolve_prefix_kernel(job.model.prefix_kernel, device, dtype),
        "chunk_kernel": resolve_chunk_kernel(job.model.chunk_kernel, device) if meta else None,
        "precision": str(dtype).removeprefix("torch."),
    }


def measure_compare(args: argparse.Namespace, kind: str, shape: str) -> dict:
    import torch

    from ttt.model.counting import flops_per_token
    from ttt.train.device import autocast_for, peak_flops

    name, job = compare_job(args.preset, kind, shape, args.set)
    device = torch.device(args.device)
    autocast = autocast_for(device, job.train.precision)
    model, inputs, targets = _build(job, args.batch, args.device)
    step = _step_fn(model, inputs, targets, job, args.device, autocast)
    peak, seconds = _warm_peak_time(model, step, args.device, args.repeats)
    tokens_per_s = args.batch * job.train.seq_len / seconds
    # Model FLOPs (no recomputation), the MFU convention; the meta step's count includes its inner loop.
    flops = flops_per_token(job.model, job.train.seq_len, job.ttt.enabled, job.ttt.recompute).train
    peak_rate = peak_flops(device, args.peak_tflops)
    return {
        "kind": kind,
        "preset": name,
        "seq_len": job.train.seq_len,
        "mini_batch": job.ttt.mini_batch_size,
        "window": job.model.window_size,
        "recompute": job.ttt.recompute,
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "mfu": flops * tokens_per_s / peak_rate if peak_rate else None,
        "peak_bytes": peak,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        **_kernels(job, device, autocast),
    }


# -- mode 3: the recompute policies, interleaved ---------------------------------------------------------

POLICIES = ("none", "selective", "full")


def measure_policies(args: argparse.Namespace) -> dict:
    import torch

    from ttt.config import preset as get_preset

    seq_len = args.lengths[0]
    steps, peaks = {}, {}
    for policy in POLICIES:
        job = get_preset(args.preset).with_overrides([f"train.seq_len={seq_len}", f"ttt.recompute={policy}"])
        job = job.with_overrides(args.set)
        model, inputs, targets = _build(job, args.batch, args.device)
        steps[policy] = _step_fn(model, inputs, targets, job, args.device)
        steps[policy]()  # warm-up
        peaks[policy] = _peak_bytes(model, steps[policy], args.device)
    seconds: dict[str, list[float]] = {p: [] for p in POLICIES}
    for round_ in range(args.rounds):
        order = POLICIES if round_ % 2 == 0 else POLICIES[::-1]
        for policy in order:
            start = time.perf_counter()
            for _ in range(args.block):
                steps[policy]()
            seconds[policy].append((time.perf_counter() - start) / args.block)
    return {
        "preset": args.preset,
        "seq_len": seq_len,
        "mini_batch": job.ttt.mini_batch_size,
        "window": job.model.window_size,
        "seconds": seconds,
        "peak_bytes": peaks,
        "torch_threads": torch.get_num_threads(),
    }


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def render_policies(row: dict, args: argparse.Namespace) -> str:
    sets = " ".join(f"`--set {item}`" for item in args.set) or "none"
    none = row["seconds"]["none"]
    lines = [
        f"# Recompute policies: `{row['preset']}` preset, T={row['seq_len']}, b={row['mini_batch']}, "
        f"W={row['window']}, batch {args.batch}",
        "",
        f"Measured with `python benchmarks/meta_step.py --policies --preset {row['preset']} --lengths "
        f"{row['seq_len']} --batch {args.batch} --rounds {args.rounds} --block {args.block}` on "
        f"{_machine(args)}; overrides: {sets}. {args.rounds} interleaved rounds of {args.block} steps per "
        "policy (order alternating); time / none is the median [IQR] of the per-round paired ratios; peak = "
        "the memory rise during one step over the weights.",
        "",
        "| ttt.recompute | s/step (median) | time / none | peak (MiB) | memory / none |",
        "|---|---|---|---|---|",
    ]
    for policy in POLICIES:
        times = row["seconds"][policy]
        ratios = [t / n for t, n in zip(times, none, strict=True)]
        q1, med, q3 = _quartiles(ratios)
        peak = row["peak_bytes"][policy]
        lines.append(
            f"| {policy} | {statistics.median(times):.3f} | **{med:.2f}** [{q1:.2f}–{q3:.2f}] "
            f"| {peak / 2**20:,.1f} | {peak / row['peak_bytes']['none']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run_policies(args: argparse.Namespace) -> None:
    extra = ["--rounds", str(args.rounds), "--block", str(args.block), "--lengths", str(args.lengths[0])]
    row = _spawn(args, ["--policies-worker", *extra])
    table = render_policies(row, args)
    print(table)
    if args.write:
        key = f"policies_{row['preset']}_{row['seq_len']}"
        heading = (
            f"Recompute policies, {row['preset']} T={row['seq_len']} (`benchmarks/meta_step.py --policies`)"
        )
        write_block(args.write, key, table, heading)


# -- driver: one fresh process per measurement ---------------------------------------------------------


def _spawn(args: argparse.Namespace, worker: list[str]) -> dict:
    """Run this script on one measurement in a fresh process and return its JSON line."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    common = ["--preset", args.preset, "--batch", str(args.batch), "--repeats", str(args.repeats)]
    common += ["--threads", str(args.threads), "--device", args.device]
    common += [f"--set={item}" for item in args.set]
    if args.peak_tflops:
        common += ["--peak-tflops", str(args.peak_tflops)]
    done = subprocess.run(
        [sys.executable, __file__, *common, *worker], env=env, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"measurement {' '.join(worker)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_sweep(args: argparse.Namespace) -> None:
    rows = []
    for seq_len in args.lengths:
        for recompute in ("full", "none"):
            rows.append(_spawn(args, ["--worker", f"{seq_len}:{recompute}"]))
            print(
                f"T={seq_len:5d} recompute={recompute:5s} {rows[-1]['seconds']:.3f} s  "
                f"{rows[-1]['peak_bytes'] / 2**20:8.1f} MiB",
                file=sys.stderr,
            )
    table = render(rows, args)
    print(table)
    if args.write:
        heading = "Meta step vs context length (`benchmarks/meta_step.py`)"
        write_block(args.write, "meta_step", table, heading)


def run_compare(args: argparse.Namespace) -> None:
    shapes = args.shapes or [_preset_shape(args.preset)]
    rows = []
    for shape in shapes:
        for kind in ("meta", "full"):
            rows.append(_spawn(args, ["--compare-worker", f"{kind}@{shape}"]))
            row = rows[-1]
            print(
                f"{shape} {row['preset']:>10s}: {row['seconds']:.3f} s  {row['tokens_per_s']:,.0f} tok/s  "
                f"{row['peak_bytes'] / 2**20:.1f} MiB",
                file=sys.stderr,
            )
    table = render_compare(rows, args)
    print(table)
    if args.write:
        write_block(args.write, "meta_vs_full", table, COMPARE_HEADING)


def _preset_shape(preset: str) -> str:
    from ttt.config import preset as get_preset

    job = get_preset(preset.partition("-")[0])
    return f"{job.train.seq_len}:{job.ttt.mini_batch_size}:{job.model.window_size}"


# -- tables --------------------------------------------------------------------------------------------


def _machine(args: argparse.Namespace, device_name: str | None = None) -> str:
    return (
        f"{args.device} ({device_name or platform.processor() or platform.machine()}, {args.threads} threads)"
    )


def render(rows: list[dict], args: argparse.Namespace) -> str:
    by = {(r["seq_len"], r["recompute"]): r for r in rows}
    first = args.lengths[0]
    r0 = rows[0]
    lines = [
        f"# One meta step: `{args.preset}` preset, batch {args.batch}, mini-batch b={r0['mini_batch']}, "
        f"window W={r0['window']}",
        "",
        f"Measured with `python benchmarks/meta_step.py` on {_machine(args)}; "
        "time is the median of the measured steps, memory the peak rise during one step.",
        "",
        "| T | mini-batches | time, full (s) | time, none (s) | time ratio | peak, full (MiB) "
        f"| peak, none (MiB) | memory ratio | full peak / peak at T={first} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in args.lengths:
        on, off = by[(t, "full")], by[(t, "none")]
        lines.append(
            f"| {t} | {t // on['mini_batch']} | {on['seconds']:.3f} | {off['seconds']:.3f} "
            f"| {on['seconds'] / off['seconds']:.2f} | {on['peak_bytes'] / 2**20:.1f} "
            f"| {off['peak_bytes'] / 2**20:.1f} | {on['peak_bytes'] / off['peak_bytes']:.2f} "
            f"| {on['peak_bytes'] / by[(first, 'full')]['peak_bytes']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _compare_line(row: dict, full: dict) -> str:
    kernels = f"prefix {row['prefix_kernel']}" + (
        f", chunk {row['chunk_kernel']}" if row["chunk_kernel"] else ""
    )
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
    label = "TTT-E2E meta step" if row["kind"] == "meta" else "full attention"
    return (
        f"| {row['seq_len']} | {row['mini_batch'] if row['kind'] == 'meta' else '—'} "
        f"| {row['window'] if row['kind'] == 'meta' else 'full'} | {label} (`{row['preset']}`) | {kernels} "
        f"| {row['seconds']:.3f} | {row['tokens_per_s']:,.0f} | {row['flops_per_token'] / 1e9:.3f} | {mfu} "
        f"| {row['peak_bytes'] / 2**20:,.1f} | **{row['seconds'] / full['seconds']:.2f}** "
        f"| {row['peak_bytes'] / full['peak_bytes']:.2f} |"
    )


def render_compare(rows: list[dict], args: argparse.Namespace) -> str:
    r0 = rows[0]
    sets = " ".join(f"`--set {item}`" for item in args.set) or "none"
    peak = (
        f"{args.peak_tflops} TFLOP/s (--peak-tflops)" if args.peak_tflops else "the device's dense bf16 peak"
    )
    lines = [
        f"# Meta step vs full-attention train step: `{r0['preset']}` / `{r0['preset']}-fa`, "
        f"batch {args.batch}, {r0['precision']}, ttt.recompute={r0['recompute']}",
        "",
        "Measured with `python benchmarks/meta_step.py --compare-full` on "
        f"{_machine(args, r0['device_name'])}; "
        f"overrides: {sets}. Each step is forward + backward only (no AdamW update); time is the median of "
        f"{args.repeats} steps after a warm-up, tokens/s = batch·T / time, GFLOP/token the model FLOPs of "
        f"`ttt.model.counting.flops_per_token` (no recomputation), MFU = FLOPs/token × tokens/s ÷ {peak} "
        "(n/a: no peak known), peak = the memory rise during one step over the weights.",
        "",
        "| T | b | W | model | kernels | time (s) | tokens/s | GFLOP/token | MFU | peak (MiB) "
        "| time / full | memory / full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fulls = {r["seq_len"]: r for r in rows if r["kind"] == "full"}
    lines += [_compare_line(row, fulls[row["seq_len"]]) for row in rows]
    return "\n".join(lines) + "\n"


# -- command line --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="model size; --compare-full also runs <size>-fa")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--write", help="also write the table as Markdown to this file")
    parser.add_argument(
        "--compare-full", action="store_true", help="meta step vs the full-attention train step"
    )
    parser.add_argument(
        "--shapes", nargs="+", metavar="T:b:W", help="--compare-full shapes (default: the preset's own)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for both configs"
    )
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak for MFU (default: looked up)")
    parser.add_argument("--policies", action="store_true", help="none / selective / full, interleaved")
    parser.add_argument("--rounds", type=int, default=8, help="--policies: interleaved rounds")
    parser.add_argument("--block", type=int, default=3, help="--policies: steps per policy per round")
    parser.add_argument("--policies-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--compare-worker", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.worker or args.compare_worker or args.policies_worker:  # one measurement in this fresh process
        import torch

        torch.set_num_threads(args.threads)
        if args.policies_worker:
            row = measure_policies(args)
        elif args.worker:
            seq_len, recompute = args.worker.split(":")
            row = measure(args.preset, int(seq_len), args.batch, recompute, args.repeats, args.device)
        else:
            kind, shape = args.compare_worker.split("@")
            row = measure_compare(args, kind, shape)
        print(json.dumps(row))
        return
    if args.policies:
        run_policies(args)
    elif args.compare_full:
        run_compare(args)
    else:
        run_sweep(args)


if __name__ == "__main__":
    main()
