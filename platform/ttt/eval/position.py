"""Validation loss and loss by position within the context, and the `ttt eval` suite built around them.

TTT-E2E is evaluated the way it is used: under no_grad the inner loop still takes its steps, so positions
late in the context are predicted by weights adapted to everything before them. The loss by position is the
masked mean NLL at each position over the validation windows; `loss_past_window` averages positions ≥ W,
which a sliding-window model can only get right through what TTT stored in its weights.

`evaluate_suite` runs the parts a user asks for (loss, position, S-NIAH from `ttt.eval.niah`) on a
checkpoint and its baselines; `write_suite` and `log_suite` turn the result into files and an MLflow run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ttt.config import JobConfig, TTTConfig
from ttt.data.loader import split_tokens
from ttt.data.tokenizer import Tokenizer
from ttt.errors import UserError
from ttt.eval.niah import Generate, NiahResult

if TYPE_CHECKING:
    from ttt.tracking.logger import Tracker
from ttt.model.ttt import MetaLearner


@dataclass
class EvalResult:
    loss: float
    """Mean over windows of the mean over mini-batches of the masked loss (the training objective)."""
    loss_past_window: float | None
    """Masked mean NLL over positions ≥ W (None when the context is not longer than the window)."""
    loss_by_position: list[float]
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(
    learner: MetaLearner,
    batches: Sequence[torch.Tensor],
    ttt: TTTConfig,
    window: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> EvalResult:
    """`learner` is called (not bypassed) so that sharded weights are gathered; with several ranks each
    evaluates its share of the windows and `all_reduce` sums the statistics."""
    model = learner.model
    was_training = learner.training
    learner.eval()
    length = None
    nll_sum = count = stats = None
    for tokens in batches:
        inputs, targets = (t.to(device) for t in split_tokens(tokens, model.config.vocab_size))
        length = inputs.shape[1]
        mask = targets != model.config.bos_token_id
        with autocast():
            _, out = learner(inputs, targets, loss_mask=mask, ttt=ttt)
        masked = out.token_nll.double() * mask
        batch_stats = torch.stack(
            [out.chunk_losses.double().mean(1).sum(), torch.tensor(inputs.shape[0], device=device)]
        )
        nll_sum = masked.sum(0) if nll_sum is None else nll_sum + masked.sum(0)
        count = mask.sum(0).double() if count is None else count + mask.sum(0)
        stats = batch_stats if stats is None else stats + batch_stats
    learner.train(was_training)
    total = all_reduce(torch.cat([nll_sum, count, stats.to(nll_sum.dtype)]).to(device))
    nll_sum, count, (loss_sum, windows) = total[:length], total[length : 2 * length], total[2 * length :]
    by_position = (nll_sum / count.clamp(min=1)).tolist()
    past = None
    if length > window:
        past = float(nll_sum[window:].sum() / count[window:].sum().clamp(min=1))
    return EvalResult(
        loss=float(loss_sum / windows),
        loss_past_window=past,
        loss_by_position=by_position,
        windows=int(windows),
    )


def evaluate_with_and_without_ttt(
    learner: MetaLearner,
    batches: Sequence[torch.Tensor],
    window: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[EvalResult, EvalResult | None]:
    """The model as configured, and for a TTT model also the same weights without test-time updates
    (how much of its gain is adaptation at test time); None for models without TTT."""
    ttt = learner.ttt
    result = evaluate(learner, batches, ttt, window, device, autocast, all_reduce)
    if not (ttt.enabled and learner.model.config.suffix_len):
        return result, None
    static = dataclasses.replace(ttt, enabled=False)
    return result, evaluate(learner, batches, static, window, device, autocast, all_reduce)


# -- a checkpoint, and the `ttt eval` suite around it --------------------------------------------------

SUITES = ("loss", "position", "niah")
DEFAULT_SUITE = ("loss", "position")


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to evaluate: its (overridden) config, weights on the device, and how to run it."""

    checkpoint: str
    job: JobConfig
    learner: MetaLearner
    step: int
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]


