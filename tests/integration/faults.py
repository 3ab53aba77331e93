"""What the drills do to the services: an MLflow server stopped and started again on the same store and
port, and a TCP proxy that takes a server away (connections refused, transfers in flight cut) and brings
it back with its data intact, as an S3 endpoint behind a load balancer does during an outage.

(moto keeps its objects in memory, so stopping the moto process itself would lose them, which a real S3
outage does not: the proxy stands for the outage, moto for the store.)"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.integration.hosts import Host
from tests.integration.services import BIN, free_port, stop, wait_for


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and proxied artifacts under `base`; or on
    `host`, one of the drills' network hosts (tests.integration.hosts), at its address."""

    def __init__(self, base: Path, port: int | None = None, host: Host | None = None):
        self.base = Path(base)
        self.host = host
        self.port = port or (5000 if host else free_port())
        self.uri = f"http://{host.address if host else '127.0.0.1'}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._shm_before: set[Path] = set()

    def start(self, seconds: float = 90) -> float:
        """Start and wait until it answers; returns how long that took."""
        began = time.monotonic()
        self.base.mkdir(parents=True, exist_ok=True)
        shm = Path("/dev/shm")
        self._shm_before |= set(shm.iterdir()) if shm.is_dir() else set()
        command = [
            str(BIN / "mlflow"),
            "server",
            "--host",
            self.host.address if self.host else "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.base / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.base / "artifacts"),
        ]
        if self.host:
            command = self.host.command(command)
        with open(self.base / "server.log", "ab") as log:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        if self.host:
            self.host.call(wait_for, f"{self.uri}/health", self.proc, seconds)
        else:
            wait_for(f"{self.uri}/health", self.proc, seconds=seconds)
        return time.monotonic() - began

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None
        # The server keeps its job queue in a temporary folder under /dev/shm and leaves it there.
        shm = Path("/dev/shm")
        for folder in (set(shm.iterdir()) - self._shm_before) if shm.is_dir() else ():
            with contextlib.suppress(OSError):
                if any(p.name.endswith(".mlflow-huey-store") for p in folder.iterdir()):
                    shutil.rmtree(folder, ignore_errors=True)


class TcpProxy:
    """127.0.0.1:`port` forwarded to 127.0.0.1:`target`. `down()` closes the listening socket and every
    connection (clients see refused connections and cut transfers); `up()` listens again on the same port.
    `cut_when(pattern, seconds)` goes down the first time a request containing `pattern` passes, and comes
    back after `seconds` (None: when `up()` is called). `delay_s` holds every chunk that long (a far
    server)."""

    def __init__(self, target: int, delay_s: float = 0.0):
        self.target = target
        self.delay_s = delay_s
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._trigger: tuple[bytes, float | None] | None = None
        self.cuts: list[float] = []
        """When each outage began (monotonic)."""

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, set()
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def cut_when(self, pattern: bytes, seconds: float | None) -> None:
        self._trigger = (pattern, seconds)

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, inspect: bool) -> None:
        try:
            while data := src.recv(65536):
                if inspect and self._trigger and self._trigger[0] in data:
                    _, seconds = self._trigger
                    self._trigger = None
                    self.cuts.append(time.monotonic())
                    self.down()  # the request never reaches the server
                    if seconds is not None:
                        threading.Timer(seconds, self.up).start()
                    return
                if self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
