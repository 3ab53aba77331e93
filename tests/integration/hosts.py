"""Two machines on one: network namespaces joined by a veth pair, each with one address (needs root; CI runs
as root). A process started in a host sees only that host's network, so a Ray node there is a node of its
own, and killing every process of the namespace is losing that machine. The file system stays shared, as
it is between the containers of one pod, which is why the drills keep their runs on S3.

The test process itself stays outside; `Host.call` runs a function on a thread that has joined the host's
network namespace (a namespace is per thread on Linux), so the test reaches the host's servers directly."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
INTERFACE = "ttt0"  # the same name on both hosts, as every pod has its eth0
T = TypeVar("T")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    netns: str
    address: str
    _thread: ThreadPoolExecutor | None = field(default=None, repr=False)

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def popen(self, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(self.command(argv), stdout=out, stderr=subprocess.STDOUT, env=env)

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, text=True, env=env, timeout=timeout)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30)
        return [int(pid) for pid in out.stdout.split()]

    def power_off(self, seconds: float = 30.0) -> int:
        """SIGKILL every process of the host, as when a machine is lost; returns how many there were."""
        killed: set[int] = set()
        deadline = time.monotonic() + seconds
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.1)
        if self.pids():
            raise RuntimeError(f"processes of {self.netns} survived SIGKILL for {seconds} s")
        return len(killed)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a thread inside this host's network."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, f"in-{self.netns}", initializer=self._enter)
        return self._thread.submit(fn, *args, **kwargs).result()

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.netns} failed")
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Namespaces `ttt<pid>a` and `ttt<pid>b`, 10.X.Y.1 and .2 on the two ends of one veth pair, and
    loopback up in each. Nothing outside the two namespaces is touched; teardown kills what runs in them."""
    tag = f"ttt{os.getpid()}"
    subnet = f"10.{random.randint(64, 250)}.{random.randint(0, 250)}"
    a, b = Host(f"{tag}a", f"{subnet}.1"), Host(f"{tag}b", f"{subnet}.2")
    made: list[Host] = []
    try:
        for host in (a, b):
            _ip("netns", "add", host.netns)
            made.append(host)
            _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip(
            "link",
            "add",
            INTERFACE,
            "netns",
            a.netns,
            "type",
            "veth",
            "peer",
            "name",
            INTERFACE,
            "netns",
            b.netns,
        )
        for host in (a, b):
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", INTERFACE)
            _ip("-n", host.netns, "link", "set", INTERFACE, "up")
        yield a, b
    finally:
        for host in made:
            host.close()
            with contextlib.suppress(RuntimeError):
                host.power_off()
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
