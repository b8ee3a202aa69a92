#!/usr/bin/env python3
"""Draw docs/dashboard.svg: what `mbroker --dashboard` shows, for the README.

    python docs/make_dashboard_svg.py            # a real broker during a load run (8 s)
    python docs/make_dashboard_svg.py --live 5   # the same, after 5 s of load
    python docs/make_dashboard_svg.py --fixed    # a fixed, hand-made snapshot

The default (--live) is what produced docs/dashboard.svg: a real mbroker.Broker
runs on a thread of this process, on ephemeral loopback ports, driven by
tools/maze.py as a subprocess (3,000,000 events, 100 clients, maze's defaults
otherwise). One extra client, with a tiny receive buffer, registers as a user
that takes part in the events but that maze does not connect, and never reads,
so the deepest-queue table shows a real queue; maze verifies only its own
clients. After SECONDS of load the broker's own snapshot (stats(), taken on its
loop's thread) is drawn at 80 x 30, then maze and the broker are stopped.

The fixed snapshot is reproducible (the SVG only changes when the dashboard
does) and shows every colour rule: a client queue about to be cut off, a
growing reorder buffer, closes by slow consumers.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mbroker  # noqa: E402
from mbroker import render_dashboard  # noqa: E402

MIB = 1024 * 1024
WIDTH, HEIGHT = 80, 30
# Fixed wall-clock time for the recently-closed list, drawn in UTC, so the
# SVG only changes when the dashboard does.
PICTURE_TIME = 1_767_225_600.0 + 3 * 3600 + 25 * 60  # 2026-01-01 03:25:00 UTC


def fixed_snapshot() -> mbroker.BrokerStats:
    """A broker forty minutes into a 10-million-event run, under some strain."""
    broker = mbroker.Broker(mbroker.BrokerConfig(event_port=9090, client_port=9099))
    try:
        snapshot = broker.stats()
    finally:
        broker.reactor.close()
    deep = [(417, 15_903_112, 183_410), (88, 9_201_677, 105_881), (902, 6_020_118, 69_001)]
    top = [mbroker.ClientStats(user_id=user, peer=f"10.0.3.{user % 250}:{40100 + user}",
                               queued_notifications=notifications, queued_bytes=queued,
                               notifications_sent=31_000 + user * 7, bytes_sent=0,
                               connected_seconds=2400.0 - user)
           for user, queued, notifications in deep]
    shallow = random.Random(7)
    for index in range(30):
        user = shallow.randrange(1, 1000)
        queued = 600_000 // (index + 1)
        top.append(mbroker.ClientStats(
            user_id=user, peer=f"10.0.3.{user % 250}:{40100 + user}",
            queued_notifications=queued // 23, queued_bytes=queued,
            notifications_sent=31_000 + user * 7, bytes_sent=0,
            connected_seconds=2430.0 - index))
    reasons = mbroker.CloseReason
    closed = [
        ("10.0.3.61:40661", 561, reasons.CLIENT_QUIT, "", PICTURE_TIME - 95),
        ("10.0.3.23:40373", 273, reasons.SLOW_CONSUMER_TIMEOUT,
         "nothing written for 10 s with 3211008 bytes queued", PICTURE_TIME - 41),
        ("10.0.3.9:41109", 1009, reasons.SLOW_CONSUMER_BUFFER,
         "16777731 bytes queued, limit 16777216", PICTURE_TIME - 3),
    ]
    return replace(
        snapshot, uptime=2437.0, next_seq=6_120_417, highest_seq=6_498_310,
        reorder_depth=612_904, reorder_depth_max=640_221, events_in=6_733_321,
        events_dispatched=6_120_416, notifications=31_877_950, bytes_out=703_511_268,
        clients=1_000, connections=1_002, awaiting_hello=2, known_users=1_000,
        follows=48_211, bytes_queued=41 * MIB + 337_120,
        source=mbroker.SourceStats(connected=True, peer="127.0.0.1:51734", paused=False,
                                   connections=1, bytes_read=148_337_204),
        rates=mbroker.Rates(events_in=148_212.0, events_out=147_990.0,
                            notifications=771_402.0, bytes_out=17_020_113.0),
        counters=replace(snapshot.counters, malformed=3, duplicate=120, slow_consumers=2),
        closes={**snapshot.closes, "client_quit": 14, "slow_consumer_buffer": 1,
                "slow_consumer_timeout": 1, "invalid_id": 3},
        top_clients=tuple(top),
        recently_closed=tuple(mbroker.ClosedConnection("client", peer, user, reason, detail, at)
                              for peer, user, reason, detail, at in closed))


MAZE = ROOT / "tools" / "maze.py"
MAZE_EVENTS = 3_000_000
MAZE_CLIENTS = 100
MAZE_SEED = 666  # maze's default; it decides which users maze connects
STARTUP_TIMEOUT = 60.0  # seconds for maze to connect its clients and start sending
STOP_TIMEOUT = 10.0  # seconds for maze, then the broker, to stop


def maze_connected_users(clients: int, users: int, seed: int) -> set[int]:
    """The user ids maze connects with these settings (its choice is seeded)."""
    spec = importlib.util.spec_from_file_location("maze", MAZE)
    maze = importlib.util.module_from_spec(spec)
    sys.modules["maze"] = maze  # its dataclasses look their module up by name
    spec.loader.exec_module(maze)
    return set(maze.WorkloadGenerator(0, clients, users, seed=seed).connected_users)


def wait_for(condition, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def live_snapshot(seconds: float) -> mbroker.BrokerStats:
    """A real broker's stats() after `seconds` of a maze load run."""
    users = MAZE_CLIENTS * 10  # maze's default numberOfUsers
    taken = maze_connected_users(MAZE_CLIENTS, users, MAZE_SEED)
    stalled_user = min(set(range(1, users + 1)) - taken)  # in maze's events, not its clients

    broker = mbroker.Broker(mbroker.BrokerConfig(host="127.0.0.1", event_port=0, client_port=0))
    broker.bind()
    loop = threading.Thread(target=broker.serve_forever, name="broker", daemon=True)
    loop.start()
    stalled = maze = None
    try:
        # The client that never reads. A tiny receive buffer alone is not enough on
        # loopback: the broker's send buffer grows with the segment size (64 KiB
        # there) and would swallow a couple of MiB first. A small MSS keeps the
        # kernel's share to tens of KiB, so the rest piles up in the broker's queue.
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        stalled.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
        stalled.settimeout(5)
        stalled.connect(("127.0.0.1", broker.client_port))
        stalled.sendall(f"{stalled_user}\r\n".encode())
        wait_for(lambda: broker.snapshot(top_clients=0).clients == 1, 5,
                 "the extra client to register")

        command = [sys.executable, str(MAZE), "--host", "127.0.0.1",
                   "--eventListenerPort", str(broker.event_port),
                   "--clientListenerPort", str(broker.client_port),
                   "--totalEvents", str(MAZE_EVENTS), "--concurrencyLevel", str(MAZE_CLIENTS),
                   "--randomSeed", str(MAZE_SEED), "--logInterval", "0"]
        maze = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

        def loaded() -> bool:
            if maze.poll() is not None:
                raise RuntimeError(f"maze exited early with code {maze.returncode}")
            snapshot = broker.snapshot(top_clients=0)
            return snapshot.clients > MAZE_CLIENTS and snapshot.events_in > 0

        wait_for(loaded, STARTUP_TIMEOUT, "maze to connect and send")
        time.sleep(seconds)  # rates are averaged over the last few seconds
        if maze.poll() is not None:
            raise RuntimeError("maze finished before the snapshot: lower --live")
        snapshot = broker.snapshot(top_clients=HEIGHT)
        print(f"user {stalled_user} never reads; maze: {' '.join(command[1:])}")
        return snapshot
    finally:
        # Stopping maze resets its 100 connections: one warning each, not news here.
        logging.getLogger("mbroker").setLevel(logging.ERROR)
        if maze is not None and maze.poll() is None:
            maze.terminate()
            try:
                maze.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                maze.kill()
                maze.wait(STOP_TIMEOUT)
        if stalled is not None:
            stalled.close()
        broker.request_stop()
        broker.request_stop()  # a second request: no drain, stop now
        loop.join(STOP_TIMEOUT)
        if loop.is_alive():
            print("warning: the broker's thread did not stop", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--live", type=float, metavar="SECONDS", default=8.0,
                      help="draw a real broker after this many seconds of a maze load run "
                           "(the default mode; default %(default)g s)")
    mode.add_argument("--fixed", action="store_true",
                      help="draw the fixed, hand-made snapshot instead (reproducible)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "dashboard.svg")
    arguments = parser.parse_args()
    if not arguments.fixed and arguments.live <= 0:
        parser.error("--live needs a positive number of seconds")

    from rich.console import Console

    os.environ["TZ"] = "UTC"
    time.tzset()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    snapshot = fixed_snapshot() if arguments.fixed else live_snapshot(arguments.live)
    console = Console(record=True, width=WIDTH, height=HEIGHT, force_terminal=True,
                      color_system="truecolor", file=io.StringIO())
    console.print(render_dashboard(snapshot, width=WIDTH, height=HEIGHT))
    console.save_svg(str(arguments.output), title="mbroker --dashboard")
    print(f"wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
