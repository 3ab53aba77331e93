"""`ttt`: the command line. Thin: parse, call the library, print; user errors exit 2 without a traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ttt import config as cfgmod
from ttt.errors import UserError


def _cmd_config(args: argparse.Namespace) -> int:
    job = cfgmod.resolve(args.source, args.set)
    if args.counts:
        from ttt.model.counting import flops_per_token, param_counts

        params = param_counts(job.model)
        flops = flops_per_token(job.model, job.train.seq_len, job.ttt.enabled, job.ttt.recompute)
        counts = {
            "params": {
                "total": params.total,
                "non_embedding": params.non_embedding,
                "embedding": params.embedding,
                "prime": params.prime,
                "inner": params.inner,
            },
            "flops_per_token": {
                "forward": flops.forward,
                "train": flops.train,
                "train_with_recompute": flops.train_with_recompute,
            },
        }
        print(json.dumps(counts, indent=2))
    else:
        sys.stdout.write(cfgmod.to_yaml(job))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from ttt.model.counting import param_counts

    for name in cfgmod.preset_names():
        job = cfgmod.preset(name)
        m = job.model
        print(
            f"{name:12s} {_kind(job):16s} L={m.num_layers:<3d} D={m.hidden_size:<5d} "
            f"params={param_counts(m).total:>13,d}  T={job.train.seq_len}"
        )
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    for name in cfgmod.recipe_names():
        job = cfgmod.resolve(name)
        print(
            f"{name:28s} {_kind(job):16s} T={job.train.seq_len:<7d} steps={job.train.total_steps:<6d} "
            f"batch={job.train.global_batch_size}"
        )
    return 0


def _kind(job: cfgmod.JobConfig) -> str:
    from ttt.train.trainer import variant_label

    return variant_label(job)


def _cmd_parity(args: argparse.Namespace) -> int:
    from ttt.parity import run_parity

    report = run_parity(args.file, device=args.device, overrides=args.set)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0 if report["ok"] else 1


def _cmd_import_official(args: argparse.Namespace) -> int:
    from ttt.model.orbax_import import import_official

    job = cfgmod.resolve(args.config, args.set)
    where, loaded = import_official(args.orbax_dir, job, args.output, args.step)
    print(json.dumps({"checkpoint": where, "step": loaded.step, "source": str(loaded.source)}, indent=2))
    return 0


def default_run_name(source: str) -> str:
    return f"{Path(source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _cmd_train(args: argparse.Namespace) -> int:
    from ttt.tracking.logger import quiet_mlflow
    from ttt.train.trainer import Trainer

    quiet_mlflow()
    overrides = list(args.set)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.run_name:
        overrides.append(f"tracking.run_name={args.run_name}")
    if args.workers is not None:  # 0 too: the config refuses it, naming scale.workers
        overrides.append(f"scale.workers={args.workers}")
    if args.zero_stage is not None:
        overrides.append(f"scale.zero_stage={args.zero_stage}")
    job = cfgmod.resolve(args.source, overrides)
    name = job.tracking.run_name or default_run_name(args.source)
    if job.scale.workers > 1 or job.scale.ray_address:
        from ttt.distributed.launcher import launch

        result = launch(job, name, progress=not args.no_progress)
    else:
        result = Trainer(job, name, progress=not args.no_progress).fit()
    print(format_result(result))
    if result.preempted:
        from ttt.train.preemption import EXIT_PREEMPTED

        return EXIT_PREEMPTED
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    from ttt.tracking.delivery import sync_run

    print(json.dumps(sync_run(args.run_dir, args.tracking_uri), indent=2))
    return 0


def format_result(result) -> str:
    stopped = " (stopped on request: train it again to continue)" if result.preempted else ""
    lines = [f"run {result.run_name}: {result.steps} steps in {result.train_seconds:.0f} s{stopped}"]
    if result.final_eval:
        ev = result.final_eval
        past = f", past the window {ev.loss_past_window:.4f}" if ev.loss_past_window is not None else ""
        lines.append(f"  validation loss {ev.loss:.4f}{past} ({ev.windows} windows)")
    lines.append(f"  run directory   {result.run_dir}")
    lines.append(f"  checkpoint      {result.last_checkpoint}")
    if result.mlflow_run_id:
        lines.append(f"  MLflow run      {result.mlflow_run_id} at {result.tracking_uri}")
    if result.plot:
        lines.append(f"  plot            artifact {result.plot} of that run")
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    from ttt.eval.position import NiahSettings, evaluate_suite, log_suite, parse_suite, write_suite

    suite = parse_suite(args.suite)
    niah = NiahSettings(
        lengths=_numbers("--niah-lengths", args.niah_lengths, int),
        depths=_numbers("--niah-depths", args.niah_depths, float),
        trials=args.niah_trials,
        tasks=tuple(t.strip() for t in args.niah_tasks.split(",") if t.strip()),
        distractors=args.niah_distractors,
        haystack=args.niah_haystack,
        scoring=args.niah_scoring,
    )
    result = evaluate_suite(
        args.checkpoint,
        suite,
        baselines=args.baseline,
        data=args.data,
        seq_len=args.seq_len,
        sequences=args.sequences,
        batch_size=args.batch_size,
        device=args.device,
        niah=niah,
    )
    if args.plot and result.curves:
        from ttt.tracking.plots import loss_by_position_plot

        loss_by_position_plot(result.curves, result.window, Path(args.plot), args.checkpoint)
        result.report["plot"] = args.plot
    if args.output:
        files = write_suite(result, Path(args.output))
        if args.tracking_uri:
            result.report["mlflow_run_id"] = log_suite(result, files, args.tracking_uri)
    elif args.tracking_uri:
        import tempfile

        # MLflow gets its artifacts from files: without --output they pass through a scratch folder.
        with tempfile.TemporaryDirectory(prefix="ttt-eval-") as scratch:
            files = write_suite(result, Path(scratch))
            result.report["mlflow_run_id"] = log_suite(result, files, args.tracking_uri)
        del result.report["files"]  # uploaded to the run, gone from here
    print(json.dumps(result.report, indent=2))
    return 0


def _numbers(flag: str, text: str, kind: type) -> tuple:
    try:
        return tuple(kind(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise UserError(f"{flag}: '{text}' is not a comma-separated list of numbers") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    from ttt.eval.generate import PromptTooShortError, byte_tokenizer_for, generate, load_model

    model, job = load_model(args.checkpoint, args.device)
    tokenizer = byte_tokenizer_for(job)
    try:
        tokens = generate(
            model,
            job.ttt,
            tokenizer.encode(args.prompt),
            args.max_new_tokens,
            greedy=args.greedy,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
    except PromptTooShortError as exc:  # byte-level: a token is a byte of --prompt
        raise UserError(f"--prompt: {exc}") from None
    sys.stdout.write(tokenizer.decode(tokens) + "\n")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from ttt.data.corpus import prepare
    from ttt.data.tokenizer import load_tokenizer

    meta = prepare(args.inputs, args.output, load_tokenizer(args.tokenizer, args.bos_token), args.val_every)
    print(json.dumps({"output": args.output, **meta}, indent=2))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ttt.sweep.local import describe, run_sweep
    from ttt.sweep.spec import load_any

    if args.parallelism is not None and args.parallelism < 1:
        raise UserError(f"--parallelism: {args.parallelism} is not a number of trials (at least 1)")
    spec, base = load_any(args.sweep)
    if args.dry_run:
        print(describe(spec, base))
        return 0
    result = run_sweep(
        spec, base, root=args.root, tracking_uri=args.tracking_uri, parallelism=args.parallelism
    )
    if result.failed:
        print(f"ttt: {len(result.failed)} of {len(result.trials)} trials failed", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ttt.demo import run_demo

    return run_demo(args.root, args.tracking_uri)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttt", description="TTT-E2E training platform")
    sub = parser.add_subparsers(dest="command", required=True)

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. --set ttt.mini_batch_size=512 (repeatable)",
        )

    p = sub.add_parser(
        "train",
        help="train a recipe, preset or YAML config (resumes a run of the same name); exits 75 when "
        "stopped by SIGTERM/SIGINT after a checkpoint",
    )
    p.add_argument("source", help="recipe (see `ttt recipes`), preset, or path to a YAML config")
    overrides(p)
    p.add_argument("--run-name", help="name of the run and its directory (default: <recipe>-<time>)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under storage.root)")
    p.add_argument("--workers", type=int, help="training processes (more than 1: Ray Train + DeepSpeed)")
    p.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3 (default 2 with several workers)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "sync", help="deliver what a run's MLflow journal still holds (records kept while MLflow was away)"
    )
    p.add_argument("run_dir", help="run directory, local or s3://")
    p.add_argument("--tracking-uri", help="the run's MLflow server seen from here (default: the one it used)")
    p.set_defaults(func=_cmd_sync)

    p = sub.add_parser("eval", help="validation loss, loss by position and S-NIAH retrieval of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint file (.pt) or run directory, local or s3://")
    p.add_argument("--data", help="dataset to evaluate on (default: the run's)")
    p.add_argument("--seq-len", type=int, help="context length (default: the run's)")
    p.add_argument("--sequences", type=int, default=256, help="validation windows (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--plot", help="write the loss-by-position plot to this PNG")
    p.add_argument(
        "--suite",
        default="loss,position",
        help="comma-separated parts: loss, position (loss by position), niah (default loss,position)",
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="CHECKPOINT",
        help="another checkpoint evaluated alongside, on the model's data and context (repeatable)",
    )
    p.add_argument("--output", help="folder for report.json, niah.csv and the plots")
    p.add_argument("--tracking-uri", help="also log the results as a run of MLflow experiment 'ttt-eval'")
    p.add_argument(
        "--niah-lengths", default="256,512", help="S-NIAH context lengths, rounded up to multiples of b"
    )
    p.add_argument("--niah-depths", default="0,0.5,1", help="S-NIAH needle depths, 0 (start) to 1 (end)")
    p.add_argument("--niah-trials", type=int, default=8, help="S-NIAH trials per cell (default 8)")
    p.add_argument("--niah-tasks", default="passkey,number", help="S-NIAH tasks: passkey, number")
    p.add_argument(
        "--niah-distractors", type=int, default=4, help="wrong answers each answer is ranked against"
    )
    p.add_argument(
        "--niah-haystack",
        default="passage",
        choices=["passage", "data"],
        help="filler: a fixed repeated passage (default) or text from the validation split",
    )
    # Checked by NiahSettings, not argparse choices: a bad value is then a one-line error like the others.
    p.add_argument(
        "--niah-scoring",
        default="likelihood",
        metavar="{likelihood,greedy,both}",
        help="S-NIAH scoring: rank the answer among distractors by likelihood (default), exact match of "
        "greedy decoding, or both",
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "generate", help="continue a text prompt with a byte-level checkpoint, with test-time training"
    )
    p.add_argument("checkpoint", help="checkpoint file (.pt) or run directory, local or s3://")
    p.add_argument("--prompt", required=True, help="text to continue (a TTT model needs one mini-batch)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the K most likely tokens only")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_cmd_generate)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize text files or folders into train/val token streams")
    p.add_argument("inputs", nargs="+", help="text files or folders (each file is one document)")
    p.add_argument("--output", required=True, help="dataset folder or s3:// prefix to write")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json / folder")
    p.add_argument("--bos-token", default="<|begin_of_text|>", help="BOS token of a Hugging Face tokenizer")
    p.add_argument("--val-every", type=int, default=20, help="hold out every N-th document (default 20)")
    p.set_defaults(func=_cmd_data_prepare)

    p = sub.add_parser("sweep", help="train every trial of a sweep with Ray Tune, tracked in MLflow")
    p.add_argument("sweep", help="sweep YAML file (with base:) or a TTTSweep manifest")
    p.add_argument("--root", default="runs/sweeps", help="where trials' runs go (default runs/sweeps)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under --root)")
    p.add_argument("--parallelism", type=int, help="trials at once (default: the sweep's parallelism)")
    p.add_argument("--dry-run", action="store_true", help="list the trials and skipped combinations only")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("demo", help="train tiny TTT-E2E and its no-TTT ablation on CPU and compare them")
    p.add_argument("--root", default="runs/demo", help="where the demo's runs go (default runs/demo)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under --root)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("config", help="print a resolved config (recipe, preset or YAML, plus overrides)")
    p.add_argument("source", help="recipe, preset (see `ttt presets`) or path to a YAML config")
    overrides(p)
    p.add_argument("--counts", action="store_true", help="print parameter and FLOP counts instead")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("presets", help="list the bundled model presets")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("recipes", help="list the training recipes")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("parity", help="compare with a reference dump of the official implementation")
    p.add_argument("file", help="reference .npz in the golden-file format")
    p.add_argument("--output", help="also write the JSON report here")
    p.add_argument("--device", default="cpu", help="device to compute on, e.g. cuda (default cpu; fp32)")
    overrides(p)  # e.g. --set model.chunk_kernel=triton checks the fused kernels against the reference
    p.set_defaults(func=_cmd_parity)

    p = sub.add_parser(
        "import-official", help="convert a checkpoint of the official JAX code (Orbax) into a ttt checkpoint"
    )
    p.add_argument("orbax_dir", help="Orbax checkpoint root (newest step), a step folder, or model_weights/")
    p.add_argument("output", help="checkpoint file to write (.pt) or a new run directory, local or s3://")
    p.add_argument("--step", type=int, help="step folder to take from a checkpoint root (default: newest)")
    p.add_argument(
        "--config",
        "--preset",
        dest="config",
        required=True,
        help="the checkpoint's architecture: recipe, preset (see `ttt presets`) or path to a YAML config",
    )
    overrides(p)
    p.set_defaults(func=_cmd_import_official)
    return parser


TRAIN_EXTRA_MODULES = frozenset({"torch", "ray", "deepspeed", "zarr", "psutil", "tqdm"})
"""Top-level modules that only the `train` extra installs."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print("ttt: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        # An install of the operator's set only (`pip install ttt-platform`): say what to add.
        print(
            f"ttt: error: `ttt {args.command}` needs {exc.name.split('.')[0]}, one of the training "
            "dependencies: pip install 'ttt-platform[train]'",
            file=sys.stderr,
        )
    except cfgmod.ConfigError as exc:
        print(f"ttt: config error: {exc}", file=sys.stderr)
    except (UserError, ValueError, OSError) as exc:
        print(f"ttt: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
