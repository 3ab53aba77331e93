"""Checkpoints under <run dir>/checkpoints/, on local disk or S3, holding everything a resume needs:
model, optimizer, scheduler, data position, RNG states, step, config, MLflow run id.

Two layouts, one per engine:
* single process: `step-N.pt`, one object written atomically (see ttt.storage);
* DeepSpeed: `step-N/` with every rank's shards and `ttt.pt` (full weights, config, state), then the
  marker `step-N.complete`, written last by rank 0 once all uploads are done.
Only `.pt` files and `.complete` markers are listed as checkpoints, so an upload cut off halfway is never
loaded. A save that storage refuses (a full disk, S3 away beyond botocore's retries) raises
`CheckpointNotWritten` on every rank and leaves nothing that counts; the trainer goes on and tries again
at the next checkpoint step.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ttt.config import JobConfig
from ttt.errors import UserError, reason
from ttt.storage import Storage, failures, join, open_storage

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.(pt|complete)$")
FORMAT = 1


class CheckpointError(UserError):
    pass


class CheckpointNotWritten(Exception):
    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint at step {step} not written ({reason})")


def checkpoint_name(step: int) -> str:
    return f"{FOLDER}/step-{step:08d}.pt"


def tag(step: int) -> str:
    return f"step-{step:08d}"


class Found(NamedTuple):
    """A complete checkpoint in the run directory, and which layout it has."""

    step: int
    sharded: bool

    @property
    def name(self) -> str:
        return f"{FOLDER}/{tag(self.step)}" + ("" if self.sharded else ".pt")


class Checkpointer:
    def __init__(self, storage: Storage, keep: int):
        self.storage = storage
        self.keep = keep

    def index(self) -> dict[int, str]:
        """One listing of the folder: step → "pt" or "complete" (cut-off uploads have neither)."""
        return {int(m.group(1)): m.group(2) for n in self.storage.list(FOLDER) if (m := _NAME.match(n))}

    def newest(self) -> Found | None:
        index = self.index()
        if not index:
            return None
        step = max(index)
        return Found(step, index[step] == "complete")

    def latest(self) -> int | None:
        found = self.newest()
        return None if found is None else found.step

    def describe(self, found: Found) -> str:
        return self.storage.describe(found.name)

    # -- single process ----------------------------------------------------------------------------

    def save(self, payload: dict, step: int) -> str:
        try:
            self.storage.write_bytes(checkpoint_name(step), encode(payload))  # atomic: all or nothing
        except failures() as exc:
            raise CheckpointNotWritten(step, reason(exc)) from None
        self._prune()
        return self.describe(Found(step, sharded=False))

    def load(self, found: Found) -> dict:
        if found.sharded:
            raise CheckpointError(
                f"{self.describe(found)} was written by DeepSpeed; resume with scale.zero_stage set"
            )
        return _decode(self.storage.read_bytes(found.name), self.describe(found))

    # -- DeepSpeed (collective: every rank calls these) --------------------------------------------

    def save_sharded(self, engine, meta: dict, step: int) -> str:
        folder = f"{FOLDER}/{tag(step)}"
        why = None
        shards = engine.save_shards(tag(step))
        try:
            for path in sorted(shards.iterdir()):
                self.storage.upload(path, f"{folder}/{path.name}")
        except failures() as exc:
            why = reason(exc)
        finally:
            shutil.rmtree(shards.parent, ignore_errors=True)
        model = engine.full_model_state()  # collective under ZeRO-3: every rank takes part
        if engine.rank == 0 and why is None:
            try:
                self.storage.write_bytes(f"{folder}/ttt.pt", encode({"model": model, **meta}))
            except failures() as exc:
                why = reason(exc)
        # Every rank's files are up, or none of this counts (the all-reduce is also the barrier).
        if engine.all_true(why is None) and engine.rank == 0:
            try:
                files = self.storage.list(folder)
                self.storage.write_bytes(f"{folder}.complete", json.dumps({"files": files}).encode())
            except failures() as exc:
                why = reason(exc)
            else:
                self._prune()
        if not engine.all_true(why is None):
            if engine.rank == 0:
                self._remove_files(folder)
            raise CheckpointNotWritten(step, why or "another rank could not upload its shards")
        return self.describe(Found(step, sharded=True))

    def load_sharded(self, engine, found: Found) -> dict:
        if not found.sharded:
            raise CheckpointError(
                f"{self.describe(found)} is a single-process checkpoint; resume without ZeRO"
            )
        where, step = self.describe(found), found.step
        folder = Path(tempfile.mkdtemp(prefix="ttt-resume-"))
        try:
            for name in json.loads(self.storage.read_bytes(f"{FOLDER}/{tag(step)}.complete"))["files"]:
                self.storage.download(f"{FOLDER}/{tag(step)}/{name}", folder / tag(step) / name)
            payload = _decode((folder / tag(step) / "ttt.pt").read_bytes(), where)
            try:
                engine.load_shards(folder, tag(step))
            except (RuntimeError, KeyError, ValueError) as exc:
                raise CheckpointError(f"{where} cannot be loaded: {str(exc).splitlines()[0]}") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return payload

    def _prune(self) -> None:
        try:
            index = self.index()
            for old in sorted(index)[: -self.keep]:
                if index[old] == "pt":
                    self.storage.delete(checkpoint_name(old))
                else:
                    # unmark first, then remove the files
                    self.storage.delete(f"{FOLDER}/{tag(old)}.complete")
                    self._remove_files(f"{FOLDER}/{tag(old)}")
        except failures():
            pass  # an old checkpoint too many for now: the next save prunes again

    def _remove_files(self, folder: str) -> None:
        try:
            for name in self.storage.list(folder):
                self.storage.delete(f"{folder}/{name}")
        except failures():
            pass  # never counted without its marker; pruned or overwritten later


def encode(payload: dict) -> bytes:
    """The bytes of a checkpoint file: `payload` (at least model, config, state) and the format version."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    return buffer.getvalue()


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
    """Weights, config and state of a checkpoint file, or of a run directory's newest checkpoint (either
    layout), local or s3:// (no optimizer state for DeepSpeed checkpoints)."""
    if uri.endswith(".pt"):
        parent, _, name = uri.rpartition("/")
        storage = open_storage(parent or ".")
        try:
            return _decode(storage.read_bytes(name), uri)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {uri} does not exist") from None
    checkpointer = Checkpointer(open_storage(uri), keep=1)
    found = checkpointer.newest()
    if found is None:
        raise CheckpointError(f"no checkpoint under {join(uri, FOLDER)}")
    if not found.sharded:
        return checkpointer.load(found)
    name = f"{found.name}/ttt.pt"
    return _decode(checkpointer.storage.read_bytes(name), checkpointer.storage.describe(name))


def checkpoint_job(payload: dict, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """The job config a checkpoint was trained with, for use on this machine: the attention kernels go back
    to 'auto' (they compute the same function; one pinned to Triton on a GPU would not run on a CPU)."""
    job = JobConfig.from_dict(payload["config"])
    return job.with_overrides(["model.prefix_kernel=auto", "model.chunk_kernel=auto", *overrides])


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
