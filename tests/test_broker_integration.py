"""The broker over real loopback sockets (issue 2, "What must work"): the
protocol of SPEC §2 end to end, source reconnects and takeovers, the write
path, close reasons and logs, and the command line (SPEC §1, §3, §4).

Every test broker listens on ephemeral loopback ports. Where a test must know
that nothing else arrived, it sends a final broadcast as a barrier: all bytes
up to and including the barrier must equal the expected bytes exactly."""

from __future__ import annotations

import logging
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields

import pytest

import mbroker
from mbroker import CloseReason
from tests.harness import (
    ROOT,
    WAIT,
    BrokerProcess,
    assert_nothing_more,
    connect_client,
    connect_source,
    expect,
    local_peer,
    read_until_closed,
    receive_exactly,
    reset,
    tiny_receiver,
    wait_closed,
    wait_dispatched,
    wait_registered,
    wait_until,
)

# -- SPEC §2: the protocol end to end -------------------------------------------


def test_five_event_types_reach_exactly_the_clients_they_concern_byte_for_byte(broker):
    users = (60, 50, 12, 9, 32, 56, 1)
    clients = {user: connect_client(broker.client_port, user) for user in users}
    wait_registered(broker, len(users))
    source = connect_source(broker.event_port)
    source.sendall(b"1|F|60|50\r\n"  # 50 is told; 60 now follows 50
                   b"2|F|12|9\n"  # 9 is told; 12 follows 9
                   b"3|U|12|9\r\n"  # nobody is told; 12 no longer follows 9
                   b"4|B\r\n"  # everyone
                   b"5|P|32|56\r\n"  # only 56
                   b"6|S|50\r\n"  # the followers of 50: 60
                   b"7|S|9\n"  # 9 has no followers left
                   b"8|B\r\n")  # barrier
    expected = dict.fromkeys(users, b"4|B\r\n8|B\r\n")
    expected[50] = b"1|F|60|50\r\n4|B\r\n8|B\r\n"
    expected[9] = b"2|F|12|9\n4|B\r\n8|B\r\n"
    expected[56] = b"4|B\r\n5|P|32|56\r\n8|B\r\n"
    expected[60] = b"4|B\r\n6|S|50\r\n8|B\r\n"
    for user, sock in clients.items():
        assert receive_exactly(sock, len(expected[user])) == expected[user], f"user {user}"


def test_status_update_reaches_only_followers_current_at_its_sequence_number(broker):
    clients = {user: connect_client(broker.client_port, user) for user in (1, 2, 3)}
    wait_registered(broker, 3)
    source = connect_source(broker.event_port)
    # Sent out of order: the follow graph must be applied in sequence order.
    source.sendall(b"5|S|3\r\n4|U|1|3\r\n2|S|3\r\n3|F|2|3\r\n1|F|1|3\r\n6|B\r\n")
    expect(clients[1], b"2|S|3\r\n6|B\r\n")
    expect(clients[2], b"5|S|3\r\n6|B\r\n")
    expect(clients[3], b"1|F|1|3\r\n3|F|2|3\r\n6|B\r\n")


def test_follow_state_is_kept_for_a_user_who_connects_later(broker):
    source = connect_source(broker.event_port)
    source.sendall(b"1|F|7|8\r\n2|F|9|8\r\n3|U|9|8\r\n")
    wait_dispatched(broker, 3)
    follower = connect_client(broker.client_port, 7, wait_registered=broker)
    unfollowed = connect_client(broker.client_port, 9, wait_registered=broker)
    wait_registered(broker, 2)
    source.sendall(b"4|S|8\r\n5|B\r\n")
    expect(follower, b"4|S|8\r\n5|B\r\n")
    expect(unfollowed, b"5|B\r\n")


def test_following_twice_delivers_both_follows_and_unfollowing_a_non_follower_does_nothing(
        broker):
    clients = {user: connect_client(broker.client_port, user) for user in (1, 2, 3)}
    wait_registered(broker, 3)
    source = connect_source(broker.event_port)
    source.sendall(b"1|F|1|2\r\n2|F|1|2\r\n3|U|3|2\r\n4|S|2\r\n5|U|1|2\r\n6|S|2\r\n7|B\r\n")
    expect(clients[2], b"1|F|1|2\r\n2|F|1|2\r\n7|B\r\n")
    expect(clients[1], b"4|S|2\r\n7|B\r\n")
    expect(clients[3], b"7|B\r\n")


