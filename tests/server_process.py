"""A real `jaxserve serve` subprocess on localhost for end-to-end tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from jaxserve.client import Client, JaxServeError

STARTUP_TIMEOUT = 300  # seconds: loading + compiling every bucket on a cold 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, *args: str, env: dict | None = None, port: int | None = None):
        self.model, self.args, self.env = model, args, env
        self.port, self.metrics_port = port or free_port(), free_port()  # port: e.g. a restart on the same one
        self.address = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="jaxserve-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "jaxserve.cli", "--log-level", "INFO", "serve", "--model", model,
               "--port", str(self.port), "--metrics-port", str(self.metrics_port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with Client(self.address, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    if client.health() == "SERVING":
                        return
                except JaxServeError:
                    pass
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start in {STARTUP_TIMEOUT} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        """The same command on the same port (after kill or stop)."""
        again = ServerProcess(self.model, *self.args, env=self.env, port=self.port)
        self.proc, self.log, self.metrics_port = again.proc, again.log, again.metrics_port

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_until_idle(client: Client, timeout: float = 30):
    """Polls server info until nothing runs or waits and every page is free; returns the info."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.server_info()
        idle = info.running_requests == 0 and info.waiting_requests == 0 and info.pages_free == info.pages_total
        if idle or time.monotonic() > deadline:
            return info
        time.sleep(0.2)
