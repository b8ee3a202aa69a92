"""End-to-end throughput over loopback: mbroker.py and tools/maze.py, each in its own
process.

Every round starts a fresh broker on ephemeral ports (a broker keeps its sequence state
when the source disconnects, so it cannot serve two maze runs), runs maze against it in
pre-generated mode, reads the broker's CPU time and peak RSS from /proc while it is
still up, and stops it with SIGINT.

What is timed is the transfer alone: maze's own measure, from the first event byte
written to the last notification verified (the "seconds" of its --json report), not the
maze process around it (start-up, pre-generation, connecting the clients, the settle
and grace periods). That time is measured in another process, so these benchmarks give
pytest-benchmark a timer of their own (``@pytest.mark.benchmark(timer=...)``):
``transfer_clock``, which stands still except when a round adds the transfer seconds
maze reported. pytest-benchmark reads the timer just before and just after each round,
so a round's time, and every statistic and ``--benchmark-compare`` built on it, is the
transfer. The rates in extra_info come from the same seconds.

A last benchmark measures maze alone against its in-process discarding sink, to show
that the load tool is not what limits the end-to-end figures.
"""

from __future__ import annotations

import json
import resource
import statistics
from pathlib import Path

import pytest

from tests.harness import BrokerProcess, assert_maze_succeeded, run_maze

FULL_ROUNDS = 3
# Descriptors beyond one per client: listeners, the source, the selector, std streams,
# the interpreter's own files.
SPARE_FILES = 256

# Sizes are keyed by full_size: {True: the benchmark run, False: the smoke run}.

# 1,000,000 events at the harness defaults otherwise (100 clients of 1,000 users,
# batches up to 100, \r\n).
DEFAULT_EVENTS = {True: 1_000_000, False: 50_000}

# Many clients and ten times the default share of broadcasts (2% instead of 0.2%): each
# broadcast is a notification for every client, so this is the fan-out case.
MANY_CLIENTS = {True: 10_000, False: 1_000}
MANY_CLIENTS_EVENTS = {True: 50_000, False: 10_000}
BROADCAST_HEAVY_MIX = "F=350,U=150,B=20,P=250,S=230"

SINK_EVENTS = {True: 2_000_000, False: 100_000}


_transfer_seconds = [0.0]  # the transfer clock's reading


def transfer_clock() -> float:
    """pytest-benchmark's timer for these benchmarks: the seconds of transfer
    that maze runs have reported so far (see the module docstring)."""
    return _transfer_seconds[0]


def clock_transfer(report: dict) -> None:
    """Advance the transfer clock by a maze run's transfer time."""
    _transfer_seconds[0] += report["seconds"]


def skip_unless_open_files_allowed(needed: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files per process but the hard RLIMIT_NOFILE is "
                    f"{hard}; raise it (ulimit -Hn, limits.conf) to run this benchmark")


class EndToEndRound:
    """One fresh broker and one maze run against it."""

    def __init__(self, report_path: Path, open_files: int):
        self.report_path = report_path
        self.open_files = open_files
        self.broker = BrokerProcess(open_files=open_files)
        self.report: dict | None = None
        self.broker_cpu_seconds = 0.0
        self.broker_peak_rss_mb = 0.0

    def drive(self, maze_arguments: list[str]) -> None:
        """One maze run; what it times is the transfer it reports (transfer_clock)."""
        result = run_maze("--pregenerate", "--logInterval", "0",
                          "--json", str(self.report_path), *maze_arguments,
                          broker=self.broker, open_files=self.open_files)
        assert_maze_succeeded(result, self.broker)
        self.report = json.loads(self.report_path.read_text())
        clock_transfer(self.report)

    def finish(self) -> None:
        """Read the broker's usage, then stop it; safe to call twice."""
        if self.broker.process.poll() is None:
            self.broker_cpu_seconds, self.broker_peak_rss_mb = self.broker.usage()
        exit_code = self.broker.stop()
        assert exit_code == 0, (f"the broker exited {exit_code} on SIGINT:\n"
                                f"{self.broker.log(last=50)}")


