"""The durable log on Redis Streams (docs/behaviour.md §7), in process: the
entry and snapshot formats, recovery, idempotent appends, trimming, and a
Redis that goes away and comes back. Every server is a real redis-server
(tests/redis_server.py); faults come from stopping it or from a TCP link
that cuts replies, never from a mock.
"""

from __future__ import annotations

import logging
import socket
import threading

import pytest

import mbroker
from mbroker import LogEntry, LogError
from tests.harness import (
    LOCALHOST,
    WAIT,
    connect_client,
    connect_source,
    receive_exactly,
    wait_until,
)
from tests.redis_server import RedisServer, free_port

pytest.importorskip("redis")

LOG_WAIT = 15.0  # reconnecting backs off up to LOG_RETRY_MAX between tries


@pytest.fixture
def redis_server(tmp_path, request):
    """A real redis-server; parametrize indirectly with {"appendonly": True} for
    one whose data survives a restart."""
    server = RedisServer(tmp_path, **getattr(request, "param", {}))
    yield server
    server.close()


def stream(redis_server, key: str = "mbroker:events") -> list[LogEntry]:
    return [LogEntry.decode(entry_id, fields)
            for entry_id, fields in redis_server.client().xrange(key)]


def covered(entries: list[LogEntry]) -> list[int]:
    """The SEQ of every line in the entries, in stream order."""
    return [int(line.split(b"|")[0]) for entry in entries
            for line in entry.text.splitlines()]


def events(first: int, last: int) -> bytes:
    """Follows of user 1 by users first..last, then a status update of 1 each."""
    return b"".join(b"%d|F|%d|1\r\n" % (seq, seq) for seq in range(first, last + 1))


# -- formats ----------------------------------------------------------------------------


def test_an_entry_round_trips_through_its_stream_fields():
    entry = LogEntry(after=10, last=14, text=b"11|B\r\n13|P|1|2\n", written_at=1700000000.25)
    assert entry.entry_id == "14-0"
    fields = entry.fields()
    assert LogEntry.decode(b"14-0", fields) == entry


@pytest.mark.parametrize(("entry_id", "fields", "why"), [
    (b"14-0", {b"foo": b"bar"}, "not an mbroker entry"),
    (b"1700000000000-0", {b"payload": b"x"}, "not an mbroker entry"),
    (b"14-0", {b"after": b"x", b"lines": b"", b"t": b"1"}, "not an mbroker entry"),
    (b"14-3", {b"after": b"10", b"lines": b"", b"t": b"1"}, "damaged"),
    (b"14-0", {b"after": b"14", b"lines": b"", b"t": b"1"}, "damaged"),
    (b"14-0", {b"after": b"10", b"lines": b"11|B", b"t": b"1"}, "damaged"),
])
def test_a_foreign_or_damaged_entry_is_refused_with_a_reason(entry_id, fields, why):
    with pytest.raises(LogError, match=why):
        LogEntry.decode(entry_id, fields)


def test_a_snapshot_round_trips_and_a_damaged_one_is_refused():
    graph = {7: {1, 2, 3}, 10**30: {5}, 2: {10**30}}
    builder = mbroker.SnapshotBuilder(42, iter(graph.items()), follows=5)
    while not builder.step():
        pass
    text = builder.text()
    assert mbroker.decode_snapshot(text) == (42, graph)
    with pytest.raises(LogError, match="damaged"):
        mbroker.decode_snapshot(text.replace(b"1,2,3", b"1,2"))
    with pytest.raises(LogError, match="damaged"):
        mbroker.decode_snapshot(b"something else\n1 2\n")


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://user:s3cret@cache.example:6380/2", "rediss://user:***@cache.example:6380/2"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_a_password_in_the_url_is_masked_wherever_the_url_is_shown(url, shown):
    assert mbroker.masked(url) == shown


# -- the primary's appends and recovery -------------------------------------------------


def test_the_primary_appends_the_ordered_stream_one_entry_per_flush(redis_server):
    with mbroker.running(log=redis_server.url) as broker:
        source = connect_source(broker.event_port)
        source.sendall(b"3|B\r\n1|F|5|6\r\n2|P|5|6\n4|X|1|2\r\n5|S|6\r\n")
        wait_until(lambda: broker.stats().log.position == 5, LOG_WAIT)
    entries = stream(redis_server)
    assert entries[0].after == 0 and entries[-1].last == 5
    assert all(a.last == b.after for a, b in zip(entries, entries[1:], strict=False))
    # The lines exactly as the source sent them, in sequence order; the
    # malformed 4 is consumed as a no-op, covered by its entry but not in it.
    assert b"".join(entry.text for entry in entries) == \
        b"1|F|5|6\r\n2|P|5|6\n3|B\r\n5|S|6\r\n"


