"""Files under a local directory or an s3:// prefix, with the same small interface.

Writes are atomic: a local file is written beside its target and renamed over it (rename is atomic on one
file system); an S3 object becomes visible only once its upload has completed. So a reader never sees a
partial file. S3 credentials, region and endpoint come from the standard AWS variables (AWS_ENDPOINT_URL
for S3-compatible stores); transient S3 errors are retried with exponential backoff by botocore
(`retry_settings`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ttt.errors import UserError


class StorageError(UserError):
    """A storage location cannot be used; the message says which and why."""


def cache_dir() -> Path:
    """This machine's cache of remote things (datasets from S3, journals of S3 run directories)."""
    return Path(os.environ.get("TTT_CACHE_DIR") or Path.home() / ".cache" / "ttt-platform")


def failures() -> tuple[type[BaseException], ...]:
    """What a read or write that did not happen raises: the local disk (full, read-only, gone) or S3
    (after botocore's retries: refused, timed out, throttled, a transfer cut off)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (OSError, StorageError, BotoCoreError, ClientError, Boto3Error)


def open_storage(uri: str) -> Storage:
    if uri.startswith("s3://"):
        return S3Storage(uri)
    if "://" in uri:
        raise StorageError(f"unsupported storage URI '{uri}': use a local path or s3://bucket/prefix")
    return LocalStorage(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


class Storage:
    uri: str

    def write_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Names of the files directly under `prefix` (relative to it), sorted."""
        raise NotImplementedError

    def list_recursive(self, prefix: str = "") -> list[str]:
        """Paths of every file below `prefix` (relative to it), sorted."""
        raise NotImplementedError

    def local_path(self) -> Path | None:
        """The directory on this machine, for local storage; None for object storage."""
        return None

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def download(self, name: str, dest: Path) -> None:
        raise NotImplementedError

    def upload(self, src: Path, name: str) -> None:
        raise NotImplementedError

    def check_writable(self) -> None:
        raise NotImplementedError

    def describe(self, name: str = "") -> str:
        return join(self.uri, name) if name else self.uri


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(root)

    def _path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def write_bytes(self, name: str, data: bytes) -> None:
        self._write_atomic(self._path(name), lambda fh: fh.write(data))

    @staticmethod
    def _write_atomic(path: Path, fill) -> None:
        """Write beside the target, then rename over it: readers see the old file or the whole new one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _copy_atomic(self, src: Path, dest: Path) -> None:
        def fill(fh) -> None:
            with open(src, "rb") as source:
                shutil.copyfileobj(source, fh, length=16 << 20)

        self._write_atomic(dest, fill)

    def read_bytes(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def list(self, prefix: str = "") -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.endswith(".partial"))

    def list_recursive(self, prefix: str = "") -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        files = (p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".partial"))
        return sorted(str(p.relative_to(folder)) for p in files)

    def local_path(self) -> Path | None:
        return self.root

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def download(self, name: str, dest: Path) -> None:
        self._copy_atomic(self._path(name), Path(dest))

    def upload(self, src: Path, name: str) -> None:
        self._copy_atomic(Path(src), self._path(name))

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-probe-"):
                pass
        except OSError as exc:
            raise StorageError(f"cannot write to '{self.root}': {exc.strerror or exc}") from None


S3_ATTEMPTS = 10
"""Attempts per S3 request unless AWS_MAX_ATTEMPTS says otherwise: with botocore's standard backoff
(exponential with jitter, at most 20 s apart) an outage of about a minute is carried through."""


def retry_settings() -> dict[str, Any]:
    """botocore's own retries: its retry mode (standard unless AWS_RETRY_MODE says `adaptive`, which adds
    client-side rate limiting for a throttling bucket) retries throttling, 5xx answers, timeouts and refused
    connections; the attempt count is ours unless AWS_MAX_ATTEMPTS is set."""
    return {} if os.environ.get("AWS_MAX_ATTEMPTS") else {"total_max_attempts": S3_ATTEMPTS}


class S3Storage(Storage):
    def __init__(self, uri: str):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"'{uri}' names no bucket: use s3://bucket/prefix")
        self.uri = uri.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", config=Config(retries=retry_settings(), connect_timeout=10))
        return self._client

    def _key(self, name: str) -> str:
        return "/".join(p for p in (self.prefix, name.strip("/")) if p)

    def write_bytes(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(self.describe(name)) from None

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        base = self._key(prefix)
        base = f"{base}/" if base else ""
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, Delimiter="/"
        ):
            names += [obj["Key"][len(base) :] for obj in page.get("Contents", [])]
        return sorted(names)

    def list_recursive(self, prefix: str = "") -> list[str]:
        base = self._key(prefix)
        base = f"{base}/" if base else ""
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            names += [obj["Key"][len(base) :] for obj in page.get("Contents", [])]
        return sorted(names)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def download(self, name: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(name), str(dest))

    def upload(self, src: Path, name: str) -> None:
        self.client.upload_file(str(src), self.bucket, self._key(name))

    def check_writable(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise StorageError(f"cannot use bucket '{self.bucket}' ({code}) for {self.uri}") from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot reach S3 for {self.uri}: {exc}") from None
