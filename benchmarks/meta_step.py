"""Time and peak memory of one TTT-E2E meta step (forward + second-order backward) against context length.

For each context length T (at a fixed mini-batch b) and with / without per-mini-batch checkpointing, a fresh
process builds the model, runs a warm-up step, then measures:
  * peak memory: the rise of the resident set (VmHWM reset just before the step) during one step. glibc is
    told to serve every large buffer by mmap, so freed activations go back to the OS and RSS tracks live
    tensors (CPU); on CUDA, torch.cuda.max_memory_allocated.
  * time: the median of a few further steps.
With checkpointing only the carry (fast weights and KV caches) is kept per mini-batch, so memory should
grow about linearly in T with a small slope; without it, every mini-batch's double-backward graph is kept.

    python benchmarks/meta_step.py                    # tiny preset, T = 256..2048, prints a table
    python benchmarks/meta_step.py --write benchmarks/RESULTS.md
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

from results import write_block


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(preset: str, seq_len: int, batch: int, checkpoint: bool, repeats: int, device: str) -> dict:
    import torch

    from ttt.config import preset as get_preset
    from ttt.model.transformer import Transformer
    from ttt.model.ttt import sequence_loss

    job = get_preset(preset).with_overrides([f"train.seq_len={seq_len}", f"ttt.checkpoint={checkpoint}"])
    torch.manual_seed(0)
    model = Transformer(job.model).to(device)
    tokens = torch.randint(0, job.model.vocab_size, (batch, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        sequence_loss(model, inputs, targets, job.ttt).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: one-time allocations and kernel selection
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        model.zero_grad(set_to_none=True)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the high-water mark
        base = _rss_kib("VmRSS")
        step()
        peak = (_rss_kib("VmHWM") - base) * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "seq_len": seq_len,
        "checkpoint": checkpoint,
        "seconds": statistics.median(times),
        "peak_bytes": peak,
        "mini_batch": job.ttt.mini_batch_size,
        "window": job.model.window_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--write", help="also write the table as Markdown to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # one measurement in this fresh process
        import torch

        torch.set_num_threads(args.threads)
        seq_len, checkpoint = args.worker.split(":")
        print(
            json.dumps(
                measure(args.preset, int(seq_len), args.batch, checkpoint == "1", args.repeats, args.device)
            )
        )
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    rows = []
    for seq_len in args.lengths:
        for checkpoint in (True, False):
            cmd = [
                sys.executable,
                __file__,
                "--preset",
                args.preset,
                "--batch",
                str(args.batch),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                "--worker",
                f"{seq_len}:{int(checkpoint)}",
            ]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(
                f"T={seq_len:5d} checkpoint={checkpoint!s:5s} {rows[-1]['seconds']:.3f} s  "
                f"{rows[-1]['peak_bytes'] / 2**20:8.1f} MiB",
                file=sys.stderr,
            )
    table = render(rows, args)
    print(table)
    if args.write:
        heading = "Meta step vs context length (`benchmarks/meta_step.py`)"
        write_block(args.write, "meta_step", table, heading)


def render(rows: list[dict], args: argparse.Namespace) -> str:
    by = {(r["seq_len"], r["checkpoint"]): r for r in rows}
    first = args.lengths[0]
    r0 = rows[0]
    lines = [
        f"# One meta step: `{args.preset}` preset, batch {args.batch}, mini-batch b={r0['mini_batch']}, "
        f"window W={r0['window']}",
        "",
        f"Measured with `python benchmarks/meta_step.py` on {args.device} "
        f"({platform.processor() or platform.machine()}, {args.threads} threads); "
        "time is the median of the measured steps, memory the peak rise during one step.",
        "",
        "| T | mini-batches | time, ckpt (s) | time, no ckpt (s) | time ratio | peak, ckpt (MiB) "
        f"| peak, no ckpt (MiB) | memory ratio | ckpt peak / peak at T={first} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in args.lengths:
        on, off = by[(t, True)], by[(t, False)]
        lines.append(
            f"| {t} | {t // on['mini_batch']} | {on['seconds']:.3f} | {off['seconds']:.3f} "
            f"| {on['seconds'] / off['seconds']:.2f} | {on['peak_bytes'] / 2**20:.1f} "
            f"| {off['peak_bytes'] / 2**20:.1f} | {on['peak_bytes'] / off['peak_bytes']:.2f} "
            f"| {on['peak_bytes'] / by[(first, True)]['peak_bytes']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
