"""The event source comes and goes (docs/behaviour.md §4.8, §4.9, §6.10): the
sequence state outlives a source connection, an unterminated last line dies with
its connection, a half-closed source still has its complete lines delivered, and a
newer source takes over from an older one."""

from __future__ import annotations

import logging
import select
import socket
import threading

import pytest

from mbroker import CloseReason
from tests.harness import (
    WAIT,
    assert_nothing_more,
    assert_serving,
    connect_client,
    connect_source,
    expect,
    local_peer,
    read_until_closed,
    receive_exactly,
    reset,
    wait_closed,
    wait_registered,
    wait_until,
)


def test_source_reconnect_continues_the_stream_and_drops_already_delivered_numbers(broker):
    clients = {user: connect_client(broker.client_port, user) for user in (1, 2)}
    wait_registered(broker, 2)
    first = connect_source(broker.event_port)
    first.sendall(b"1|F|1|2\r\n2|B\r\n4|S|2\r\n")  # 3 missing: 4 waits
    expect(clients[2], b"1|F|1|2\r\n2|B\r\n")
    first.close()
    wait_closed(broker, CloseReason.SOURCE_QUIT)
    stats = broker.stats()
    assert stats.next_seq == 3 and stats.reorder_depth == 1
    assert not stats.source.connected
    second = connect_source(broker.event_port)
    # A safe resend: 1 and 2 were delivered, 4 is waiting; only 3 and 5 are new.
    second.sendall(b"1|F|1|2\r\n2|B\r\n4|S|2\r\n3|P|2|1\r\n5|B\r\n")
    expect(clients[1], b"2|B\r\n3|P|2|1\r\n4|S|2\r\n5|B\r\n")
    expect(clients[2], b"5|B\r\n")
    stats = broker.stats()
    assert stats.counters.duplicate == 3
    assert stats.next_seq == 6
    assert stats.source.connections == 2


@pytest.mark.parametrize("leaving", ["close", "reset"])
def test_unterminated_last_line_of_a_source_that_left_is_never_joined_to_the_next(broker,
                                                                                   leaving):
    clients = {user: connect_client(broker.client_port, user) for user in (1, 2)}
    wait_registered(broker, 2)
    first = connect_source(broker.event_port)
    sent = b"1|B\r\n2|P|1"
    first.sendall(sent)
    expect(clients[1], b"1|B\r\n")
    wait_until(lambda: broker.stats().source.bytes_read == len(sent))  # the fragment too
    if leaving == "close":
        first.close()
    else:
        reset(first)
    wait_until(lambda: not broker.stats().source.connected)
    second = connect_source(broker.event_port)
    # Joined, the old bytes and these would read "2|P|1|2": a message to 2.
    second.sendall(b"|2\r\n2|B\r\n")
    expect(clients[1], b"2|B\r\n")
    expect(clients[2], b"1|B\r\n2|B\r\n")
    for sock in clients.values():
        assert_nothing_more(sock)
    stats = broker.stats()
    assert stats.counters.unsequenced == 1
    assert stats.closes["source_quit"] + stats.closes["source_error"] == 1
    if leaving == "close":
        assert stats.closes["source_quit"] == 1


def test_half_closed_source_has_its_terminated_lines_delivered(broker):
    user5 = connect_client(broker.client_port, 5, wait_registered=broker)
    source = connect_source(broker.event_port)
    source.sendall(b"1|B\r\n2|P|1|5\r\n3|P|1|5")  # the last line is never terminated
    source.shutdown(socket.SHUT_WR)
    expected = b"1|B\r\n2|P|1|5\r\n"
    assert receive_exactly(user5, len(expected)) == expected
    wait_until(lambda: broker.stats().closes["source_quit"] == 1)
    assert read_until_closed(source, timeout=2.0).closed
    stats = broker.stats()
    assert stats.next_seq == 3
    assert_serving(broker, seq=3)


