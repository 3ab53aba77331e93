"""All-reduce bandwidth between the Ray Train workers a TTTJob gets: NCCL on GPUs, gloo on CPUs.

The check to run first on a new multi-node cluster (docs/cluster-checklist.md): gradients are all-reduced
every step, so a network that falls back to TCP sockets (no EFA/RDMA device, a wrong NCCL_SOCKET_IFNAME)
shows here as bus bandwidth far below the fabric's. Bus bandwidth is what nccl-tests report, comparable
across worker counts: algorithm bandwidth (bytes / time) times 2 (n - 1) / n.

    python benchmarks/allreduce.py --workers 2                        # here: 2 CPU workers over gloo
    python benchmarks/allreduce.py --address auto --workers 16 --gpus-per-worker 1   # in a Ray cluster
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any


def measure(config: dict[str, Any]) -> None:
    """One Ray Train worker: all-reduce each size, check the sum, and (rank 0) print the table."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    device = ray.train.torch.get_device() if config["gpu"] else torch.device("cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, ray.util.get_node_ip_address())
    rows = []
    for size_mb in config["sizes_mb"]:
        x = torch.ones(int(size_mb * 2**20) // 4, dtype=torch.float32, device=device)
        dist.all_reduce(x)
        sync()
        if x[0].item() != world or x[-1].item() != world:  # a fabric that corrupts data is worse than slow
            raise RuntimeError(f"all_reduce of {size_mb} MiB summed to {x[0].item()}, not {world}")
        times = []
        for _ in range(config["iters"]):
            sync()
            start = time.perf_counter()
            dist.all_reduce(x)
            sync()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        algbw = x.numel() * 4 / seconds / 1e9
        rows.append((size_mb, seconds * 1e3, algbw, algbw * 2 * (world - 1) / world))
    if rank == 0:
        nodes = len(set(hosts))
        backend = dist.get_backend()
        print(f"all_reduce over {world} workers on {nodes} node(s), backend {backend}, float32:", flush=True)
        print("| size (MiB) | time (ms) | algbw (GB/s) | busbw (GB/s) |", flush=True)
        print("|---|---|---|---|", flush=True)
        for size_mb, ms, alg, bus in rows:
            print(f"| {size_mb:g} | {ms:.2f} | {alg:.2f} | {bus:.2f} |", flush=True)
    ray.train.report({"busbw_gbps": rows[-1][3]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--address", default=None, help="Ray cluster to join ('auto' inside one)")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--placement", default="SPREAD", help="Ray placement strategy (SPREAD, PACK, ...)")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers: an all-reduce needs at least 2 workers")

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # each worker line once, not twice
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, args.workers), include_dashboard=False)
    gpu = args.gpus_per_worker > 0
    trainer = TorchTrainer(
        measure,
        train_loop_config={"gpu": gpu, "sizes_mb": args.sizes_mb, "iters": args.iters},
        scaling_config=ScalingConfig(
            num_workers=args.workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": 1, **({"GPU": args.gpus_per_worker} if gpu else {})},
            placement_strategy=args.placement,
        ),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name="allreduce-check", storage_path=os.path.abspath("allreduce-results")),
    )
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
