"""The training run: data → meta-learning steps → evaluation, checkpoints and MLflow.

`Trainer(job, run_name).fit()` is the whole run, the same on a laptop and (wrapped by Ray Train) on a
cluster. A run lives in <storage.root>/<run name>/; if that directory already holds a checkpoint the run
continues from it, with the same data order, RNG state and MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ttt.config import JobConfig, flatten, to_yaml
from ttt.data import Samples, TrainBatches, open_dataset, split_tokens, validation_batches
from ttt.data.streams import DataError
from ttt.errors import UserError, warn
from ttt.eval.position import EvalResult, evaluate, evaluate_with_and_without_ttt
from ttt.model.attention import kernels_label
from ttt.model.counting import flops_per_token
from ttt.model.transformer import Transformer
from ttt.model.ttt import MetaLearner, inner_lr_at
from ttt.storage import join, open_storage
from ttt.tracking.logger import CURVE_ARTIFACT, Tracker
from ttt.tracking.plots import loss_by_position_plot
from ttt.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointNotWritten,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from ttt.train.device import autocast_for, peak_flops, resolve_device, uses_bf16
from ttt.train.engine import LocalEngine, NonFiniteGradient
from ttt.train.preemption import StopRequest, running_in_pod, signals_request_stop, stop_marker
from ttt.train.report import ATTEMPT_ENV, ProgressReport, read_progress


class DivergedError(UserError):
    pass


class InjectedFailure(RuntimeError):
    """Raised on purpose by train.fail_at_step."""


@dataclass
class TrainState:
    step: int = 0
    """Outer updates done."""
    data_position: int = 0
    """Global batches consumed."""
    tokens_seen: int = 0
    mlflow_run_id: str | None = None


@dataclass
class RunResult:
    run_name: str
    run_dir: str
    mlflow_run_id: str | None
    tracking_uri: str
    steps: int
    last_checkpoint: str | None
    train_seconds: float
    final_eval: EvalResult | None = None
    final_eval_no_ttt: EvalResult | None = None
    plot: str | None = None
    preempted: bool = False
    """Stopped on request after a checkpoint (the CLI exits with EXIT_PREEMPTED); not finished."""


def variant_label(job: JobConfig) -> str:
    if job.model.suffix_len and job.ttt.enabled:
        return "TTT-E2E"
    if job.model.suffix_len:
        return "no-TTT ablation"
    return "full attention" if job.model.attention == "full" else "sliding window"


def build_engine(learner: MetaLearner, job: JobConfig, device: torch.device):
    if not job.scale.uses_deepspeed:
        return LocalEngine(learner, job)
    from ttt.distributed.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(learner, job, bf16=uses_bf16(device, job.train.precision))


class Trainer:
    def __init__(
        self,
        job: JobConfig,
        run_name: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
        on_checkpoint: Callable[[int, str], None] | None = None,
        on_metrics: Callable[[dict[str, float], int], None] | None = None,
        stop_token: str | None = None,
        hosts: list[str] | None = None,
    ):
        """`on_checkpoint(step, uri)` runs on every rank after each complete checkpoint (Ray Train hears
        of checkpoints through it). `on_metrics(metrics, step)` runs on every rank after each step's
        training metrics and each periodic evaluation (a sweep's early stopping watches them).
        `stop_token` names the run directory's marker by which a distributed run's driver asks its
        workers to stop (see ttt.train.preemption). `hosts` names each rank's node (tagged on the MLflow
        run and written to progress.json: which machines ran the attempt)."""
        self.hosts = hosts or [socket.gethostname()]
        self.stop_token = stop_token
        self.stopped = False
        self.on_checkpoint = on_checkpoint
        self.on_metrics = on_metrics
        self.job = job
        self.run_name = run_name
        self.rank = rank
        self.world_size = world_size
        self.progress = progress and rank == 0

    # -- setup ---------------------------------------------------------------------------------------

    def _check_vocab(self, meta: dict) -> None:
        model = self.job.model
        vocab = meta.get("vocab_size")
        if vocab is not None and vocab > model.vocab_size:
            raise DataError(
                f"data.path: the dataset's tokenizer has {vocab} ids, "
                f"more than model.vocab_size {model.vocab_size}"
            )
        bos = meta.get("bos_token_id")
        if bos is not None and bos != model.bos_token_id:
            raise DataError(
                f"data.path: the dataset's BOS id is {bos}, model.bos_token_id is {model.bos_token_id}"
            )

    def fit(self) -> RunResult:
        job, cfg = self.job, self.job.train
        storage = self.storage = open_storage(join(job.storage.root, self.run_name))
        storage.check_writable()
        device = resolve_device(cfg.device)
        autocast = autocast_for(device, cfg.precision)

        dataset = open_dataset(job.data.path, (job.data.train_split, job.data.val_split))
        self._check_vocab(dataset.meta)
        train = TrainBatches(
            Samples(dataset.split(job.data.train_split), cfg.seq_len),
            cfg.global_batch_size,
            cfg.seed,
            self.rank,
            self.world_size,
        )
        val = validation_batches(
            Samples(dataset.split(job.data.val_split), cfg.seq_len),
            cfg.eval_sequences,
            cfg.eval_batch_size,
            self.rank,
            self.world_size,
        )

        torch.manual_seed(cfg.seed)
        learner = MetaLearner(Transformer(job.model).to(device), job.ttt)
        checkpointer = Checkpointer(storage, cfg.keep_checkpoints)
        latest = checkpointer.newest()
        if latest is None and cfg.init_from:  # before the engine exists: ZeRO-3 partitions the weights
            self._load_weights(load_checkpoint(cfg.init_from)["model"], learner.model, cfg.init_from)
        engine = build_engine(learner, job, device)
        state = TrainState()
        last_checkpoint = None
        if latest is not None:
            if engine.sharded_checkpoints:
                payload = checkpointer.load_sharded(engine, latest)
            else:
                payload = checkpointer.load(latest)
                self._restore(payload, engine)
            set_rng_state(payload["rng"])
            state = TrainState(**payload["state"])
            last_checkpoint = checkpointer.describe(latest)

        tracker = self.tracker = Tracker(job.tracking, job.storage.root, enabled=self.rank == 0)
        report = self.report = ProgressReport(
            storage, cfg.total_steps, cfg.report_every_s, enabled=self.rank == 0
        )
        run_id = state.mlflow_run_id
        if run_id is None and self.rank == 0:
            # An earlier attempt that died before its first checkpoint still opened the MLflow run.
            earlier = read_progress(storage) or {}
            if earlier.get("tracking_uri") == tracker.uri:
                run_id = earlier.get("mlflow_run_id")
        state.mlflow_run_id = tracker.start(
            run_id,
            self.run_name,
            flatten(job),
            {
                "ttt.variant": variant_label(job),
                "ttt.run_dir": storage.uri,
                "ttt.hosts": ",".join(self.hosts),
                # Which attempt under the operator (it reads this when it cannot read progress.json).
                **({"ttt.attempt": os.environ[ATTEMPT_ENV]} if os.environ.get(ATTEMPT_ENV) else {}),
                # The newest attempt's starting point (a restart after a lost node or a preemption).
                **({"ttt.resumed_from": last_checkpoint} if last_checkpoint else {}),
                "ttt.kernels": kernels_label(job.model, device, uses_bf16(device, cfg.precision)),
            },
            run_dir=storage,
        )
        stop = self._stop_request(storage)
        start = time.perf_counter()
        try:
            with signals_request_stop(stop), running_in_pod():
                # Read now, while the server is known to answer: the plot at the end needs no MLflow call.
                baseline_id = job.tracking.baseline_run_id
                baseline = tracker.curve_of(baseline_id) if baseline_id else None
                if self.rank == 0:
                    storage.write_bytes("config.yaml", to_yaml(job).encode())
                tracker.log_text(to_yaml(job), "config.yaml")
                known = self._checkpoint_info(state.step, last_checkpoint)
                report.data["hosts"] = self.hosts
                report.start(state.step, state.mlflow_run_id, tracker.uri, known)
                checkpoints = _Checkpoints(self, checkpointer, engine, state, job, last_checkpoint)
                self._loop(engine, train, val, state, autocast, device, checkpoints, stop)
                train_seconds = time.perf_counter() - start
                if self.stopped:
                    return self._preempted(state, checkpoints.last, stop, train_seconds)
                final, final_no_ttt, plot = self._final_eval(engine, val, device, autocast, state, baseline)
        except (KeyboardInterrupt, SystemExit):  # stopped at once (a second signal, a sweep's scheduler)
            tracker.end("KILLED", timeout=5.0)
            self._finish_report("killed", "stopped")
            raise
        except BaseException as exc:
            tracker.end("FAILED")
            self._finish_report("failed", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            stop.close()
        tracker.log_text(
            json.dumps({"latest": checkpoints.last, "run_dir": storage.uri}, indent=2), "checkpoints.json"
        )
        evals = {"final_eval": final, "final_eval_no_ttt": final_no_ttt, "plot": plot}
        result = self._result(state, checkpoints.last, train_seconds, **evals)
        tracker.end("FINISHED")
        report.finish("succeeded")
        return result

    def _stop_request(self, storage) -> StopRequest:
        """Signals and the pod's preStop reach every rank; the driver of a distributed run asks through a
        marker in the run directory, which rank 0 looks for (the ranks agree in the step's all-reduce)."""
        stop = StopRequest()
        if self.stop_token and self.rank == 0:
            marker = stop_marker(self.stop_token)
            stop.watch(lambda: storage.exists(marker), 1.0, "the driver was asked to stop")
        return stop

    def _preempted(self, state: TrainState, last: str | None, stop: StopRequest, seconds: float) -> RunResult:
        """The end of a run stopped on request: its checkpoint is written; MLflow gets what is left of the
        grace period, the journal keeps the rest; the next attempt continues the same MLflow run."""
        grace = self.job.train.stop_grace_s
        self.tracker.set_tags({"ttt.stopped": f"{stop.reason} after step {state.step}"})
        self.tracker.end("KILLED", timeout=max(stop.remaining(grace) - 2.0, 0.0))
        took = stop.elapsed()
        message = f"stopped after step {state.step} ({stop.reason}) in {took:.1f} s; checkpoint: {last}"
        self.report.data["stop_seconds"] = round(took, 2)
        self.report.data["stop_requested_during_step"] = stop.during
        self._finish_report("preempted", message)
        if self.progress:
            warn(f"ttt: {message}")
        return self._result(state, last, seconds, preempted=True)

    def _result(self, state: TrainState, last: str | None, seconds: float, **rest) -> RunResult:
        return RunResult(
            run_name=self.run_name,
            run_dir=self.storage.uri,
            mlflow_run_id=state.mlflow_run_id,
            tracking_uri=self.tracker.uri,
            steps=state.step,
            last_checkpoint=last,
            train_seconds=seconds,
            **rest,
        )

    @staticmethod
    def _checkpoint_info(step: int, uri: str | None) -> dict | None:
        return {"step": step, "uri": uri} if uri else None

    def _finish_report(self, state: str, message: str) -> None:
        try:
            self.report.finish(state, message)
        except Exception as exc:  # the run's own error matters more than its report
            print(f"could not write the run's final progress report: {exc}", file=sys.stderr)

    @staticmethod
    def _restore(payload: dict, engine) -> None:
        try:
            engine.load_state_dict(payload)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"the run's checkpoint does not fit this config: {str(exc).splitlines()[0]}"
            ) from None

    @staticmethod
    def _load_weights(weights: dict, model, where: str) -> None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise CheckpointError(
                f"train.init_from: {where} does not fit this model: {str(exc).splitlines()[0]}"
            ) from None

    # -- the loop ------------------------------------------------------------------------------------

    def _loop(self, engine, train, val, state, autocast, device, checkpoints, stop) -> None:
        job, cfg, tracker = self.job, self.job.train, self.tracker
        tokens_per_step = cfg.global_batch_size * cfg.seq_len
        micro = train.local_batch // cfg.grad_accum_steps
        flops = flops_per_token(job.model, cfg.seq_len, job.ttt.enabled, job.ttt.recompute).train
        peak = peak_flops(device, cfg.peak_tflops)
        progress = _Progress(cfg.total_steps, state.step, self.progress)
        while state.step < cfg.total_steps:
            step, began = state.step, time.perf_counter()
            stop.step = step
            if cfg.fail_at_step == step:
                self._inject_failure(step)
            loss = 0.0
            parts = train.batch(state.data_position).split(micro)
            for index, part in enumerate(parts):
                inputs, targets = (t.to(device) for t in split_tokens(part, job.model.vocab_size))
                with autocast():
                    loss += engine.micro_step(inputs, targets, step, last=index == len(parts) - 1)
            # The same loss on every rank, and a stop request of any rank reaches all: they stop together.
            loss, stopping = engine.mean_and_any(loss / len(parts), stop.requested())
            if not math.isfinite(loss):
                engine.discard_gradients()
                # the weights are still those of the last good step
                where = checkpoints.last if state.step == 0 else checkpoints.save() or checkpoints.last
                raise DivergedError(
                    f"loss {loss} at step {step}: training stopped; last good checkpoint: {where}"
                )
            lr = engine.lr
            try:
                grad_norm = engine.apply()
            except NonFiniteGradient as exc:
                unchanged = state.step == 0 or engine.sharded_checkpoints
                where = checkpoints.last if unchanged else checkpoints.save() or checkpoints.last
                raise DivergedError(
                    f"{exc} at step {step}: training stopped; last good checkpoint: {where}"
                ) from None
            state.step += 1
            state.data_position += 1
            state.tokens_seen += tokens_per_step
            seconds = time.perf_counter() - began
            metrics = {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_per_second": tokens_per_step / seconds,
                "train/step_seconds": seconds,
            }
            if job.ttt.enabled and job.model.suffix_len:
                metrics["train/inner_lr"] = inner_lr_at(job.ttt, step)
            if peak:
                metrics["train/mfu"] = flops * tokens_per_step / seconds / peak
            tracker.log_metrics(metrics, step)
            if self.on_metrics:
                self.on_metrics(metrics, step)
            progress.update(loss, tokens_per_step / seconds)
            self.report.step(state.step, loss, tokens_per_step / seconds)
            done = state.step == cfg.total_steps
            if stopping:  # no evaluation now: the grace period is for the checkpoint
                checkpoints.save()
                self.stopped = True
                break
            if cfg.eval_every and state.step % cfg.eval_every == 0 and not done:
                result = self._evaluate(engine, val, job.ttt, device, autocast)
                val_metrics = {"val/loss": result.loss, "val/loss_past_window": result.loss_past_window}
                tracker.log_metrics(val_metrics, step)
                if self.on_metrics:
                    self.on_metrics(val_metrics, step)
                tracker.log_text(json.dumps(result.to_dict()), f"eval/step-{step:08d}/loss_by_position.json")
            if state.step % cfg.checkpoint_every == 0 or done:
                checkpoints.save(final=done)
        progress.close()

    def _inject_failure(self, step: int) -> None:
        """Fail once per run (a marker in the run directory), so that the restarted run gets past it."""
        marker = f"injected-failure-{step}"
        if self.storage.exists(marker):
            return
        if self.rank == 0:
            self.storage.write_bytes(marker, b"")
            raise InjectedFailure(f"train.fail_at_step: failing on purpose before update {step}")

    def _evaluate(self, engine, val, ttt, device, autocast) -> EvalResult:
        return evaluate(
            engine.learner, val, ttt, self.job.model.window_size, device, autocast, engine.all_reduce_sum
        )

    def _final_eval(self, engine, val, device, autocast, state, baseline):
        job, tracker = self.job, self.tracker
        step = max(state.step - 1, 0)
        final, no_ttt = evaluate_with_and_without_ttt(
            engine.learner, val, job.model.window_size, device, autocast, engine.all_reduce_sum
        )
        metrics = {"val/loss": final.loss, "val/loss_past_window": final.loss_past_window}
        curves = {f"{self.run_name} ({variant_label(job)})": final.loss_by_position}
        if no_ttt is not None:
            metrics |= {
                "val/loss_no_ttt": no_ttt.loss,
                "val/loss_past_window_no_ttt": no_ttt.loss_past_window,
            }
            curves[f"{self.run_name}, TTT off at eval"] = no_ttt.loss_by_position
        tracker.log_metrics(metrics, step)
        self.report.final_metrics(metrics)
        if baseline:
            curves[f"{baseline[0]} (baseline)"] = baseline[1]
        if not tracker.run_id:
            return final, no_ttt, None
        plot_dir = Path(tempfile.mkdtemp(prefix="ttt-plot-"))
        tracker.log_text(
            json.dumps(
                {
                    "loss_by_position": final.loss_by_position,
                    "window": job.model.window_size,
                    "label": variant_label(job),
                    "windows": final.windows,
                }
            ),
            CURVE_ARTIFACT,
        )
        title = f"{self.run_name}: validation loss by position ({final.windows} windows)"
        plot = loss_by_position_plot(curves, job.model.window_size, plot_dir / "loss_by_position.png", title)
        tracker.log_artifact(plot, "eval")
        return final, no_ttt, f"eval/{plot.name}"


