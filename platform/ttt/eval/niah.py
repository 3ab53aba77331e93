"""Single-needle retrieval (S-NIAH): can the model recall one fact planted in a long haystack?

A trial is a context of exactly L input tokens (L + 1 with the final target):

    [BOS] haystack[:p-1]  needle  haystack[p-1:]  question  answer
          └──────── filler ────────┘                        └ scored ┘

The needle ("The pass key is 71432. Remember it.") starts at token p, set by a relative depth (0: right
after BOS, 1: right before the question) or given explicitly. The question ends where the answer begins
("… The pass key is"), so the answer is an ordinary continuation.

Scoring is by teacher-forced likelihood, which works for models far too small to decode the answer
greedily: the true answer and K distractors of the same token length are appended in turn, and a trial is
correct when the true answer has a strictly higher log-likelihood than every distractor (a tie is a miss,
so a model that ignores the context scores 0, not 1). Chance is 1 / (K + 1). Candidates share everything
before the answer, so only the model's use of the needle can separate them. Optionally (or instead) a trial
is scored by greedy exact match: the model decodes as many tokens as the answer has after the prompt, and
the trial is correct when they are the answer's tokens.

Everything here works on token ids through a `Tokenizer` and a log-likelihood function, so it serves any
model; `learner_loglik` adapts a TTT-E2E `MetaLearner`, run as `ttt.eval.position` runs it (the inner loop
takes its steps over the haystack before the answer is scored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ttt.data.tokenizer import Tokenizer
from ttt.errors import UserError
from ttt.model.ttt import MetaLearner


@dataclass(frozen=True)
class NeedleTask:
    name: str
    needle: str
    """Sentence with `{answer}` where the value goes; spaces around it keep it apart from the filler."""
    question: str
    digits: int
    """The answer is a number of exactly this many digits."""


TASKS: dict[str, NeedleTask] = {
    task.name: task
    for task in (
        NeedleTask(
            "passkey", " The pass key is {answer}. Remember it. ", " What is the pass key? The pass key is", 5
        ),
        NeedleTask(
            "number",
            " The special magic number is {answer}. ",
            " What is the special magic number? The special magic number is",
            7,
        ),
    )
}

# A neutral passage repeated to any length: it carries no numbers, so nothing in it competes with the needle.
PASSAGE = (
    "The river runs slowly past the old mill. Birds sing in the trees along the bank. A cart rolls down "
    "the road toward the town, and the baker opens his door. Clouds drift over the hills in the afternoon. "
)

Filler = Callable[[int, random.Random], list[int]]
"""(count, rng) → exactly `count` haystack token ids."""

LogLikelihood = Callable[[torch.Tensor], torch.Tensor]
"""tokens [B, L+1] with BOS first → log p(tokens[:, t+1] | tokens[:, :t+1]) for t < L, as [B, L]."""

Generate = Callable[[list[int], int], list[int]]
"""(prompt ids, count) → `count` greedily decoded ids (optional exact-match scoring)."""

SCORE_KEYS = {"likelihood": "accuracy", "greedy": "exact_match"}
"""Each scoring method and the `Cell` field (and report key) that holds its accuracy."""
SCORINGS = tuple(SCORE_KEYS)


def passage_filler(tokenizer: Tokenizer, passage: str = PASSAGE) -> Filler:
    ids = tokenizer.encode(passage)

    def fill(count: int, rng: random.Random) -> list[int]:
        start = rng.randrange(len(ids))  # each trial starts the passage somewhere else
        repeats = (start + count) // len(ids) + 1
        return (ids * repeats)[start : start + count]

    return fill


def stream_filler(stream: Sequence[int] | torch.Tensor, bos_token_id: int) -> Filler:
    """Haystacks cut from a token stream (e.g. a validation split), BOS ids left out so the haystack reads
    as one document."""
    import numpy as np

    tokens = np.asarray(stream, dtype=np.int64)
    tokens = tokens[tokens != bos_token_id]
    if tokens.size == 0:
        raise UserError("the S-NIAH haystack stream has no tokens besides BOS")

    def fill(count: int, rng: random.Random) -> list[int]:
        start = rng.randrange(max(1, tokens.size - count))
        out = tokens[start : start + count].tolist()
        while len(out) < count:  # a stream shorter than the haystack wraps around
            out += tokens[: count - len(out)].tolist()
        return out

    return fill


@dataclass(frozen=True)
class Trial:
    task: str
    length: int
    """L: input tokens; `len(prefix) + len(answer) == length + 1`."""
    depth: float | None
    needle_start: int
    """Index in the token sequence (0 is BOS) of the needle's first token."""
    needle: list[int]
    prefix: list[int]
    """Everything before the answer: BOS, haystack with the needle, question."""
    answer: list[int]
    distractors: list[list[int]]
    answer_text: str

    def candidates(self) -> list[list[int]]:
        """Full token sequences, the true answer first."""
        return [self.prefix + self.answer, *(self.prefix + d for d in self.distractors)]


