#!/usr/bin/env python3
"""Measure the durable log: a primary, its edges and Redis, end to end.

    python3 bench/log_measurements.py memory     # Redis memory over a 10,000,000-event run
    python3 bench/log_measurements.py lag        # an edge's extra latency over the primary's
    python3 bench/log_measurements.py fanout     # 10,000 clients: one primary, or it and 2 edges
    python3 bench/log_measurements.py follow     # per event: primary, serving edge, idle edge
    python3 bench/log_measurements.py redis      # Redis's CPU and bytes for 1 edge, then 4
    python3 bench/log_measurements.py hiredis    # redis-py's C reply parser: does it pay?

Each subcommand starts a fresh redis-server (the dev extra's, see
tests/redis_server.py) in a temporary directory, and fresh brokers
(`mbroker.py --log ...`, `mbroker.py --edge --log ...`) on ephemeral
loopback ports for every run, each run on a log key of its own; it drives
them with tools/maze.py, which verifies every notification byte for byte,
reads CPU time from /proc, and prints tables. Runs of the setups being
compared alternate, because this machine is shared and noisy, and the
summaries are medians. docs/several-brokers.md has the results and what
follows from them.

CPU seconds come from /proc (whole processes, and a broker's main thread
apart from the one thread that talks to Redis); Redis's own come from its
INFO (cpu, stats, commandstats). follow, redis and hiredis run the primary
with a --snapshot-every past the run's end: unpaced, a primary with no
clients of its own gets more than a snapshot interval ahead of an edge that
serves clients, and that edge then reloads from the snapshot and its
clients miss events (pass --snapshot-every 100000 to see it). hiredis
installs hiredis into a directory of its own (pip install --target) and
puts it on the brokers' PYTHONPATH for the runs with it, so this
environment is never changed.

--broker PATH runs another copy of mbroker.py (say, one taken with
`git show HEAD:mbroker.py > /tmp/mbroker.py`, so that edits to the working
tree during a long run do not change what is measured); --json PATH also
writes every run's numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import itertools
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, bench/ is on sys.path and the root is not
    sys.path.insert(0, str(ROOT))

from tests.harness import (  # noqa: E402
    MBROKER_PATH,
    BrokerProcess,
    assert_maze_succeeded,
    cpu_seconds,
    rss_kib,
    run_maze,
)

MIB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_KEY = "mbroker:events"  # the broker's --log-key default
MAZE_LONG_TIMEOUT = 3600.0  # seconds for one maze run, the 10,000,000-event one included
SPARE_FILES = 1000  # descriptors beyond one per client (listeners, Redis, std streams...)
BROADCAST_HEAVY_MIX = "F=350,U=150,B=20,P=250,S=230"  # as bench/test_end_to_end_throughput.py
CLOSED_LINE = re.compile(r"\) closed: [^;]*; (\d+) notifications sent")
RUN_TOKENS = itertools.count(1)


# -- readings -----------------------------------------------------------------------------


def thread_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the process, of its main thread): the rest is its other
    threads' (a broker's log writer or reader, the one thread it starts)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2:].split()
    return cpu_seconds(pid), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def maps_mention(pid: int, name: str) -> bool:
    """Whether a shared object whose path contains name is loaded in pid."""
    with open(f"/proc/{pid}/maps") as maps:
        return any(name in line for line in maps)


def median(values) -> float:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[str(header) for header in headers]] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(cell.rjust(width) if index and _numeric(cell) else
                               cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                     .rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,.]+( ?(ms|s|MiB|MB|%|x))?|nan|-", cell))


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


# -- processes ----------------------------------------------------------------------------


class Session:
    """One redis-server for a subcommand, and the broker file and its interpreter
    environment; cleans everything up on exit."""

    def __init__(self, broker: Path, cleanup: contextlib.ExitStack):
        from tests.redis_server import RedisServer

        self.broker = broker
        directory = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mbroker-log-"))
        self.redis = RedisServer(Path(directory))
        cleanup.callback(self.redis.close)
        self.client = self.redis.client()
        self.brokers: list[BrokerProcess] = []
        cleanup.callback(self._close_brokers)

    def new_key(self) -> str:
        return f"bench:{os.getpid()}:{next(RUN_TOKENS)}"

    def forget(self, key: str) -> None:
        """Delete a finished run's log, so that runs do not add up in Redis."""
        self.client.delete(key, f"{key}:snapshot")

    def primary(self, key: str, *extra: str, open_files: int | None = None,
                pythonpath: str | None = None) -> BrokerProcess:
        return self._start(["--log", self.redis.url, "--log-key", key, *extra], ("0", "0"),
                           open_files, pythonpath)

    def edge(self, key: str, open_files: int | None = None,
             pythonpath: str | None = None) -> BrokerProcess:
        return self._start(["--edge", "--log", self.redis.url, "--log-key", key], ("0",),
                           open_files, pythonpath)

    def _start(self, arguments: list[str], ports: tuple[str, ...], open_files: int | None,
               pythonpath: str | None) -> BrokerProcess:
        with extra_pythonpath(pythonpath):
            broker = BrokerProcess(*arguments, ports=ports, script=self.broker,
                                   open_files=open_files)
        self.brokers.append(broker)
        return broker

    def stop(self, *brokers: BrokerProcess) -> list[str]:
        """Stop the brokers (SIGINT, a clean stop); their WARNING and ERROR lines."""
        problems = []
        for broker in brokers:
            code = broker.stop()
            problems += [line for line in broker.lines if " WARNING " in line or
                         " ERROR " in line]
            if code != 0:
                problems.append(f"broker {broker.pid} exited with {code}")
            broker.close()
            self.brokers.remove(broker)
        return problems

    def _close_brokers(self) -> None:
        for broker in self.brokers:
            broker.close()

    def redis_cpu(self) -> float:
        """redis-server's CPU seconds, as it counts them (microseconds, not ticks)."""
        return self.redis_counters()["cpu"]

    def redis_counters(self) -> dict:
        """Redis's own counters: CPU seconds, bytes in and out over the network, and
        per command its calls and the microseconds spent executing them."""
        info = self.client.info("everything")
        counters = {"cpu": info["used_cpu_sys"] + info["used_cpu_user"],
                    "net_in": info["total_net_input_bytes"],
                    "net_out": info["total_net_output_bytes"]}
        for name in ("xadd", "xread", "xrevrange", "xtrim", "set", "get", "xrange"):
            stats = info.get(f"cmdstat_{name}", {})
            counters[f"{name}_calls"] = stats.get("calls", 0)
            counters[f"{name}_usec"] = stats.get("usec", 0)
        return counters

    def redis_counters_since(self, before: dict) -> dict:
        after = self.redis_counters()
        return {name: after[name] - before[name] for name in after}


