"""SIGINT / SIGTERM (docs/behaviour.md §4.18, §4.19, §6.3): at once stop accepting
clients and reading events, deliver what was already dispatched (bytes already
queued for a client count) within --drain-timeout, close everything and exit 0;
a second signal exits at once. Most tests run `python mbroker.py` as a child
process and signal it."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.harness import (
    WAIT,
    BrokerProcess,
    connect_client,
    connect_source,
    give_accepted_sockets_small_send_buffers,
    read_until_closed,
    receive_exactly,
    send_until_blocked,
    tiny_receiver,
    wait_until,
)

PAD = b"3" * 3900
QUEUED_EVENTS = 2500  # ~10 MB for one client: more than the kernel takes, so the broker queues


def event(seq: int, to_user: int) -> bytes:
    return b"%d|P|%s|%d\r\n" % (seq, PAD, to_user)


def refused(port: int) -> bool:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=1.0)
    except ConnectionRefusedError:
        return True
    sock.close()
    return False


def queue_for_a_client_that_does_not_read(process, late_user: int = 7):
    """Connect a client that does not read and a marker client; dispatch
    QUEUED_EVENTS for the first, then one for the marker, and wait for that
    one: everything before it has then been dispatched."""
    late = connect_client(process.client_port, late_user)
    marker = connect_client(process.client_port, 8)
    source = connect_source(process.event_port)
    source.sendall(b"1|B\r\n")  # both registered once both receive it
    assert receive_exactly(marker, 5) == b"1|B\r\n"
    events = b"".join(event(seq, late_user) for seq in range(2, QUEUED_EVENTS + 2))
    marker_seq = QUEUED_EVENTS + 2
    source.sendall(events + b"%d|P|1|8\r\n" % marker_seq)
    expected_marker = b"%d|P|1|8\r\n" % marker_seq
    assert receive_exactly(marker, len(expected_marker), timeout=10) == expected_marker
    return late, marker, source, b"1|B\r\n" + events, marker_seq


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_delivers_queued_notifications_to_a_late_reader_refuses_new_connections_and_exits_0(
        start_broker_process, signum):
    process = start_broker_process("--drain-timeout", "4", "--write-timeout", "30",
                                   "--max-client-buffer", str(64 * 1024 * 1024))
    late, marker, source, expected, marker_seq = queue_for_a_client_that_does_not_read(process)
    signalled = time.monotonic()
    process.send_signal(signum)
    process.wait_for_log(r"stopping")
    # Logged first, then the listening ports close (docs/behaviour.md §4.18): soon
    # both refuse newcomers, while the late client's bytes are still being drained.
    wait_until(lambda: refused(process.client_port), timeout=2.0,
               message="new clients still accepted after the signal")
    wait_until(lambda: refused(process.event_port), timeout=2.0,
               message="new event sources still accepted after the signal")
    assert process.process.poll() is None, "exited before delivering queued notifications"
    # the event source is closed: events sent now are not read, and never delivered
    assert read_until_closed(source, timeout=2.0).closed, \
        "the event source was not closed on the signal"
    try:
        source.sendall(b"%d|P|1|7\r\n" % (marker_seq + 1))
    except OSError:
        pass
    # the late client finally reads: it gets every dispatched byte, then EOF
    ending = read_until_closed(late, timeout=10.0)
    assert ending.closed
    assert len(ending.data) == len(expected), (len(ending.data), len(expected))
    assert ending.data == expected
    assert process.wait_exit(timeout=5.0) == 0
    assert time.monotonic() - signalled < 4.0 + 2.0
    assert read_until_closed(marker, timeout=2.0).closed
    assert "Traceback" not in process.log()


def test_drain_timeout_bounds_shutdown_when_a_client_never_reads(start_broker_process):
    process = start_broker_process("--drain-timeout", "1", "--write-timeout", "30",
                                   "--max-client-buffer", str(64 * 1024 * 1024))
    late, _marker, _source, _expected, _seq = queue_for_a_client_that_does_not_read(process)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait_exit(timeout=5.0)
    elapsed = time.monotonic() - signalled
    assert code == 0
    assert 0.8 <= elapsed < 3.0, elapsed
    process.wait_for_log(r"drain timeout")
    assert "Traceback" not in process.log()


def test_second_signal_exits_at_once_while_draining(start_broker_process):
    process = start_broker_process("--drain-timeout", "30", "--write-timeout", "60",
                                   "--max-client-buffer", str(64 * 1024 * 1024))
    late, _marker, _source, _expected, _seq = queue_for_a_client_that_does_not_read(process)
    process.send_signal(signal.SIGINT)
    process.wait_for_log(r"stopping")
    assert not process.exited_within(0.3), "should still be draining after one signal"
    second = time.monotonic()
    process.send_signal(signal.SIGINT)
    process.wait_exit(timeout=2.0)
    assert time.monotonic() - second < 2.0
    assert "Traceback" not in process.log()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_an_idle_broker_promptly_with_exit_0_closing_its_connections(
        start_broker_process, signum):
    process = start_broker_process()
    client = connect_client(process.client_port, 5)
    source = connect_source(process.event_port)
    source.sendall(b"1|B\r\n")
    assert receive_exactly(client, 5) == b"1|B\r\n"
    started = time.monotonic()
    process.send_signal(signum)
    assert process.wait_exit(timeout=5.0) == 0
    assert time.monotonic() - started < 1.5
    assert read_until_closed(client, timeout=1.0).closed
    assert read_until_closed(source, timeout=1.0).closed
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


def test_source_blocked_by_backpressure_is_released_by_shutdown(start_broker_process):
    # A paused source must not keep the broker alive: shutdown closes it too.
    process = start_broker_process("--max-buffered", "100000", "--drain-timeout", "1",
                                   "--write-timeout", "30")
    client = connect_client(process.client_port, 7)
    source = connect_source(process.event_port)
    source.sendall(b"1|P|1|7\r\n")
    assert receive_exactly(client, 9) == b"1|P|1|7\r\n"
    stream = b"".join(event(seq, 7) for seq in range(2, 3002))
    send_until_blocked(source, stream, stall=0.5, budget=8.0)
    process.wait_for_log(r"pausing the event source")
    process.send_signal(signal.SIGTERM)
    assert process.wait_exit(timeout=5.0) == 0


def test_stop_delivers_only_what_was_dispatched_not_the_paused_backlog(start_broker,
                                                                       monkeypatch):
    give_accepted_sockets_small_send_buffers(monkeypatch)
    running = start_broker(max_buffered=50_000, dispatch_slice=4, flush_lines=4,
                           read_size=1 << 20, drain_timeout=5.0, write_timeout=60.0)
    client = tiny_receiver(running.client_port, 1, rcvbuf=4096)
    wait_until(lambda: running.stats().clients == 1)
    pad = b"0" * 990
    source = connect_source(running.event_port)
    source.sendall(b"".join(b"%s%d|P|9|1\r\n" % (pad, seq) for seq in range(1, 257)))
    wait_until(lambda: running.stats().source.paused)
    dispatched = running.stats().events_dispatched
    assert dispatched < 256, "the test needs an undispatched backlog"
    running.broker.request_stop()
    ending = read_until_closed(client, timeout=10)
    assert ending.closed
    assert ending.data.count(b"\n") == dispatched
    assert running.broker.exchange.dispatched == dispatched
