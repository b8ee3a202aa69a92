#!/usr/bin/env python3
"""Draw docs/dashboard.svg: what `mbroker --dashboard` shows, for the README.

    python docs/make_dashboard_svg.py            # a fixed, realistic snapshot
    python docs/make_dashboard_svg.py --live 3   # a real broker after 3 s of load

The fixed snapshot is hand-made so that every colour rule shows: a client
queue about to be cut off, a growing reorder buffer, closes by slow consumers.
With --live, a broker runs on this process's threads on ephemeral loopback
ports, fed by a synthetic source and clients (one of which never reads), and
its own stats() snapshot is drawn.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import socket
import sys
import threading
import time
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


def fixed_snapshot() -> dict:
    """A broker forty minutes into a 10-million-event run, under some strain."""
    broker = mbroker.Broker(mbroker.BrokerConfig(event_port=9090, client_port=9099))
    try:
        snapshot = broker.stats()
    finally:
        broker.selector.close()
    snapshot.update(uptime=2437.0, next_seq=6_120_417, highest_seq=6_498_310,
                    reorder_depth=612_904, reorder_depth_max=640_221,
                    events_in=6_733_321, events_dispatched=6_120_416,
                    notifications=31_877_950, bytes_out=703_511_268, clients=1_000,
                    connections=1_002, awaiting_hello=2, known_users=1_000,
                    follows=48_211, bytes_queued=41 * MIB + 337_120)
    snapshot["source"].update(connected=True, peer="127.0.0.1:51734", paused=False,
                              connections=1, bytes_read=148_337_204)
    snapshot["rates"] = {"events_in": 148_212.0, "events_out": 147_990.0,
                         "notifications": 771_402.0, "bytes_out": 17_020_113.0}
    snapshot["counters"].update(malformed=3, duplicate=120, slow_consumers=2)
    snapshot["closes"].update(client_quit=14, slow_consumer_buffer=1,
                              slow_consumer_timeout=1, invalid_id=3)
    deep = [(417, 15_903_112, 183_410), (88, 9_201_677, 105_881), (902, 6_020_118, 69_001)]
    top = [{"user_id": user, "peer": f"10.0.3.{user % 250}:{40100 + user}",
            "queued_notifications": notifications, "queued_bytes": queued,
            "notifications_sent": 31_000 + user * 7, "bytes_sent": 0,
            "connected_seconds": 2400.0 - user}
           for user, queued, notifications in deep]
    shallow = random.Random(7)
    for index in range(30):
        user = shallow.randrange(1, 1000)
        queued = 600_000 // (index + 1)
        top.append({"user_id": user, "peer": f"10.0.3.{user % 250}:{40100 + user}",
                    "queued_notifications": queued // 23, "queued_bytes": queued,
                    "notifications_sent": 31_000 + user * 7, "bytes_sent": 0,
                    "connected_seconds": 2430.0 - index})
    snapshot["top_clients"] = top
    snapshot["recently_closed"] = [
        {"kind": "client", "peer": "10.0.3.61:40661", "user_id": 561, "reason": "client_quit",
         "detail": "", "at": PICTURE_TIME - 95},
        {"kind": "client", "peer": "10.0.3.23:40373", "user_id": 273,
         "reason": "slow_consumer_timeout",
         "detail": "nothing written for 10 s with 3211008 bytes queued", "at": PICTURE_TIME - 41},
        {"kind": "client", "peer": "10.0.3.9:41109", "user_id": 1009,
         "reason": "slow_consumer_buffer", "detail": "16777731 bytes queued, limit 16777216",
         "at": PICTURE_TIME - 3},
    ]
    return snapshot


def live_snapshot(seconds: float) -> dict:
    """Run a real broker under synthetic load for `seconds` and return its stats()."""
    config = mbroker.BrokerConfig(event_port=0, client_port=0, max_client_buffer=4 * MIB,
                                  max_pending=200_000)
    broker = mbroker.Broker(config)
    broker.bind()
    loop = threading.Thread(target=broker.serve_forever, daemon=True)
    loop.start()
    stop = threading.Event()
    sockets = []

    def reader(sock: socket.socket) -> None:
        while not stop.is_set():
            try:
                if not sock.recv(1 << 16):
                    return
            except OSError:
                return

    try:
        for user in range(1, 51):
            sock = socket.socket()
            if user == 50:  # a client that never reads: its queue grows toward the limit
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", broker.client_port))
            sock.sendall(f"{user}\r\n".encode())
            sockets.append(sock)
            if user != 50:
                threading.Thread(target=reader, args=(sock,), daemon=True).start()
        source = socket.create_connection(("127.0.0.1", broker.event_port))
        sockets.append(source)
        shuffle = random.Random(666)
        deadline = time.monotonic() + seconds
        sequence = 1
        while time.monotonic() < deadline:
            batch = []
            for number in range(sequence, sequence + 1000):
                kind = shuffle.choice("FFFUPPSSB")
                sender, target = shuffle.randrange(1, 60), shuffle.randrange(1, 60)
                fields = {"F": (sender, target), "U": (sender, target),
                          "P": (sender, target), "S": (sender,), "B": ()}[kind]
                batch.append("|".join(map(str, (number, kind, *fields))))
            sequence += 1000
            shuffle.shuffle(batch)
            source.sendall(("\r\n".join(batch) + "\r\n").encode())
        time.sleep(0.5)  # let the rates settle over the last housekeeping samples
        return broker.snapshot(top_clients=HEIGHT)
    finally:
        stop.set()
        broker.request_stop()
        loop.join(10)
        for sock in sockets:
            sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=float, metavar="SECONDS",
                        help="draw a real broker after this many seconds of synthetic load")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "dashboard.svg")
    arguments = parser.parse_args()

    from rich.console import Console

    os.environ["TZ"] = "UTC"
    time.tzset()
    snapshot = live_snapshot(arguments.live) if arguments.live else fixed_snapshot()
    console = Console(record=True, width=WIDTH, height=HEIGHT, force_terminal=True,
                      color_system="truecolor", file=io.StringIO())
    console.print(render_dashboard(snapshot, width=WIDTH, height=HEIGHT))
    console.save_svg(str(arguments.output), title="mbroker --dashboard")
    print(f"wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
