"""Storage: atomic local writes, URI checks, and the S3 client's retry policy."""

from __future__ import annotations

import pytest

from ttt.storage import S3_ATTEMPTS, LocalStorage, S3Storage, StorageError, open_storage


def test_local_writes_are_atomic_and_listed_without_partials(tmp_path):
    storage = LocalStorage(tmp_path / "run")
    storage.write_bytes("checkpoints/a.pt", b"complete")
    (tmp_path / "run" / "checkpoints" / ".b.pt.123.partial").write_bytes(b"cut off")
    assert storage.list("checkpoints") == ["a.pt"]
    assert storage.read_bytes("checkpoints/a.pt") == b"complete"
    assert not list((tmp_path / "run" / "checkpoints").glob(".a.pt*"))  # no temporary left behind


def test_unusable_locations_are_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="cannot write to"):
        LocalStorage(tmp_path / "file" / "runs").check_writable()
    with pytest.raises(StorageError, match="use a local path or s3://bucket/prefix"):
        open_storage("gs://bucket/runs")
    with pytest.raises(StorageError, match="names no bucket"):
        open_storage("s3:///runs")


def test_s3_client_retries_transient_errors_with_backoff(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    storage = S3Storage("s3://bucket/runs/a")
    assert (storage.bucket, storage.prefix) == ("bucket", "runs/a")
    retries = storage.client.meta.config.retries
    assert retries["mode"] == "standard"  # exponential backoff with jitter on throttling, 5xx, timeouts
    assert retries["total_max_attempts"] == S3_ATTEMPTS == 10

    # The standard AWS settings choose when they are set (botocore's own precedence, not ours).
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    retries = S3Storage("s3://bucket/runs/a").client.meta.config.retries
    assert (retries["mode"], retries["total_max_attempts"]) == ("adaptive", 3)
