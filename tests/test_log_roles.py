"""A primary and its edges as separate processes around one real Redis
(docs/behaviour.md §7): the same bytes from every broker, crashes (kill -9)
of a primary or an edge, a Redis restart, an edge that falls behind the
trimmed log, foreign entries, and Redis unreachable at start. Every check of
what clients receive is byte for byte, against maze or against an in-memory
core that never crashed.
"""

from __future__ import annotations

import random
import signal
import threading

import pytest

import mbroker
from mbroker import LogEntry
from tests.harness import (
    WAIT,
    BrokerProcess,
    assert_maze_succeeded,
    connect_client,
    connect_source,
    receive_exactly,
    run_maze,
    wait_until,
)
from tests.redis_server import RedisServer, free_port

pytest.importorskip("redis")

LOG_WAIT = 20.0
USERS = 40


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path, appendonly=True)
    yield server
    server.close()


@pytest.fixture
def start(redis_server):
    """start("--edge") -> BrokerProcess on the test's Redis; killed at the end."""
    started: list[BrokerProcess] = []

    def start_broker(*arguments: str, url: str | None = None) -> BrokerProcess:
        edge = "--edge" in arguments
        process = BrokerProcess("--log", url or redis_server.url, "--log-level", "DEBUG",
                                *arguments, ports=("0",) if edge else ("0", "0"))
        started.append(process)
        return process

    yield start_broker
    for process in started:
        process.close()


def newest_seq(redis_server, key: str = "mbroker:events") -> int:
    newest = redis_server.client().xrevrange(key, count=1)
    return int(newest[0][0].partition(b"-")[0]) if newest else 0


def event_lines(count: int, seed: int = 7) -> list[bytes]:
    """count events of every type over USERS users, SEQ 1..count, with many
    follows so that status updates have followers to reach."""
    rng = random.Random(seed)
    lines = []
    for seq in range(1, count + 1):
        kind = rng.choices("FUSPB", weights=(40, 10, 30, 19, 1))[0]
        a, b = rng.randint(1, USERS), rng.randint(1, USERS)
        lines.append({"F": b"%d|F|%d|%d\r\n" % (seq, a, b), "U": b"%d|U|%d|%d\r\n" % (seq, a, b),
                      "S": b"%d|S|%d\r\n" % (seq, a), "P": b"%d|P|%d|%d\r\n" % (seq, a, b),
                      "B": b"%d|B\r\n" % seq}[kind])
    return lines


def shuffled(lines: list[bytes], seed: int = 3) -> bytes:
    """The lines in batches of up to 20, each batch shuffled: out of order, as a source sends."""
    rng = random.Random(seed)
    wire, position = [], 0
    while position < len(lines):
        batch = lines[position:position + rng.randint(1, 20)]
        position += len(batch)
        rng.shuffle(batch)
        wire += batch
    return b"".join(wire)


def never_crashed(lines: list[bytes], connected_after: int) -> dict[int, bytes]:
    """What each user gets from a broker that never stopped, when every user
    connects once the first `connected_after` events were dispatched."""
    pipeline = mbroker.EventPipeline(mbroker.Exchange())
    pipeline.feed(b"".join(lines[:connected_after]))
    users = {user: mbroker.Subscriber(user) for user in range(1, USERS + 1)}
    for user, subscriber in users.items():
        pipeline.exchange.subscribe(user, subscriber)
    pipeline.feed(b"".join(lines[connected_after:]))
    return {user: subscriber.take_bytes() for user, subscriber in users.items()}


def connect_everyone(broker: BrokerProcess, port: int) -> dict[int, object]:
    start = len(broker.lines)
    clients = {user: connect_client(port, user) for user in range(1, USERS + 1)}
    wait_until(lambda: sum("registered" in line for line in broker.lines[start:]) >= USERS,
               message="every client registered")
    return clients


def assert_received(clients: dict, expected: dict[int, bytes],
                    broker: BrokerProcess | None = None) -> None:
    for user, sock in clients.items():
        received = receive_exactly(sock, len(expected[user]), timeout=LOG_WAIT)
        assert received == expected[user], \
            f"user {user}: {len(received)} of {len(expected[user])} bytes" + (
                f"\nbroker log:\n{broker.log(last=80)}" if broker is not None else "")


# -- several brokers, one stream ----------------------------------------------------------


