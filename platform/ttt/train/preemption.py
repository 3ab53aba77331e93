"""Stopping a run on request (preemption, eviction, node drain, `kubectl delete`, Ctrl-C) without losing
the work: finish the step in flight, write a checkpoint, end the MLflow run so that the next attempt
continues it, and exit with EXIT_PREEMPTED.

Who may ask, and how the request reaches every rank:
* a signal (SIGTERM, SIGINT) to the training process, or to the driver of a distributed run, which passes
  it on through a marker in the run directory (its workers may be on other machines); rank 0 watches it;
* a pod's preStop hook, through `$TTT_STOP_DIR/stop` on the pod's own disk, which every process of the
  pod looks at once per step. The hook then waits, within the pod's termination grace period, while a
  `$TTT_STOP_DIR/running-<pid>` file says that a process of the pod is still saving.
Each rank's request joins the step's all-reduce, so that all ranks stop after the same step and write
the sharded checkpoint together. A second signal stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ttt.errors import reason, warn

EXIT_PREEMPTED = 75
"""The exit status of a run stopped on request after its checkpoint (sysexits' EX_TEMPFAIL: "try
again"). The operator does not count such an attempt against backoffLimit."""
STOP_DIR_ENV = "TTT_STOP_DIR"
STOP_FILE = "stop"
MARKER_PREFIX = "stop-requested-"
"""`<run dir>/stop-requested-<token>`: the driver's request to the workers of its attempt."""


class StopRequest:
    """Whether this process has been asked to stop, and why (cheap enough to ask once per step)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.since: float | None = None
        self.step = 0
        """The step in flight (its index); the trainer keeps it current."""
        self.during: int | None = None
        """The step in flight when the request came. The run stops after it, or after the next one when
        the request missed that step's agreement point (the stop flag joins the step's all-reduce)."""
        folder = os.environ.get(STOP_DIR_ENV)
        self._file = Path(folder) / STOP_FILE if folder else None
        self._watcher: threading.Event | None = None

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason, self.since, self.during = reason, time.monotonic(), self.step
            self._event.set()

    def requested(self) -> bool:
        if not self._event.is_set() and self._file is not None and self._file.exists():
            self.set("the pod is being stopped (preStop)")
        return self._event.is_set()

    def elapsed(self) -> float:
        """Seconds since the request came (0 before)."""
        return 0.0 if self.since is None else time.monotonic() - self.since

    def remaining(self, budget_s: float) -> float:
        """Seconds left of `budget_s` since the request came."""
        return max(0.0, budget_s - self.elapsed())

    def watch(self, exists: Callable[[], bool], every_s: float, reason: str) -> None:
        """Poll `exists()` in a background thread (a marker in the run directory); a hit is a request.
        Storage errors only delay the next look."""
        stop = self._watcher = threading.Event()

        def run() -> None:
            while not stop.wait(every_s):
                with contextlib.suppress(Exception):
                    if exists():
                        self.set(reason)
                        return

        threading.Thread(target=run, name="ttt-stop-watch", daemon=True).start()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.set()


@contextlib.contextmanager
def signals_request_stop(request: StopRequest, what: str = "after the step in flight") -> Iterator[None]:
    """SIGTERM and SIGINT ask `request` to stop; a second one interrupts at once. Only the main thread
    can own signals: elsewhere (a Ray worker's training thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if request.requested():
            raise KeyboardInterrupt(f"second {name}")
        request.set(name)
        warn(f"ttt: {name}: stopping {what}; a second signal stops at once")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def running_in_pod() -> Iterator[None]:
    """While training, `$TTT_STOP_DIR/running-<pid>` tells the pod's preStop hook to wait for this process."""
    folder = os.environ.get(STOP_DIR_ENV)
    if not folder:
        yield
        return
    marker = Path(folder) / f"running-{os.getpid()}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        marker = None
    try:
        yield
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


def prestop_command(stop_dir: str, wait_s: int) -> list[str]:
    """The preStop hook of a training pod: ask, then wait (at most `wait_s`) while a process is saving."""
    d = shlex.quote(stop_dir)
    script = (
        f"mkdir -p {d} && touch {d}/{STOP_FILE}; i=0; "
        f"while [ $i -lt {int(wait_s)} ] && ls {d}/running-* >/dev/null 2>&1; do sleep 1; i=$((i+1)); done"
    )
    return ["sh", "-c", script]


def stop_marker(token: str) -> str:
    return f"{MARKER_PREFIX}{token}"


@contextlib.contextmanager
def forward_to_workers(storage, token: str) -> Iterator[StopRequest]:
    """The driver of a distributed run: a signal to it, or its pod's preStop, becomes the run directory's
    marker `stop_marker(token)`, which its workers' rank 0 watches. The marker is removed at the end."""
    from ttt.storage import failures

    request, done = StopRequest(), threading.Event()

    def forward() -> None:
        while not done.wait(0.2):
            if request.requested():
                try:
                    storage.write_bytes(stop_marker(token), (request.reason or "stop").encode())
                    return
                except failures() as exc:  # storage away: keep trying while the grace period lasts
                    warn(f"ttt: cannot ask the workers to stop yet ({reason(exc)})")
                    done.wait(2.0)

    thread = threading.Thread(target=forward, name="ttt-stop-forward", daemon=True)
    thread.start()
    with signals_request_stop(request, "once the workers have written a checkpoint"), running_in_pod():
        try:
            yield request
        finally:
            done.set()
            with contextlib.suppress(Exception):
                storage.delete(stop_marker(token))