def load_for_eval(
    checkpoint: str, *, data: str | None = None, seq_len: int | None = None, device: str = "auto"
) -> LoadedCheckpoint:
    from ttt.eval.generate import load_checkpoint_model
    from ttt.train.device import autocast_for

    overrides = ([f"train.seq_len={seq_len}"] if seq_len else []) + ([f"data.path={data}"] if data else [])
    model, job, step = load_checkpoint_model(checkpoint, device, overrides)
    target = model.embed.weight.device
    return LoadedCheckpoint(
        checkpoint, job, MetaLearner(model, job.ttt), step, target, autocast_for(target, job.train.precision)
    )


@dataclass
class CheckpointEval:
    report: dict
    curves: dict[str, list[float]]
    window: int


def evaluate_loaded(loaded: LoadedCheckpoint, sequences: int = 256, batch_size: int = 8) -> CheckpointEval:
    """Validation loss and loss by position on the checkpoint's validation split (for a TTT model also
    with test-time training switched off)."""
    from ttt.data import Samples, open_dataset, validation_batches

    job = loaded.job
    dataset = open_dataset(job.data.path, (job.data.val_split,))
    batches = validation_batches(
        Samples(dataset.split(job.data.val_split), job.train.seq_len), sequences, batch_size
    )
    window = job.model.window_size
    result, static = evaluate_with_and_without_ttt(
        loaded.learner, batches, window, loaded.device, loaded.autocast
    )
    report = {
        "checkpoint": loaded.checkpoint,
        "step": loaded.step,
        "seq_len": job.train.seq_len,
        "windows": result.windows,
        "loss": result.loss,
        "loss_past_window": result.loss_past_window,
    }
    curves = {"with TTT" if job.ttt.enabled else "model": result.loss_by_position}
    if static is not None:
        report |= {"loss_no_ttt": static.loss, "loss_past_window_no_ttt": static.loss_past_window}
        curves["TTT off"] = static.loss_by_position
    return CheckpointEval(report, curves, window)