def test_a_primary_and_two_edges_give_every_client_the_same_bytes(start):
    primary = start()
    edges = [start("--edge"), start("--edge")]
    ports = ",".join(str(port) for port in [primary.client_port,
                                             *(edge.client_port for edge in edges)])
    result = run_maze("--eventListenerPort", str(primary.event_port),
                      "--clientListenerPort", ports, "--totalEvents", "100000",
                      "--concurrencyLevel", "60", "--logInterval", "0", timeout=120)
    assert_maze_succeeded(result, primary)
    assert "Traceback" not in primary.log() + "".join(edge.log() for edge in edges)


# -- crashes ----------------------------------------------------------------------------


def test_a_primary_killed_mid_stream_recovers_and_sends_what_one_that_never_crashed_would(
        start, redis_server):
    lines = event_lines(6000)
    first, second = lines[:3000], lines[3000:]
    primary = start("--snapshot-every", "1000")
    connect_source(primary.event_port).sendall(shuffled(first))
    wait_until(lambda: newest_seq(redis_server) >= 1500, LOG_WAIT)
    primary.process.kill()  # kill -9, mid-stream: the last entries may never reach Redis
    primary.wait_exit()
    logged = newest_seq(redis_server)
    primary = start("--snapshot-every", "1000")
    assert f"next expected sequence number {logged + 1}" in primary.log()
    # The source reconnects and resends from the start: what the log has is a duplicate.
    source = connect_source(primary.event_port)
    source.sendall(shuffled(first))
    wait_until(lambda: newest_seq(redis_server) == 3000, LOG_WAIT)
    clients = connect_everyone(primary, primary.client_port)
    source.sendall(shuffled(second, seed=5))
    assert_received(clients, never_crashed(lines, 3000), primary)
    primary.wait_for_log(rf"{logged} events dropped as duplicates", timeout=WAIT)
    assert primary.stop() == 0


def test_an_edge_killed_mid_stream_recovers_from_the_log(start, redis_server):
    lines = event_lines(6000, seed=11)
    primary = start("--snapshot-every", "1000")
    edge = start("--edge")
    source = connect_source(primary.event_port)
    source.sendall(shuffled(lines[:3000]))
    wait_until(lambda: newest_seq(redis_server) == 3000, LOG_WAIT)
    edge.process.kill()
    edge.wait_exit()
    edge = start("--edge")  # recovers up to 3000 before its port opens
    assert "next expected sequence number 3001" in edge.log()
    clients = connect_everyone(edge, edge.client_port)
    source.sendall(shuffled(lines[3000:]))
    assert_received(clients, never_crashed(lines, 3000))


def test_a_redis_restart_mid_stream_loses_and_duplicates_nothing(start, redis_server):
    primary = start("--snapshot-every", "100000000")
    edge = start("--edge")
    restarted = threading.Event()

    def restart_redis_mid_stream() -> None:
        try:
            wait_until(lambda: newest_seq(redis_server) >= 50_000, 60)
        except AssertionError:
            return
        redis_server.restart()  # SIGTERM, then the same port: the append-only file is kept
        restarted.set()

    restarter = threading.Thread(target=restart_redis_mid_stream, daemon=True)
    restarter.start()
    ports = f"{primary.client_port},{edge.client_port}"
    result = run_maze("--eventListenerPort", str(primary.event_port),
                      "--clientListenerPort", ports, "--totalEvents", "150000",
                      "--rate", "50000",  # three seconds: Redis restarts mid-stream
                      "--concurrencyLevel", "40", "--logInterval", "0", timeout=120)
    restarter.join(WAIT)
    assert restarted.is_set(), "the stream ended before Redis was restarted"
    assert_maze_succeeded(result, primary)
    wait_until(lambda: newest_seq(redis_server) == 150_000, LOG_WAIT)
    entries = [LogEntry.decode(entry_id, fields)
               for entry_id, fields in redis_server.client().xrange("mbroker:events")]
    assert entries[0].after == 0
    assert all(a.last == b.after for a, b in zip(entries, entries[1:], strict=False))
    seqs = [int(line.split(b"|")[0]) for entry in entries for line in entry.text.splitlines()]
    assert seqs == list(range(1, 150_001))  # every event once, in order
    primary.wait_for_log(r"retrying in", timeout=WAIT)
    edge.wait_for_log(r"retrying in", timeout=WAIT)