def run_end_to_end(benchmark, tmp_path: Path, record_rates, maze_arguments: list[str],
                   rounds: int, clients: int) -> None:
    open_files = clients + SPARE_FILES
    skip_unless_open_files_allowed(open_files)
    started: list[EndToEndRound] = []

    def fresh_round():
        # Untimed: a broker for this round alone, up and listening before maze starts.
        end_to_end_round = EndToEndRound(tmp_path / f"maze-round-{len(started)}.json",
                                         open_files)
        started.append(end_to_end_round)
        return (end_to_end_round, maze_arguments), {}

    try:
        benchmark.pedantic(EndToEndRound.drive, setup=fresh_round,
                           teardown=lambda end_to_end_round, _: end_to_end_round.finish(),
                           rounds=rounds)
        # pytest-benchmark skips teardown when benchmarks are disabled (the smoke run).
        for end_to_end_round in started:
            end_to_end_round.finish()
    finally:
        for end_to_end_round in started:
            end_to_end_round.broker.close()

    reports = [end_to_end_round.report for end_to_end_round in started]
    events, notifications = reports[0]["events"], reports[0]["notifications"]
    # Same seed, same workload: every round must have carried the same counts.
    assert all((report["events"], report["notifications"]) == (events, notifications)
               for report in reports), reports
    record_rates(events, notifications, [report["seconds"] for report in reports])
    broker_cpu = statistics.median(r.broker_cpu_seconds for r in started)
    benchmark.extra_info.update({
        "clients": clients,
        "broker_cpu_seconds": round(broker_cpu, 2),
        "events_per_broker_cpu_second": round(events / broker_cpu) if broker_cpu else None,
        "broker_peak_rss_mb": round(max(r.broker_peak_rss_mb for r in started), 1),
        "maze_cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in reports), 2),
    })


@pytest.mark.benchmark(group="end-to-end", timer=transfer_clock)
def test_end_to_end_default_settings(benchmark, tmp_path, full_size, record_rates):
    arguments = ["--totalEvents", str(DEFAULT_EVENTS[full_size])]
    run_end_to_end(benchmark, tmp_path, record_rates, arguments,
                   rounds=FULL_ROUNDS if full_size else 1, clients=100)


@pytest.mark.benchmark(group="end-to-end", timer=transfer_clock)
def test_end_to_end_many_clients_broadcast_heavy(benchmark, tmp_path, full_size,
                                                 record_rates):
    clients = MANY_CLIENTS[full_size]
    arguments = ["--totalEvents", str(MANY_CLIENTS_EVENTS[full_size]),
                 "--concurrencyLevel", str(clients), "--mix", BROADCAST_HEAVY_MIX]
    run_end_to_end(benchmark, tmp_path, record_rates, arguments,
                   rounds=FULL_ROUNDS if full_size else 1, clients=clients)


@pytest.mark.benchmark(group="load-tool", timer=transfer_clock)
def test_load_tool_ceiling_pregenerated_sink(benchmark, tmp_path, full_size, record_rates):
    """maze --sink --pregenerate: its sending ceiling, with no broker and no clients."""
    total_events = SINK_EVENTS[full_size]
    reports: list[dict] = []

    def run_sink():
        report_path = tmp_path / f"sink-round-{len(reports)}.json"
        result = run_maze("--sink", "--pregenerate", "--totalEvents", str(total_events),
                          "--logInterval", "0", "--json", str(report_path))
        assert_maze_succeeded(result)
        reports.append(json.loads(report_path.read_text()))
        clock_transfer(reports[-1])

    benchmark.pedantic(run_sink, rounds=FULL_ROUNDS if full_size else 1)
    assert all(report["events"] == total_events for report in reports)
    record_rates(total_events, 0, [report["seconds"] for report in reports])
