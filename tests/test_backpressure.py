"""--max-buffered (docs/behaviour.md §4.15, §6.2, §3.5): when the outbound buffers
of all clients together pass the limit, the broker stops reading the event
source (TCP then pushes back on the source, whose sends block) until they drain
below half; nothing is dropped, so clients that stalled and then read get every
notification in order."""

from __future__ import annotations

import re
import threading

from tests.harness import (
    Reader,
    give_accepted_sockets_small_send_buffers,
    send_until_blocked,
    small_sender,
    tiny_receiver,
    wait_housekeeping_ticks,
    wait_until,
)

USER = 7
PAD = b"2" * 3900
MAX_BUFFERED = 200_000
STALLED_CLIENTS = 3
EVENTS = 8000  # ~31 MB at most: well past the kernel buffers (TCP autotuning can take MBs)
AFTER_PUSHBACK = 300  # events sent once the clients read


def event(seq: int) -> bytes:
    return b"%d|P|%s|%d\r\n" % (seq, PAD, USER)


def test_full_outbound_buffers_pause_the_source_until_clients_drain_and_nothing_is_lost(
        start_broker, caplog):
    caplog.set_level("INFO", logger="mbroker")
    running = start_broker(max_buffered=MAX_BUFFERED, write_timeout=60.0,
                           max_client_buffer=64 * 1024 * 1024)
    go = threading.Event()
    stream = b"".join(event(seq) for seq in range(1, EVENTS + 1))
    readers = []
    for _ in range(STALLED_CLIENTS):
        sock = tiny_receiver(running.client_port, USER, rcvbuf=4096)
        readers.append(Reader(sock, expected=len(stream), timeout=10, start_event=go))
    wait_until(lambda: running.stats().clients == STALLED_CLIENTS)
    for reader in readers:
        reader.start()  # each waits for `go` before reading anything
    source = small_sender(running.event_port, sndbuf=65536)
    try:
        sent, offered = send_until_blocked(source, stream, stall=0.5, budget=10.0), len(stream)
        assert sent < offered, "the source was never pushed back on"
        # finish with a bounded tail: whole events up to AFTER_PUSHBACK past the block
        whole_events = stream.count(b"\n", 0, sent)
        total_events = min(EVENTS, whole_events + AFTER_PUSHBACK)
        stream = b"".join(event(seq) for seq in range(1, total_events + 1))
        for reader in readers:
            reader.expected = len(stream)
        stats = running.stats()
        assert stats.source.paused, stats.source
        assert stats.bytes_queued > MAX_BUFFERED
        read_before = stats.source.bytes_read
        wait_housekeeping_ticks(running)  # the loop has gone round, with bytes waiting
        stats = running.stats()
        assert stats.source.bytes_read == read_before, "a paused source is still read"
        assert stats.counters.slow_consumers == 0
        # the clients start reading: the broker drains, resumes and takes the rest
        go.set()
        source.settimeout(15)
        source.sendall(stream[sent:])
    finally:
        go.set()
    for index, reader in enumerate(readers):
        received = reader.result()
        assert len(received) == len(stream), f"client {index}: {len(received)} bytes"
        assert received == stream, f"client {index}: stream not complete and in order"
    stats = running.stats()
    assert not stats.source.paused
    assert stats.counters.slow_consumers == 0
    assert stats.events_dispatched == total_events
    messages = [r.getMessage() for r in caplog.records]
    assert any("pausing the event source" in m for m in messages), messages
    relieved = [m for m in messages if "backpressure relieved" in m]
    assert relieved, messages
    for message in relieved:  # resumed only once below half of --max-buffered
        queued = int(re.search(r"(\d+) bytes queued", message).group(1))
        assert queued <= MAX_BUFFERED // 2, message


def test_broadcast_fan_out_to_many_stalled_clients_stays_near_the_limit(start_broker,
                                                                         monkeypatch):
    # Small kernel send buffers (as for remote clients) so the broker's own
    # queues, not the kernel's, take the fan-out.
    give_accepted_sockets_small_send_buffers(monkeypatch)
    limit = 1 << 20
    clients = 300
    line_length = 1000
    running = start_broker(max_buffered=limit, write_timeout=60.0)
    stalled = [tiny_receiver(running.client_port, user, rcvbuf=4096) for user in range(clients)]
    wait_until(lambda: running.stats().clients == clients)
    peak = 0
    source = small_sender(running.event_port)
    pad = b"0" * (line_length - 10)
    stream = b"".join(b"%s%d|B\r\n" % (pad, seq) for seq in range(1, 1001))
    sent = send_until_blocked(source, stream)

    def paused_noting_the_peak() -> bool:
        nonlocal peak
        stats = running.stats()
        peak = max(peak, stats.bytes_queued)
        return stats.source.paused

    wait_until(paused_noting_the_peak, timeout=3, interval=0.02,
               message=f"source not paused after {sent} bytes")
    # One slice may pass the limit by its fan-out budget (an eighth of the
    # limit) plus one broadcast to every client, never by a whole read.
    bound = limit + limit // 8 + clients * line_length
    assert peak <= bound, f"{peak} bytes queued for a limit of {limit}"
    for sock in stalled:
        sock.close()