def test_newer_source_connection_takes_over_and_the_older_one_is_closed(broker):
    client = connect_client(broker.client_port, 1)
    wait_registered(broker, 1)
    older = connect_source(broker.event_port)
    older.sendall(b"1|B\r\n2|P|9")  # the unterminated line dies with the connection
    expect(client, b"1|B\r\n")
    older_peer = local_peer(older)
    newer = connect_source(broker.event_port)
    ending = read_until_closed(older)
    assert (ending.data, ending.how) in ((b"", "eof"), (b"", "reset"))
    (closed,) = wait_closed(broker, CloseReason.SOURCE_REPLACED)
    assert (closed.kind, closed.peer) == ("source", older_peer)
    newer.sendall(b"|1\r\n2|B\r\n3|P|9|1\r\n")
    expect(client, b"2|B\r\n3|P|9|1\r\n")
    stats = broker.stats()
    assert stats.source.connected
    assert stats.source.peer == local_peer(newer)


def test_older_source_readable_in_the_same_wakeup_as_the_takeover_leaves_the_newer_connected(
        broker):
    """A newer source connects and the older one sends before the loop wakes:
    one select() reports both. Taking over closes the older socket; its stale
    readiness must then be ignored, not turned into closing the newer source,
    whichever order the two are handled in."""
    user5 = connect_client(broker.client_port, 5, wait_registered=broker)
    old = connect_source(broker.event_port)
    old.sendall(b"1|P|1|5\r\n")
    expect(user5, b"1|P|1|5\r\n")
    held, release = threading.Event(), threading.Event()

    def hold_the_loop() -> None:
        held.set()
        release.wait(WAIT)

    broker.broker.call_in_loop(hold_the_loop)
    assert held.wait(WAIT)
    try:
        new = connect_source(broker.event_port)  # completes in the kernel backlog
        old.sendall(b"2|P|1|")  # unterminated: never delivered, whoever reads it
        # The loop is held, so its sockets can be looked at from here: wait until
        # its next select() will report both the listener and the older source.
        waiting = [broker.broker.event_listener.sock, broker.broker.source.sock]
        wait_until(lambda: len(select.select(waiting, [], [], 0)[0]) == 2)
    finally:
        release.set()
    new.sendall(b"2|P|2|5\r\n3|B\r\n")
    expected = b"2|P|2|5\r\n3|B\r\n"
    received = receive_exactly(user5, len(expected), timeout=2.0)
    assert received == expected, broker.stats().recently_closed
    assert_nothing_more(user5)
    stats = broker.stats()
    assert stats.source.connected, "the new event source was closed"
    assert stats.source.peer == local_peer(new)
    assert stats.closes["source_replaced"] == 1
    assert stats.closes["source_error"] == 0, stats.recently_closed
    assert read_until_closed(old, timeout=2.0).closed


def test_a_new_source_starting_again_at_1_is_told_why_its_events_vanish(broker, caplog):
    caplog.set_level(logging.INFO, logger="mbroker")  # the source's close line is INFO
    client = connect_client(broker.client_port, 2, wait_registered=broker)
    first = connect_source(broker.event_port)
    first.sendall(b"1|P|1|2\r\n2|P|1|2\r\n3|P|1|2\r\n")
    expect(client, b"1|P|1|2\r\n2|P|1|2\r\n3|P|1|2\r\n")
    first.close()
    wait_until(lambda: not broker.stats().source.connected)
    second = connect_source(broker.event_port)  # a second load run, say
    second.sendall(b"1|P|9|2\r\n2|P|9|2\r\n")
    wait_until(lambda: broker.stats().counters.duplicate == 2)
    second.close()
    wait_until(lambda: broker.stats().source.connections == 2
               and not broker.stats().source.connected)
    warning = next(record for record in caplog.records if "were already dispatched" in
                   record.getMessage())
    assert warning.levelname == "WARNING"
    assert "2 events dropped as duplicates (sequence numbers 1..2 were already dispatched or " \
           "waiting; next expected 4); a source that starts a new stream from 1 needs a " \
           "fresh broker" in warning.getMessage()
    closed = [record.getMessage() for record in caplog.records
              if "closed: source_quit" in record.getMessage()]
    assert "0 events dropped as duplicates" in closed[0]
    assert "2 events dropped as duplicates" in closed[1]
    assert_nothing_more(client)
