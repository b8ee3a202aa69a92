#!/usr/bin/env python3
"""Compare broker versions end to end, alternating runs in one session.

    git show c80411c:mbroker.py > /tmp/mbroker_before.py
    python3 bench/compare_brokers.py /tmp/mbroker_before.py mbroker.py --runs 3
    python3 bench/compare_brokers.py mbroker.py "mbroker.py --log {redis} --log-key run:{run}"

A broker is a file and, optionally, its arguments, as one shell word.
{redis} stands for a Redis server this script starts for the session (from
the dev extra: see tests/redis_server.py) and {run} for a token new to each
run, so that every run with --log starts a fresh log, as every run starts a
fresh broker. --scrape-every S has a thread GET a broker's /metrics every S
seconds during its runs, when it was started with --metrics-port.

Each run starts the given broker file on ephemeral loopback ports, drives it
with `tools/maze.py --pregenerate` (1,000,000 events at the harness defaults
unless told otherwise), checks that maze verified every notification, and
reads the broker's CPU time and peak RSS from /proc before stopping it. Runs
alternate between the brokers, because this machine is shared and noisy: a
ratio of medians taken side by side means more than two numbers taken apart.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shlex
import statistics
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, bench/ is on sys.path and the root is not
    sys.path.insert(0, str(ROOT))

from tests.harness import BrokerProcess, assert_maze_succeeded, run_maze  # noqa: E402

RUN_TIMEOUT = 600.0


RUN_TOKENS = itertools.count(1)


class Scraper(threading.Thread):
    """GETs http://127.0.0.1:PORT/metrics every `every` seconds until stopped."""

    def __init__(self, port: int, every: float):
        super().__init__(daemon=True)
        self.url, self.every = f"http://127.0.0.1:{port}/metrics", every
        self.done = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.done.wait(self.every):
            with urllib.request.urlopen(self.url, timeout=5) as answer:
                answer.read()
            self.scrapes += 1


def run_once(broker: str, events: int, maze_arguments: list[str], redis_url: str | None,
             scrape_every: float | None = None) -> dict:
    broker_file, *broker_arguments = shlex.split(broker)
    token = str(next(RUN_TOKENS))
    broker_arguments = [argument.replace("{redis}", redis_url or "").replace("{run}", token)
                        for argument in broker_arguments]
    broker = BrokerProcess(*broker_arguments, script=Path(broker_file).resolve())
    scraper = None
    if scrape_every and "--metrics-port" in broker_arguments:
        line = broker.wait_for_log(r"metrics at http://")
        scraper = Scraper(int(line.rsplit(":", 1)[1].split("/")[0]), scrape_every)
        scraper.start()
    try:
        with tempfile.NamedTemporaryFile(suffix=".json") as report_file:
            maze = run_maze("--totalEvents", str(events), "--pregenerate", "--logInterval", "0",
                            "--json", report_file.name, *maze_arguments, broker=broker,
                            timeout=RUN_TIMEOUT)
            try:
                assert_maze_succeeded(maze, broker)
            except AssertionError as failure:
                raise RuntimeError(f"maze failed against {broker_file}:\n"
                                   f"{str(failure)[-4000:]}") from None
            report = json.loads(Path(report_file.name).read_text())
        cpu, peak_mib = broker.usage()
        return {"events_per_second": report["events_per_second"], "broker_cpu": cpu,
                "peak_rss_mb": peak_mib, "scrapes": scraper.scrapes if scraper else 0}
    finally:
        if scraper is not None:
            scraper.done.set()
            scraper.join(10)
        broker.stop()
        broker.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("brokers", nargs="+", help='broker files to compare, each with its '
                        'arguments if any ("mbroker.py --log {redis}"); the first is the baseline')
    parser.add_argument("--runs", type=int, default=3, help="runs per broker")
    parser.add_argument("--events", type=int, default=1_000_000, help="events per run")
    parser.add_argument("--scrape-every", type=float, default=None,
                        help="seconds between GETs of /metrics, for brokers given --metrics-port")
    parser.add_argument("--maze-args", default="",
                        help='extra arguments for tools/maze.py, e.g. "--terminator lf"')
    arguments = parser.parse_args()
    maze_arguments = shlex.split(arguments.maze_args)
    results: dict[str, list[dict]] = {broker: [] for broker in arguments.brokers}
    with contextlib.ExitStack() as cleanup:
        redis_url = None
        if any("{redis}" in broker for broker in arguments.brokers):
            from tests.redis_server import RedisServer

            directory = cleanup.enter_context(tempfile.TemporaryDirectory())
            server = RedisServer(Path(directory))
            cleanup.callback(server.close)
            redis_url = server.url
        for run in range(1, arguments.runs + 1):
            for broker in arguments.brokers:
                result = run_once(broker, arguments.events, maze_arguments, redis_url,
                                  arguments.scrape_every)
                results[broker].append(result)
                print(f"run {run}  {broker}: {result['events_per_second']:,.0f} events/s, "
                      f"broker CPU {result['broker_cpu']:.2f} s, "
                      f"peak RSS {result['peak_rss_mb']:.0f} MB"
                      + (f", {result['scrapes']} scrapes" if result["scrapes"] else ""),
                      flush=True)
    baseline = statistics.median(r["events_per_second"] for r in results[arguments.brokers[0]])
    for broker, runs in results.items():
        median = statistics.median(r["events_per_second"] for r in runs)
        cpu = statistics.median(r["broker_cpu"] for r in runs)
        print(f"median  {broker}: {median:,.0f} events/s (x{median / baseline:.2f}), "
              f"broker CPU {cpu:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
