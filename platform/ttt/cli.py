"""`ttt`: the command line. Thin: parse, call the library, print; user errors exit 2 without a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ttt import config as cfgmod


def _cmd_config(args: argparse.Namespace) -> int:
    job = cfgmod.resolve(args.source, args.set)
    if args.counts:
        from ttt.model.counting import flops_per_token, param_counts

        params = param_counts(job.model)
        flops = flops_per_token(job.model, job.train.seq_len, job.ttt.enabled, job.ttt.checkpoint)
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
        kind = "TTT-E2E" if job.ttt.enabled else ("no-TTT" if m.suffix_len else m.attention.upper())
        print(
            f"{name:12s} {kind:8s} L={m.num_layers:<3d} D={m.hidden_size:<5d} "
            f"params={param_counts(m).total:>13,d}  T={job.train.seq_len}"
        )
    return 0


def _cmd_parity(args: argparse.Namespace) -> int:
    from ttt.parity import run_parity

    report = run_parity(args.file)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttt", description="TTT-E2E training platform")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print a resolved config (preset or YAML, plus overrides)")
    p.add_argument("source", help="preset name (see `ttt presets`) or path to a YAML config")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set ttt.mini_batch_size=512 (repeatable)",
    )
    p.add_argument("--counts", action="store_true", help="print parameter and FLOP counts instead")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("presets", help="list the bundled model presets")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("parity", help="compare with a reference dump of the official implementation")
    p.add_argument("file", help="reference .npz in the golden-file format")
    p.add_argument("--output", help="also write the JSON report here")
    p.set_defaults(func=_cmd_parity)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head`
        return 0
    except cfgmod.ConfigError as exc:
        print(f"ttt: config error: {exc}", file=sys.stderr)
    except (ValueError, OSError) as exc:
        print(f"ttt: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