@contextlib.contextmanager
def extra_pythonpath(directory: str | None):
    """PYTHONPATH=directory for the children started inside (hiredis's overlay)."""
    if directory is None:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = directory + (os.pathsep + before if before else "")
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def maze(event_port: int, client_ports: list[int], *arguments: str,
         open_files: int | None = None, timeout: float = MAZE_LONG_TIMEOUT,
         brokers: tuple[BrokerProcess, ...] = ()) -> dict:
    """Run tools/maze.py to success and return its JSON report."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report_file:
        result = run_maze("--eventListenerPort", str(event_port), "--clientListenerPort",
                          ",".join(map(str, client_ports)), "--logInterval", "0",
                          "--json", report_file.name, *arguments,
                          open_files=open_files, timeout=timeout)
        try:
            assert_maze_succeeded(result, brokers[0] if brokers else None)
        except AssertionError as failure:
            logs = "".join(f"\nbroker {broker.pid} (last lines):\n{broker.log(last=20)}"
                           for broker in brokers[1:])
            raise RuntimeError(f"maze failed:\n{str(failure)[-6000:]}{logs}") from None
        return json.loads(Path(report_file.name).read_text())


def notifications_sent(broker: BrokerProcess, clients: int, timeout: float = 120.0) -> int:
    """What the broker says it sent its clients, summed from their close lines
    (one per client, logged at INFO when maze disconnects); waits for all of
    them, so that the broker has finished with the run."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [int(match.group(1)) for match in map(CLOSED_LINE.search, list(broker.lines))
                  if match]
        if len(counts) >= clients or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if len(counts) != clients:
        raise RuntimeError(f"broker {broker.pid} logged {len(counts)} client closes, "
                           f"expected {clients}")
    return sum(counts)


def describe_broker(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size + path.read_bytes()).hexdigest()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    return f"{path} (git blob {digest[:12]}; repository HEAD {head or '?'})"


def print_problems(problems: list[str]) -> None:
    if problems:
        print(f"  broker warnings/errors ({len(problems)}):")
        for line in problems[:10]:
            print(f"    {line}")


# -- memory: Redis over a long run --------------------------------------------------------


