"""Training throughput of the tiny-cpu recipe with 1 and 2 workers (Ray Train + DeepSpeed ZeRO-2).

The same global batch is split over the workers; tokens/s is the median over steps after a short warm-up,
read back from each run's MLflow history. On a 2-core machine the workers share the same two cores that
the single process uses (1 thread each vs 2 threads), so the ratio shows the cost of distribution itself.

    python benchmarks/workers.py [--steps 40] [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from mlflow.tracking import MlflowClient

from results import write_block
from ttt.config import resolve
from ttt.distributed.launcher import launch
from ttt.tracking.logger import quiet_mlflow
from ttt.train.trainer import Trainer


def run(label: str, overrides: list[str], root: str, steps: int) -> dict:
    job = resolve(
        "tiny-cpu",
        [
            f"storage.root={root}",
            f"train.total_steps={steps}",
            "optim.warmup_steps=4",
            "train.eval_sequences=16",
            "tracking.system_metrics=false",
            *overrides,
        ],
    )
    if job.scale.workers > 1:
        result = launch(job, label, progress=False)
    else:
        result = Trainer(job, label, progress=False).fit()
    history = MlflowClient(result.tracking_uri).get_metric_history(
        result.mlflow_run_id, "train/tokens_per_second"
    )
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][5:]
    return {"label": label, "workers": job.scale.workers, "tokens_per_second": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--write", help="update the marked block of this Markdown file")
    args = parser.parse_args()
    quiet_mlflow()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as root:
        rows = [
            run("1 worker (PyTorch)", [], root, args.steps),
            run("1 worker (DeepSpeed ZeRO-2)", ["scale.zero_stage=2"], root, args.steps),
            run("2 workers (Ray + ZeRO-2)", ["scale.workers=2", "scale.zero_stage=2"], root, args.steps),
        ]
    base = rows[0]["tokens_per_second"]
    lines = [
        f"`tiny-cpu` (batch 8 x T=256), median tokens/s over steps 6-{args.steps}, "
        f"{os.cpu_count()} CPU cores:",
        "",
        "| setup | tokens/s | ratio to 1 worker |",
        "|---|---|---|",
        *(
            f"| {r['label']} | {r['tokens_per_second']:,.0f} | {r['tokens_per_second'] / base:.2f} |"
            for r in rows
        ),
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        write_block(args.write, "workers", table, "Workers (`benchmarks/workers.py`)")


if __name__ == "__main__":
    main()
