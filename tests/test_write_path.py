"""The write path: a client's notifications leave in few send() calls (the output
is flushed per dispatch pass, docs/behaviour.md §6.2, §6.11), and the byte and
notification counts of stats() match what the clients received."""

from __future__ import annotations

import socket

from tests.harness import (
    connect_client,
    connect_source,
    expect,
    receive_exactly,
    wait_registered,
    wait_until,
)


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
