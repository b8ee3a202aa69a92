"""Never crash, never leak, never spin (docs/behaviour.md §3.6, §4.16, §4.17):
garbage and non-UTF-8 bytes on either port and connect/disconnect churn leave the
broker serving, with its file descriptors back where they started; an accept burst
is taken whole; running out of file descriptors (EMFILE) pauses accepting, without
spinning, while connected clients keep being served, the event source still gets
in on its spare descriptor, and accepting resumes once descriptors are free again;
an accept error of one connection is skipped, any other pauses accepting."""

from __future__ import annotations

import errno
import logging
import os
import random
import resource
import selectors
import socket
import time

import pytest

import mbroker
from tests.harness import (
    WAIT,
    assert_nothing_more,
    assert_serving,
    connect_client,
    connect_source,
    cpu_seconds,
    open_fds,
    raw_client,
    read_until_closed,
    receive_exactly,
    reset,
    wait_until,
)

DIGITS = frozenset(b"0123456789")


def garbage(seed: int, size: int) -> bytes:
    """Seeded random bytes without ASCII digits (so no line can carry a valid SEQ),
    ending with a newline so whatever follows starts a fresh line."""
    rng = random.Random(seed)
    data = bytes(b for b in rng.randbytes(size * 2) if b not in DIGITS)[:size - 1]
    return data + b"\n"


def count_lines_without_a_seq(data: bytes, max_line: int) -> tuple[int, int]:
    """(overlong, unsequenced): how a broker counts the complete lines of `data`
    when none of them has a valid SEQ. A line longer than max_line before its
    newline, its "\\r" included, is overlong; an empty one (the newline, or
    "\\r\\n", alone) is skipped; any other is unsequenced (docs/behaviour.md
    §2.1.1, §2.1.9, §4.2, §4.3)."""
    overlong = unsequenced = 0
    for line in data.split(b"\n")[:-1]:
        if len(line) > max_line:
            overlong += 1
        elif line not in (b"", b"\r"):
            unsequenced += 1
    return overlong, unsequenced


def test_garbage_and_non_utf8_bytes_on_the_event_port_never_crash_the_broker(start_broker):
    max_line = 512
    running = start_broker(max_line=max_line)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    noise = garbage(1, 300_000)
    # bytes that look almost like events, invalid UTF-8, NULs, lone CRs, pipes
    near_misses = b"|||\r\n\x00|B\r\n\xc3\x28|P\r\n\r\r\r\n|\xff|\xfe|\n\xed\xa0\x80\r\n"
    source.sendall(noise)
    source.sendall(near_misses)
    source.sendall(b"1|B\r\n")
    assert receive_exactly(user5, 5) == b"1|B\r\n"
    assert_nothing_more(user5)
    counters = running.stats().counters
    overlong, unsequenced = count_lines_without_a_seq(noise + near_misses, max_line)
    assert overlong > 0  # the seeded noise has lines both over and under the limit
    assert counters.unsequenced > 100
    assert (counters.overlong, counters.unsequenced) == (overlong, unsequenced)
    assert counters.malformed == 0
    # garbage cut off by a reset, then a new source
    rogue = connect_source(running.event_port)
    rogue.sendall(garbage(2, 50_000)[:-1])
    reset(rogue)
    assert_serving(running, seq=2)
    assert_nothing_more(user5)


def test_garbage_on_the_client_port_never_crashes_the_broker(start_broker):
    running = start_broker(hello_timeout=5.0)
    chatty = connect_client(running.client_port, 5, wait_registered=running)
    rng = random.Random(3)
    for _ in range(20):  # a registered client talking nonsense is read and ignored
        chatty.sendall(rng.randbytes(2000))
    garbage_hellos = []
    for seed in range(30):
        sock = raw_client(running.client_port)
        sock.sendall(random.Random(seed).randbytes(rng.randrange(1, 5000)))
        garbage_hellos.append(sock)
    for sock in garbage_hellos:  # each is refused as an invalid id (or waits for its newline)
        try:
            sock.sendall(b"\n")
        except OSError:
            pass
        assert read_until_closed(sock, timeout=3.0).closed
    source = connect_source(running.event_port)
    source.sendall(b"1|P|1|5\r\n")
    assert receive_exactly(chatty, 9) == b"1|P|1|5\r\n"
    assert_serving(running, source, seq=2)
    stats = running.stats()
    assert stats.closes["invalid_id"] == 30
    assert stats.connections == 1


