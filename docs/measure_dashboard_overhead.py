#!/usr/bin/env python3
"""Measure what `mbroker --dashboard` costs: maze throughput with and without it.

    python docs/measure_dashboard_overhead.py                 # 3 runs each, 1,000,000 events
    python docs/measure_dashboard_overhead.py --runs 5 --json /tmp/overhead.json

Each run starts a fresh broker (`python mbroker.py --host 127.0.0.1 0 0`, plus
`--dashboard` every other run) whose stdout is a pseudo-terminal of --columns x
--rows, so that --dashboard draws its live view rather than the status line;
this process drains the terminal on a thread (both modes get the same
terminal). Then `tools/maze.py --totalEvents N --pregenerate --json ...` is run
against it, and its events/s is the run's number. Runs alternate without/with,
to spread the drift of a shared machine over both; every raw number is
printed, then the medians and their ratio. The broker's own CPU time during
the maze run (from /proc) is reported too: on a busy machine it is steadier
than throughput.

Loopback only, ephemeral ports; every wait is bounded (broker start, maze run,
broker stop), and a broker that does not stop on SIGINT is killed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "mbroker.py"
MAZE = ROOT / "tools" / "maze.py"
LISTENING = re.compile(r"listening events=([\d.]+):(\d+) clients=([\d.]+):(\d+)")
SUCCESS_LINE = "\\o/ ALL NOTIFICATIONS RECEIVED \\o/"
DRAWING = re.compile(r"dashboard: \d+ frames drawn in ([\d.]+) s of CPU")
START_TIMEOUT = 15.0  # seconds for the broker's "listening" line
STOP_TIMEOUT = 15.0  # seconds for the broker to exit on SIGINT (its drain is 5 s)


class Terminal:
    """A pseudo-terminal of a given size whose output is read and counted on a thread."""

    def __init__(self, columns: int, rows: int):
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.bytes_read = 0
        self.tail = b""
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:  # EIO: every slave end is closed
                return
            if not data:
                return
            self.bytes_read += len(data)
            self.tail = (self.tail + data)[-(1 << 16):]

    def close_slave(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        self.close_slave()
        self._reader.join(5)
        os.close(self.master)


def start_broker(dashboard: bool, terminal: Terminal,
                 program: Path = BROKER) -> tuple[subprocess.Popen, int, int, list]:
    command = [sys.executable, str(program), "--host", "127.0.0.1", "0", "0"]
    if dashboard:
        command.append("--dashboard")
    environment = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    environment["TERM"] = "xterm-256color"
    broker = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=terminal.slave,
                              stderr=subprocess.PIPE, env=environment, cwd=ROOT)
    terminal.close_slave()  # the broker holds the only slave end now
    ports: list[int] = []
    found = threading.Event()
    log_lines: list[str] = []

    def read_log() -> None:  # keeps draining stderr after the ports are known
        for raw in broker.stderr:
            line = raw.decode(errors="replace").rstrip()
            log_lines.append(line)
            match = LISTENING.search(line)
            if match and not found.is_set():
                ports.extend((int(match.group(2)), int(match.group(4))))
                found.set()

    threading.Thread(target=read_log, daemon=True).start()
    if not found.wait(START_TIMEOUT):
        stop_broker(broker)
        raise RuntimeError(f"no listening line within {START_TIMEOUT:g} s: {log_lines[-5:]}")
    return broker, ports[0], ports[1], log_lines


def stop_broker(broker: subprocess.Popen) -> int:
    if broker.poll() is None:
        broker.send_signal(signal.SIGINT)
        try:
            broker.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(STOP_TIMEOUT)
    return broker.returncode


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(dashboard: bool, arguments: argparse.Namespace, workdir: Path, index: int) -> dict:
    terminal = Terminal(arguments.columns, arguments.rows)
    report_path = workdir / f"run{index}.json"
    broker = None
    try:
        broker, event_port, client_port, log_lines = start_broker(dashboard, terminal,
                                                                  arguments.broker)
        time.sleep(arguments.settle)  # past start-up: imports, the first frames
        cpu_before = cpu_seconds(broker.pid)
        command = [sys.executable, str(MAZE), "--host", "127.0.0.1",
                   "--eventListenerPort", str(event_port),
                   "--clientListenerPort", str(client_port),
                   "--totalEvents", str(arguments.events), "--pregenerate",
                   "--logInterval", "0", "--json", str(report_path)]
        maze = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=arguments.maze_timeout, cwd=ROOT)
        broker_cpu = cpu_seconds(broker.pid) - cpu_before
        if maze.returncode != 0 or SUCCESS_LINE not in maze.stdout:
            raise RuntimeError(f"maze failed (exit {maze.returncode}):\n"
                               f"{maze.stdout[-2000:]}{maze.stderr[-2000:]}")
        report = json.loads(report_path.read_text())
        broker_cpu_total = cpu_seconds(broker.pid)
    finally:
        if broker is not None:
            stop_broker(broker)
        terminal.close()
    # The broker times its own frames and logs the total when it stops: the
    # share of its CPU that drawing took, free of the machine's noise.
    drawing = 0.0
    for line in log_lines:
        match = DRAWING.search(line)
        if match:
            drawing = float(match.group(1))
    return {"dashboard": dashboard, "events_per_second": report["events_per_second"],
            "seconds": report["seconds"], "broker_cpu_seconds": broker_cpu,
            "terminal_bytes": terminal.bytes_read, "drawing_cpu_seconds": drawing,
            "drawing_share": drawing / broker_cpu_total if broker_cpu_total else 0.0,
            "warnings": sum(" WARNING " in line for line in log_lines)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs with, and runs without")
    parser.add_argument("--events", type=int, default=1_000_000, help="maze --totalEvents")
    parser.add_argument("--columns", type=int, default=80, help="terminal width")
    parser.add_argument("--rows", type=int, default=30, help="terminal height")
    parser.add_argument("--broker", type=Path, default=BROKER,
                        help="the mbroker.py to run (e.g. a copy, while the tree is edited)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds between the broker's listening line and starting maze")
    parser.add_argument("--maze-timeout", type=float, default=300.0,
                        help="seconds one maze run may take before it is abandoned")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    arguments = parser.parse_args()
    if arguments.runs < 1 or arguments.events < 1:
        parser.error("--runs and --events must be at least 1")

    results = []
    with tempfile.TemporaryDirectory(prefix="mbroker-overhead-") as directory:
        for index in range(2 * arguments.runs):
            dashboard = index % 2 == 1  # without, with, without, with, ...
            started = time.monotonic()
            result = run_once(dashboard, arguments, Path(directory), index)
            results.append(result)
            print(f"run {index + 1:2d}  {'with   ' if dashboard else 'without'} dashboard  "
                  f"{result['events_per_second']:>9,.0f} events/s  "
                  f"{result['seconds']:5.2f} s  broker cpu {result['broker_cpu_seconds']:5.2f} s  "
                  f"terminal {result['terminal_bytes']:>9,} B  "
                  f"drawing {100 * result['drawing_share']:4.1f}% of broker CPU  "
                  f"({time.monotonic() - started:.0f} s wall)", flush=True)

    def median(dashboard: bool) -> float:
        return statistics.median(r["events_per_second"] for r in results
                                 if r["dashboard"] == dashboard)

    def median_cpu(dashboard: bool) -> float:
        return statistics.median(r["broker_cpu_seconds"] for r in results
                                 if r["dashboard"] == dashboard)

    without, with_ = median(False), median(True)
    ratio = with_ / without
    cpu_without, cpu_with = median_cpu(False), median_cpu(True)
    shares = [r["drawing_share"] for r in results if r["dashboard"]]
    print(f"drawing took {100 * statistics.median(shares):.1f}% of the broker's CPU "
          f"(median over the runs with the dashboard)")
    print(f"median without dashboard: {without:,.0f} events/s  broker cpu {cpu_without:.2f} s")
    print(f"median with dashboard:    {with_:,.0f} events/s  broker cpu {cpu_with:.2f} s")
    print(f"ratio with/without: throughput {ratio:.3f} ({(ratio - 1) * 100:+.1f}%), "
          f"broker cpu {cpu_with / cpu_without:.3f}")
    if arguments.json:
        arguments.json.write_text(json.dumps(
            {"runs": results, "median_without": without, "median_with": with_,
             "ratio": ratio, "median_cpu_without": cpu_without, "median_cpu_with": cpu_with,
             "events": arguments.events,
             "terminal": [arguments.columns, arguments.rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
