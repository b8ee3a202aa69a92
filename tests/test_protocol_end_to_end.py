"""The protocol over real loopback sockets (docs/behaviour.md §2 and §3.1–§3.3):
what each event type changes and whom it reaches, byte for byte, in sequence order,
for clients that register, leave and share an id.

Each test starts an in-process broker on ephemeral loopback ports. Where a test
must know that nothing else arrived, it sends a final broadcast as a barrier: all
bytes up to and including the barrier must equal the expected bytes exactly."""

from __future__ import annotations

import random
import socket

from tests.harness import (
    assert_nothing_more,
    connect_client,
    connect_source,
    expect,
    receive_exactly,
    wait_dispatched,
    wait_registered,
)


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


def test_empty_lines_are_skipped_uncounted_and_everything_else_is_forwarded_unchanged(broker):
    client = connect_client(broker.client_port, 4)
    wait_registered(broker, 1)
    source = connect_source(broker.event_port)
    source.sendall(b"\r\n\n1|P|3|4\r\n\r\n\n\n2|B\n\r\n\n\r\n3|B\r\n\n4|B\n")
    expect(client, b"1|P|3|4\r\n2|B\n3|B\r\n4|B\n")
    assert_nothing_more(client)
    stats = broker.stats()
    assert stats.counters.malformed == stats.counters.unsequenced == 0
    assert stats.next_seq == 5  # an empty line consumes no sequence number


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