def test_accept_burst_of_hundreds_of_clients_is_served_whole(start_broker):
    running = start_broker()
    count = 300
    clients = [raw_client(running.client_port) for _ in range(count)]
    for index, sock in enumerate(clients):
        sock.sendall(b"%d\r\n" % (index + 1))
    wait_until(lambda: running.stats().clients == count)
    source = connect_source(running.event_port)
    source.sendall(b"1|B\r\n")
    for sock in clients:
        assert receive_exactly(sock, 5) == b"1|B\r\n"


def wait_registered_in_process(source: socket.socket, client: socket.socket) -> None:
    """Send SEQ 1..100 (private to user 5), one at a time, until the client (user 5)
    receives one: it is then registered. The rest are sent at once, so the stream
    continues at 101 whatever happened."""
    deadline = time.monotonic() + WAIT
    for seq in range(1, 101):
        line = b"%d|P|1|5\r\n" % seq
        source.sendall(line)
        if time.monotonic() < deadline and receive_exactly(client, len(line), 0.2) == line:
            rest = b"".join(b"%d|P|1|5\r\n" % later for later in range(seq + 1, 101))
            source.sendall(rest)
            assert receive_exactly(client, len(rest)) == rest
            return
    raise AssertionError("the client never registered")


def churn(client_port: int, event_port: int, cycles: int) -> None:
    for cycle in range(cycles):
        kind = cycle % 6
        sock = connect_source(event_port) if kind == 5 else raw_client(client_port)
        if kind == 0:
            sock.sendall(b"%d\r\n" % cycle)
            sock.close()
        elif kind == 1:
            sock.close()
        elif kind == 2:
            sock.sendall(b"%d\r\n" % cycle)
            reset(sock)
        elif kind == 3:
            sock.sendall(b"\xff\xfe garbage \x00")
            reset(sock)
        elif kind == 4:
            sock.sendall(b"4")  # mid-hello
            sock.close()
        else:
            sock.sendall(b"|B\r\n")  # a source that says something broken and leaves
            sock.close()


def test_connect_disconnect_churn_returns_open_fds_to_where_they_started(start_broker_process):
    process = start_broker_process("--hello-timeout", "5")
    pid = process.pid
    source = connect_source(process.event_port)
    keeper = connect_client(process.client_port, 5)
    wait_registered_in_process(source, keeper)
    baseline = open_fds(pid)
    churn(process.client_port, process.event_port, cycles=600)
    # the churn displaced the source; a new one continues the stream
    source = connect_source(process.event_port)
    wait_until(lambda: open_fds(pid) == baseline, timeout=WAIT)
    source.sendall(b"101|P|1|5\r\n")
    assert receive_exactly(keeper, 11) == b"101|P|1|5\r\n"
    assert process.process.poll() is None
    assert "Traceback" not in process.log()
    assert process.stop() == 0


def test_connect_disconnect_churn_leaves_no_connections_behind(start_broker):
    running = start_broker(hello_timeout=5.0)
    churn(running.client_port, running.event_port, cycles=300)
    wait_until(lambda: running.stats().connections == 0 and
               not running.stats().source.connected)
    assert running.stats().awaiting_hello == 0
    assert_serving(running)


