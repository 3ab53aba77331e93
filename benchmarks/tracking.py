"""What MLflow tracking costs the training loop per step: synchronous calls (how sweeps' parent runs and
`ttt eval` log) against the trainer's journal and sender thread, on a real `mlflow server`.

Each step logs the trainer's six training metrics; the time is the loop's, from the first call to the
last (the sender's delivery is in another thread). Optionally a delay is added in front of the server
(`--latency-ms`, through the drills' TCP proxy), as for a server in another zone or behind an ingress.

    python benchmarks/tracking.py [--steps 200] [--latency-ms 0 20] [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.faults import MlflowServer, TcpProxy

from results import write_block
from ttt.config import TrackingConfig
from ttt.storage import LocalStorage
from ttt.tracking.logger import Tracker, quiet_mlflow

METRICS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "train/step_seconds")


def per_step_ms(uri: str, journal: bool, steps: int, root: str) -> float:
    tracker = Tracker(TrackingConfig(uri=uri, experiment="bench", system_metrics=False), root)
    run_dir = LocalStorage(tempfile.mkdtemp(dir=root)) if journal else None
    tracker.start(None, "journal" if journal else "sync", {"bench": 1}, {}, run_dir=run_dir)
    began = time.perf_counter()
    for step in range(steps):
        tracker.log_metrics({key: 1.0 / (step + 1) for key in (*METRICS, "train/inner_lr")}, step)
    spent = time.perf_counter() - began
    tracker.end()
    return spent / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--write", help="update the marked block of this Markdown file")
    args = parser.parse_args()
    quiet_mlflow()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        server = MlflowServer(Path(root) / "mlflow")
        server.start()
        try:
            for latency in args.latency_ms:
                proxy = TcpProxy(server.port, delay_s=latency / 1e3)
                proxy.up()
                uri = f"http://127.0.0.1:{proxy.port if latency else server.port}"
                sync = per_step_ms(uri, False, args.steps, root)
                journal = per_step_ms(uri, True, args.steps, root)
                proxy.down()
                rows.append((latency, sync, journal))
        finally:
            server.stop()
    lines = [
        f"Loop time per step for 6 metrics, {args.steps} steps, `mlflow server` with sqlite on this machine:",
        "",
        "| added latency (one way) | synchronous calls | journal + sender | ratio |",
        "|---|---|---|---|",
        *(f"| {lat:g} ms | {s:.2f} ms | {j:.3f} ms | {s / j:,.0f}x |" for lat, s, j in rows),
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        write_block(args.write, "tracking", table, "Tracking per step (`benchmarks/tracking.py`)")


if __name__ == "__main__":
    main()
