"""Every close has a reason (docs/behaviour.md §4): each CloseReason is counted
under `closes` in stats(), recorded with its peer and user among the recent closes
and named in the close log line; and a client that leaves, however it leaves,
closes that connection alone (§4.12)."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from mbroker import CloseReason
from tests.harness import (
    WAIT,
    assert_serving,
    connect_client,
    connect_source,
    expect,
    local_peer,
    raw_client,
    read_until_closed,
    receive_exactly,
    reset,
    tiny_receiver,
    wait_closed,
    wait_registered,
    wait_until,
)


def test_client_leaving_with_a_reset_leaves_other_clients_receiving(broker):
    leaving = connect_client(broker.client_port, 1)
    staying = connect_client(broker.client_port, 2)
    wait_registered(broker, 2)
    source = connect_source(broker.event_port)
    source.sendall(b"1|B\r\n")
    expect(leaving, b"1|B\r\n")
    expect(staying, b"1|B\r\n")
    peer = local_peer(leaving)
    reset(leaving)
    source.sendall(b"2|P|2|1\r\n3|B\r\n")  # one for the leaver, one for all
    expect(staying, b"3|B\r\n")
    (closed,) = wait_closed(broker, CloseReason.CLIENT_ERROR)
    assert (closed.kind, closed.peer, closed.user_id) == ("client", peer, 1)
    source.sendall(b"4|P|1|2\r\n")
    expect(staying, b"4|P|1|2\r\n")
    assert broker.stats().clients == 1


def test_half_closed_client_is_closed_alone(broker):
    other = connect_client(broker.client_port, 6, wait_registered=broker)
    half = connect_client(broker.client_port, 5, wait_registered=broker)
    half.shutdown(socket.SHUT_WR)  # EOF from a client closes that connection only
    assert read_until_closed(half, timeout=2.0).closed
    assert broker.stats().closes["client_quit"] == 1
    source = connect_source(broker.event_port)
    source.sendall(b"1|B\r\n")
    assert receive_exactly(other, 5) == b"1|B\r\n"


def test_clients_reset_mid_hello_or_with_bytes_queued_are_closed_alone(start_broker):
    running = start_broker(write_timeout=30.0, max_client_buffer=64 * 1024 * 1024)
    healthy = connect_client(running.client_port, 5, wait_registered=running)
    mid_hello = raw_client(running.client_port)
    mid_hello.sendall(b"12")
    stalled = tiny_receiver(running.client_port, 5, rcvbuf=4096)
    wait_until(lambda: running.stats().clients == 2)
    reset(mid_hello)
    source = connect_source(running.event_port)
    pad = b"4" * 3900
    first_half = b"".join(b"%d|P|%s|5\r\n" % (seq, pad) for seq in range(1, 601))
    second_half = b"".join(b"%d|P|%s|5\r\n" % (seq, pad) for seq in range(601, 1201))
    events = first_half + second_half
    reader_bytes = bytearray()
    source.sendall(first_half)
    healthy.settimeout(WAIT)
    while len(reader_bytes) < len(first_half):  # keep the healthy client drained
        reader_bytes += healthy.recv(1 << 20)
    reset(stalled)  # RST while the broker holds bytes for it
    source.sendall(second_half)
    healthy.settimeout(WAIT)
    deadline = time.monotonic() + WAIT
    while len(reader_bytes) < len(events) and time.monotonic() < deadline:
        reader_bytes += healthy.recv(1 << 20)
    assert bytes(reader_bytes) == events
    wait_until(lambda: running.stats().connections == 1)
    closes = running.stats().closes
    assert closes["client_error"] + closes["client_quit"] == 2
    assert closes["slow_consumer_buffer"] == closes["slow_consumer_timeout"] == 0
    assert_serving(running, source, seq=1201)

# -- one scenario per close reason -------------------------------------------------------


def flood_one_client(broker, user: int, megabytes: int = 4) -> None:
    """Send private messages to `user` until kernel buffers surely fill."""
    padding = "9" * 3000
    source = connect_source(broker.event_port)
    seq = broker.stats().next_seq
    batch = []
    for _ in range(megabytes * 1024 * 1024 // 3000):
        batch.append(f"{seq}|P|{padding}|{user}\r\n".encode())
        seq += 1
    source.sendall(b"".join(batch))
    source.close()


KEEP_OPEN: list[socket.socket] = []  # sockets a scenario must not let the GC close


@pytest.fixture(autouse=True)
def _close_kept_sockets():
    yield
    while KEEP_OPEN:
        KEEP_OPEN.pop().close()


def scenario_client_quit(start_broker):
    broker = start_broker()
    sock = connect_client(broker.client_port, 11, wait_registered=broker)
    peer = local_peer(sock)
    sock.close()
    return broker, ("client", peer, 11)


def scenario_client_error(start_broker):
    broker = start_broker()
    sock = connect_client(broker.client_port, 12, wait_registered=broker)
    peer = local_peer(sock)
    reset(sock)
    return broker, ("client", peer, 12)


def scenario_hello_timeout(start_broker):
    broker = start_broker(hello_timeout=0.3)
    sock = raw_client(broker.client_port)
    sock.sendall(b"1")  # never finished
    ending = read_until_closed(sock)
    assert (ending.data, ending.how) == (b"", "eof")
    return broker, ("client", local_peer(sock), None)


def scenario_invalid_id(start_broker):
    broker = start_broker()
    sock = raw_client(broker.client_port)
    sock.sendall(b"not-a-number\r\n")
    assert read_until_closed(sock).closed
    return broker, ("client", local_peer(sock), None)


def scenario_slow_consumer_buffer(start_broker):
    broker = start_broker(max_client_buffer=64 * 1024)
    sock = tiny_receiver(broker.client_port, 13)
    KEEP_OPEN.append(sock)
    wait_registered(broker, 1)
    flood_one_client(broker, 13)
    return broker, ("client", local_peer(sock), 13)


def scenario_slow_consumer_timeout(start_broker):
    broker = start_broker(write_timeout=0.5)
    sock = tiny_receiver(broker.client_port, 14)
    KEEP_OPEN.append(sock)
    wait_registered(broker, 1)
    flood_one_client(broker, 14)
    return broker, ("client", local_peer(sock), 14)


def scenario_source_quit(start_broker):
    broker = start_broker()
    source = connect_source(broker.event_port)
    wait_until(lambda: broker.stats().source.connected)
    peer = local_peer(source)
    source.close()
    return broker, ("source", peer, None)


def scenario_source_error(start_broker):
    broker = start_broker()
    source = connect_source(broker.event_port)
    wait_until(lambda: broker.stats().source.connected)
    peer = local_peer(source)
    reset(source)
    return broker, ("source", peer, None)


def scenario_source_replaced(start_broker):
    broker = start_broker()
    older = connect_source(broker.event_port)
    wait_until(lambda: broker.stats().source.connected)
    newer = connect_source(broker.event_port)
    KEEP_OPEN.append(newer)
    wait_until(lambda: broker.stats().source.peer == local_peer(newer))
    return broker, ("source", local_peer(older), None)


def scenario_shutdown(start_broker):
    broker = start_broker()
    sock = connect_client(broker.client_port, 15, wait_registered=broker)
    broker.stop()
    assert read_until_closed(sock).closed
    return broker, ("client", local_peer(sock), 15)


CLOSE_SCENARIOS = {
    CloseReason.CLIENT_QUIT: scenario_client_quit,
    CloseReason.CLIENT_ERROR: scenario_client_error,
    CloseReason.HELLO_TIMEOUT: scenario_hello_timeout,
    CloseReason.INVALID_ID: scenario_invalid_id,
    CloseReason.SLOW_CONSUMER_BUFFER: scenario_slow_consumer_buffer,
    CloseReason.SLOW_CONSUMER_TIMEOUT: scenario_slow_consumer_timeout,
    CloseReason.SOURCE_QUIT: scenario_source_quit,
    CloseReason.SOURCE_ERROR: scenario_source_error,
    CloseReason.SOURCE_REPLACED: scenario_source_replaced,
    CloseReason.SHUTDOWN: scenario_shutdown,
}


@pytest.mark.parametrize("reason", list(CloseReason), ids=lambda reason: reason.value)
def test_every_close_is_recorded_with_its_reason_in_stats(start_broker, reason):
    broker, (kind, peer, user_id) = CLOSE_SCENARIOS[reason](start_broker)
    wait_until(lambda: broker.stats().closes[reason.value] >= 1)
    stats = broker.stats()
    assert set(stats.closes) == {member.value for member in CloseReason}
    matching = [c for c in stats.recently_closed if c.peer == peer]
    assert matching, stats.recently_closed
    closed = matching[-1]
    assert closed.reason is reason
    assert (closed.kind, closed.user_id) == (kind, user_id)
    assert stats.closes[reason.value] == sum(
        c.reason is reason for c in stats.recently_closed)
    if reason.is_slow_consumer:
        assert stats.counters.slow_consumers == 1


def test_close_log_lines_name_the_peer_the_user_and_the_reason(broker, caplog):
    caplog.set_level(logging.INFO, logger="mbroker")
    sock = connect_client(broker.client_port, 21, wait_registered=broker)
    peer = local_peer(sock)
    reset(sock)
    wait_closed(broker, CloseReason.CLIENT_ERROR)
    source = connect_source(broker.event_port)
    wait_until(lambda: broker.stats().source.connected)
    source_peer = local_peer(source)
    source.close()
    wait_closed(broker, CloseReason.SOURCE_QUIT)
    messages = [record.getMessage() for record in caplog.records]
    assert any(peer in m and "21" in m and "client_error" in m for m in messages), messages
    assert any(source_peer in m and "source_quit" in m for m in messages), messages