def test_ids_and_sequence_numbers_compare_as_integers(broker):
    client = connect_client(broker.client_port, b"007\r\n")
    wait_registered(broker, 1)
    source = connect_source(broker.event_port)
    source.sendall(b"0002|P|1|0007\r\n001|F|7|00009\r\n3|F|0007|9\r\n04|S|9\r\n5|B\n")
    expect(client, b"0002|P|1|0007\r\n04|S|9\r\n5|B\n")
    assert broker.stats().follows == 1  # 7 following 9, stated twice


def test_empty_lines_are_ignored_and_anything_else_is_forwarded_unchanged(broker):
    client = connect_client(broker.client_port, 4)
    wait_registered(broker, 1)
    source = connect_source(broker.event_port)
    source.sendall(b"\r\n\n1|P|3|4\r\n\r\n\n\n2|B\n\r\n")
    expect(client, b"1|P|3|4\r\n2|B\n")
    assert_nothing_more(client, wait=0.1)
    counters = broker.stats().counters
    assert counters.malformed == counters.unsequenced == 0


def test_broadcast_goes_only_to_clients_that_announced_their_id(broker):
    registered = connect_client(broker.client_port, 1)
    silent = socket.create_connection(("127.0.0.1", broker.client_port), timeout=WAIT)
    wait_until(lambda: broker.stats().connections == 2)
    wait_registered(broker, 1)
    source = connect_source(broker.event_port)
    source.sendall(b"1|B\r\n")
    expect(registered, b"1|B\r\n")
    assert_nothing_more(silent, wait=0.2)


def test_late_joiner_receives_only_events_dispatched_after_it_registered(broker):
    early = connect_client(broker.client_port, 1)
    wait_registered(broker, 1)
    source = connect_source(broker.event_port)
    source.sendall(b"1|B\r\n2|P|5|2\r\n3|F|2|1\r\n")
    expect(early, b"1|B\r\n3|F|2|1\r\n")
    late = connect_client(broker.client_port, 2)
    wait_registered(broker, 2)
    source.sendall(b"4|B\r\n5|P|1|2\r\n")
    expect(late, b"4|B\r\n5|P|1|2\r\n")
    expect(early, b"4|B\r\n")


def test_two_clients_with_one_user_id_both_receive_every_notification(broker):
    phone = connect_client(broker.client_port, 5)
    laptop = connect_client(broker.client_port, b"  5 \n")
    other = connect_client(broker.client_port, 6)
    wait_registered(broker, 3)
    source = connect_source(broker.event_port)
    source.sendall(b"1|F|6|5\r\n2|P|6|5\r\n3|F|5|6\r\n4|S|6\r\n5|B\r\n")
    both = b"1|F|6|5\r\n2|P|6|5\r\n4|S|6\r\n5|B\r\n"
    expect(phone, both)
    expect(laptop, both)
    expect(other, b"3|F|5|6\r\n5|B\r\n")
    phone.close()  # the other device keeps receiving
    wait_registered(broker, 2)
    source.sendall(b"6|P|6|5\r\n")
    expect(laptop, b"6|P|6|5\r\n")


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


def test_anything_a_registered_client_sends_is_read_and_discarded(broker):
    chatty = connect_client(broker.client_port, 1)
    wait_registered(broker, 1)
    chatty.sendall(b"2\r\n1|B\r\nhello\xff\r\n" * 100)
    source = connect_source(broker.event_port)
    source.sendall(b"1|P|2|1\r\n2|P|1|2\r\n")
    expect(chatty, b"1|P|2|1\r\n")
    assert_nothing_more(chatty, wait=0.1)
    assert broker.stats().clients == 1


def test_events_split_one_byte_at_a_time_arrive_intact(broker):
    clients = {user: connect_client(broker.client_port, user) for user in (1, 2)}
    wait_registered(broker, 2)
    stream = b"2|F|1|2\r\n1|B\n\r\n4|S|2\r\n3|P|2|1\r\n5|B\r\n"
    source = connect_source(broker.event_port)
    source.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for index in range(len(stream)):
        source.send(stream[index:index + 1])
    expect(clients[1], b"1|B\n3|P|2|1\r\n4|S|2\r\n5|B\r\n")
    expect(clients[2], b"1|B\n2|F|1|2\r\n5|B\r\n")