def measure_memory(session: Session, arguments: argparse.Namespace) -> dict:
    key = DEFAULT_KEY  # the defaults, as an operator would run it
    session.forget(key)
    client = session.redis.client()
    baseline = client.info("memory")["used_memory"]
    primary = session.primary(key)
    samples: list[dict] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            try:
                memory = client.info("memory")
                samples.append({
                    "t": time.monotonic() - started,
                    "used_memory": memory["used_memory"],
                    "used_memory_rss": memory["used_memory_rss"],
                    "xlen": client.xlen(key),
                    "snapshot_bytes": client.strlen(f"{key}:snapshot"),
                    "broker_rss_mib": rss_kib(primary.pid) / 1024,
                })
            except Exception as error:  # a sample lost is reported, never fatal
                samples.append({"t": time.monotonic() - started, "error": repr(error)})
            stop.wait(arguments.interval)

    counters_before = session.redis_counters()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        report = maze(primary.event_port, [primary.client_port],
                      "--totalEvents", str(arguments.events), brokers=(primary,))
    finally:
        stop.set()
        sampler.join(10)
    cpu, peak_rss = primary.usage()
    redis = session.redis_counters_since(counters_before)
    info = client.info("memory")
    last_entry = client.xrevrange(key, count=1)
    problems = session.stop(primary)
    good = [s for s in samples if "error" not in s]
    used = [s["used_memory"] for s in good]
    quarter = max(len(used) // 4, 1)
    t = [s["t"] for s in good]
    # The slope leaves out the first quarter: the stream is still filling up there.
    slope = _slope(t[quarter:], used[quarter:]) if len(used) > 4 else float("nan")
    second_quarter, last_quarter = used[quarter:2 * quarter], used[-quarter:]
    result = {
        "events": report["events"], "notifications": report["notifications"],
        "events_per_second": report["events_per_second"], "seconds": report["seconds"],
        "broker_cpu": cpu, "broker_peak_rss_mib": peak_rss,
        "redis_baseline": baseline, "redis_used_memory_peak": info["used_memory_peak"],
        "samples": samples, "sample_errors": len(samples) - len(good),
        "used_min": min(used), "used_median": median(used), "used_max": max(used),
        "second_quarter_max": max(second_quarter), "last_quarter_max": max(last_quarter),
        "slope_bytes_per_minute": slope * 60,
        "last_entry": last_entry[0][0].decode() if last_entry else None,
        "source_bytes": report["source_bytes"], "redis": redis,
        "problems": problems,
    }
    # Flat: the last quarter of the run peaks no higher than the second quarter
    # (by 10% and 1 MiB of slack: one snapshot interval is ~1.7 MB of stream).
    result["flat"] = result["last_quarter_max"] <= result["second_quarter_max"] * 1.1 + MIB
    print_memory(result, arguments)
    return result


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if not spread:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def print_memory(result: dict, arguments: argparse.Namespace) -> None:
    good = [s for s in result["samples"] if "error" not in s]
    print(f"\nRedis memory over one run: {result['events']:,} events streamed by maze "
          f"(harness defaults), one primary with --log (defaults), sampled every "
          f"{arguments.interval:g} s ({len(good)} samples, {result['sample_errors']} failed)")
    shown = sorted({0, len(good) - 1, *range(0, len(good), max(len(good) // 12, 1))})
    print(table(["t (s)", "used_memory (MiB)", "used_memory_rss (MiB)", "XLEN",
                 "snapshot (KiB)", "broker RSS (MiB)"],
                [[f"{good[i]['t']:.1f}", f"{good[i]['used_memory'] / MIB:.2f}",
                  f"{good[i]['used_memory_rss'] / MIB:.2f}", good[i]["xlen"],
                  f"{good[i]['snapshot_bytes'] / 1024:.1f}", f"{good[i]['broker_rss_mib']:.1f}"]
                 for i in shown]))
    print()
    print(table(["what", "value"], [
        ["events/s (maze)", f"{result['events_per_second']:,.0f}"],
        ["run seconds (maze)", f"{result['seconds']:.1f}"],
        ["notifications", f"{result['notifications']:,}"],
        ["Redis used_memory before the run (MiB)", f"{result['redis_baseline'] / MIB:.2f}"],
        ["used_memory min / median / max (MiB)",
         f"{result['used_min'] / MIB:.2f} / {result['used_median'] / MIB:.2f} / "
         f"{result['used_max'] / MIB:.2f}"],
        ["used_memory first / last sample (MiB)",
         f"{good[0]['used_memory'] / MIB:.2f} / {good[-1]['used_memory'] / MIB:.2f}"],
        ["XLEN first / last sample", f"{good[0]['xlen']} / {good[-1]['xlen']}"],
        ["XLEN min / max", f"{min(s['xlen'] for s in good)} / {max(s['xlen'] for s in good)}"],
        ["max, 2nd quarter / last quarter (MiB)",
         f"{result['second_quarter_max'] / MIB:.2f} / {result['last_quarter_max'] / MIB:.2f}"],
        ["least-squares slope after the 1st quarter (KiB/min)",
         f"{result['slope_bytes_per_minute'] / 1024:+.1f}"],
        ["used_memory_rss first / last / max (MiB)",
         f"{good[0]['used_memory_rss'] / MIB:.2f} / {good[-1]['used_memory_rss'] / MIB:.2f} / "
         f"{max(s['used_memory_rss'] for s in good) / MIB:.2f}"],
        ["used_memory_peak (MiB)", f"{result['redis_used_memory_peak'] / MIB:.2f}"],
        ["broker peak RSS (MiB)", f"{result['broker_peak_rss_mib']:.1f}"],
        ["broker CPU (s)", f"{result['broker_cpu']:.1f}"],
        ["newest entry id at the end", result["last_entry"]],
        ["source bytes per event", f"{result['source_bytes'] / result['events']:.2f}"],
        ["Redis: bytes in per event", f"{result['redis']['net_in'] / result['events']:.2f}"],
        ["Redis: XADD calls, usec per call",
         f"{result['redis']['xadd_calls']:,}, "
         f"{result['redis']['xadd_usec'] / max(result['redis']['xadd_calls'], 1):.0f}"],
        ["Redis: CPU s (all of it)", f"{result['redis']['cpu']:.2f}"],
    ]))
    verdict = "FLAT" if result["flat"] else "NOT FLAT"
    print(f"\nmemory is {verdict}: the last quarter's peak used_memory "
          f"{result['last_quarter_max'] / MIB:.2f} MiB vs the second quarter's "
          f"{result['second_quarter_max'] / MIB:.2f} MiB (flat: at most 10% + 1 MiB more)")
    print_problems(result["problems"])


# -- lag: an edge's latency over the primary's ---------------------------------------------

PERCENTILES = ("p50", "p90", "p99", "p999", "max")


def measure_lag(session: Session, arguments: argparse.Namespace) -> dict:
    runs: list[dict] = []
    extra = ["--pregenerate"] if arguments.pregenerate else []
    for rate in arguments.rates:
        events = int(rate * arguments.seconds)
        for run in range(1, arguments.runs + 1):
            for placement in ("primary", "edge"):
                key = session.new_key()
                primary = session.primary(key)
                edge = session.edge(key)
                port = primary.client_port if placement == "primary" else edge.client_port
                try:
                    redis_before = session.redis_counters()
                    report = maze(primary.event_port, [port], "--totalEvents", str(events),
                                  "--rate", str(rate), *extra, brokers=(primary, edge))
                    redis = session.redis_counters_since(redis_before)
                    cpu = {"primary_cpu": cpu_seconds(primary.pid),
                           "edge_cpu": cpu_seconds(edge.pid), "redis_cpu": redis["cpu"],
                           "xadd_calls": redis["xadd_calls"],
                           "xread_calls": redis["xread_calls"]}
                finally:
                    problems = session.stop(primary, edge)
                    session.forget(key)
                latency = report["latency"]
                row = {"rate": rate, "run": run, "clients_on": placement,
                       "events": report["events"], "notifications": report["notifications"],
                       "achieved": report["sender"]["achieved_events_per_second"],
                       "sender_max_lag": report["sender"]["max_lag_seconds"],
                       **{name: latency[name] for name in PERCENTILES},
                       **cpu, "maze_cpu": report["cpu_seconds"], "problems": problems}
                runs.append(row)
                print(f"rate {rate:,}/s run {run} clients on the {placement}: "
                      + ", ".join(f"{name} {ms(row[name])} ms" for name in PERCENTILES)
                      + f"; achieved {row['achieved']:,.0f} events/s; CPU s primary "
                      f"{row['primary_cpu']:.2f}, edge {row['edge_cpu']:.2f}, maze "
                      f"{row['maze_cpu']:.2f}, redis {row['redis_cpu']:.2f}; "
                      f"{row['xadd_calls']:,} XADD, {row['xread_calls']:,} XREAD", flush=True)
                print_problems(problems)
    print_lag(runs, arguments)
    return {"runs": runs}


def print_lag(runs: list[dict], arguments: argparse.Namespace) -> None:
    generation = "pregenerated" if arguments.pregenerate else "streamed"
    print(f"\nEnd-to-end latency (ms), maze at its defaults (100 clients, 1,000 users), "
          f"paced, {arguments.seconds:g} s per run, {generation}; a primary and one edge "
          f"run in both placements")
    print(table(["rate/s", "clients on", "run", *PERCENTILES, "achieved/s", "CPU s: primary",
                 "edge", "maze", "redis", "XADD", "XREAD"],
                [[f"{r['rate']:,}", r["clients_on"], r["run"], *(ms(r[p]) for p in PERCENTILES),
                  f"{r['achieved']:,.0f}", f"{r['primary_cpu']:.2f}", f"{r['edge_cpu']:.2f}",
                  f"{r['maze_cpu']:.2f}", f"{r['redis_cpu']:.2f}", f"{r['xadd_calls']:,}",
                  f"{r['xread_calls']:,}"] for r in runs]))
    rows = []
    for rate in arguments.rates:
        medians = {placement: {p: median(r[p] for r in runs if r["rate"] == rate
                                         and r["clients_on"] == placement)
                               for p in PERCENTILES}
                   for placement in ("primary", "edge")}
        for placement in ("primary", "edge"):
            rows.append([f"{rate:,}", placement, *(ms(medians[placement][p])
                                                   for p in PERCENTILES)])
        rows.append([f"{rate:,}", "edge - primary",
                     *(ms(medians["edge"][p] - medians["primary"][p]) for p in PERCENTILES)])
    print(f"\nMedians of {arguments.runs} runs, and the edge's lag (its extra latency):")
    print(table(["rate/s", "clients on", *PERCENTILES], rows))


# -- fanout: many clients on one primary, or spread over it and two edges -------------------


def measure_fanout(session: Session, arguments: argparse.Namespace) -> dict | None:
    needed = arguments.clients + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        print(f"fanout skipped: {arguments.clients:,} clients need {needed:,} open files in "
              f"maze and in a broker, and the hard RLIMIT_NOFILE is {hard:,} (raise it, e.g. "
              f"`ulimit -Hn {needed}` as root, or pass --clients {max(hard - SPARE_FILES, 0)})")
        return None
    setups = {"primary alone": 0, f"primary + {arguments.edges} edges": arguments.edges}
    runs: list[dict] = []
    idle: list[dict] = []  # the same clients and no event: what connecting costs
    for run in range(1, arguments.runs + 1):
        for setup, edge_count in setups.items():
            runs.append(fanout_once(session, arguments, setup, edge_count, run,
                                    arguments.events))
            if arguments.connect_only:
                idle.append(fanout_once(session, arguments, setup, edge_count, run, 0))
    print_fanout(runs, idle, setups, arguments)
    return {"runs": runs, "connect_only": idle}


def fanout_once(session: Session, arguments: argparse.Namespace, setup: str, edge_count: int,
                run: int, events: int) -> dict:
    files = arguments.clients + SPARE_FILES
    key = session.new_key()
    primary = session.primary(key, open_files=files)
    edges = [session.edge(key, open_files=files) for _ in range(edge_count)]
    brokers = [primary, *edges]
    try:
        cpu_before = [cpu_seconds(broker.pid) for broker in brokers]
        redis_before = session.redis_cpu()
        report = maze(primary.event_port, [broker.client_port for broker in brokers],
                      "--totalEvents", str(events), "--concurrencyLevel",
                      str(arguments.clients), "--mix", arguments.mix, "--pregenerate",
                      open_files=files, brokers=tuple(brokers))
        per_port = report["clients_per_port"]
        sent = [notifications_sent(broker, per_port[str(broker.client_port)])
                for broker in brokers]
        cpu = [cpu_seconds(broker.pid) - before for broker, before in
               zip(brokers, cpu_before, strict=True)]
        redis_cpu = session.redis_cpu() - redis_before
    finally:
        problems = session.stop(*brokers)
        session.forget(key)
    if sum(sent) != report["notifications"]:
        problems.append(f"the brokers sent {sum(sent)} notifications, maze expected "
                        f"{report['notifications']}")
    names = ["primary"] + [f"edge {index}" for index in range(1, edge_count + 1)]
    result = {"setup": setup, "run": run, "events": report["events"],
              "notifications": report["notifications"], "seconds": report["seconds"],
              "notifications_per_second": report["notifications_per_second"],
              "events_per_second": report["events_per_second"],
              "maze_cpu": report["cpu_seconds"], "redis_cpu": redis_cpu,
              "brokers": {name: {"cpu": c, "clients": per_port[str(b.client_port)],
                                 "notifications": n,
                                 "cpu_per_million": c / (n / 1e6) if n else float("nan")}
                          for name, b, c, n in zip(names, brokers, cpu, sent, strict=True)},
              "problems": problems}
    print(f"run {run} {setup}{'' if events else ', connect only (no event)'}: "
          f"{result['notifications']:,} notifications in "
          f"{result['seconds']:.2f} s = {result['notifications_per_second']:,.0f}/s; CPU s "
          + ", ".join(f"{name} {b['cpu']:.2f}" for name, b in result["brokers"].items())
          + f", maze {result['maze_cpu']:.2f}, redis {redis_cpu:.2f}", flush=True)
    print_problems(problems)
    return result


def print_fanout(runs: list[dict], idle: list[dict], setups: dict[str, int],
                 arguments: argparse.Namespace) -> None:
    print(f"\nFan-out: {arguments.clients:,} clients, mix {arguments.mix}, "
          f"{arguments.events:,} events, --pregenerate, every broker with --log; "
          f"CPU seconds from the brokers' listening lines to their last client close")
    rows = []
    for r in runs:
        for name, b in r["brokers"].items():
            rows.append([r["setup"], r["run"], name, f"{b['clients']:,}",
                         f"{b['notifications']:,}", f"{b['cpu']:.2f}",
                         f"{b['cpu_per_million']:.2f}"])
        rows.append([r["setup"], r["run"], "maze", "", "", f"{r['maze_cpu']:.2f}", ""])
        rows.append([r["setup"], r["run"], "redis-server", "", "", f"{r['redis_cpu']:.2f}", ""])
    print(table(["setup", "run", "process", "clients", "notifications", "CPU s",
                 "CPU s / M notif."], rows))
    print(f"\nMedians of {arguments.runs} runs:")
    rows = []
    for setup in setups:
        mine = [r for r in runs if r["setup"] == setup]
        rows.append([setup, "all (maze's count)", "",
                     f"{median(r['notifications'] for r in mine):,.0f}",
                     f"{median(r['notifications_per_second'] for r in mine):,.0f}", "", ""])
        for name in mine[0]["brokers"]:
            rows.append([setup, name, f"{mine[0]['brokers'][name]['clients']:,}",
                         f"{median(r['brokers'][name]['notifications'] for r in mine):,.0f}", "",
                         f"{median(r['brokers'][name]['cpu'] for r in mine):.2f}",
                         f"{median(r['brokers'][name]['cpu_per_million'] for r in mine):.2f}"])
        rows.append([setup, "maze", "", "", "", f"{median(r['maze_cpu'] for r in mine):.2f}", ""])
        rows.append([setup, "redis-server", "", "", "",
                     f"{median(r['redis_cpu'] for r in mine):.2f}", ""])
    print(table(["setup", "process", "clients", "notifications", "notifications/s", "CPU s",
                 "CPU s / M notif."], rows))
    if not idle:
        return
    print(f"\nConnecting, greeting and closing the same clients with no event (medians of "
          f"{arguments.runs} runs), and what is left for the delivery itself:")
    rows = []
    for setup in setups:
        mine = [r for r in runs if r["setup"] == setup]
        bare = [r for r in idle if r["setup"] == setup]
        for name in mine[0]["brokers"]:
            full = median(r["brokers"][name]["cpu"] for r in mine)
            fixed = median(r["brokers"][name]["cpu"] for r in bare)
            sent = median(r["brokers"][name]["notifications"] for r in mine)
            rows.append([setup, name, f"{mine[0]['brokers'][name]['clients']:,}",
                         f"{full:.2f}", f"{fixed:.2f}", f"{full - fixed:.2f}",
                         f"{(full - fixed) / (sent / 1e6):.3f}" if sent else "-"])
        full, fixed = median(r["maze_cpu"] for r in mine), median(r["maze_cpu"] for r in bare)
        rows.append([setup, "maze", f"{arguments.clients:,}", f"{full:.2f}", f"{fixed:.2f}",
                     f"{full - fixed:.2f}", ""])
    print(table(["setup", "process", "clients", "CPU s (run)", "CPU s (connect only)",
                 "delivery CPU s", "delivery CPU s / M notif."], rows))


# -- redis: what Redis spends on one primary and several edges -------------------------------


def measure_redis(session: Session, arguments: argparse.Namespace) -> dict:
    runs: list[dict] = []
    extra = ["--pregenerate"] if arguments.pregenerate else []
    if arguments.rate:
        extra += ["--rate", str(arguments.rate)]
    for run in range(1, arguments.runs + 1):
        for edge_count in arguments.edges:
            key = session.new_key()
            primary = session.primary(key, "--snapshot-every", str(arguments.snapshot_every))
            edges = [session.edge(key) for _ in range(edge_count)]
            try:
                before = session.redis_counters()
                report = maze(primary.event_port, [edge.client_port for edge in edges],
                              "--totalEvents", str(arguments.events), *extra,
                              brokers=(primary, *edges))
                redis = session.redis_counters_since(before)
                primary_cpu = cpu_seconds(primary.pid)
                edge_cpu = [cpu_seconds(edge.pid) for edge in edges]
            finally:
                problems = session.stop(primary, *edges)
                session.forget(key)
            row = {"edges": edge_count, "run": run, "events": report["events"],
                   "source_bytes": report["source_bytes"],
                   "events_per_second": report["events_per_second"],
                   "primary_cpu": primary_cpu, "edge_cpu": edge_cpu, **redis,
                   "problems": problems}
            runs.append(row)
            print(f"run {run}, {edge_count} edge(s): {row['events_per_second']:,.0f} events/s; "
                  f"Redis CPU {redis['cpu']:.3f} s, in {redis['net_in'] / MIB:.1f} MiB, out "
                  f"{redis['net_out'] / MIB:.1f} MiB, {redis['xadd_calls']:,} XADD, "
                  f"{redis['xread_calls']:,} XREAD; primary {primary_cpu:.2f} s, edges "
                  + ", ".join(f"{cpu:.2f}" for cpu in edge_cpu) + " s CPU", flush=True)
            print_problems(problems)
    print_redis(runs, arguments)
    return {"runs": runs}


def print_redis(runs: list[dict], arguments: argparse.Namespace) -> None:
    print(f"\nRedis's share: {arguments.events:,} events at the harness defaults"
          f"{', pregenerated' if arguments.pregenerate else ', streamed'}"
          f"{f', paced at {arguments.rate:,}/s' if arguments.rate else ', unpaced'}, a "
          f"primary and E edges, the 100 clients spread over the edges, --snapshot-every "
          f"{arguments.snapshot_every:,}; Redis's own counters "
          f"(INFO cpu, stats, commandstats)")
    rows = []
    medians = {}
    for edge_count in arguments.edges:
        mine = [r for r in runs if r["edges"] == edge_count]
        m = {name: median(r[name] for r in mine) for name in (
            "events_per_second", "cpu", "net_in", "net_out", "xadd_calls", "xadd_usec",
            "xread_calls", "xread_usec", "xrevrange_calls", "primary_cpu")}
        m["edge_cpu"] = median(statistics.fmean(r["edge_cpu"]) for r in mine)
        medians[edge_count] = m
        rows.append([edge_count, f"{m['events_per_second']:,.0f}", f"{m['cpu']:.3f}",
                     f"{m['net_in'] / MIB:.1f}", f"{m['net_out'] / MIB:.1f}",
                     f"{m['xadd_calls']:,.0f}", f"{m['xadd_usec'] / max(m['xadd_calls'], 1):.0f}",
                     f"{m['xread_calls']:,.0f}",
                     f"{m['xread_usec'] / max(m['xread_calls'], 1):.0f}",
                     f"{m['primary_cpu']:.2f}", f"{m['edge_cpu']:.2f}"])
    print(f"Medians of {arguments.runs} runs:")
    print(table(["edges", "events/s", "Redis CPU s", "in MiB", "out MiB", "XADD", "us/XADD",
                 "XREAD", "us/XREAD", "primary CPU s", "CPU s per edge"], rows))
    if len(medians) >= 2:
        low, high = min(medians), max(medians)
        per_edge = (medians[high]["cpu"] - medians[low]["cpu"]) / (high - low)
        fixed = medians[low]["cpu"] - low * per_edge
        out_per_edge = (medians[high]["net_out"] - medians[low]["net_out"]) / (high - low)
        events = runs[0]["events"]
        print(f"\nFitted as Redis CPU = appending + E x following: appending "
              f"{fixed:.3f} s ({fixed / events * 1e6:.3f} us per event, "
              f"{fixed / (medians[low]['net_in'] / MIB):.4f} s per MiB in); following, per "
              f"edge, {per_edge:.3f} s ({per_edge / events * 1e6:.3f} us per event, "
              f"{per_edge / (out_per_edge / MIB):.4f} s per MiB out); "
              f"{out_per_edge / events:.1f} bytes out per event per edge")


# -- follow: what an edge spends on the stream alone ----------------------------------------


def wait_idle(pid: int, quiet: float = 1.5, timeout: float = 120.0) -> float:
    """Until the process has used no CPU for `quiet` seconds (an edge that has
    caught up waits in XREAD); its CPU seconds then."""
    deadline = time.monotonic() + timeout
    last, since = cpu_seconds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise RuntimeError(f"process {pid} was still busy after {timeout} s")


def measure_follow(session: Session, arguments: argparse.Namespace) -> dict:
    runs: list[dict] = []
    extra = ["--pregenerate"] if arguments.pregenerate else []
    for run in range(1, arguments.runs + 1):
        key = session.new_key()
        primary = session.primary(key, "--snapshot-every", str(arguments.snapshot_every))
        serving, idle = session.edge(key), session.edge(key)
        try:
            report = maze(primary.event_port, [serving.client_port], "--totalEvents",
                          str(arguments.events), *extra, brokers=(primary, serving, idle))
            primary_cpu, primary_main = thread_cpu(primary.pid)
            serving_cpu, serving_main = thread_cpu(serving.pid)
            wait_idle(idle.pid)
            idle_cpu, idle_main = thread_cpu(idle.pid)
        finally:
            problems = session.stop(primary, serving, idle)
            session.forget(key)
        row = {"run": run, "events": report["events"], "notifications": report["notifications"],
               "events_per_second": report["events_per_second"], "primary_cpu": primary_cpu,
               "primary_thread": primary_cpu - primary_main, "serving_cpu": serving_cpu,
               "serving_thread": serving_cpu - serving_main, "idle_cpu": idle_cpu,
               "idle_thread": idle_cpu - idle_main, "problems": problems}
        runs.append(row)
        print(f"run {run}: {row['events_per_second']:,.0f} events/s; CPU s primary "
              f"{primary_cpu:.2f} (log writer {row['primary_thread']:.2f}), edge with the "
              f"clients {serving_cpu:.2f} (log reader {row['serving_thread']:.2f}), edge with "
              f"none {idle_cpu:.2f} (log reader {row['idle_thread']:.2f})", flush=True)
        print_problems(problems)
    m = {name: median(r[name] for r in runs) for name in runs[0]
         if name not in ("run", "problems")}
    events, notifications = m["events"], m["notifications"]
    print(f"\nWhat each process spends per event: {events:,.0f} events at the harness defaults, "
          f"unpaced{', pregenerated' if arguments.pregenerate else ', streamed'}, "
          f"--snapshot-every {arguments.snapshot_every:,}; a primary with no client, an edge "
          f"serving the 100 clients ({notifications:,.0f} notifications) and an edge serving "
          f"none, side by side; medians of {arguments.runs} runs (the idle edge's CPU read "
          f"once it has caught up and waits)")
    rows = []
    for name, cpu, thread in (("primary, no client", "primary_cpu", "primary_thread"),
                              ("edge, 100 clients", "serving_cpu", "serving_thread"),
                              ("edge, no client", "idle_cpu", "idle_thread")):
        rows.append([name, f"{m[cpu]:.2f}", f"{m[thread]:.2f}",
                     f"{m[cpu] / events * 1e6:.2f}", f"{events / m[cpu]:,.0f}"])
    print(table(["process", "CPU s", "of it the Redis thread", "us per event",
                 "events/s per core"], rows))
    delivery = median(r["serving_cpu"] - r["idle_cpu"] for r in runs)
    print(f"\nDelivery at the default mix (the serving edge less the idle one): {delivery:.2f} s "
          f"for {notifications:,.0f} notifications = "
          f"{delivery / (notifications / 1e6):.2f} CPU s per million notifications")
    return {"runs": runs}


# -- hiredis: redis-py's C parser, with and without ------------------------------------------


def hiredis_overlay(directory: Path) -> str:
    """A directory holding hiredis alone, put on the brokers' PYTHONPATH for the
    runs "with"; installed there (pip install --target) if it is not yet."""
    if not (directory / "hiredis").is_dir():
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--target",
                   str(directory), "hiredis"]
        print("installing hiredis beside the environment, not into it: "
              + " ".join(map(shlex.quote, command)), flush=True)
        subprocess.run(command, check=True)
    return str(directory)


def measure_hiredis(session: Session, arguments: argparse.Namespace) -> dict | None:
    if importlib.util.find_spec("hiredis") is not None:
        print("hiredis is installed in this environment, so there is no run without it: "
              "pip uninstall hiredis first (the runs with it use an overlay directory)")
        return None
    overlay = hiredis_overlay(Path(arguments.hiredis_dir))
    runs: list[dict] = []
    extra = ["--pregenerate"] if arguments.pregenerate else []
    if arguments.rate:
        extra += ["--rate", str(arguments.rate)]
    for run in range(1, arguments.runs + 1):
        for variant, pythonpath in (("without hiredis", None), ("with hiredis", overlay)):
            key = session.new_key()
            primary = session.primary(key, "--snapshot-every", str(arguments.snapshot_every),
                                      pythonpath=pythonpath)
            edge = session.edge(key, pythonpath=pythonpath)
            loaded = [maps_mention(broker.pid, "hiredis") for broker in (primary, edge)]
            try:
                redis_before = session.redis_counters()
                report = maze(primary.event_port, [edge.client_port], "--totalEvents",
                              str(arguments.events), *extra, brokers=(primary, edge))
                (primary_cpu, primary_main), (edge_cpu, edge_main) = \
                    thread_cpu(primary.pid), thread_cpu(edge.pid)
                redis = session.redis_counters_since(redis_before)
                redis_cpu = redis["cpu"]
            finally:
                problems = session.stop(primary, edge)
                session.forget(key)
            if loaded != [pythonpath is not None] * 2:
                problems.append(f"hiredis loaded in (primary, edge): {loaded}")
            row = {"variant": variant, "run": run, "events_per_second":
                   report["events_per_second"], "primary_cpu": primary_cpu,
                   "primary_writer": primary_cpu - primary_main, "edge_cpu": edge_cpu,
                   "edge_reader": edge_cpu - edge_main, "redis_cpu": redis_cpu,
                   "xadd_calls": redis["xadd_calls"], "xread_calls": redis["xread_calls"],
                   "hiredis_loaded": loaded, "problems": problems}
            runs.append(row)
            print(f"run {run} {variant}: {row['events_per_second']:,.0f} events/s; primary "
                  f"{primary_cpu:.2f} s (log writer thread {row['primary_writer']:.2f}), edge "
                  f"{edge_cpu:.2f} s (log reader thread {row['edge_reader']:.2f}), redis "
                  f"{redis_cpu:.2f} s", flush=True)
            print_problems(problems)
    print_hiredis(runs, arguments)
    return {"runs": runs}


HIREDIS_COLUMNS = (("events_per_second", "events/s", "{:,.0f}"),
                   ("primary_cpu", "primary CPU s", "{:.2f}"),
                   ("primary_writer", "of it log writer", "{:.2f}"),
                   ("edge_cpu", "edge CPU s", "{:.2f}"),
                   ("edge_reader", "of it log reader", "{:.2f}"),
                   ("redis_cpu", "redis CPU s", "{:.2f}"),
                   ("xadd_calls", "XADD", "{:,.0f}"),
                   ("xread_calls", "XREAD", "{:,.0f}"))


def print_hiredis(runs: list[dict], arguments: argparse.Namespace) -> None:
    print(f"\nhiredis: {arguments.events:,} events at the harness defaults"
          f"{', pregenerated' if arguments.pregenerate else ', streamed'}"
          f"{f', paced at {arguments.rate:,}/s' if arguments.rate else ', unpaced'}, a "
          f"primary with --log --snapshot-every {arguments.snapshot_every:,} and one edge, "
          f"the 100 clients on the edge; CPU seconds for the whole process, and for its "
          f"thread that talks to Redis")
    print(table(["variant", "run", *(title for _, title, _ in HIREDIS_COLUMNS)],
                [[r["variant"], r["run"], *(form.format(r[name])
                                            for name, _, form in HIREDIS_COLUMNS)]
                 for r in runs]))
    medians = {variant: {name: median(r[name] for r in runs if r["variant"] == variant)
                         for name, _, _ in HIREDIS_COLUMNS}
               for variant in ("without hiredis", "with hiredis")}
    rows = [[variant, *(form.format(medians[variant][name])
                        for name, _, form in HIREDIS_COLUMNS)] for variant in medians]
    rows.append(["with / without", *(f"x{medians['with hiredis'][name] / value:.2f}" if value
                                     else "-" for (name, _, _), value in
                                     zip(HIREDIS_COLUMNS, medians["without hiredis"].values(),
                                         strict=True))])
    print(f"\nMedians of {arguments.runs} runs:")
    print(table(["variant", *(title for _, title, _ in HIREDIS_COLUMNS)], rows))


# -- command line ---------------------------------------------------------------------------


SNAPSHOT_HELP = ("the primary's --snapshot-every; the default is past the run's end, so the "
                 "log is never trimmed: unpaced, a primary with no clients of its own runs "
                 "further ahead of its edges than one snapshot interval (they would then "
                 "reload from the snapshot and their clients miss events)")
NO_TRIM = 1_000_000_000


def rates(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", type=Path, default=MBROKER_PATH,
                        help="the mbroker.py to run (default: this repository's)")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    commands = parser.add_subparsers(dest="command", required=True)

    memory = commands.add_parser("memory", help="Redis memory and XLEN over one long run")
    memory.add_argument("--events", type=int, default=10_000_000)
    memory.add_argument("--interval", type=float, default=1.0, help="seconds between samples")

    lag = commands.add_parser("lag", help="latency with the clients on the primary, then "
                                          "on an edge, alternating")
    lag.add_argument("--rates", type=rates, default=[100_000, 10_000],
                     help="events/s, comma-separated")
    lag.add_argument("--seconds", type=float, default=10.0, help="length of each paced run")
    lag.add_argument("--runs", type=int, default=3)
    lag.add_argument("--streamed", dest="pregenerate", action="store_false",
                     help="generate while sending (default: --pregenerate)")

    fanout = commands.add_parser("fanout", help="many clients on a primary alone, or spread "
                                                "over it and its edges, alternating")
    fanout.add_argument("--clients", type=int, default=10_000)
    fanout.add_argument("--events", type=int, default=50_000)
    fanout.add_argument("--mix", default=BROADCAST_HEAVY_MIX)
    fanout.add_argument("--edges", type=int, default=2)
    fanout.add_argument("--runs", type=int, default=3)
    fanout.add_argument("--no-connect-only", dest="connect_only", action="store_false",
                        help="skip the runs with the same clients and no event, which "
                             "measure what connecting them costs")

    follow = commands.add_parser("follow", help="a primary, an edge with clients and one "
                                                "without: what each spends per event")
    follow.add_argument("--events", type=int, default=2_000_000)
    follow.add_argument("--runs", type=int, default=3)
    follow.add_argument("--snapshot-every", type=int, default=NO_TRIM, help=SNAPSHOT_HELP)
    follow.add_argument("--streamed", dest="pregenerate", action="store_false",
                        help="generate while sending (default: --pregenerate)")

    redis = commands.add_parser("redis", help="Redis's CPU and bytes with one edge, then "
                                              "several, alternating")
    redis.add_argument("--events", type=int, default=2_000_000)
    redis.add_argument("--edges", type=rates, default=[1, 4],
                       help="edge counts to compare, comma-separated")
    redis.add_argument("--runs", type=int, default=3)
    redis.add_argument("--snapshot-every", type=int, default=NO_TRIM, help=SNAPSHOT_HELP)
    redis.add_argument("--rate", type=int, help="pace maze at this many events/s (small "
                                                 "log entries); default: unpaced")
    redis.add_argument("--streamed", dest="pregenerate", action="store_false",
                       help="generate while sending (default: --pregenerate)")

    hiredis = commands.add_parser("hiredis", help="the brokers' CPU with and without "
                                                  "hiredis, alternating")
    hiredis.add_argument("--events", type=int, default=1_000_000)
    hiredis.add_argument("--runs", type=int, default=3)
    hiredis.add_argument("--snapshot-every", type=int, default=NO_TRIM, help=SNAPSHOT_HELP)
    hiredis.add_argument("--rate", type=int, help="pace maze at this many events/s (small "
                                                   "log entries); default: unpaced")
    hiredis.add_argument("--hiredis-dir", default=str(Path(tempfile.gettempdir()) /
                                                      "mbroker-hiredis-overlay"),
                         help="where hiredis is installed (pip install --target) for the "
                              "runs with it; the environment itself is left alone")
    hiredis.add_argument("--streamed", dest="pregenerate", action="store_false",
                         help="generate while sending (default: --pregenerate)")

    arguments = parser.parse_args()
    broker = arguments.broker.resolve()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f}; broker {describe_broker(broker)}", flush=True)
    measure = {"memory": measure_memory, "lag": measure_lag, "fanout": measure_fanout,
               "follow": measure_follow, "redis": measure_redis,
               "hiredis": measure_hiredis}[arguments.command]
    with contextlib.ExitStack() as cleanup:
        session = Session(broker, cleanup)
        result = measure(session, arguments)
    if result is not None and arguments.json:
        arguments.json.write_text(json.dumps({"command": sys.argv[1:], **result}, indent=1,
                                             default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
