"""Streaming inference cost against context length: TTT-E2E, sliding-window attention (SWA) and full
attention of the same size, through `ttt.eval.generate` (the path `ttt generate` uses).

- prefill: seconds per 1K prompt tokens to consume a prompt of T tokens (TTT-E2E takes its inner steps);
- decode: milliseconds per generated token after a prompt of T tokens (median over the decoded tokens).

TTT-E2E and SWA keep W keys per layer, so both should stay flat in T; full attention's cache grows with T.
Ratios are to full attention at the same T. Random weights: the cost does not depend on them.

    python benchmarks/inference.py [--preset tiny] [--contexts 256,512,1024,2048,4096] [--write RESULTS.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from results import write_block
from ttt.config import TTTConfig, preset
from ttt.eval.generate import prefill, step
from ttt.model.transformer import Transformer

VARIANTS = {"TTT-E2E": "", "SWA": "-swa", "full attention": "-fa"}


def build(name: str, device: torch.device) -> tuple[Transformer, TTTConfig]:
    job = preset(name)
    torch.manual_seed(0)
    return Transformer(job.model).to(device).eval(), job.ttt


def measure(model: Transformer, ttt: TTTConfig, context: int, decode_tokens: int) -> tuple[float, float]:
    device = model.embed.weight.device

    def synced() -> float:  # CUDA runs asynchronously: a time is only taken once the work is done
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    prompt = torch.randint(0, model.config.bos_token_id, (context,), device=device)
    prefill(model, ttt, prompt[: ttt.mini_batch_size * 2])  # warm-up
    began = synced()
    state, logits = prefill(model, ttt, prompt)
    prefill_s = synced() - began
    times = []
    for _ in range(decode_tokens):
        token = int(logits.argmax(-1)[0])
        began = synced()
        logits = step(state, token)
        times.append(synced() - began)
    return prefill_s / context * 1000, statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="model size (its e2e, swa and fa variants)")
    parser.add_argument("--contexts", default="256,512,1024,2048,4096")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded after each prompt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", help="update the marked block of this Markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = {}
    for label, suffix in VARIANTS.items():
        model, ttt = build(args.preset + suffix, device)  # once per variant: the weights do not matter
        for t in contexts:
            rows[(label, t)] = measure(model, ttt, t, args.decode_tokens)
    job = preset(args.preset)
    lines = [
        f"# Streaming inference: `{args.preset}` (W={job.model.window_size}, b={job.ttt.mini_batch_size}), "
        f"batch 1, {args.decode_tokens} decoded tokens",
        "",
        f"Measured with `python benchmarks/inference.py` on {device.type} ({platform.machine()}, "
        f"{torch.get_num_threads()} threads).",
        "",
        "| model | T | prefill s / 1K tokens | decode ms / token | prefill / full | decode / full |",
        "|---|---|---|---|---|---|",
    ]
    for label in VARIANTS:
        for t in contexts:
            pre, dec = rows[(label, t)]
            full_pre, full_dec = rows[("full attention", t)]
            lines.append(
                f"| {label} | {t} | {pre:.3f} | {dec:.2f} | {pre / full_pre:.2f} | {dec / full_dec:.2f} |"
            )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        write_block(
            args.write,
            "inference",
            table,
            "Streaming inference vs context length (`benchmarks/inference.py`)",
        )


if __name__ == "__main__":
    main()