def test_a_restarted_primary_recovers_the_follow_graph_and_next_seq(redis_server):
    with mbroker.running(log=redis_server.url) as broker:
        connect_source(broker.event_port).sendall(events(1, 10))
        wait_until(lambda: broker.stats().log.position == 10, LOG_WAIT)
    with mbroker.running(log=redis_server.url) as broker:
        stats = broker.stats()
        assert (stats.next_seq, stats.follows) == (11, 10)
        follower = connect_client(broker.client_port, 7, wait_registered=broker)
        source = connect_source(broker.event_port)
        source.sendall(events(1, 10) + b"11|S|1\r\n")  # a resend, then a status update
        # User 7 followed 1 before the restart: the status update reaches it.
        assert receive_exactly(follower, len(b"11|S|1\r\n")) == b"11|S|1\r\n"
        wait_until(lambda: broker.stats().counters.duplicate == 10)
    assert covered(stream(redis_server)) == list(range(1, 12))  # no resend in the log


def test_snapshots_trim_the_stream_and_recovery_from_snapshot_and_tail_equals_the_full_stream(
        redis_server):
    # Two primaries take the same stream, one snapshotting every 200 numbers
    # and the other never; each log is then recovered into a fresh core.
    stream_bytes = b"".join(
        b"%d|F|%d|%d\r\n" % (seq, seq % 37, seq % 11) if seq % 3 else
        b"%d|U|%d|%d\r\n" % (seq, (seq + 5) % 37, seq % 11)
        for seq in range(1, 3001))
    longest = 0
    for key, every in (("trimmed", 200), ("whole", 10**9)):
        with mbroker.running(log=redis_server.url, log_key=key, snapshot_every=every,
                             log_retention=0, dispatch_slice=64, flush_lines=64) as broker:
            source = connect_source(broker.event_port)
            for start in range(0, len(stream_bytes), 4096):
                source.sendall(stream_bytes[start:start + 4096])
                length = redis_server.client().xlen(key)
                longest = max(longest, length) if key == "trimmed" else longest
            wait_until(lambda: broker.stats().log.position == 3000, LOG_WAIT)
            if key == "trimmed":
                wait_until(lambda: broker.stats().log.snapshots >= 10, LOG_WAIT)
    trimmed, whole = stream(redis_server, "trimmed"), stream(redis_server, "whole")
    assert whole[0].after == 0 and covered(whole) == list(range(1, 3001))
    # With no retention, only entries since the snapshot before the latest
    # stay: two intervals at most.
    assert trimmed[-1].last - trimmed[0].after <= 2 * 200 + 64
    assert len(trimmed) < len(whole) / 5
    recovered = {}
    for key in ("trimmed", "whole"):
        pipeline = mbroker.EventPipeline(mbroker.Exchange())
        recovery = mbroker.recover_from_log(redis_server.client(), key, pipeline)
        recovered[key] = (pipeline.reorder.next_seq, pipeline.exchange.following,
                          pipeline.exchange.follow_count)
        assert (recovery.snapshot_seq is None) == (key == "whole")
    assert recovered["trimmed"] == recovered["whole"]
    assert recovered["whole"][0] == 3001


def test_entries_younger_than_the_retention_stay_when_snapshots_trim(redis_server):
    # Snapshots every 200 numbers, but a minute of retention: nothing is old
    # enough to be trimmed, so an edge far behind would still read on.
    with mbroker.running(log=redis_server.url, snapshot_every=200, log_retention=60,
                         dispatch_slice=64, flush_lines=64) as broker:
        source = connect_source(broker.event_port)
        for first in range(1, 3001, 300):
            source.sendall(events(first, first + 299))
            wait_until(lambda first=first: broker.stats().log.position == first + 299, LOG_WAIT)
        assert broker.stats().log.snapshots >= 10
    entries = stream(redis_server)
    assert entries[0].after == 0 and covered(entries) == list(range(1, 3001))


def test_a_foreign_entry_is_skipped_with_an_error_line_at_recovery(redis_server, caplog):
    client = redis_server.client()
    client.xadd("mbroker:events", LogEntry(0, 2, b"1|F|3|4\n2|B\n", 1.0).fields(), id="2-0")
    client.xadd("mbroker:events", {"note": "hello"}, id="3-0")
    client.xadd("mbroker:events", LogEntry(3, 4, b"4|F|5|6\n", 1.0).fields(), id="4-0")
    pipeline = mbroker.EventPipeline(mbroker.Exchange())
    recovery = mbroker.recover_from_log(client, "mbroker:events", pipeline)
    assert (recovery.entries, recovery.entries_skipped, recovery.last_seq) == (2, 1, 4)
    assert pipeline.exchange.follow_count == 2
    assert "entry 3-0 is not an mbroker entry (fields: note); skipped" in caplog.text


