"""Slow consumers (docs/behaviour.md §4.13, §4.14, §3.5): a client that does not
read has its outbound buffer grow; past --max-client-buffer, or after
--write-timeout seconds with bytes queued and none written, that connection alone
is closed with its reason, logged and counted as `slow_consumers`, while every
other client keeps receiving every notification in order.

The kernel absorbs a few MiB for a client that does not read before anything
is queued in the broker, so the tests send in batches until the limit bites,
within a byte budget."""

from __future__ import annotations

import time

import mbroker
from tests.harness import (
    Reader,
    connect_client,
    connect_source,
    read_until_closed,
    tiny_receiver,
    wait_until,
)

USER = 7
PAD = b"1" * 3900  # FROM padded to ~4 KB lines, well under the default --max-line
BATCH = 64  # events per batch: ~250 KB
BUDGET_BATCHES = 80  # ~20 MB at most


def event(seq: int) -> bytes:
    return b"%d|P|%s|%d\r\n" % (seq, PAD, USER)


def batch(index: int) -> bytes:
    first = index * BATCH + 1
    return b"".join(event(seq) for seq in range(first, first + BATCH))


def client_stats(running, sock) -> dict | None:
    port = sock.getsockname()[1]
    for client in running.stats().top_clients:
        if client.peer.endswith(f":{port}"):
            return client
    return None


def start_two_clients(running):
    """Two connections for the same user: one healthy reader, one that never reads."""
    healthy = connect_client(running.client_port, USER)
    stalled = tiny_receiver(running.client_port, USER, rcvbuf=4096)
    wait_until(lambda: running.stats().clients == 2)
    reader = Reader(healthy, expected=BATCH * BUDGET_BATCHES * len(event(1)) * 2, timeout=20)
    reader.start()
    return healthy, stalled, reader


def expect_everything_in_order(reader: Reader, batches: int) -> None:
    expected = b"".join(batch(index) for index in range(batches))
    wait_until(lambda: len(reader.data) >= len(expected), timeout=10)
    received = bytes(reader.data)
    assert len(received) == len(expected)
    assert received == expected, "the healthy client's stream is not complete and in order"


def closed_entry(running, sock) -> dict:
    port = sock.getsockname()[1]
    entries = [c for c in running.stats().recently_closed if c.peer.endswith(f":{port}")]
    assert len(entries) == 1, running.stats().recently_closed
    return entries[0]


def test_client_that_never_reads_is_cut_off_at_max_client_buffer_while_healthy_client_gets_everything(  # noqa: E501
        start_broker, caplog):
    caplog.set_level("WARNING", logger="mbroker")
    running = start_broker(max_client_buffer=65536, write_timeout=30.0)
    healthy, stalled, reader = start_two_clients(running)
    source = connect_source(running.event_port)
    sent = 0
    while sent < BUDGET_BATCHES and running.stats().counters.slow_consumers == 0:
        source.sendall(batch(sent))
        sent += 1
    stats = running.stats()
    assert stats.counters.slow_consumers == 1, f"not cut off after {sent} batches"
    assert stats.closes["slow_consumer_buffer"] == 1
    assert stats.closes["slow_consumer_timeout"] == 0
    assert closed_entry(running, stalled).reason is mbroker.CloseReason.SLOW_CONSUMER_BUFFER
    # a few more batches after the cut: the healthy client still gets all of them
    for _ in range(3):
        source.sendall(batch(sent))
        sent += 1
    expect_everything_in_order(reader, sent)
    # what the stalled client did get is an in-order prefix, then the close
    ending = read_until_closed(stalled, timeout=5)
    assert ending.closed
    assert b"".join(batch(index) for index in range(sent)).startswith(ending.data)
    assert running.stats().clients == 1
    assert any("slow_consumer_buffer" in r.getMessage() for r in caplog.records)


def test_client_that_never_reads_is_cut_off_after_write_timeout_while_healthy_client_gets_everything(  # noqa: E501
        start_broker, caplog):
    caplog.set_level("WARNING", logger="mbroker")
    running = start_broker(max_client_buffer=256 * 1024 * 1024, write_timeout=0.5)
    healthy, stalled, reader = start_two_clients(running)
    source = connect_source(running.event_port)
    sent = 0
    while sent < BUDGET_BATCHES and not getattr(client_stats(running, stalled), "queued_bytes", 0):
        source.sendall(batch(sent))
        sent += 1
    assert client_stats(running, stalled).queued_bytes > 0, "nothing ever queued"
    backlog_seen = time.monotonic()
    wait_until(lambda: running.stats().counters.slow_consumers == 1, timeout=3.0)
    waited = time.monotonic() - backlog_seen
    # write timeout 0.5 s, checked every 0.25 s; generous slack for a loaded machine
    assert waited < 1.5, waited
    stats = running.stats()
    assert stats.closes["slow_consumer_timeout"] == 1
    assert stats.closes["slow_consumer_buffer"] == 0
    assert closed_entry(running, stalled).reason is mbroker.CloseReason.SLOW_CONSUMER_TIMEOUT
    expect_everything_in_order(reader, sent)
    assert read_until_closed(stalled, timeout=5).closed
    assert any("slow_consumer_timeout" in r.getMessage() for r in caplog.records)
