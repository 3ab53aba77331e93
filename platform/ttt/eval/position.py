"""Validation loss and loss by position within the context.

TTT-E2E is evaluated the way it is used: under no_grad the inner loop still takes its steps, so positions
late in the context are predicted by weights adapted to everything before them. The loss by position is the
masked mean NLL at each position over the validation windows; `loss_past_window` averages positions ≥ W,
which a sliding-window model can only get right through what TTT stored in its weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ttt.config import TTTConfig
from ttt.data.loader import split_tokens
from ttt.model.transformer import Transformer
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


@dataclass
class CheckpointEval:
    report: dict
    curves: dict[str, list[float]]
    window: int


def evaluate_checkpoint(
    checkpoint: str,
    *,
    data: str | None = None,
    seq_len: int | None = None,
    sequences: int = 256,
    batch_size: int = 8,
    device: str = "auto",
) -> CheckpointEval:
    """Validation loss and loss by position of a checkpoint (file or run directory, local or s3://), on
    its run's validation split or on `data`, at its training context or at `seq_len`; for a TTT model
    also with test-time training switched off."""
    from ttt.config import JobConfig
    from ttt.data import Samples, open_dataset, validation_batches
    from ttt.train.checkpoint import load_checkpoint
    from ttt.train.device import autocast_for, resolve_device

    payload = load_checkpoint(checkpoint)
    overrides = ([f"train.seq_len={seq_len}"] if seq_len else []) + ([f"data.path={data}"] if data else [])
    job = JobConfig.from_dict(payload["config"]).with_overrides(overrides)
    target = resolve_device(device)
    model = Transformer(job.model).to(target)
    model.load_state_dict(payload["model"])
    learner = MetaLearner(model, job.ttt)
    dataset = open_dataset(job.data.path, (job.data.val_split,))
    batches = validation_batches(
        Samples(dataset.split(job.data.val_split), job.train.seq_len), sequences, batch_size
    )
    autocast = autocast_for(target, job.train.precision)
    window = job.model.window_size
    result, static = evaluate_with_and_without_ttt(learner, batches, window, target, autocast)
    report = {
        "checkpoint": checkpoint,
        "step": payload["state"]["step"],
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