class _Checkpoints:
    """The run's checkpoints as the loop writes them. A checkpoint that storage refuses (a full disk, S3
    away beyond botocore's retries) leaves nothing that counts: a warning, and the next checkpoint step
    tries again. Only the last one must be written, or the run would end without its weights."""

    def __init__(self, trainer: Trainer, checkpointer, engine, state: TrainState, job: JobConfig, last):
        self.trainer, self.checkpointer, self.engine, self.state, self.job = (
            trainer,
            checkpointer,
            engine,
            state,
            job,
        )
        self.last: str | None = last
        """The newest complete checkpoint."""

    def save(self, final: bool = False) -> str | None:
        state, job, engine, trainer = self.state, self.job, self.engine, self.trainer
        meta = {"state": dataclasses.asdict(state), "rng": rng_state(), "config": job.to_dict()}
        try:
            if engine.sharded_checkpoints:
                uri = self.checkpointer.save_sharded(engine, meta, state.step)
            else:
                uri = self.checkpointer.save({**engine.state_dict(), **meta}, state.step)
        except CheckpointNotWritten as exc:
            if final:
                raise CheckpointError(
                    f"the final checkpoint (step {exc.step}) could not be written ({exc.reason}); the newest "
                    f"complete one is {self.last}: train the run again to resume from it"
                ) from None
            if trainer.rank == 0:
                every, total = job.train.checkpoint_every, job.train.total_steps
                retry = min((state.step // every + 1) * every, total)
                warn(
                    f"ttt: {exc}; training goes on and step {retry} tries again (newest complete "
                    f"checkpoint: {self.last})"
                )
            return None
        self.last = uri
        trainer.tracker.set_tags({"ttt.checkpoint": uri})
        trainer.tracker.checkpoint()
        trainer.report.checkpoint(state.step, uri)
        if trainer.on_checkpoint:
            trainer.on_checkpoint(state.step, uri)
        return uri


class _Progress:
    """A tqdm bar on a terminal; periodic plain lines otherwise (pod logs, CI)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.step = self.initial = initial
        self.bar = None
        self.started = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, loss: float, tokens_per_second: float) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
        elif self.enabled and (self.step % max(1, self.total // 20) == 0 or self.step == self.total):
            elapsed = time.perf_counter() - self.started
            eta = elapsed / (self.step - self.initial) * (self.total - self.step)
            print(
                f"step {self.step}/{self.total} loss {loss:.4f} tok/s {tokens_per_second:,.0f} "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
