"""Bounded memory, whatever the input (docs/behaviour.md §3.6), measured as the
resident memory of a child broker: with sequence 1 withheld and hundreds of
thousands of events streamed, a broker with a small --max-pending declares 1 lost,
resumes delivery (§4.7) and grows by far less than buffering the stream would
cost; a reorder window that stays below --max-pending costs what the window
holds, however long the stream; follows refused past --max-follows (§6.1) leave
nothing behind."""

from __future__ import annotations

import re
import time

from tests.harness import (
    assert_nothing_more,
    connect_client,
    connect_source,
    receive_exactly,
    rss_kib,
)

EVENTS = 300_000  # SEQ 2..EVENTS+1; SEQ 1 is withheld
MAX_PENDING = 1000
FROM = b"1" * 30
CHUNK = 20_000  # events per sendall


def event(seq: int) -> bytes:
    # every 1000th event is for user 5 (connected), the rest for user 9 (not)
    return b"%d|P|%s|%d\r\n" % (seq, FROM, 5 if seq % 1000 == 0 else 9)


def test_withheld_first_seq_under_a_stream_of_300k_events_keeps_memory_bounded(
        start_broker_process):
    process = start_broker_process("--max-pending", str(MAX_PENDING), "--log-level", "DEBUG")
    pid = process.pid
    user5 = connect_client(process.client_port, 5)
    source = connect_source(process.event_port)
    process.wait_for_registration(5)
    before = rss_kib(pid)
    last = EVENTS + 1
    stream_bytes = 0
    started = time.monotonic()
    for first in range(2, last + 1, CHUNK):
        chunk = b"".join(event(seq) for seq in range(first, min(first + CHUNK, last + 1)))
        stream_bytes += len(chunk)
        source.sendall(chunk)
    for_user5 = b"".join(event(seq) for seq in range(1000, last + 1, 1000))
    received = receive_exactly(user5, len(for_user5), timeout=20)
    elapsed = time.monotonic() - started
    assert len(received) == len(for_user5), f"delivery did not resume: {len(received)} bytes"
    assert received == for_user5
    growth_kib = rss_kib(pid) - before
    # Holding the stream would take well over its own size (about 13 MB of lines,
    # plus per-event objects); the bound allows a few MiB of allocator slack.
    assert growth_kib * 1024 < stream_bytes / 2, (
        f"RSS grew by {growth_kib} KiB for a {stream_bytes // 1024} KiB stream")
    skip = process.wait_for_log(r"declared lost")
    assert re.search(r"\b1\.\.1\b", skip), skip
    # the withheld number finally arrives: it is late, and dropped
    source.sendall(b"1|P|1|5\r\n")
    assert_nothing_more(user5, wait=0.3)
    assert process.process.poll() is None
    assert process.stop() == 0
    assert elapsed < 20


def send_in_chunks(source, lines: list[bytes], chunk: int = 50_000) -> int:
    total = 0
    for start in range(0, len(lines), chunk):
        data = b"".join(lines[start:start + chunk])
        total += len(data)
        source.sendall(data)
    return total


def wait_for_seq(process, source, user5, seq: int, timeout: float = 20) -> None:
    """Send SEQ `seq` for user 5 and wait for it: everything before is processed."""
    line = b"%d|P|1|5\r\n" % seq
    source.sendall(line)
    assert receive_exactly(user5, len(line), timeout=timeout) == line


def test_steady_reorder_window_below_max_pending_keeps_memory_bounded(start_broker_process):
    # Every even SEQ arrives 1,200 places late: about 600 events always wait in
    # the reorder buffer (between a quarter and all of --max-pending=1000), and
    # each is delivered in turn. Nothing is ever skipped, and what the broker
    # holds for the reorder buffer must stay about 600 events, however long the
    # stream runs.
    events, delay = 400_000, 1200
    process = start_broker_process("--max-pending", "1000", "--log-level", "DEBUG")
    pid = process.pid
    user5 = connect_client(process.client_port, 5)
    source = connect_source(process.event_port)
    process.wait_for_registration(5)
    before = rss_kib(pid)
    order = sorted(range(1, events + 1), key=lambda seq: seq + (delay if seq % 2 == 0 else 0))
    # hold back the last window's late evens, so the buffer is still busy when measured
    held_back = [seq for seq in order[-delay:] if seq % 2 == 0]
    withheld = set(held_back)
    sent = [seq for seq in order if seq not in withheld]
    stream_bytes = send_in_chunks(source, [b"%d|U|1|2\r\n" % seq for seq in sent])
    # the lowest held-back SEQ, resent as an event for user 5, is delivered once
    # all of the stream before it is processed
    lowest = held_back[0]
    wait_for_seq(process, source, user5, lowest)
    growth_kib = rss_kib(pid) - before
    assert growth_kib < 5 * 1024, (
        f"RSS grew by {growth_kib} KiB over a {stream_bytes // 1024} KiB stream while at most "
        f"1000 events were ever waiting")
    # the stream then completes normally
    source.sendall(b"".join(b"%d|U|1|2\r\n" % seq for seq in held_back[1:]))
    wait_for_seq(process, source, user5, events + 1)
    assert "declared lost" not in process.log()
    assert process.stop() == 0


def test_refused_follows_to_ever_new_users_keep_memory_bounded(start_broker_process):
    # --max-follows caps the follow graph; follows past it are refused and must
    # not leave anything behind, whichever users they name.
    events = 300_000
    process = start_broker_process("--max-follows", "1000", "--log-level", "DEBUG")
    pid = process.pid
    user5 = connect_client(process.client_port, 5)
    source = connect_source(process.event_port)
    process.wait_for_registration(5)
    before = rss_kib(pid)
    stream_bytes = send_in_chunks(
        source, [b"%d|F|1|%d\r\n" % (seq, 1_000_000 + seq) for seq in range(1, events + 1)])
    wait_for_seq(process, source, user5, events + 1)
    growth_kib = rss_kib(pid) - before
    assert growth_kib < 8 * 1024, (
        f"RSS grew by {growth_kib} KiB for {events} follows of which at most 1000 are kept "
        f"({stream_bytes // 1024} KiB stream)")
    assert process.stop() == 0
