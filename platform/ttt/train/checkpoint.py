"""Checkpoints: one file per save holding everything a resume needs (model, optimizer, scheduler, data
position, RNG states, step, config, MLflow run id), under <run dir>/checkpoints/ on local disk or S3.

A checkpoint is a single object written atomically (see ttt.storage), so a crash mid-save leaves the
previous checkpoints intact and no partial one that could be loaded.
"""

from __future__ import annotations

import io
import random
import re

import numpy as np
import torch

from ttt.errors import UserError
from ttt.storage import Storage, join, open_storage

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")
FORMAT = 1


class CheckpointError(UserError):
    pass


def checkpoint_name(step: int) -> str:
    return f"{FOLDER}/step-{step:08d}.pt"


class Checkpointer:
    def __init__(self, storage: Storage, keep: int):
        self.storage = storage
        self.keep = keep

    def steps(self) -> list[int]:
        return sorted(int(m.group(1)) for n in self.storage.list(FOLDER) if (m := _NAME.match(n)))

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, payload: dict, step: int) -> str:
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, **payload}, buffer)
        self.storage.write_bytes(checkpoint_name(step), buffer.getvalue())
        for old in self.steps()[: -self.keep]:
            self.storage.delete(checkpoint_name(old))
        return self.storage.describe(checkpoint_name(step))

    def load(self, step: int) -> dict:
        return _decode(
            self.storage.read_bytes(checkpoint_name(step)), self.storage.describe(checkpoint_name(step))
        )


def _decode(data: bytes, where: str) -> dict:
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {where} is corrupt or unreadable ({type(exc).__name__})") from None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != FORMAT
        or not {"model", "config", "state"} <= set(payload)
    ):
        raise CheckpointError(f"{where} is not a ttt-platform checkpoint")
    return payload


def load_checkpoint(uri: str) -> dict:
    """A checkpoint file, or a run directory (its newest checkpoint), local or s3://."""
    if uri.endswith(".pt"):
        parent, _, name = uri.rpartition("/")
        storage = open_storage(parent or ".")
        try:
            return _decode(storage.read_bytes(name), uri)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {uri} does not exist") from None
    checkpointer = Checkpointer(open_storage(uri), keep=1)
    step = checkpointer.latest()
    if step is None:
        raise CheckpointError(f"no checkpoint under {join(uri, FOLDER)}")
    return checkpointer.load(step)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": np.random.get_state()[2],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
