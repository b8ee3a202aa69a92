"""End-to-end latency at a fixed rate: tools/maze.py paced with --rate against a fresh
mbroker.py, and against maze's own replay broker (the tool's floor).

Every round starts a fresh broker on ephemeral loopback ports (a broker keeps its
sequence state when the source disconnects) and runs maze with ``--rate`` and
``--pregenerate``: the workload is built before the clock starts, so generating it never
holds up maze's loop while latencies are being taken. maze measures every notification,
from the source write that completed its SEQ prefix to the read that completed it (see
tools/README.md); its percentiles and how far the source fell behind its schedule go
into ``benchmark.extra_info``, as medians over the rounds (milliseconds), with the
per-round values kept too.

The replay broker (``maze --serve-replay``) forwards each notification as soon as the
bytes that release it have arrived, without parsing anything: the latency measured
against it is maze's own share (and the loopback's), to subtract from mbroker's.

Benchmarks measure; they assert only that maze verified every notification.
"""

from __future__ import annotations

import json
import re
import select
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import BrokerProcess, assert_maze_succeeded, run_maze

REPO_ROOT = Path(__file__).resolve().parent.parent
MAZE_PATH = REPO_ROOT / "tools" / "maze.py"
REPLAY_LISTENING = re.compile(r"events=[^\s:]+:(\d+) clients=[^\s:]+:(\d+)")
STARTUP_TIMEOUT = 60.0  # the replay broker generates the whole workload first
STOP_TIMEOUT = 30.0

FULL_ROUNDS = 3
RATES = [10_000, 100_000]  # events/s
# Seconds of paced sending per round: {True: the benchmark run, False: the smoke run}.
SENDING_SECONDS = {True: 5.0, False: 0.05}
# The smoke run keeps every wait short; the benchmark run uses maze's defaults.
QUICK_WAITS = ["--settle-ms", "50", "--grace-ms", "50"]


class ReplayBroker:
    """``maze --serve-replay`` with a run's workload settings, as a child process; it
    exits by itself once the source has closed and everything is sent."""

    def __init__(self, settings: list[str]):
        self.process = subprocess.Popen(
            [sys.executable, str(MAZE_PATH), "--serve-replay", "--eventListenerPort", "0",
             "--clientListenerPort", "0", *settings],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        readable, _, _ = select.select([self.process.stderr], [], [], STARTUP_TIMEOUT)
        match = REPLAY_LISTENING.search(self.process.stderr.readline()) if readable else None
        if match is None:
            self.close()
            raise AssertionError("the replay broker did not start")
        self.event_port, self.client_port = int(match.group(1)), int(match.group(2))

    def log(self, last: int = 50) -> str:
        return ""  # it logs nothing after its listening line

    def close(self) -> None:
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        self.process.stderr.close()


def paced_round(broker_kind: str, settings: list[str], maze_arguments: list[str],
                report_path: Path) -> dict:
    """One fresh broker, one paced maze run against it; maze's JSON report."""
    if broker_kind == "mbroker":
        broker = BrokerProcess()
    else:
        broker = ReplayBroker(settings)
    try:
        result = run_maze(*settings, *maze_arguments, "--json", str(report_path),
                          broker=broker)
        assert_maze_succeeded(result, broker if broker_kind == "mbroker" else None)
    finally:
        if broker_kind == "mbroker":
            broker.stop()
        broker.close()
    return json.loads(report_path.read_text())


@pytest.mark.benchmark(group="latency")
@pytest.mark.parametrize("broker_kind", ["mbroker", "replay"])
@pytest.mark.parametrize("rate", RATES)
def test_latency_at_a_fixed_rate(benchmark, tmp_path, full_size, rate, broker_kind):
    events = int(rate * SENDING_SECONDS[full_size])
    settings = ["--totalEvents", str(events)]
    maze_arguments = ["--rate", str(rate), "--pregenerate", "--logInterval", "0",
                      *([] if full_size else QUICK_WAITS)]
    reports: list[dict] = []

    def one_round() -> None:
        reports.append(paced_round(broker_kind, settings, maze_arguments,
                                   tmp_path / f"round-{len(reports)}.json"))

    benchmark.pedantic(one_round, rounds=FULL_ROUNDS if full_size else 1)

    def milliseconds(values) -> float:
        return round(statistics.median(values) * 1000, 3)

    latencies = [report["latency"] for report in reports]
    senders = [report["sender"] for report in reports]
    benchmark.extra_info.update({
        "broker": broker_kind,
        "rate": rate,
        "events": events,
        "notifications": reports[0]["notifications"],
        **{f"{key}_ms": milliseconds(latency[key] for latency in latencies)
           for key in ("p50", "p90", "p99", "p999", "max")},
        "p99_ms_rounds": [round(latency["p99"] * 1000, 3) for latency in latencies],
        "achieved_events_per_second": round(statistics.median(
            sender["achieved_events_per_second"] or 0 for sender in senders)),
        "max_lag_ms": milliseconds(sender["max_lag_seconds"] for sender in senders),
        "final_lag_ms": milliseconds(sender["final_lag_seconds"] for sender in senders),
    })
    assert all(latency["count"] == report["notifications"]
               for latency, report in zip(latencies, reports, strict=True))
