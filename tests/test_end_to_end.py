"""End to end: the real broker (mbroker.py) under load from tools/maze.py.

Each test starts a fresh broker on ephemeral ports (``0 0``: a broker keeps its sequence
state across source connections, so every maze run needs its own broker), reads the
ports from its "listening events=... clients=..." log line, runs maze against it and
stops it with SIGINT.
"""

from __future__ import annotations

import collections
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MAZE_PATH = REPO_ROOT / "tools" / "maze.py"
SUCCESS_LINE = "\\o/ ALL NOTIFICATIONS RECEIVED \\o/"
LISTENING = re.compile(r"events=[^\s:]+:(\d+) clients=[^\s:]+:(\d+)")
STARTUP_TIMEOUT = 15
STOP_TIMEOUT = 15
MAZE_TIMEOUT = 120


class RunningBroker:
    """mbroker.py as a subprocess; its stderr is drained by a thread so that the broker
    never blocks on a full pipe, and the last lines are kept for failure messages."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "mbroker.py", "--host", "127.0.0.1", "0", "0"],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace")
        self.recent_lines: collections.deque[str] = collections.deque(maxlen=50)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        self.event_port, self.client_port = self._wait_for_ports()

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.recent_lines.append(line.rstrip("\n"))
            self.lines.put(line)
        self.lines.put(None)

    def _wait_for_ports(self) -> tuple[int, int]:
        try:
            while True:
                line = self.lines.get(timeout=STARTUP_TIMEOUT)
                if line is None:
                    break
                match = LISTENING.search(line)
                if match:
                    return int(match.group(1)), int(match.group(2))
        except queue.Empty:
            pass
        self.kill()
        raise AssertionError("the broker did not log its listening ports:\n" + self.log())

    def log(self) -> str:
        return "\n".join(self.recent_lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)

    def stop(self) -> int:
        """SIGINT, then a bounded wait for a clean exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the broker did not stop within "
                                 f"{STOP_TIMEOUT} s of SIGINT:\n{self.log()}") from None
        finally:
            self.reader.join(STOP_TIMEOUT)


@pytest.fixture
def broker():
    running = RunningBroker()
    try:
        yield running
    finally:
        running.kill()


def run_maze_against(broker: RunningBroker, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(MAZE_PATH),
               "--eventListenerPort", str(broker.event_port),
               "--clientListenerPort", str(broker.client_port),
               "--concurrencyLevel", "100", "--timeout", "10000", "--logInterval", "0",
               *arguments]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=MAZE_TIMEOUT)


def assert_all_notifications_received(broker: RunningBroker, *arguments: str) -> None:
    result = run_maze_against(broker, *arguments)
    exit_code = broker.stop()
    details = (f"maze stdout:\n{result.stdout}\nmaze stderr:\n{result.stderr}\n"
               f"broker log (last lines):\n{broker.log()}")
    assert result.returncode == 0, details
    assert SUCCESS_LINE in result.stdout.splitlines(), details
    assert exit_code == 0, "the broker did not exit 0 on SIGINT\n" + details


def test_broker_delivers_every_notification_for_100k_shuffled_crlf_events(broker):
    assert_all_notifications_received(broker, "--totalEvents", "100000",
                                      "--maxEventSourceBatchSize", "100")


def test_broker_delivers_every_notification_for_lf_terminated_events(broker):
    assert_all_notifications_received(broker, "--totalEvents", "100000",
                                      "--maxEventSourceBatchSize", "100",
                                      "--terminator", "lf", "--randomSeed", "7")


def test_broker_reorders_batches_of_up_to_10000_events(broker):
    assert_all_notifications_received(broker, "--totalEvents", "100000",
                                      "--maxEventSourceBatchSize", "10000",
                                      "--randomSeed", "42")
