"""The client hello (docs/behaviour.md §2.2.1, §2.2.2, §2.2.6, §4.10, §4.11): a
client receives nothing until its id is read; one that sends no id within
--hello-timeout is closed (hello_timeout); an invalid id (not digits, over 32
digits, or a first line over 64 bytes, even before its newline) is closed at
once (invalid_id). Both are logged; other clients are never disturbed."""

from __future__ import annotations

import time

from tests.harness import (
    assert_nothing_more,
    connect_client,
    connect_source,
    raw_client,
    read_until_closed,
    receive_exactly,
    wait_until,
)

INVALID_HELLOS = {
    "letters": b"abc\n",
    "negative": b"-5\n",
    "plus sign": b"+5\n",
    "underscore": b"1_000\n",
    "two numbers": b"1 2\n",
    "empty line": b"\n",
    "only spaces": b"   \r\n",
    "arabic-indic digit": "\u0663\n".encode(),
    "non-UTF-8": b"\xff\xfe\n",
    "event line": b"7|B\r\n",
    "33 digits": b"1" * 33 + b"\n",
    "65-byte line with a short id": b" " * 60 + b"12345\n",
    "65 bytes, no newline yet": b"x" * 65,
    "65 digits, no newline yet": b"1" * 65,
}


def test_client_without_an_id_receives_nothing_and_is_closed_after_the_hello_timeout(
        start_broker, caplog):
    caplog.set_level("WARNING", logger="mbroker")
    running = start_broker(hello_timeout=0.3)
    registered = connect_client(running.client_port, 5, wait_registered=running)
    started = time.monotonic()
    silent = raw_client(running.client_port)
    partial = raw_client(running.client_port)
    partial.sendall(b"12")  # an id without its newline is not an id yet
    wait_until(lambda: running.stats().awaiting_hello == 2)
    source = connect_source(running.event_port)
    source.sendall(b"1|B\r\n")  # only announced clients are "connected"
    assert receive_exactly(registered, 5) == b"1|B\r\n"
    for sock in (silent, partial):
        ending = read_until_closed(sock, timeout=3.0)
        assert ending.closed, "a client without an id was never closed"
        assert ending.data == b"", "an unannounced client received a notification"
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 2.0, elapsed
    stats = running.stats()
    assert stats.closes["hello_timeout"] == 2
    assert stats.awaiting_hello == 0 and stats.connections == 1
    assert sum("hello_timeout" in r.getMessage() for r in caplog.records) == 2
    # the registered client outlives the hello timeout and keeps receiving
    source.sendall(b"2|P|1|5\r\n")
    assert receive_exactly(registered, 9) == b"2|P|1|5\r\n"


def test_invalid_ids_are_closed_at_once_and_others_keep_receiving(start_broker, caplog):
    caplog.set_level("WARNING", logger="mbroker")
    running = start_broker(hello_timeout=10.0)
    healthy = connect_client(running.client_port, 5, wait_registered=running)
    started = time.monotonic()
    bad = {}
    for name, hello in INVALID_HELLOS.items():
        bad[name] = raw_client(running.client_port)
        bad[name].sendall(hello)
    deadline = started + 2.0
    not_closed = [name for name, sock in bad.items()
                  if not read_until_closed(sock, max(0.1, deadline - time.monotonic())).closed]
    assert not not_closed, f"invalid ids not closed at once: {not_closed}"
    assert time.monotonic() - started < 2.0
    stats = running.stats()
    assert stats.closes["invalid_id"] == len(INVALID_HELLOS)
    assert stats.closes["hello_timeout"] == 0
    assert stats.connections == 1
    assert any("invalid_id" in r.getMessage() for r in caplog.records)
    source = connect_source(running.event_port)
    source.sendall(b"1|B\r\n2|P|1|5\r\n")
    assert receive_exactly(healthy, 14) == b"1|B\r\n2|P|1|5\r\n"
    assert_nothing_more(healthy)


def test_valid_ids_with_spaces_leading_zeros_32_digits_or_split_are_accepted(start_broker):
    running = start_broker(hello_timeout=10.0)
    big = int("9" * 32)
    padded = b" " * 62 + b"42"  # 64 bytes before the newline: the longest allowed
    assert len(padded) == 64
    hellos = [(b"  8  \r\n", 8), (b"007\n", 7), (b"9" * 32 + b"\r\n", big), (padded + b"\n", 42)]
    clients = [(connect_client(running.client_port, hello), uid) for hello, uid in hellos]
    split = raw_client(running.client_port)
    # Paced, so that the broker is likely to read the id in three pieces.
    split.sendall(b"1")
    time.sleep(0.05)
    split.sendall(b"3\r")
    time.sleep(0.05)
    split.sendall(b"\n")
    clients.append((split, 13))
    wait_until(lambda: running.stats().clients == len(clients))
    source = connect_source(running.event_port)
    events = [b"%d|P|1|%d\r\n" % (seq, uid) for seq, (_, uid) in enumerate(clients, start=1)]
    source.sendall(b"".join(events))
    for (sock, _uid), event in zip(clients, events, strict=True):
        assert receive_exactly(sock, len(event)) == event
        assert_nothing_more(sock, wait=0.05)
    assert running.stats().closes["invalid_id"] == 0
