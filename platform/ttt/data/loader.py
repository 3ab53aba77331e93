"""Samples and batches (spec §6): sample k is tokens[k·T : (k+1)·T + 1], so consecutive samples overlap by
one token; inputs are the first T, targets the last T. Training order is a permutation per epoch drawn
from (seed, epoch); global batch s takes positions [s·B, (s+1)·B) of that order whatever the number of
workers, and each rank reads its contiguous slice. The position (global batches consumed) is all a
checkpoint needs to resume the exact order.
"""

from __future__ import annotations

import numpy as np
import torch

from ttt.data.streams import DataError, TokenStream


class Samples:
    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len
        self.count = (len(stream) - 1) // seq_len if len(stream) > 0 else 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return self.stream[start : start + self.seq_len + 1]


class TrainBatches:
    """Shuffled, sharded, resumable: `batch(position)` is a pure function of the position."""

    def __init__(self, samples: Samples, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by {world_size} workers")
        if len(samples) < global_batch:
            raise DataError(
                f"the '{samples.stream.name}' stream holds {len(samples)} samples of "
                f"{samples.seq_len + 1} tokens, fewer than one global batch of {global_batch}"
            )
        self.samples = samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self._epoch: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.samples)))
        return self._epoch[1]

    def indices(self, position: int) -> list[int]:
        first = position * self.global_batch + self.rank * self.local_batch
        n = len(self.samples)
        return [int(self._order(i // n)[i % n]) for i in range(first, first + self.local_batch)]

    def batch(self, position: int) -> torch.Tensor:
        """[local batch, T + 1] token ids of global batch number `position`."""
        return torch.from_numpy(np.stack([self.samples[i] for i in self.indices(position)]))


def validation_batches(
    samples: Samples, count: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """The first `count` windows in order (fewer if the split is shorter), this rank's share, batched."""
    if len(samples) == 0:
        raise DataError(
            f"the '{samples.stream.name}' stream is shorter than one sample of {samples.seq_len + 1} tokens"
        )
    usable = min(count, len(samples))
    usable = max(usable - usable % world_size, world_size)  # the same number of windows on every rank
    mine = [i % len(samples) for i in range(usable)][rank::world_size]
    return [
        torch.from_numpy(np.stack([samples[i] for i in mine[k : k + batch_size]]))
        for k in range(0, len(mine), batch_size)
    ]


def split_tokens(tokens: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, T+1] → inputs [b, T], targets [b, T]; ids outside the vocabulary are a data error, not a crash."""
    top = int(tokens.max())
    if top >= vocab_size or int(tokens.min()) < 0:
        raise DataError(f"token id {top} is outside the model's vocabulary of {vocab_size}")
    return tokens[:, :-1], tokens[:, 1:]