def test_thousands_of_shuffled_events_in_one_sendall_arrive_in_sequence_order(broker):
    rng = random.Random(2)
    count, users = 5000, 8
    clients = {user: connect_client(broker.client_port, user) for user in range(1, users + 1)}
    wait_registered(broker, users)
    lines = []
    for seq in range(1, count + 1):
        kind = rng.choice("FUBPS")
        a, b = rng.randint(1, users), rng.randint(1, users)
        fields = {"F": f"{seq}|F|{a}|{b}", "U": f"{seq}|U|{a}|{b}", "B": f"{seq}|B",
                  "P": f"{seq}|P|{a}|{b}", "S": f"{seq}|S|{a}"}[kind]
        lines.append((seq, kind, a, b, (fields + rng.choice(["\n", "\r\n"])).encode()))
    expected = {user: [] for user in clients}
    followers: dict[int, set[int]] = {}
    for _seq, kind, a, b, raw in lines:
        if kind == "F":
            followers.setdefault(b, set()).add(a)
            expected[b].append(raw)
        elif kind == "U":
            followers.get(b, set()).discard(a)
        elif kind == "B":
            for user in expected:
                expected[user].append(raw)
        elif kind == "P":
            expected[b].append(raw)
        else:
            for user in followers.get(a, ()):
                expected[user].append(raw)
    wire = []
    for start in range(0, count, 100):  # shuffled within batches of 100
        batch = lines[start:start + 100]
        rng.shuffle(batch)
        wire.extend(raw for *_, raw in batch)
    source = connect_source(broker.event_port)
    source.sendall(b"".join(wire))
    for user, sock in clients.items():
        want = b"".join(expected[user])
        assert receive_exactly(sock, len(want)) == want, f"user {user}"
    stats = broker.stats()
    assert stats.next_seq == count + 1
    assert stats.counters.skipped == stats.counters.duplicate == 0


def test_huge_sequence_numbers_are_forwarded_once_declared_lost_numbers_are_skipped(
        start_broker):
    broker = start_broker(max_pending=1)
    client = connect_client(broker.client_port, 1)
    wait_registered(broker, 1)
    base = 10 ** 40
    source = connect_source(broker.event_port)
    source.sendall(f"{base + 1}|B\r\n{base + 2}|B\r\n".encode())
    expect(client, f"{base + 1}|B\r\n{base + 2}|B\r\n".encode())
    stats = broker.stats()
    assert stats.counters.skipped == base
    assert stats.next_seq == base + 3


# -- SPEC §3: the event source comes and goes -----------------------------------


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


def test_unterminated_last_line_of_an_old_source_is_not_joined_to_the_new_one(broker):
    clients = {user: connect_client(broker.client_port, user) for user in (1, 2)}
    wait_registered(broker, 2)
    first = connect_source(broker.event_port)
    first.sendall(b"1|B\r\n2|P|1")
    expect(clients[1], b"1|B\r\n")
    first.close()
    wait_closed(broker, CloseReason.SOURCE_QUIT)
    second = connect_source(broker.event_port)
    # Joined, the old bytes and these would read "2|P|1|2": a message to 2.
    second.sendall(b"|2\r\n2|B\r\n")
    expect(clients[1], b"2|B\r\n")
    expect(clients[2], b"1|B\r\n2|B\r\n")
    assert broker.stats().counters.unsequenced == 1


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


def test_readiness_of_a_replaced_source_in_the_same_wakeup_does_not_close_the_new_source(
        broker):
    """A newer source connects and the older one sends before the loop wakes:
    one select() reports both. Taking over closes the older socket; its stale
    readiness must then be ignored, not turned into closing the newer source."""
    client = connect_client(broker.client_port, 1)
    wait_registered(broker, 1)
    older = connect_source(broker.event_port)
    older.sendall(b"1|B\r\n")
    expect(client, b"1|B\r\n")
    broker.broker.call_in_loop(lambda: time.sleep(0.3))  # hold the loop for a moment
    time.sleep(0.05)
    newer = connect_source(broker.event_port)
    time.sleep(0.02)
    older.sendall(b"2|B\r\n")  # readable after the listener, in the same wakeup
    wait_closed(broker, CloseReason.SOURCE_REPLACED)
    # The stale readiness is handled in the same pass as the takeover, so by
    # now any wrongful close of the newer source has been recorded.
    stats = broker.stats()
    assert stats.closes[CloseReason.SOURCE_ERROR.value] == 0, stats.recently_closed
    assert stats.source.peer == local_peer(newer)
    newer.sendall(b"2|B\r\n3|B\r\n")
    expect(client, b"2|B\r\n3|B\r\n")