def test_an_edge_behind_the_trimmed_log_reloads_from_the_snapshot_and_says_what_it_missed(
        start, redis_server):
    lines = event_lines(8000, seed=13)
    primary = start("--snapshot-every", "500", "--log-retention", "0")
    edge = start("--edge")
    source = connect_source(primary.event_port)
    source.sendall(shuffled(lines[:1000]))
    wait_until(lambda: newest_seq(redis_server) == 1000, LOG_WAIT)
    edge.wait_for_log(r"connected; reading after")
    edge.send_signal(signal.SIGSTOP)  # the edge stands still while the log moves on
    try:
        # In steps, so that each step is an entry and a snapshot that trims
        # the log; the edge's pending read can only take the first step.
        for end in range(1500, 7001, 500):
            source.sendall(shuffled(lines[end - 500:end]))
            wait_until(lambda end=end: newest_seq(redis_server) == end, LOG_WAIT)
    finally:
        edge.send_signal(signal.SIGCONT)
    missed = edge.wait_for_log(r"fell behind the trimmed log", timeout=LOG_WAIT)
    assert "were missed by its clients" in missed and "reloaded the follow graph" in missed
    # From the snapshot on, the edge is whole again: clients that connect now
    # get exactly what the primary's own clients get.
    edge_clients = connect_everyone(edge, edge.client_port)
    primary_clients = connect_everyone(primary, primary.client_port)
    source.sendall(shuffled(lines[7000:]))
    expected = never_crashed(lines, 7000)
    assert_received(edge_clients, expected)
    assert_received(primary_clients, expected)


# -- what is not mbroker's --------------------------------------------------------------


def test_a_foreign_entry_in_the_stream_is_reported_and_skipped_not_a_traceback(
        start, redis_server):
    primary = start()
    edge = start("--edge")
    source = connect_source(primary.event_port)
    source.sendall(b"1|B\r\n2|B\r\n")
    wait_until(lambda: newest_seq(redis_server) == 2, LOG_WAIT)
    redis_server.client().xadd("mbroker:events", {"hello": "world"}, id="2-1")
    client = connect_client(edge.client_port, 9)
    edge.wait_for_log(r"registered")
    source.sendall(b"3|P|1|9\r\n")
    assert receive_exactly(client, len(b"3|P|1|9\r\n"), timeout=LOG_WAIT) == b"3|P|1|9\r\n"
    line = edge.wait_for_log(r"entry 2-1")
    assert "is damaged; skipped" in line or "is not an mbroker entry" in line
    assert "Traceback" not in edge.log() + primary.log()


def test_a_damaged_snapshot_stops_the_start_with_one_line_and_exit_code_2(redis_server):
    redis_server.client().set("mbroker:events:snapshot", b"not a snapshot")
    process = BrokerProcess("--log", redis_server.url, listening_line=False, expect_exit=True)
    assert process.wait_exit() == 2
    (line,) = process.lines
    assert line.startswith("mbroker: cannot recover from the log mbroker:events at redis://")
    assert "snapshot is damaged" in line


def test_redis_unreachable_at_start_is_one_line_naming_the_url_and_exit_code_2():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    process = BrokerProcess("--log", url, listening_line=False, expect_exit=True)
    assert process.wait_exit() == 2
    (line,) = process.lines
    assert line.startswith("mbroker: cannot reach the log at redis://:***@127.0.0.1:")
    assert "hunter2" not in line


def test_a_password_in_the_log_url_never_reaches_the_logs(tmp_path):
    server = RedisServer(tmp_path, password="hunter2")
    try:
        primary = BrokerProcess("--log", server.url, "--log-level", "DEBUG", "--dashboard")
        edge = BrokerProcess("--edge", "--log", server.url, "--log-level", "DEBUG",
                             ports=("0",))
        try:
            connect_source(primary.event_port).sendall(b"1|B\r\n")
            edge.wait_for_log(r"connected; reading after")
            server.restart()  # reconnect lines name the URL too
            primary.wait_for_log(r"retrying in|connected", timeout=LOG_WAIT)
            assert primary.stop() == 0 and edge.stop() == 0
            text = primary.log() + edge.log()
            assert "redis://:***@127.0.0.1" in text
            assert "hunter2" not in text
        finally:
            primary.close()
            edge.close()
    finally:
        server.close()