def check_depth(depth: float) -> None:
    if not (isinstance(depth, int | float) and 0.0 <= depth <= 1.0):  # NaN fails both comparisons
        raise UserError(f"needle depth {depth} is outside the context: depths are fractions from 0 to 1")


def aligned_length(length: int, block: int) -> int:
    """`length` rounded up to a multiple of the TTT mini-batch size (the inner loop steps per b tokens)."""
    if length < 1:
        raise UserError(f"S-NIAH context length {length} is not a positive number of tokens")
    return -(-length // block) * block


def build_trial(
    task: NeedleTask,
    tokenizer: Tokenizer,
    length: int,
    *,
    seed: int | str,
    depth: float | None = None,
    position: int | None = None,
    distractors: int = 4,
    filler: Filler | None = None,
) -> Trial:
    """One context of `length` input tokens with the needle at `depth` (0..1) or at token `position`."""
    if (depth is None) == (position is None):
        raise ValueError("give exactly one of depth and position")
    if depth is not None:
        check_depth(depth)
    rng = random.Random(seed)
    low, high = 10 ** (task.digits - 1), 10**task.digits
    value = rng.randrange(low, high)
    answer = tokenizer.encode(f" {value}")
    needle = tokenizer.encode(task.needle.format(answer=value))
    question = tokenizer.encode(task.question)
    haystack_len = length - len(needle) - len(question) - len(answer)
    if haystack_len < 0:
        raise UserError(
            f"S-NIAH context length {length} is too short for the {task.name} task: its needle, question "
            f"and answer alone take {length - haystack_len} tokens"
        )
    last = 1 + haystack_len  # the needle may end right before the question, no later
    if depth is not None:
        position = 1 + round(depth * haystack_len)
    assert position is not None
    if not 1 <= position <= last:
        raise UserError(
            f"needle position {position} is outside the context: with length {length} the "
            f"{len(needle)}-token needle must start between 1 and {last}, before the "
            f"{len(question)}-token question"
        )
    wrong = _distractors(tokenizer, rng, value, low, high, len(answer), distractors)
    haystack = (filler or passage_filler(tokenizer))(haystack_len, rng)
    cut = position - 1
    prefix = [tokenizer.bos_token_id, *haystack[:cut], *needle, *haystack[cut:], *question]
    return Trial(task.name, length, depth, position, needle, prefix, answer, wrong, str(value))


def _distractors(
    tokenizer: Tokenizer, rng: random.Random, value: int, low: int, high: int, size: int, count: int
) -> list[list[int]]:
    """`count` other numbers of the same digit count whose encodings have the answer's token length (so
    every candidate ends the sequence at the same position)."""
    chosen: dict[int, list[int]] = {}
    for _ in range(100 * count + 100):
        if len(chosen) == count:
            break
        other = rng.randrange(low, high)
        ids = tokenizer.encode(f" {other}")
        if other != value and other not in chosen and len(ids) == size:
            chosen[other] = ids
    if len(chosen) < count:
        raise UserError(f"cannot find {count} distractor answers of {size} tokens with this tokenizer")
    return list(chosen.values())


@dataclass(frozen=True)
class TrialScore:
    correct: bool | None
    """None (as margin and rank) when the trial was scored by greedy decoding only."""
    margin: float | None
    """Log-likelihood of the true answer minus that of the best distractor (> 0: correct)."""
    rank: int | None
    """Candidates scoring at least as high as the true answer (0: correct)."""
    exact_match: bool | None = None


def score_trials(
    trials: Sequence[Trial],
    loglik: LogLikelihood | None,
    batch_size: int = 8,
    generate: Generate | None = None,
) -> list[TrialScore]:
    """Rank each trial's answer among its distractors by summed log-likelihood of the answer tokens, and
    with `generate` also decode the answer greedily; without `loglik` the ranking is skipped."""
    # Greedy-only skips the ranking: its K + 1 full-length passes cost more than one decode.
    candidates = (lambda trial: trial.candidates()) if loglik is not None else (lambda trial: [])
    sequences = [(i, seq) for i, trial in enumerate(trials) for seq in candidates(trial)]
    totals: list[list[float]] = [[] for _ in trials]
    # Group by length so that each batch is one tensor (a cell's trials all have the same length).
    by_length: dict[int, list[tuple[int, list[int]]]] = {}
    for item in sequences:
        by_length.setdefault(len(item[1]), []).append(item)
    for group in by_length.values():
        for k in range(0, len(group), batch_size):
            part = group[k : k + batch_size]
            assert loglik is not None
            scores = loglik(torch.tensor([seq for _, seq in part], dtype=torch.long)).double().cpu()
            for (i, _), row in zip(part, scores, strict=True):
                totals[i].append(float(row[-len(trials[i].answer) :].sum()))
    out = []
    for trial, values in zip(trials, totals, strict=True):
        match = None
        if generate is not None:
            match = generate(trial.prefix, len(trial.answer)) == trial.answer
        if not values:
            out.append(TrialScore(correct=None, margin=None, rank=None, exact_match=match))
            continue
        true, others = values[0], values[1:]
        out.append(
            TrialScore(
                correct=all(true > o for o in others),
                margin=true - max(others) if others else math.inf,
                rank=sum(o >= true for o in others),
                exact_match=match,
            )
        )
    return out


@dataclass(frozen=True)
class Cell:
    task: str
    length: int
    depth: float
    accuracy: float | None
    """Likelihood ranking's accuracy; None when the cell was not scored that way (so `mean_margin`)."""
    trials: int
    mean_margin: float | None
    exact_match: float | None = None
    """Greedy decoding's accuracy; None when the cell was not scored that way."""

    def score(self, scoring: str) -> float | None:
        return getattr(self, SCORE_KEYS[scoring])


@dataclass
class NiahResult:
    cells: list[Cell]
    distractors: int
    haystack: str
    scoring: tuple[str, ...] = ("likelihood",)
    """The methods the cells were scored by, in `SCORINGS` order."""

    @property
    def chance(self) -> float:
        """Of the likelihood ranking; guessing a greedy answer's digits has practically no chance."""
        return 1.0 / (self.distractors + 1)

    def mean(self, scoring: str) -> float | None:
        values = [c.score(scoring) for c in self.cells]
        return None if None in values else sum(v for v in values if v is not None) / len(values)

    @property
    def accuracy(self) -> float | None:
        return self.mean("likelihood")

    def to_dict(self) -> dict:
        """Accuracies, overall and per cell, under `SCORE_KEYS`: None for a method that was not run."""
        return {
            "scoring": list(self.scoring),
            "accuracy": self.accuracy,
            "exact_match": self.mean("greedy"),
            "chance": self.chance,
            "distractors": self.distractors,
            "haystack": self.haystack,
            "cells": [dataclasses.asdict(c) for c in self.cells],
        }


def run_niah(
    loglik: LogLikelihood | None,
    tokenizer: Tokenizer,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    block: int = 1,
    tasks: Sequence[str] = ("passkey",),
    distractors: int = 4,
    filler: Filler | None = None,
    haystack: str = "passage",
    seed: int = 0,
    batch_size: int = 8,
    generate: Generate | None = None,
) -> NiahResult:
    """Accuracy per (task, length, depth) cell over `trials` seeded trials, by likelihood ranking (`loglik`)
    and/or greedy exact match (`generate`). Lengths are rounded up to multiples of `block`; every trial is
    built (and every bad value reported) before the model runs."""
    if loglik is None and generate is None:
        raise ValueError("give loglik, generate or both")
    if not (lengths and depths and tasks):
        raise UserError("S-NIAH needs at least one context length, one depth and one task")
    if trials < 1:
        raise UserError(f"S-NIAH trials {trials} is not a number of trials (at least 1)")
    if distractors < 1:
        raise UserError(f"S-NIAH distractors {distractors} must be at least 1")
    for name in tasks:
        if name not in TASKS:
            raise UserError(f"unknown S-NIAH task '{name}' (available: {', '.join(TASKS)})")
    for depth in depths:
        check_depth(depth)
    grid = sorted({aligned_length(n, block) for n in lengths})
    plan = {
        (name, length, depth): [
            build_trial(
                TASKS[name],
                tokenizer,
                length,
                seed=f"{seed}/{name}/{length}/{depth}/{i}",  # str seeds hash the same in every process
                depth=depth,
                distractors=distractors,
                filler=filler,
            )
            for i in range(trials)
        ]
        for name in tasks
        for length in grid
        for depth in depths
    }
    # Scored all at once: batches then span cells of the same length (fewer, fuller model calls).
    flat = score_trials([t for cell in plan.values() for t in cell], loglik, batch_size, generate)
    cells = []
    for (name, length, depth), scores in zip(plan, _split(flat, trials), strict=True):
        cells.append(
            Cell(
                task=name,
                length=length,
                depth=float(depth),
                accuracy=_mean([s.correct for s in scores]),
                trials=len(scores),
                mean_margin=_mean([s.margin for s in scores]),
                exact_match=_mean([s.exact_match for s in scores]),
            )
        )
    scoring = tuple(s for s, fn in zip(SCORINGS, (loglik, generate), strict=True) if fn is not None)
    return NiahResult(cells, distractors, haystack, scoring)


def _mean(values: Sequence[float | bool | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _split(items: list[TrialScore], size: int) -> list[list[TrialScore]]:
    return [items[k : k + size] for k in range(0, len(items), size)]


def ttt_block(learner: MetaLearner) -> int:
    """The granularity lengths must respect: b when the inner loop runs, else any length works."""
    ttt, model = learner.ttt, learner.model
    return ttt.mini_batch_size if ttt.enabled and model.config.suffix_len else 1


def learner_loglik(
    learner: MetaLearner,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> LogLikelihood:
    """The model's per-token log-likelihoods, computed through the MetaLearner as in `evaluate`: the
    inner loop adapts to the haystack, and each answer token is scored before its mini-batch's update."""
    config = learner.model.config

    @torch.no_grad()
    def loglik(tokens: torch.Tensor) -> torch.Tensor:
        from ttt.data.loader import split_tokens

        inputs, targets = (t.to(device) for t in split_tokens(tokens, config.vocab_size))
        ttt = learner.ttt
        if ttt_block(learner) == 1:  # no inner loop: the loss chunk is free, one per sequence
            ttt = dataclasses.replace(ttt, mini_batch_size=inputs.shape[1])
        was_training = learner.training
        learner.eval()
        try:
            with autocast():
                _, out = learner(inputs, targets, loss_mask=targets != config.bos_token_id, ttt=ttt)
        finally:
            learner.train(was_training)
        return -out.token_nll.float().cpu()

    return loglik
