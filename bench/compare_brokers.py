#!/usr/bin/env python3
"""Compare broker versions end to end, alternating runs in one session.

    git show c80411c:mbroker.py > /tmp/mbroker_before.py
    python bench/compare_brokers.py /tmp/mbroker_before.py mbroker.py --runs 3

Each run starts the given broker file on ephemeral loopback ports, drives it
with `tools/maze.py --pregenerate` (1,000,000 events at the harness defaults
unless told otherwise), checks that maze verified every notification, and
reads the broker's CPU time and peak RSS from /proc before stopping it. Runs
alternate between the brokers, because this machine is shared and noisy: a
ratio of medians taken side by side means more than two numbers taken apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"events=[^\s:]+:(\d+) clients=[^\s:]+:(\d+)")
START_TIMEOUT = 15.0
RUN_TIMEOUT = 600.0


def broker_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS in bytes) of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu, peak


def run_once(broker_file: str, events: int, maze_arguments: list[str]) -> dict:
    broker = subprocess.Popen(
        [sys.executable, broker_file, "--host", "127.0.0.1", "0", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = broker.stderr.readline()  # the first line is the listening line
        match = LISTENING.search(line)
        if not match:
            raise RuntimeError(f"{broker_file} did not start: {line!r}")
        event_port, client_port = match.groups()
        with tempfile.NamedTemporaryFile(suffix=".json") as report_file:
            maze = subprocess.run(
                [sys.executable, str(ROOT / "tools" / "maze.py"),
                 "--eventListenerPort", event_port, "--clientListenerPort", client_port,
                 "--totalEvents", str(events), "--pregenerate", "--logInterval", "0",
                 "--json", report_file.name, *maze_arguments],
                capture_output=True, text=True, timeout=RUN_TIMEOUT)
            if maze.returncode != 0:
                raise RuntimeError(f"maze failed against {broker_file}:\n"
                                   f"{maze.stdout[-2000:]}{maze.stderr[-2000:]}")
            report = json.loads(Path(report_file.name).read_text())
        cpu, peak = broker_usage(broker.pid)
        return {"events_per_second": report["events_per_second"], "broker_cpu": cpu,
                "peak_rss_mb": peak / 2**20}
    finally:
        broker.send_signal(signal.SIGINT)
        try:
            broker.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(START_TIMEOUT)
        broker.stderr.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("brokers", nargs="+", help="broker files to compare (the first is the "
                                                   "baseline)")
    parser.add_argument("--runs", type=int, default=3, help="runs per broker")
    parser.add_argument("--events", type=int, default=1_000_000, help="events per run")
    parser.add_argument("--maze-args", default="",
                        help='extra arguments for tools/maze.py, e.g. "--terminator lf"')
    arguments = parser.parse_args()
    maze_arguments = shlex.split(arguments.maze_args)
    results: dict[str, list[dict]] = {broker: [] for broker in arguments.brokers}
    for run in range(1, arguments.runs + 1):
        for broker in arguments.brokers:
            result = run_once(broker, arguments.events, maze_arguments)
            results[broker].append(result)
            print(f"run {run}  {broker}: {result['events_per_second']:,.0f} events/s, "
                  f"broker CPU {result['broker_cpu']:.2f} s, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    baseline = statistics.median(r["events_per_second"] for r in results[arguments.brokers[0]])
    for broker, runs in results.items():
        median = statistics.median(r["events_per_second"] for r in runs)
        cpu = statistics.median(r["broker_cpu"] for r in runs)
        print(f"median  {broker}: {median:,.0f} events/s (x{median / baseline:.2f}), "
              f"broker CPU {cpu:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