# -- issue 2 point 4: the write path -------------------------------------------


class CountingSocket:
    """Wraps a client's socket on the loop's thread to count send() calls."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.sends = 0

    def send(self, data, *flags):
        self.sends += 1
        return self._sock.send(data, *flags)

    def fileno(self):
        return self._sock.fileno()

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_many_notifications_for_one_client_leave_in_a_few_send_calls(broker):
    client = connect_client(broker.client_port, 1)
    wait_registered(broker, 1)
    counting: list[CountingSocket] = []

    def wrap():
        (connection,) = broker.broker.clients
        connection.sock = CountingSocket(connection.sock)
        counting.append(connection.sock)

    broker.broker.call_in_loop(wrap)
    wait_until(lambda: counting)
    count = 2000
    stream = b"".join(b"%d|P|2|1\r\n" % seq for seq in range(1, count + 1))
    source = connect_source(broker.event_port)
    source.sendall(stream)
    assert receive_exactly(client, len(stream)) == stream
    wait_until(lambda: broker.stats().bytes_out == len(stream))
    stats = broker.stats()
    (entry,) = stats.top_clients
    assert entry.bytes_sent == len(stream)
    assert entry.notifications_sent == count
    assert entry.queued_bytes == 0 and entry.queued_notifications == 0
    assert stats.notifications == count
    assert counting[0].sends <= 20, f"{counting[0].sends} send() calls for {count} lines"


def test_bytes_out_counts_every_byte_delivered_to_every_client(broker):
    clients = [connect_client(broker.client_port, user) for user in (1, 2, 2)]
    wait_registered(broker, 3)
    source = connect_source(broker.event_port)
    source.sendall(b"1|B\r\n2|P|1|2\n")
    expect(clients[0], b"1|B\r\n")
    expect(clients[1], b"1|B\r\n2|P|1|2\n")
    expect(clients[2], b"1|B\r\n2|P|1|2\n")
    wait_until(lambda: broker.stats().bytes_out == 3 * len(b"1|B\r\n") + 2 * len(b"2|P|1|2\n"))
    assert broker.stats().notifications == 5


# -- issue 2 point 6: every close has a reason ------------------------------------


def hello_then(broker, user):
    sock = connect_client(broker.client_port, user)
    wait_until(lambda: any(c.user_id == user for c in broker.stats().top_clients))
    return sock


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
    sock = hello_then(broker, 11)
    peer = local_peer(sock)
    sock.close()
    return broker, ("client", peer, 11)


def scenario_client_error(start_broker):
    broker = start_broker()
    sock = hello_then(broker, 12)
    peer = local_peer(sock)
    reset(sock)
    return broker, ("client", peer, 12)


def scenario_hello_timeout(start_broker):
    broker = start_broker(hello_timeout=0.3)
    sock = socket.create_connection(("127.0.0.1", broker.client_port), timeout=WAIT)
    sock.sendall(b"1")  # never finished
    ending = read_until_closed(sock)
    assert (ending.data, ending.how) == (b"", "eof")
    return broker, ("client", local_peer(sock), None)


def scenario_invalid_id(start_broker):
    broker = start_broker()
    sock = socket.create_connection(("127.0.0.1", broker.client_port), timeout=WAIT)
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
    sock = hello_then(broker, 15)
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
    sock = hello_then(broker, 21)
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


# -- the command line (issue 2 points 1 and 7) ----------------------------------


def run_mbroker(*arguments: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "mbroker.py"), *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_option_with_its_default():
    result = run_mbroker("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    defaults = mbroker.BrokerConfig()
    options = [item.name for item in fields(mbroker.BrokerConfig)
               if "help" in item.metadata and not item.metadata["positional"]]
    assert len(options) >= 9
    for name in options:
        option = "--" + name.replace("_", "-")
        assert option in text
        segment = text[text.rindex(option + " "):]  # its entry, not the usage line
        segment = segment[:segment.find(" --", 2)]  # up to the next option's entry
        assert f"(default: {getattr(defaults, name)})" in segment, segment
    for option in ("--host", "--max-line", "--max-pending", "--hello-timeout",
                   "--max-client-buffer", "--write-timeout", "--max-buffered",
                   "--drain-timeout", "--log-level", "--dashboard"):
        assert option in text
    assert "(default: 127.0.0.1)" in text
    assert "(default: INFO)" in text
    assert "(default: 9090)" in text and "(default: 9099)" in text


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_broker_cleanly_with_exit_0(start_broker_process, signum):
    process = start_broker_process()
    client = connect_client(process.client_port, 1)
    source = connect_source(process.event_port)
    source.sendall(b"1|B\r\n")
    expect(client, b"1|B\r\n")
    assert process.stop(signum) == 0
    assert "Traceback" not in process.log()
    assert read_until_closed(client).closed


@pytest.mark.parametrize("which", ["event", "client"])
def test_port_already_in_use_is_a_one_line_error_naming_it_with_exit_code_2(which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = [str(port), "0"] if which == "event" else ["0", str(port)]
        result = run_mbroker("--host", "127.0.0.1", *ports)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0]
    assert "in use" in lines[0]
    assert "Traceback" not in result.stderr


def test_importing_mbroker_imports_nothing_outside_the_standard_library():
    code = ("import sys; before = set(sys.modules); import mbroker; "
            "extra = sorted(m for m in set(sys.modules) - before "
            "if m.split('.')[0] not in sys.stdlib_module_names and m != 'mbroker'); "
            "print(repr(extra))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_broker_serves_on_a_python_without_site_packages(start_broker_process):
    """`python -I -S`: no site-packages at all, as on a bare Python 3.11."""
    process = start_broker_process(python_options=("-I", "-S"))
    client = connect_client(process.client_port, 3)
    time.sleep(0.1)
    source = connect_source(process.event_port)
    source.sendall(b"1|P|1|3\r\n")
    expect(client, b"1|P|1|3\r\n")
    assert process.stop(signal.SIGTERM, timeout=WAIT) == 0
    assert "Traceback" not in process.log()


def start_and_signal_as_soon_as_listening(signum: int) -> tuple[int, str]:
    """Start `python mbroker.py`, send `signum` the moment it logs that it
    listens (the line operators and tools wait for), return (exit code, stderr)."""
    process = BrokerProcess()
    try:
        process.send_signal(signum)
        return process.wait_exit(WAIT), process.log()
    finally:
        process.close()


def test_signal_right_after_the_listening_line_still_exits_0_without_traceback():
    outcomes = [start_and_signal_as_soon_as_listening(signum)
                for signum in [signal.SIGINT, signal.SIGTERM] * 4]
    failures = [(code, stderr[-400:]) for code, stderr in outcomes
                if code != 0 or "Traceback" in stderr]
    assert not failures, f"{len(failures)} of {len(outcomes)} runs: {failures[0]}"


def test_by_default_both_ports_listen_on_loopback_only(broker):
    # Whoever reaches the event port can publish to every user (SPEC §3).
    assert broker.broker.event_listener.sock.getsockname()[0] == "127.0.0.1"
    assert broker.broker.client_listener.sock.getsockname()[0] == "127.0.0.1"


def test_log_level_warning_hides_info_lines_and_debug_shows_registrations(
        start_broker_process):
    # At WARNING the listening line is hidden too: wait for both ports to listen.
    quiet = start_broker_process("--log-level", "WARNING", listening_line=False)
    assert quiet.stop() == 0
    assert " INFO " not in quiet.log() and "listening" not in quiet.log()
    chatty = start_broker_process("--log-level", "DEBUG")
    with connect_client(chatty.client_port, 1):
        chatty.wait_for_log(r"\(user 1\) registered")
    assert chatty.stop() == 0
    assert " DEBUG " in chatty.log() and "(user 1) registered" in chatty.log()
