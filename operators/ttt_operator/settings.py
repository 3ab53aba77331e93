"""Operator settings, read once from the environment (the Helm chart sets them from its values)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ttt.errors import UserError

DEFAULT_IMAGE = "ttt-platform/ttt:0.1.0"


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty: all of them."""
    default_image: str = DEFAULT_IMAGE
    """Training image of TTTJobs that name none."""
    mlflow_tracking_uri: str | None = None
    """MLflow server the runs log to (the chart's in-cluster server, or an external one)."""
    storage_uri: str = "/runs"
    """Default root of runs: s3://bucket/prefix, or a path on the runs volume."""
    runs_pvc: str | None = None
    """PersistentVolumeClaim mounted at `runs_mount` in every Ray pod (when storage is a path)."""
    runs_mount: str = "/runs"
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, …); None: AWS."""
    s3_secret: str | None = None
    """Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, given to the Ray pods through envFrom."""
    image_pull_secrets: tuple[str, ...] = ()
    """Secrets the Ray pods pull their image with, unless a TTTJob names its own."""
    rayjob_ttl_seconds: int = 3600
    """How long a finished attempt's Ray pods (and their logs) stay, unless a TTTJob says otherwise."""
    ray_version: str = "2.60.0"
    poll_seconds: float = 30.0
    """How often running jobs' progress is read from their run directory."""
    retry_backoff_seconds: float = 10.0
    """A failed attempt's retry waits this long, doubled for each failure before it, ..."""
    retry_backoff_cap_seconds: float = 360.0
    """... up to this long."""
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def opt(name: str) -> str | None:
            return env.get(name) or None

        try:
            poll = float(env.get("TTT_POLL_SECONDS", cls.poll_seconds))
        except ValueError:
            raise UserError(f"TTT_POLL_SECONDS: '{env['TTT_POLL_SECONDS']}' is not a number") from None
        if poll <= 0:
            raise UserError(f"TTT_POLL_SECONDS: must be positive, got {poll}")
        backoff = {}
        for field_name, var in (
            ("retry_backoff_seconds", "TTT_RETRY_BACKOFF_SECONDS"),
            ("retry_backoff_cap_seconds", "TTT_RETRY_BACKOFF_CAP_SECONDS"),
        ):
            try:
                backoff[field_name] = float(env.get(var) or getattr(cls, field_name))
            except ValueError:
                raise UserError(f"{var}: '{env[var]}' is not a number of seconds") from None
            if not 0 <= backoff[field_name] < float("inf"):
                raise UserError(f"{var}: must be a finite number of seconds, at least 0, got {env[var]}")
        namespaces = tuple(n.strip() for n in env.get("TTT_OPERATOR_NAMESPACES", "").split(",") if n.strip())
        try:
            ttl = int(env.get("TTT_RAYJOB_TTL_SECONDS") or cls.rayjob_ttl_seconds)
        except ValueError:
            raise UserError(
                f"TTT_RAYJOB_TTL_SECONDS: '{env['TTT_RAYJOB_TTL_SECONDS']}' is not a whole number"
            ) from None
        if ttl < 0:
            raise UserError(f"TTT_RAYJOB_TTL_SECONDS: must not be negative, got {ttl}")
        pull = tuple(n.strip() for n in env.get("TTT_IMAGE_PULL_SECRETS", "").split(",") if n.strip())
        return cls(
            namespaces=namespaces,
            default_image=env.get("TTT_DEFAULT_IMAGE") or DEFAULT_IMAGE,
            mlflow_tracking_uri=opt("TTT_MLFLOW_TRACKING_URI"),
            storage_uri=env.get("TTT_STORAGE_URI") or cls.storage_uri,
            runs_pvc=opt("TTT_RUNS_PVC"),
            runs_mount=env.get("TTT_RUNS_MOUNT") or cls.runs_mount,
            s3_endpoint_url=opt("TTT_S3_ENDPOINT_URL"),
            s3_secret=opt("TTT_S3_SECRET"),
            image_pull_secrets=pull,
            rayjob_ttl_seconds=ttl,
            ray_version=env.get("TTT_RAY_VERSION") or cls.ray_version,
            poll_seconds=poll,
            **backoff,
            log_level=env.get("TTT_LOG_LEVEL") or cls.log_level,
        )
