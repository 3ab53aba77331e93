"""Side by side: the OFFICIAL TTT-E2E JAX train step against ours, interleaved, on the "demo" config.

Demo config: vocab 257, D=128, 4 heads, L=4, one suffix block (prime MLP), T=256, window 64, mini-batch b=32,
global batch 8, fp32, on 2 CPU cores. The official code (github.com/test-time-training/e2e, measured at
a4fc4788) is not part of this project: it is imported at run time from `--official-src`, under the JAX
interpreter given by `--jax-python`.

    python benchmarks/peer.py --official-src e2e --jax-python jaxenv/bin/python \\
        [--rounds 12 --block 5] [--write benchmarks/RESULTS.md]

Workers, each a long-lived subprocess (pinned with `taskset -c 0,1` where taskset exists) that answers
`run K` (K timed steps, a fresh random batch each) and `quit` (peak RSS) on stdin with one JSON line each:

  * J_meta  official `ttt.model.loop.train_on_sequence` (jitted value_and_grad through the inner loop, outer
            grad mean, global norm, AdamW with clip 1.0), `125m/pretrain/pretrain-125m-e2e` experiment scaled
            to the demo config, train_mode=meta, b=32; model, state, mesh and optax state built as the
            official `ttt/train.py` builds them.
  * J_fa    official full-attention step (`pretrain-125m-fa` experiment: per-block remat, MLP width 425).
  * P_none, P_full, P_selective  ours, recipe `tiny-cpu` with ttt.recompute=none|full|selective: the calls
            the trainer makes per step (autocast_for context, LocalEngine.micro_step, LocalEngine.apply).
  * P_fa    ours, preset `tiny-fa` (full attention, MLP width 425), same calls.
  * P_compiled, P_compiled_selective  ours, `tiny-cpu` with ttt.compile=true (inductor), recompute none or
            selective (AOTAutograd's activation memory budget 1 or 0).

The workers start one at a time, so each one's import, build, compile and warm-up run alone (start-up cost).
Then R rounds; in each every worker runs a block of K steps, the order reversed every other round (ABBA).
Per block the driver also records the CPU time that other processes used (machine-wide busy time from
/proc/stat minus the worker's own CPU time); rounds where any block saw more than `--max-foreign` CPU-s per
wall-s of it are dropped. Reported: median s/step, paired per-round ratios (block medians) ours / official
and meta / full attention as median [IQR], peak RSS per worker, start-up times.

To run the official step on CPU the worker redirects jax.nn.dot_product_attention(implementation="cudnn")
to XLA's implementation (same math) and stubs the grain/zarr data-loading modules (the batches are random
token ids in [0, 256), so every loss mask is 1). The official-worker code path uses only the standard
library, numpy and JAX packages; our package is kept off its sys.path (the official package is also `ttt`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HEADING = "Official JAX train step vs ours (`benchmarks/peer.py`)"
BLOCK_KEY = "peer_official"
TOKENS = 8 * 256

# name -> (implementation, what to build)
WORKERS = {
    "J_meta": ("official", "meta"),
    "J_fa": ("official", "fa"),
    "P_none": ("ours", "tiny-cpu ttt.recompute=none"),
    "P_full": ("ours", "tiny-cpu ttt.recompute=full"),
    "P_selective": ("ours", "tiny-cpu ttt.recompute=selective"),
    "P_fa": ("ours", "tiny-fa"),
    "P_compiled": ("ours", "tiny-cpu ttt.recompute=none ttt.compile=true"),
    "P_compiled_selective": ("ours", "tiny-cpu ttt.recompute=selective ttt.compile=true"),
}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _serve(step, ready: dict, out) -> None:
    """The worker loop shared by both implementations: `run K` -> times, `quit` -> peak memory."""
    print(json.dumps(ready), file=out, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            cpu0 = time.process_time()
            times, losses = [], []
            for _ in range(int(cmd[1])):
                seconds, loss = step()
                times.append(seconds)
                losses.append(loss)
            reply = {"times": times, "losses": losses, "cpu_s": time.process_time() - cpu0}
            print(json.dumps(reply), file=out, flush=True)
        elif cmd[0] == "quit":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                json.dumps({"peak_rss_mib": round(peak, 1), "hwm_mib": round(_status_mib("VmHWM"), 1)}),
                file=out,
                flush=True,
            )
            return


# -- official worker (runs under the JAX interpreter: standard library, numpy and JAX packages only) ---------

_DEMO = [
    "model.vocab_size=257",
    "model.bos_token_id=256",
    "model.eos_token_id=256",
    "model.hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_hidden_layers=4",
    "model.compute_dtype=fp32",
    "model.param_dtype=fp32",
    "model.state_dtype=fp32",
    "model.rope_theta=10000",
    "training.seq_length=256",
    "training.global_batch_size=8",
    "training.total_steps=300",
    "training.optimizer_outer.lr=3e-3",
    "training.optimizer_outer.lr_warmup_steps=30",
    "training.optimizer_outer.lr_decay_steps=300",
]
_OFFICIAL = {
    "meta": (
        "+experiment=125m/pretrain/pretrain-125m-e2e",
        [
            "model.intermediate_size=340",
            "model.suffix_len=1",
            "model.prime=true",
            "model.sliding_window_size=64",
            "model.mini_batch_size=32",
            "training.train_mode=meta",
            "training.optimizer_inner.lr=1.0",
            "training.optimizer_inner.clip_gradient=1.0",
            "training.ilr_warmup_steps=0",
        ],
    ),
    "fa": (
        "+experiment=125m/pretrain/pretrain-125m-fa",
        [
            "model.intermediate_size=425",
            "model.suffix_len=0",
            "model.prime=false",
            "model.mini_batch_size=256",
        ],
    ),
}


def official_worker(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    out, sys.stdout = sys.stdout, sys.stderr  # the official code logs to stdout; the protocol owns it
    src = os.path.abspath(args.official_src)
    # keep our own package (also named `ttt`) and this folder's modules out of the way
    sys.path[:] = [src] + [p for p in sys.path if p and os.path.abspath(p) not in (HERE, REPO + "/platform")]
    import types

    def stub(name: str, **attrs) -> None:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module

    def no_data(*_a, **_k):
        raise RuntimeError("data loading is stubbed out in benchmarks/peer.py")

    try:
        import grain.python  # noqa: F401
    except ImportError:  # only the data iterator / evaluator use grain, not the train step
        stub("grain.python", MapDataset=None, RandomAccessDataSource=object, ReadOptions=None)
        stub("grain")
        sys.modules["grain"].python = sys.modules["grain.python"]
    stub("ttt.dataloader.lm_dataset", lm_dataset=no_data, dummy_dataset=no_data)

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    from hydra import compose, initialize_config_dir
    from jax.sharding import PartitionSpec

    xla_attention = jax.nn.dot_product_attention

    def cpu_attention(*a, implementation=None, **k):  # no cuDNN on CPU: XLA's kernel, the same math
        return xla_attention(*a, implementation=None, **k)

    jax.nn.dot_product_attention = cpu_attention

    from ttt.config import register_configs

    register_configs()
    from ttt.model.data import Batch
    from ttt.model.loop import train_on_sequence
    from ttt.model.sharding import ModelSharding
    from ttt.optimizers import make_optimizer
    from ttt.utils.jax_utils import set_random_seed, tree_rearrange

    from ttt.model.transformer import MetaModel

    experiment, extra = _OFFICIAL[args.official_worker]
    with initialize_config_dir(config_dir=os.path.join(src, "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=[experiment, "+deploy=interactive", *_DEMO, *extra])
    # as ttt/train.py: seed, mesh, sharded model + state, optax state over the trainable parameters
    key = set_random_seed(cfg.training.model_seed)
    n_dp = jax.device_count() // cfg.training.n_state_parallel
    optimizer, _ = make_optimizer(cfg.training.optimizer_outer)
    mesh = ModelSharding(cfg).mesh
    data_sharding = jax.NamedSharding(mesh, PartitionSpec("data"))
    cfg.model.seq_len = cfg.training.seq_length
    model_sharding = ModelSharding(cfg, mesh=mesh)

    @eqx.filter_jit
    def create():
        model, state = eqx.nn.make_with_state(MetaModel)(cfg, key=key)
        state = jax.device_put(state, jax.NamedSharding(mesh, PartitionSpec()))
        return model_sharding.shard_params(model), state

    holder = {}
    holder["model"], holder["state"] = create()
    holder["opt"] = optimizer.init(holder["model"].trainable_parameters())
    n_params = int(sum(x.size for x in jax.tree.leaves(holder["model"].trainable_parameters())))
    batch_size, seq_len, bos = cfg.training.global_batch_size, cfg.training.seq_length, cfg.model.bos_token_id
    rng = np.random.RandomState(0)

    def ready(tree):
        return jax.block_until_ready(eqx.filter(tree, eqx.is_array))

    def make_batch():  # shaped and sharded like train.py's to_sharded_batch; fresh each step (donated)
        tok = rng.randint(0, 256, size=(batch_size, seq_len + 1)).astype(np.int32)
        batch = Batch(input_ids=tok[:, :-1], target_tokens=tok[:, 1:], loss_masks=tok[:, 1:] != bos)
        batch = jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                sharding=data_sharding, local_data=x, global_shape=x.shape
            ),
            batch,
        )
        batch = tree_rearrange(
            batch, "(data_parallel batch) ... -> data_parallel batch ...", data_parallel=n_dp
        )
        ready(batch)
        return batch

    counter = [0]

    def step():
        batch = make_batch()
        holder["state"] = holder["state"].set(
            holder["model"].step_index, jnp.array(counter[0], dtype=jnp.int32)
        )
        t0 = time.perf_counter()
        holder["model"], holder["opt"], loss, metrics = train_on_sequence(
            holder["state"], holder["model"], holder["opt"], batch, cfg
        )
        ready((holder["model"], holder["opt"], loss, metrics))
        seconds = time.perf_counter() - t0
        counter[0] += 1
        return seconds, float(metrics[MetaModel.MetricType.loss].mean())

    t_built = time.perf_counter()
    with mesh:
        holder["state"] = holder["state"].set(holder["model"].step_index, jnp.array(0, dtype=jnp.int32))
        t0 = time.perf_counter()
        lowered = train_on_sequence.lower(holder["state"], holder["model"], holder["opt"], make_batch(), cfg)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        first, loss = step()
        first_done = time.time()
        warm = [step()[0] for _ in range(args.warmup)]
        info = {
            "impl": "official-jax",
            "n_params": n_params,
            "import_build_s": t_built - t_start,
            "trace_lower_s": t1 - t0,
            "compile_s": t2 - t1,
            "first_call_s": first,
            "first_step_done_at": first_done,
            "warmup_calls_s": warm,
            "loss_first": loss,
            "mini_batch": int(cfg.model.mini_batch_size),
            "train_mode": str(cfg.training.train_mode),
            "jax": jax.__version__,
            "threads": len(os.sched_getaffinity(0)),
        }
        _serve(step, info, out)


# -- our worker: the calls Trainer makes per step ------------------------------------------------------------


def ours_worker(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    source, *overrides = args.ours_worker.split()
    import torch

    from ttt.config import resolve
    from ttt.model.transformer import Transformer
    from ttt.model.ttt import MetaLearner
    from ttt.train.device import autocast_for, resolve_device
    from ttt.train.engine import LocalEngine

    out, sys.stdout = sys.stdout, sys.stderr
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    job = resolve(source, overrides)
    device = resolve_device(job.train.device)
    autocast = autocast_for(device, job.train.precision)
    torch.manual_seed(job.train.seed)
    learner = MetaLearner(Transformer(job.model).to(device), job.ttt)
    engine = LocalEngine(learner, job)
    n_params = sum(p.numel() for p in learner.model.parameters())
    gen = torch.Generator().manual_seed(0)
    batch_size, seq_len = job.train.global_batch_size, job.train.seq_len
    counter = [0]

    def step():
        tok = torch.randint(0, 256, (batch_size, seq_len + 1), generator=gen)
        t0 = time.perf_counter()
        inputs, targets = tok[:, :-1].to(device), tok[:, 1:].to(device)
        with autocast():
            loss = engine.micro_step(inputs, targets, counter[0], last=True)
        engine.apply()
        counter[0] += 1
        return time.perf_counter() - t0, loss

    t_built = time.perf_counter()
    first, loss = step()
    first_done = time.time()
    warm = [step()[0] for _ in range(args.warmup)]
    info = {
        "impl": "ours-torch",
        "n_params": n_params,
        "import_build_s": t_built - t_start,
        "first_call_s": first,
        "first_step_done_at": first_done,
        "warmup_calls_s": warm,
        "loss_first": loss,
        "recompute": job.ttt.recompute,
        "compile": job.ttt.compile,
        "ttt_enabled": job.ttt.enabled,
        "attention": job.model.attention,
        "mini_batch": job.ttt.mini_batch_size,
        "precision": job.train.precision,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    _serve(step, info, out)


# -- driver --------------------------------------------------------------------------------------------------


def _busy_cpu_s() -> float:
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fh.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class Worker:
    def __init__(self, name: str, args: argparse.Namespace, log_dir: str):
        impl, what = WORKERS[name]
        self.name = name
        if impl == "official":
            python, flag = args.jax_python, ["--official-worker", what, "--official-src", args.official_src]
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_cpu_multi_thread_eigen=true")
        else:
            python, flag = args.torch_python, ["--ours-worker", what]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [os.path.join(REPO, "platform"), env.get("PYTHONPATH")])
            )
        cmd = [python, os.path.abspath(__file__), *flag, "--warmup", str(args.warmup)]
        if args.cores and shutil.which("taskset"):
            cmd = ["taskset", "-c", args.cores, *cmd]
        self.cmd = cmd
        self.log = os.path.join(log_dir, f"peer_{name}.log")
        spawned, busy0 = time.time(), _busy_cpu_s()
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
            )
        self.ready = self._read()
        self.ready["spawn_to_ready_s"] = time.time() - spawned
        self.ready["spawn_to_first_step_s"] = self.ready.pop("first_step_done_at") - spawned
        self.ready["machine_busy_cpu_s_during_start"] = _busy_cpu_s() - busy0

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"worker {self.name} ended without an answer; see {self.log}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def block(self, steps: int) -> dict:
        busy0, wall0 = _busy_cpu_s(), time.perf_counter()
        reply = self.ask(f"run {steps}")
        reply["wall_s"] = time.perf_counter() - wall0
        reply["foreign_cpu_s"] = _busy_cpu_s() - busy0 - reply["cpu_s"]
        return reply

    def quit(self) -> dict:
        final = self.ask("quit")
        self.proc.wait(timeout=60)
        return final


def measure(args: argparse.Namespace) -> dict:
    names = args.only.split(",")
    log_dir = args.log_dir or os.path.join(tempfile.gettempdir(), "ttt-peer-logs")
    os.makedirs(log_dir, exist_ok=True)
    workers = {}
    for name in names:  # one at a time: each start-up (import, build, compile, warm-up) runs alone
        workers[name] = Worker(name, args, log_dir)
        r = workers[name].ready
        print(
            f"{name:12s} ready after {r['spawn_to_ready_s']:.1f} s (first step {r['first_call_s']:.2f} s)",
            file=sys.stderr,
            flush=True,
        )
    blocks = []
    t0 = time.time()
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            time.sleep(0.2)
            reply = workers[name].block(args.block)
            reply.update(worker=name, round=round_)
            blocks.append(reply)
            print(
                f"round {round_:2d} {name:12s} {statistics.median(reply['times']):.3f} s/step, "
                f"foreign CPU {reply['foreign_cpu_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    timed_s = time.time() - t0
    final = {name: w.quit() for name, w in workers.items()}
    return {
        "names": names,
        "ready": {n: w.ready for n, w in workers.items()},
        "cmds": {n: w.cmd for n, w in workers.items()},
        "blocks": blocks,
        "final": final,
        "rounds": args.rounds,
        "block": args.block,
        "timed_s": timed_s,
    }


# -- tables --------------------------------------------------------------------------------------------------


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    from meta_step import _quartiles as quartiles

    return quartiles(values)


PAIRS = [
    ("P_none", "J_meta", "ours / official, meta step, ttt.recompute=none"),
    ("P_full", "J_meta", "ours / official, meta step, ttt.recompute=full"),
    ("P_selective", "J_meta", "ours / official, meta step, ttt.recompute=selective"),
    ("P_compiled", "J_meta", "ours / official, meta step, ttt.compile, recompute=none"),
    ("P_compiled_selective", "J_meta", "ours / official, meta step, ttt.compile, recompute=selective"),
    ("P_fa", "J_fa", "ours / official, full attention"),
    ("J_meta", "J_fa", "official: meta / full attention"),
    ("P_none", "P_fa", "ours: meta (none) / full attention"),
    ("P_full", "P_fa", "ours: meta (full) / full attention"),
    ("P_selective", "P_fa", "ours: meta (selective) / full attention"),
    ("P_compiled", "P_fa", "ours: meta (compiled, none) / full attention"),
    ("P_compiled_selective", "P_fa", "ours: meta (compiled, selective) / full attention"),
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(data: dict, args: argparse.Namespace) -> str:
    names, blocks = data["names"], data["blocks"]
    disturbed = {b["round"] for b in blocks if b["foreign_cpu_s"] > args.max_foreign * b["wall_s"]}
    kept = [r for r in range(data["rounds"]) if r not in disturbed] or list(range(data["rounds"]))
    per_round = {(b["worker"], b["round"]): statistics.median(b["times"]) for b in blocks}
    cmdline = (
        "python benchmarks/peer.py --official-src OFFICIAL_SRC --jax-python JAX_PYTHON "
        f"--rounds {data['rounds']} --block {data['block']}"
    )
    j = data["ready"].get("J_meta", {})
    commit = f"commit {args.official_commit}" if args.official_commit else "the commit in `--official-src`"
    p = data["ready"].get("P_none", {})
    lines = [
        "# Official TTT-E2E JAX train step vs ours: demo config (vocab 257, D=128, 4 heads, L=4, one suffix "
        "block, T=256, W=64, b=32, batch 8, fp32)",
        "",
        f"Measured with `{cmdline}` on {_cpu_name()}, "
        f"{len(args.cores.split(',')) if args.cores else os.cpu_count()} cores (`taskset -c {args.cores}`), "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; official code at {commit} "
        f"(jax {j.get('jax', '?')}), ours with torch {p.get('torch', '?')}. "
        f"{data['rounds']} interleaved rounds of {data['block']} steps per worker "
        f"(order reversed every other round); {len(kept)} rounds kept "
        f"(dropped: rounds where another process used more than {args.max_foreign:.2f} CPU-s "
        "per wall-s during a block). Ratios are the median [IQR] of per-round paired ratios of block "
        "medians; one step = "
        "forward + backward + clip + AdamW update, a fresh random batch each.",
        "",
        "| paired ratio | median [IQR] | min–max | rounds |",
        "|---|---|---|---|",
    ]
    for a, b, label in PAIRS:
        if a in names and b in names:
            ratios = [per_round[(a, r)] / per_round[(b, r)] for r in kept]
            q1, med, q3 = _quartiles(ratios)
            lines.append(
                f"| {label} | **{med:.2f}** [{q1:.2f}–{q3:.2f}] | {min(ratios):.2f}–{max(ratios):.2f} "
                f"| {len(ratios)} |"
            )
    lines += [
        "",
        "| worker | what | s/step (median) | tokens/s | peak RSS (MiB) | spawn → first step done (s) "
        "| compile (s) | first step (s) | warm-up steps (s) | spawn → ready (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r, f = data["ready"][name], data["final"][name]
        times = [t for b in blocks if b["worker"] == name and b["round"] in kept for t in b["times"]]
        med = statistics.median(times)
        compile_s = f"{r['trace_lower_s'] + r['compile_s']:.1f}" if "compile_s" in r else "—"
        warm = ", ".join(f"{t:.2f}" for t in r["warmup_calls_s"])
        what = ("official " if WORKERS[name][0] == "official" else "ours ") + WORKERS[name][1]
        lines.append(
            f"| {name} | {what} | {med:.3f} | {TOKENS / med:,.0f} | {f['peak_rss_mib']:,.0f} "
            f"| {r['spawn_to_first_step_s']:.1f} | {compile_s} | {r['first_call_s']:.2f} | {warm} "
            f"| {r['spawn_to_ready_s']:.1f} |"
        )
    lines += [
        "",
        "Compile = the official step's trace + lower + XLA compile, ahead of the first call (which reuses "
        "that executable); its second call compiles again (the first warm-up step), as the official loop "
        "does: the returned optimizer state carries the mesh sharding, the fresh one did not. Spawn → ready "
        "includes every warm-up step. Ours runs eagerly except P_compiled*, whose first step includes "
        "torch.compile of the prefix and of the inner step (one graph per KV-cache shape: none, b, W keys).",
    ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official-src", help="an extracted checkout of test-time-training/e2e")
    parser.add_argument(
        "--jax-python", help="a Python with jax, equinox, optax, hydra-core for the official code"
    )
    parser.add_argument("--official-commit", help="the official commit, for the table's text (e.g. a4fc4788)")
    parser.add_argument(
        "--torch-python", default=sys.executable, help="the Python of our venv (default: this)"
    )
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=5, help="steps per worker per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first one")
    parser.add_argument("--cores", default="0,1", help="taskset core list ('' = no pinning)")
    parser.add_argument("--only", default=",".join(WORKERS), help="comma-separated subset of the workers")
    parser.add_argument("--max-foreign", type=float, default=0.1, help="drop rounds above this CPU-s/wall-s")
    parser.add_argument("--json", help="also save the raw measurements here")
    parser.add_argument("--log-dir", help="workers' stderr logs (default: <tmp>/ttt-peer-logs)")
    parser.add_argument("--write", help="update this Markdown file's marked block (RESULTS.md)")
    parser.add_argument("--official-worker", choices=sorted(_OFFICIAL), help=argparse.SUPPRESS)
    parser.add_argument("--ours-worker", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.official_worker:
        official_worker(args)
        return
    if args.ours_worker:
        ours_worker(args)
        return
    if any(WORKERS[n][0] == "official" for n in args.only.split(",")):
        if not (args.official_src and os.path.isdir(os.path.join(args.official_src, "ttt"))):
            sys.exit("--official-src must name an extracted test-time-training/e2e checkout (with ttt/)")
        if not args.jax_python:
            sys.exit("--jax-python is needed for the official workers")
    data = measure(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=1)
    table = render(data, args)
    print(table)
    if args.write:
        from results import write_block

        write_block(args.write, BLOCK_KEY, table, HEADING)


if __name__ == "__main__":
    main()