def test_running_out_of_file_descriptors_pauses_accepting_without_spinning(
        start_broker_process):
    process = start_broker_process("--hello-timeout", "30")
    pid = process.pid
    source = connect_source(process.event_port)
    keeper = connect_client(process.client_port, 5)
    wait_registered_in_process(source, keeper)
    baseline = open_fds(pid)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (64, 64))
    extras = []
    try:
        for _ in range(90):  # more than 64 descriptors can hold; the backlog keeps the rest
            extras.append(raw_client(process.client_port))
        process.wait_for_log(r"cannot accept")
        assert open_fds(pid) <= 64
        # connected clients are still served
        source.sendall(b"101|P|1|5\r\n")
        assert receive_exactly(keeper, 11) == b"101|P|1|5\r\n"
        # and the loop does not spin on a listener it cannot accept from
        before = cpu_seconds(pid)
        time.sleep(1.0)  # the window its CPU time is measured over
        used = cpu_seconds(pid) - before
        assert used < 0.3, f"{used:.2f} s of CPU in 1 s while out of file descriptors"
    finally:
        for sock in extras:
            sock.close()
    # once descriptors are free, accepting resumes: a new client is served.
    # The closed extras still queued in the backlog are accepted (and closed)
    # first, after the pause, so broadcast until the newcomer gets one.
    newcomer = connect_client(process.client_port, 6)
    deadline = time.monotonic() + WAIT
    for seq in range(102, 1000):
        line = b"%d|B\r\n" % seq
        source.sendall(line)
        assert receive_exactly(keeper, len(line)) == line
        if receive_exactly(newcomer, len(line), 0.2) == line:
            break
        assert time.monotonic() < deadline, "the newcomer was never accepted"
    wait_until(lambda: open_fds(pid) <= baseline + 1, timeout=WAIT)
    assert process.process.poll() is None
    assert "Traceback" not in process.log()
    assert process.stop() == 0


def test_event_source_is_accepted_even_when_clients_used_every_file_descriptor(
        start_broker_process):
    process = start_broker_process("--hello-timeout", "30", "--log-level", "DEBUG")
    pid = process.pid
    keeper = connect_client(process.client_port, 5)
    process.wait_for_registration(5)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (64, 64))
    extras = []
    try:
        for _ in range(90):  # exhaust the broker's descriptors with idle clients
            extras.append(raw_client(process.client_port))
        process.wait_for_log(r"cannot accept")
        # The source still gets in at once, on the descriptor kept spare for it.
        source = connect_source(process.event_port)
        source.sendall(b"1|P|1|5\r\n")
        assert receive_exactly(keeper, 9) == b"1|P|1|5\r\n"
        process.wait_for_log(r"spare one for the event source")  # stderr is read by a thread
    finally:
        for sock in extras:
            sock.close()
    assert "Traceback" not in process.log()
    assert process.stop() == 0


class FailingAccept:
    """A listening socket whose next accept() fails once with one errno."""

    def __init__(self, sock: socket.socket, error_number: int):
        self.sock = sock
        self.error_number = error_number
        self.calls = 0

    def accept(self):
        self.calls += 1
        if self.calls == 1:
            raise OSError(self.error_number, os.strerror(self.error_number))
        raise BlockingIOError

    def fileno(self):
        return self.sock.fileno()


def listener_whose_accept_fails(error_number: int):
    """(listener, its reactor, the stand-in socket, accepted sockets, errors counted)."""
    reactor = mbroker.Reactor()
    accepted, errors = [], []
    listener = mbroker.Listener("127.0.0.1", 0, reactor, accepted.append,
                                lambda: errors.append(error_number),
                                mbroker.RateLimitedLog(logging.getLogger("test.accept")))
    failing = FailingAccept(listener.sock, error_number)
    listener.sock = failing
    return listener, reactor, failing, accepted, errors


def watched(reactor: mbroker.Reactor, sock) -> bool:
    return sock.fileno() in reactor.selector.get_map()


@pytest.mark.parametrize("error_number", [errno.ECONNABORTED, errno.ENETDOWN, errno.EPERM])
def test_an_accept_error_of_one_connection_is_skipped_not_fatal(error_number):
    listener, reactor, failing, accepted, errors = listener_whose_accept_fails(error_number)
    try:
        listener.on_ready(selectors.EVENT_READ)
        assert failing.calls == 2  # it went on to the next connection
        assert errors == [] and accepted == []
        assert watched(reactor, failing)
    finally:
        failing.sock.close()
        reactor.close()


def test_an_unforeseen_accept_error_pauses_accepting_instead_of_crashing():
    listener, reactor, failing, accepted, errors = listener_whose_accept_fails(errno.EINVAL)
    try:
        listener.on_ready(selectors.EVENT_READ)
        assert errors == [errno.EINVAL]  # counted as accept_errors by the broker
        assert not watched(reactor, failing)  # paused: no spinning on a readable socket
        listener.resume_if_due(time.monotonic())
        assert not watched(reactor, failing)  # not yet
        listener.resume_if_due(time.monotonic() + mbroker.ACCEPT_RETRY_DELAY)
        assert watched(reactor, failing)
    finally:
        failing.sock.close()
        reactor.close()