# -- faults: a lost reply, a Redis that goes away -----------------------------------------


class ReplyCutter:
    """A TCP link to Redis that can lose one reply: it forwards the next XADD
    request, then closes the connection instead of passing Redis's answer on."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server((LOCALHOST, 0))
        self.port = self.listener.getsockname()[1]
        self.cut_next_reply = threading.Event()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection((LOCALHOST, self.target))
            dropping = threading.Event()  # this connection's next reply is lost
            threading.Thread(target=self._requests, args=(inbound, outbound, dropping),
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(outbound, inbound, dropping),
                             daemon=True).start()

    def _requests(self, inbound, outbound, dropping) -> None:
        try:
            while data := inbound.recv(65536):
                if b"XADD" in data and self.cut_next_reply.is_set():
                    self.cut_next_reply.clear()
                    dropping.set()
                outbound.sendall(data)
        except OSError:
            pass

    def _replies(self, outbound, inbound, dropping) -> None:
        try:
            while data := outbound.recv(65536):
                if dropping.is_set():  # Redis has applied it; the broker never hears so
                    self.cuts += 1
                    break
                inbound.sendall(data)
        except OSError:
            pass
        for sock in (inbound, outbound):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_an_append_whose_reply_was_lost_is_retried_without_a_second_entry(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="mbroker")
    link = ReplyCutter(redis_server.port)
    try:
        with mbroker.running(log=f"redis://{LOCALHOST}:{link.port}/0") as broker:
            source = connect_source(broker.event_port)
            source.sendall(events(1, 5))
            wait_until(lambda: broker.stats().log.position == 5, LOG_WAIT)
            link.cut_next_reply.set()
            source.sendall(events(6, 9))
            wait_until(lambda: broker.stats().log.position == 9, LOG_WAIT)
            stats = broker.stats().log
            assert link.cuts == 1 and stats.reconnects == 1 and stats.state == "connected"
            assert "was in the log already (the reply to an earlier try was lost)" in caplog.text
    finally:
        link.close()
    assert covered(stream(redis_server)) == list(range(1, 10))  # each entry once


@pytest.mark.parametrize("redis_server", [{"appendonly": True}], indirect=True)
def test_while_redis_is_away_the_primary_pauses_the_source_and_then_resumes(
        redis_server, caplog):
    with mbroker.running(log=redis_server.url) as broker:
        client = connect_client(broker.client_port, 1, wait_registered=broker)
        source = connect_source(broker.event_port)
        source.sendall(events(1, 3))
        wait_until(lambda: broker.stats().log.position == 3, LOG_WAIT)
        redis_server.stop()
        # Notifications already dispatched still go out; the log backlog
        # (more than LOG_MAX_UNWRITTEN events) pauses the source.
        batch = events(4, 4 + mbroker.LOG_MAX_UNWRITTEN + 1000)
        sender = threading.Thread(target=source.sendall, args=(batch,), daemon=True)
        sender.start()
        # Paused as soon as the writer finds Redis gone, not only once its
        # backlog (LOG_MAX_UNWRITTEN events) is full.
        wait_until(lambda: broker.stats().source.paused, LOG_WAIT)
        assert broker.stats().log.state == "reconnecting"
        assert broker.stats().log.unwritten < mbroker.LOG_MAX_UNWRITTEN
        assert "retrying in" in caplog.text
        redis_server.start()
        wait_until(lambda: broker.stats().log.position == 4 + mbroker.LOG_MAX_UNWRITTEN + 1000,
                   3 * LOG_WAIT)
        sender.join(WAIT)
        wait_until(lambda: not broker.stats().source.paused)  # a snapshot may be due first
        stats = broker.stats()
        assert stats.log.state == "connected"
        assert stats.log.reconnects >= 1
        expected = b"".join(b"%d|F|%d|1\r\n" % (seq, seq) for seq in range(1, 4 + 1))
        assert receive_exactly(client, len(expected)) == expected  # user 1 is every TO
    assert covered(stream(redis_server)) == list(range(1, 4 + mbroker.LOG_MAX_UNWRITTEN + 1001))


def test_redis_unreachable_at_start_is_one_line_naming_the_url_with_its_password_masked():
    port = free_port()
    with pytest.raises(LogError) as caught, \
            mbroker.running(log=f"redis://:hunter2@{LOCALHOST}:{port}/0"):
        pass
    message = str(caught.value)
    assert f"redis://:***@{LOCALHOST}:{port}/0" in message and "hunter2" not in message
