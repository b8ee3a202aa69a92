"""Shared fixtures: a broker on ephemeral loopback ports, in a thread or a
process, and small socket helpers whose every wait is bounded."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mbroker  # noqa: E402

WAIT = 5.0  # the longest any single test wait may take
LISTENING = re.compile(rb"events=[^\s:]+:(\d+) clients=[^\s:]+:(\d+)")


class RunningBroker:
    """A Broker serving on its own thread; state is read via snapshot()."""

    def __init__(self, **options):
        options.setdefault("event_port", 0)
        options.setdefault("client_port", 0)
        self.broker = mbroker.Broker(mbroker.BrokerConfig(**options))
        self.broker.bind()
        self.event_port = self.broker.event_port
        self.client_port = self.broker.client_port
        self.thread = threading.Thread(target=self.broker.serve_forever, daemon=True)
        self.thread.start()

    def stats(self) -> dict:
        return self.broker.snapshot(timeout=WAIT, top_clients=None)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.broker.request_stop()
            self.thread.join(WAIT)
            assert not self.thread.is_alive(), "broker thread did not stop"


@pytest.fixture
def start_broker():
    """Factory: start_broker(max_pending=10, ...) -> RunningBroker."""
    started: list[RunningBroker] = []

    def start(**options) -> RunningBroker:
        running = RunningBroker(**options)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def broker(start_broker) -> RunningBroker:
    return start_broker()


class BrokerProcess:
    """`python mbroker.py` in a child process, on ephemeral ports."""

    def __init__(self, *arguments: str):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "mbroker.py"), "--host", "127.0.0.1", *arguments,
             "0", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr_lines: list[bytes] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for line in list(self.stderr_lines):
                match = LISTENING.search(line)
                if match:
                    self.event_port, self.client_port = map(int, match.groups())
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.process.kill()
        raise AssertionError(f"broker did not start: {self.stderr_text()}")

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line)

    def stderr_text(self) -> str:
        return b"".join(self.stderr_lines).decode(errors="replace")

    def stop(self, signum: int = 2, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(WAIT)


@pytest.fixture
def start_broker_process():
    """Factory: start_broker_process("--max-line", "100") -> BrokerProcess."""
    started: list[BrokerProcess] = []

    def start(*arguments: str) -> BrokerProcess:
        running = BrokerProcess(*arguments)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(WAIT)
        running.process.stdout.close()
        running.process.stderr.close()


def connect_client(port: int, user_id: int | bytes, wait_registered: RunningBroker | None = None
                   ) -> socket.socket:
    """Connect a user client and send its id; optionally wait until registered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    hello = user_id if isinstance(user_id, bytes) else f"{user_id}\r\n".encode()
    sock.sendall(hello)
    if wait_registered is not None:
        wait_until(lambda: any(c.user_id == int(hello.strip() or 0) for c in
                               wait_registered.stats().top_clients))
    return sock


def connect_source(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def wait_until(condition, timeout: float = WAIT, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def receive_exactly(sock: socket.socket, size: int, timeout: float = WAIT) -> bytes:
    """Read until `size` bytes arrived (or fail after timeout)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < size:
        if time.monotonic() > deadline:
            break
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def assert_nothing_more(sock: socket.socket, wait: float = 0.2) -> None:
    sock.settimeout(wait)
    try:
        extra = sock.recv(65536)
    except TimeoutError:
        return
    assert extra == b"", f"unexpected extra bytes: {extra!r}"
