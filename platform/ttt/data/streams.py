"""Token streams on disk: a dataset is a folder (or s3:// prefix) with one 1-D stream of token ids per split.

Formats: `<split>.npy` (memory-mapped) or a zarr array `<split>/` (the official implementation's format),
plus an optional `meta.json` written by `ttt data prepare` (tokenizer, vocabulary, BOS id). Streams on S3
are copied once into the local cache (TTT_CACHE_DIR, default ~/.cache/ttt-platform) and read from there.
`bundled:stdlib` names the byte-level corpus built from the Python standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ttt.errors import UserError
from ttt.storage import S3Storage, StorageError, cache_dir, open_storage

BUNDLED = "bundled:"


class DataError(UserError):
    """The dataset cannot be used; the message names it and says why."""


@dataclass
class TokenStream:
    """A 1-D array of token ids (np.memmap or zarr array); slices come back as int64."""

    name: str
    array: Any

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.asarray(self.array[item], dtype=np.int64)


@dataclass
class Dataset:
    location: str
    local: Path
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> TokenStream:
        npy, zarr_dir = self.local / f"{name}.npy", self.local / name
        if npy.is_file():
            try:
                array = np.load(npy, mmap_mode="r")
            except ValueError as exc:
                raise DataError(f"{self.location}: {name}.npy is not a readable .npy file ({exc})") from None
        elif (zarr_dir / "zarr.json").is_file() or (zarr_dir / ".zarray").is_file():
            import zarr

            array = zarr.open(str(zarr_dir), mode="r")
        else:
            raise DataError(
                f"{self.location} has no '{name}' stream (expected {name}.npy or a zarr array {name}/)"
            )
        if len(array.shape) != 1 or not np.issubdtype(array.dtype, np.integer):
            raise DataError(
                f"{self.location}: '{name}' must be a 1-D integer stream, got {array.dtype}{array.shape}"
            )
        return TokenStream(name, array)


def open_dataset(location: str, splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """A local folder, an s3:// prefix (cached locally) or `bundled:<name>`."""
    if location.startswith(BUNDLED):
        from ttt.data.corpus import bundled_corpus

        local = bundled_corpus(location[len(BUNDLED) :])
    elif location.startswith("s3://"):
        local = _fetch_s3(location, splits)
    else:
        local = Path(location)
        if local.is_file():  # e.g. one of its streams, train.npy, named instead of the folder
            raise DataError(
                f"data.path: '{location}' is a file, not a dataset directory (a folder of train/val streams)"
            )
        if not local.is_dir():
            raise DataError(f"data.path: '{location}' does not exist (run `ttt data prepare` to make one)")
    meta_file = local / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return Dataset(location, local, meta)


def _fetch_s3(location: str, splits: tuple[str, ...]) -> Path:
    storage = S3Storage(location)
    dest = cache_dir() / "s3" / storage.bucket / storage.prefix
    try:
        top = storage.list()
        for name in splits:
            target = dest / f"{name}.npy"
            if f"{name}.npy" in top:
                if not target.is_file():
                    _atomic_download(storage, f"{name}.npy", target)
            elif not (dest / name).is_dir():
                files = storage.list_recursive(name)
                if not files:
                    continue  # reported as a missing split when it is opened
                dest.mkdir(parents=True, exist_ok=True)  # the folder is assembled beside its final place,
                tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest))  # so the rename stays on one disk
                for rel in files:
                    storage.download(f"{name}/{rel}", tmp / rel)
                os.replace(tmp, dest / name)
        if "meta.json" in top:
            _atomic_download(storage, "meta.json", dest / "meta.json")
    except StorageError as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:  # botocore errors: no credentials, no bucket, unreachable endpoint
        raise DataError(f"data.path: cannot read dataset {location}: {exc}") from None
    if not dest.is_dir():
        if storage.prefix and _is_object(storage):
            raise DataError(f"data.path: '{location}' is an object, not a prefix of a dataset's streams")
        raise DataError(f"data.path: '{location}' has no streams")
    return dest


def _is_object(storage: S3Storage) -> bool:
    """The prefix is itself an object's key (s3://bucket/data/train.npy instead of s3://bucket/data)."""
    try:
        return storage.exists("")
    except Exception:  # no access to say: report what is missing instead
        return False


def _atomic_download(storage: S3Storage, name: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".partial")
    os.close(fd)
    try:
        storage.download(name, Path(tmp))
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_dataset(folder: Path, splits: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write streams and meta.json into a new folder, atomically (renamed into place when complete)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, tokens in splits.items():
            np.save(tmp / f"{name}.npy", tokens)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_dataset(local: Path, uri: str) -> None:
    """Copy a prepared folder to storage; meta.json goes last, so a complete dataset is marked by it."""
    storage = open_storage(uri)
    storage.check_writable()
    files = sorted(p for p in local.iterdir() if p.is_file() and p.name != "meta.json")
    for path in [*files, local / "meta.json"]:
        storage.upload(path, path.name)