def parse_suite(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise UserError(
            f"--suite: unknown part '{','.join(unknown) or text}' (choose from {', '.join(SUITES)})"
        )
    return names


@dataclass
class NiahSettings:
    lengths: Sequence[int] = (256, 512)
    depths: Sequence[float] = (0.0, 0.5, 1.0)
    trials: int = 8
    tasks: Sequence[str] = ("passkey", "number")
    distractors: int = 4
    haystack: str = "passage"
    """'passage' (a fixed repeated passage) or 'data' (text from the validation split)."""
    seed: int = 0
    scoring: str = "likelihood"
    """'likelihood' (rank the answer among distractors), 'greedy' (exact match of greedy decoding), 'both'."""

    @property
    def methods(self) -> tuple[str, ...]:
        """The scoring methods to run, in `ttt.eval.niah.SCORINGS` order."""
        return ("likelihood", "greedy") if self.scoring == "both" else (self.scoring,)

    def check(self) -> None:
        """Bad values fail before any model runs."""
        from ttt.eval.niah import TASKS, aligned_length, check_depth

        if not (self.lengths and self.depths and self.tasks):
            raise UserError("S-NIAH needs at least one --niah-lengths, --niah-depths and --niah-tasks value")
        for depth in self.depths:
            check_depth(depth)
        for length in self.lengths:
            aligned_length(length, 1)
        for task in self.tasks:
            if task not in TASKS:
                raise UserError(f"unknown S-NIAH task '{task}' (available: {', '.join(TASKS)})")
        if self.trials < 1:
            raise UserError(f"--niah-trials: {self.trials} is not a number of trials (at least 1)")
        if self.haystack not in ("passage", "data"):
            raise UserError(f"--niah-haystack: '{self.haystack}' is not 'passage' or 'data'")
        if self.scoring not in ("likelihood", "greedy", "both"):
            raise UserError(f"--niah-scoring: '{self.scoring}' is not 'likelihood', 'greedy' or 'both'")


@dataclass
class SuiteResult:
    label: str
    suite: tuple[str, ...]
    report: dict
    """The JSON report: the model's results at the top (as `ttt eval` always printed), baselines under
    `baselines`, S-NIAH under `niah`."""
    curves: dict[str, list[float]]
    window: int
    niah: dict[str, NiahResult]
    """By model label: the model first, then each baseline."""
    step: int
    baselines: list[str] = dataclasses.field(default_factory=list)
    """The baselines' labels (unique: a repeated run name gets ' #2')."""


def checkpoint_label(uri: str) -> str:
    """The run's name for a run directory or a file in its checkpoints/ folder, else the file's stem."""
    parts = [p for p in uri.rstrip("/").split("/") if p]
    if not parts:
        return uri
    if parts[-1].endswith(".pt"):
        if len(parts) >= 3 and parts[-2] == "checkpoints":
            return parts[-3]
        return parts[-1].removesuffix(".pt")
    return parts[-1]


def evaluate_suite(
    checkpoint: str,
    suite: Sequence[str] = DEFAULT_SUITE,
    *,
    baselines: Sequence[str] = (),
    data: str | None = None,
    seq_len: int | None = None,
    sequences: int = 256,
    batch_size: int = 8,
    device: str = "auto",
    niah: NiahSettings | None = None,
) -> SuiteResult:
    """The parts of `suite` for the checkpoint and for each baseline, the baselines on the model's data at
    the model's context length so that their curves overlay."""
    niah = niah or NiahSettings()
    if "niah" in suite:
        niah.check()
    loaded = load_for_eval(checkpoint, data=data, seq_len=seq_len, device=device)
    label = checkpoint_label(checkpoint)
    others = [
        load_for_eval(b, data=loaded.job.data.path, seq_len=loaded.job.train.seq_len, device=device)
        for b in baselines
    ]  # all loaded first: a missing baseline fails before minutes of evaluation
    labels = _unique([label, *(checkpoint_label(b) for b in baselines)])
    report: dict = {"checkpoint": checkpoint, "step": loaded.step, "seq_len": loaded.job.train.seq_len}
    curves: dict[str, list[float]] = {}
    results: dict[str, NiahResult] = {}
    if "loss" in suite or "position" in suite:
        main = evaluate_loaded(loaded, sequences, batch_size)
        report = main.report if "loss" in suite else report
        curves = dict(main.curves)
        if baselines and "loss" in suite:
            report["baselines"] = {}
        for name, other in zip(labels[1:], others, strict=True):
            result = evaluate_loaded(other, sequences, batch_size)
            if "loss" in suite:
                report["baselines"][name] = result.report
            curves[f"{name} (baseline)"] = next(iter(result.curves.values()))
        if "position" not in suite:
            curves = {}
    if "niah" in suite:
        from ttt.eval.niah import ttt_block

        models = [loaded, *others]
        # One length grid for all models (a multiple of every TTT model's b), so their cells line up.
        block = math.lcm(*(ttt_block(m.learner) for m in models))
        for name, item in zip(labels, models, strict=True):
            results[name] = run_niah_for(item, niah, batch_size, block)
        report["niah"] = {name: r.to_dict() for name, r in results.items()}
    report["suite"] = list(suite)
    return SuiteResult(
        label, tuple(suite), report, curves, loaded.job.model.window_size, results, loaded.step, labels[1:]
    )


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in labels:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def run_niah_for(
    loaded: LoadedCheckpoint, settings: NiahSettings, batch_size: int = 8, block: int | None = None
) -> NiahResult:
    """S-NIAH with the tokenizer the checkpoint's dataset was made with, scored as `settings.methods` say;
    lengths rounded up to multiples of `block` (default: the model's own mini-batch size b)."""
    from ttt.data import open_dataset
    from ttt.eval.niah import learner_loglik, passage_filler, run_niah, stream_filler, ttt_block

    job = loaded.job
    dataset = open_dataset(job.data.path, (job.data.val_split,))
    tokenizer = _tokenizer_of(dataset.meta, job)
    if settings.haystack == "data":
        filler = stream_filler(dataset.split(job.data.val_split)[:], job.model.bos_token_id)
    else:
        filler = passage_filler(tokenizer)
    methods = settings.methods
    return run_niah(
        learner_loglik(loaded.learner, loaded.device, loaded.autocast) if "likelihood" in methods else None,
        tokenizer,
        lengths=settings.lengths,
        depths=settings.depths,
        trials=settings.trials,
        block=block or ttt_block(loaded.learner),
        tasks=settings.tasks,
        distractors=settings.distractors,
        filler=filler,
        haystack=settings.haystack,
        seed=settings.seed,
        batch_size=batch_size,
        generate=greedy_generate(loaded) if "greedy" in methods else None,
    )


def greedy_generate(loaded: LoadedCheckpoint) -> Generate:
    """Greedy decoding by streaming inference (`ttt.eval.generate`): the prompt is prefilled with the inner
    loop's steps, then the answer's tokens are decoded one by one. It runs in the weights' dtype, without
    the checkpoint's autocast (fp32 checkpoints decode in fp32)."""
    from ttt.eval.generate import PromptTooShortError, generate

    model, ttt = loaded.learner.model, loaded.learner.ttt

    def decode(prompt: list[int], count: int) -> list[int]:
        try:
            return generate(model, ttt, prompt, count, greedy=True)
        except PromptTooShortError as exc:  # a length rounded to exactly b leaves the prompt < b tokens
            raise UserError(f"--niah-scoring greedy: {exc}; use longer --niah-lengths") from None

    return decode


def _tokenizer_of(meta: dict, job: JobConfig) -> Tokenizer:
    """The dataset's tokenizer (its meta.json names it); a dataset without one is taken as bytes when the
    model's vocabulary is the byte vocabulary."""
    from ttt.data.tokenizer import ByteTokenizer, load_tokenizer

    name = meta.get("tokenizer") or ("byte" if job.model.vocab_size == ByteTokenizer.vocab_size else None)
    if name is None:
        raise UserError(f"S-NIAH needs the model's tokenizer, but {job.data.path} has no meta.json naming it")
    tokenizer = load_tokenizer(name)
    if tokenizer.vocab_size > job.model.vocab_size or tokenizer.bos_token_id != job.model.bos_token_id:
        raise UserError(
            f"tokenizer {tokenizer.name} (vocabulary {tokenizer.vocab_size}, BOS {tokenizer.bos_token_id}) "
            f"does not match the model (vocabulary {job.model.vocab_size}, BOS {job.model.bos_token_id})"
        )
    return tokenizer


# -- writing the results -------------------------------------------------------------------------------


def write_suite(result: SuiteResult, output: Path) -> dict[str, Path]:
    """report.json, and as the suite has them niah.csv, loss_by_position.png and niah_heatmap.png (likelihood
    scoring) / niah_heatmap_greedy.png (greedy scoring)."""
    from ttt.eval.plots import niah_heatmap
    from ttt.tracking.plots import loss_by_position_plot, save_png

    output.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if result.curves:
        title = f"{result.label} (step {result.step}): validation loss by position"
        files["plot"] = loss_by_position_plot(
            result.curves, result.window, output / "loss_by_position.png", title
        )
    if result.niah:
        files["csv"] = output / "niah.csv"
        with open(files["csv"], "w", newline="") as f:
            writer = csv.writer(f)
            # `scoring` comes last so that readers of the columns before it keep working.
            writer.writerow(["model", "task", "length", "depth", "accuracy", "trials", "scoring"])
            for model, niah in result.niah.items():
                for scoring in niah.scoring:
                    for c in niah.cells:
                        value = c.score(scoring)
                        assert value is not None
                        writer.writerow([model, c.task, c.length, c.depth, f"{value:.6g}", c.trials, scoring])
        for scoring in _niah_scoring(result):
            # The likelihood heatmap keeps its name; other methods get their own file.
            key, name, how = (
                ("heatmap", "niah_heatmap.png", "")
                if scoring == "likelihood"
                else (f"heatmap_{scoring}", f"niah_heatmap_{scoring}.png", f", {scoring} exact match")
            )
            title = f"{result.label} (step {result.step}): single-needle retrieval (S-NIAH{how})"
            files[key] = save_png(niah_heatmap(result.niah, title, scoring), output / name)
    result.report["files"] = {k: str(v) for k, v in files.items()} | {"report": str(output / "report.json")}
    files["report"] = output / "report.json"
    files["report"].write_text(json.dumps(result.report, indent=2) + "\n")
    return files


def suite_metrics(result: SuiteResult) -> dict[str, float]:
    report = result.report
    metrics = {
        key: report[key]
        for key in ("loss", "loss_past_window", "loss_no_ttt", "loss_past_window_no_ttt")
        if report.get(key) is not None
    }
    for name, baseline in report.get("baselines", {}).items():
        for key in ("loss", "loss_past_window"):
            if baseline.get(key) is not None:
                metrics[f"baseline/{_metric_name(name)}/{key}"] = baseline[key]
    for index, (name, niah) in enumerate(result.niah.items()):
        for scoring in niah.scoring:
            # Likelihood keeps the plain names (niah/accuracy); greedy adds a level: niah/greedy/accuracy.
            prefix = "niah" if index == 0 else f"baseline/{_metric_name(name)}/niah"
            prefix += "" if scoring == "likelihood" else f"/{scoring}"
            metrics[f"{prefix}/accuracy"] = niah.mean(scoring)
            for c in niah.cells:
                metrics[f"{prefix}/{c.task}/L{c.length}/depth{c.depth:g}"] = c.score(scoring)
    return metrics


def _niah_scoring(result: SuiteResult) -> tuple[str, ...]:
    """The scoring methods of the suite's S-NIAH (every model is scored the same way)."""
    return next(iter(result.niah.values())).scoring if result.niah else ()


def _metric_name(name: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and spaces; anything else in a run name becomes _.
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in name)


def log_suite(result: SuiteResult, files: dict[str, Path], tracking_uri: str) -> str | None:
    """One MLflow run in the `ttt-eval` experiment: the metrics at the checkpoint's step, the files as
    artifacts, and the model's curve where a training run's `tracking.baseline_run_id` can read it."""
    from ttt.config import TrackingConfig
    from ttt.tracking.logger import Tracker, quiet_mlflow

    quiet_mlflow()
    tracker = Tracker(TrackingConfig(uri=tracking_uri, experiment=EVAL_EXPERIMENT, system_metrics=False), ".")
    params = {
        "checkpoint": result.report["checkpoint"],
        "step": result.step,
        "seq_len": result.report["seq_len"],
        "suite": ",".join(result.suite),
        "baselines": ",".join(result.baselines) or "-",
    }
    if result.niah:
        params["niah_scoring"] = ",".join(_niah_scoring(result))
    # MLflow prints "View run …" links on stdout, which holds the JSON report: send them to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        return _log_run(tracker, result, files, params)


def _log_run(tracker: Tracker, result: SuiteResult, files: dict[str, Path], params: dict) -> str | None:
    from ttt.tracking.logger import CURVE_ARTIFACT

    run_id = tracker.start(None, f"eval-{result.label}", params, {"ttt.eval": "suite"})
    status = "FAILED"
    try:
        tracker.log_metrics(suite_metrics(result), step=result.step)
        for path in files.values():
            tracker.log_artifact(path, "eval")
        if result.curves:
            curve = next(iter(result.curves.values()))
            tracker.log_text(
                json.dumps({"loss_by_position": curve, "window": result.window, "label": result.label}),
                CURVE_ARTIFACT,
            )
        status = "FINISHED"
    finally:
        tracker.end(status)
    return run_id


EVAL_EXPERIMENT = "ttt-eval"
