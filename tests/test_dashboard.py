"""The --dashboard view: rendering from fixed stats() snapshots, the live
observer, log routing, and the real broker under a pseudo-terminal.

render_dashboard is a pure function of a snapshot, so most tests render a
hand-made snapshot to an in-memory console and read the text an operator
would see.
"""

from __future__ import annotations

import io
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest

import mbroker
from mbroker import (
    BrokerStats,
    ClosedConnection,
    CloseReason,
    LiveDashboard,
    LiveLogHandler,
    make_dashboard,
    render_dashboard,
)
from tests.harness import (
    LISTENING,
    MBROKER_PATH,
    MIB,
    ROOT,
    busy_snapshot,
    connect_client,
    connect_source,
    dashboard_console,
    empty_snapshot,
    fake_client,
    listening_ports,
    receive_exactly,
    render_text,
    wait_until,
)

pytest.importorskip("rich")

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WAIT = 10.0  # the longest any wait on a child process may take


# -- snapshots ---------------------------------------------------------------


def closed(user_id, reason=CloseReason.CLIENT_QUIT, detail="", at=None, port=None):
    return ClosedConnection(kind="client", peer=f"127.0.0.1:{port or 5000 + user_id}",
                            user_id=user_id, reason=reason, detail=detail,
                            at=time.time() if at is None else at)


def with_problems(snapshot: BrokerStats) -> BrokerStats:
    """Some counters and closes moved."""
    return replace(snapshot,
                   counters=replace(snapshot.counters, malformed=5, duplicate=17, skipped=3,
                                    slow_consumers=2),
                   closes={**snapshot.closes, "client_quit": 10, "slow_consumer_buffer": 2,
                           "invalid_id": 1})


def assert_fits(text: str, width: int, height: int) -> None:
    lines = text.splitlines()
    assert len(lines) <= height, f"{len(lines)} lines for a {height}-line terminal:\n{text}"
    for line in lines:
        assert len(line) <= width, f"line longer than {width}: {line!r}"


def style_of(snapshot: BrokerStats, text: str, width: int = 80, height: int = 24):
    """The rich Style the first piece of screen text containing `text` is drawn in."""
    from rich.style import Style

    console = dashboard_console(width, height, color=True)
    for segment in console.render(render_dashboard(snapshot, width=width, height=height)):
        if text in segment.text:
            return segment.style or Style()
    raise AssertionError(f"{text!r} is not on the screen")


def colour_of(snapshot: BrokerStats, text: str) -> str | None:
    style = style_of(snapshot, text)
    return style.color.name if style.color else None


# -- what an operator must see ---------------------------------------------------


def test_empty_broker_shows_every_heading_and_counter():
    text = render_text(empty_snapshot())
    assert_fits(text, 80, 24)
    assert "mbroker  up 0s" in text
    assert "source    not connected" in text
    assert "next 1  highest seen 0" in text
    assert "0 waiting  largest 0  limit 1,000,000" in text
    assert "0 connections  0 users" in text
    assert "0 known users  0 follows" in text
    assert "0 B queued (source pauses at 256.0 MiB)" in text
    for name in ("malformed 0", "duplicate 0", "skipped 0", "slow_consumers 0",
                 "unsequenced 0", "overlong 0", "late 0", "follows_refused 0",
                 "accept_errors 0"):
        assert name in text
    assert "closes    none yet" in text
    assert "no clients connected" in text
    assert "recently closed" not in text  # nothing closed: no empty section


def test_busy_broker_shows_rates_sequence_and_totals():
    text = render_text(busy_snapshot())
    assert_fits(text, 80, 24)
    assert "connected 127.0.0.1:51234  reading  117.7 MiB read" in text
    assert "next 1,234,568  highest seen 1,240,000" in text
    assert "5,432 waiting  largest 9,999" in text
    assert "events in 120,000/s  out 119,800/s  notifications 450,000/s" in text
    assert "31.5 MiB/s  3.0 MiB queued" in text
    assert "1,000 connections  997 users  3 awaiting id" in text
    assert "10,000 known users  123,456 follows" in text
    assert "up 1h 02m" in text


def test_client_table_lists_deepest_first_and_as_many_rows_as_fit():
    snapshot = busy_snapshot(client_count=1000)
    for height in (24, 40):
        text = render_text(snapshot, height=height)
        assert_fits(text, 80, height)
        rows = [line for line in text.splitlines() if re.match(r"^1\d{3} ", line)]
        users = [int(row.split()[0]) for row in rows]
        assert users == list(range(1000, 1000 + len(users))), "not in snapshot order"
        assert users[0] == 1000  # the deepest queue is the first row
        assert f"deepest client queues  {len(users)} of 1,000 connections" in text
        header = next(line for line in text.splitlines() if line.startswith("user "))
        for column in ("peer", "queued", "queued bytes", "sent", "connected"):
            assert column in header
        # The rows fill the terminal: at most a couple of lines are left over.
        assert len(text.splitlines()) >= height - 2
    deepest = next(line for line in render_text(snapshot).splitlines() if line.startswith("1000 "))
    assert re.split(r"\s{2,}", deepest.strip()) == [
        "1000", "127.0.0.1:41000", "10,000", "976.6 KiB", "50,000", "1m 00s"]


def test_paused_source_is_shown_in_red():
    snapshot = busy_snapshot()
    snapshot = replace(snapshot, source=replace(snapshot.source, paused=True))
    text = render_text(snapshot)
    assert "PAUSED by backpressure" in text
    assert "reading" not in text
    assert colour_of(snapshot, "PAUSED") == "red"


def test_reading_source_has_no_colour():
    assert colour_of(busy_snapshot(), "reading") is None


def test_slow_consumer_about_to_be_cut_off_is_red_with_its_share_of_the_limit():
    snapshot = busy_snapshot(client_count=3)
    limit = snapshot.limits.max_client_buffer
    assert limit == 16 * MIB
    snapshot = replace(snapshot, top_clients=(
        fake_client(7, queued_bytes=int(limit * 0.97), queued_notifications=800_000),
        fake_client(8, queued_bytes=int(limit * 0.6), queued_notifications=500_000),
        fake_client(9, queued_bytes=MIB, queued_notifications=100),
    ))
    text = render_text(snapshot)
    assert_fits(text, 80, 24)
    assert "15.5 MiB 97%" in text
    assert "9.6 MiB 60%" in text
    calm_row = next(line for line in text.splitlines() if line.startswith("9 "))
    assert "1.0 MiB" in calm_row and "%" not in calm_row  # far from the limit: no share
    assert colour_of(snapshot, "15.5 MiB 97%") == "red"
    assert colour_of(snapshot, "9.6 MiB 60%") == "yellow"
    assert colour_of(snapshot, "1.0 MiB") is None


def test_reorder_buffer_and_total_queue_turn_yellow_past_half_their_limit():
    snapshot = replace(busy_snapshot(), reorder_depth=600_000, bytes_queued=200 * MIB)
    assert colour_of(snapshot, "600,000 waiting") == "yellow"
    assert colour_of(snapshot, "200.0 MiB queued") == "yellow"
    snapshot = replace(snapshot, reorder_depth=950_000)  # about to declare the lowest gap lost
    assert colour_of(snapshot, "950,000 waiting") == "red"
    calm = busy_snapshot()
    assert colour_of(calm, "5,432 waiting") is None
    assert colour_of(calm, "3.0 MiB queued") is None


def test_counters_and_closes_use_the_names_of_the_logs_and_stats():
    snapshot = with_problems(busy_snapshot())
    text = render_text(snapshot)
    assert_fits(text, 80, 24)
    for shown in ("malformed 5", "duplicate 17", "skipped 3", "slow_consumers 2",
                  "client_quit 10", "slow_consumer_buffer 2", "invalid_id 1"):
        assert shown in text
    assert "hello_timeout" not in text  # close reasons that never happened are left out
    # Zero counters are dimmed so that the ones that moved stand out.
    assert not style_of(snapshot, "slow_consumers").dim
    assert style_of(snapshot, "late").dim


def test_recently_closed_newest_first_with_reason_and_detail():
    now = time.time()
    snapshot = replace(busy_snapshot(client_count=2), recently_closed=(
        closed(41, port=5000, at=now - 5),
        closed(42, CloseReason.SLOW_CONSUMER_BUFFER, "16777300 bytes queued, limit 16777216",
               port=5555, at=now),
    ))
    text = render_text(snapshot, width=100)
    lines = text.splitlines()
    start = lines.index("recently closed")
    assert "client 42  127.0.0.1:5555  slow_consumer_buffer  16777300 bytes queued" \
        in lines[start + 1]
    assert "client 41  127.0.0.1:5000  client_quit" in lines[start + 2]
    assert colour_of(snapshot, "slow_consumer_buffer") == "yellow"


def test_stopping_broker_says_so():
    snapshot = replace(busy_snapshot(), stopping=True)
    assert "STOPPING: draining queued notifications" in render_text(snapshot)


def test_huge_numbers_and_ipv6_peers_still_fit_80_columns():
    snapshot = busy_snapshot(client_count=5)
    snapshot = replace(snapshot, next_seq=10**200, highest_seq=10**200 + 5, reorder_depth=10**12,
                       top_clients=(fake_client(10**50, queued_bytes=5 * MIB, sent=10**15,
                                                peer="[2001:db8:85a3::8a2e:370:7334]:65535"),
                                    fake_client(None, peer="[::1]:1"),
                                    *snapshot.top_clients[2:]))
    text = render_text(snapshot)
    assert_fits(text, 80, 24)
    assert "…" in text
    assert "(no id)" in text


@pytest.mark.parametrize("width", [40, 60, 80, 132])
@pytest.mark.parametrize("height", [3, 10, 24, 60])
def test_any_terminal_size_is_respected(width, height):
    snapshot = replace(with_problems(busy_snapshot(client_count=200)),
                       recently_closed=tuple(closed(index) for index in range(10)))
    assert_fits(render_text(snapshot, width=width, height=height), width, height)


# -- the live observer and log routing ------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_dashboard_asks_for_only_the_rows_it_can_show():
    broker = mbroker.Broker(mbroker.BrokerConfig(event_port=0, client_port=0))
    requested = []
    real_stats = broker.stats

    def recording_stats(top_clients=20):
        requested.append(top_clients)
        return real_stats(top_clients)

    broker.stats = recording_stats
    screen = io.StringIO()
    dashboard = LiveDashboard(screen)
    try:
        dashboard(broker, time.monotonic())
        dashboard(broker, time.monotonic())
        assert dashboard.live.is_started
    finally:
        dashboard.stop()
        broker.reactor.close()
    assert requested and all(count is not None and count <= 100 for count in requested)
    assert "mbroker  up" in screen.getvalue()  # the last frame stays on screen


def test_route_logging_sends_terminal_handlers_through_the_live_console(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    logger = logging.getLogger("test_dashboard.routing")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    terminal, log_file = FakeTerminal(), io.StringIO()
    to_terminal = logging.StreamHandler(terminal)
    to_terminal.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    to_file = logging.StreamHandler(log_file)
    logger.addHandler(to_terminal)
    logger.addHandler(to_file)
    screen = io.StringIO()
    dashboard = LiveDashboard(screen)
    try:
        dashboard.route_logging(logger)
        assert to_file in logger.handlers and to_terminal not in logger.handlers
        routed = [h for h in logger.handlers if isinstance(h, LiveLogHandler)]
        assert len(routed) == 1
        logger.warning("client 1.2.3.4:5 closed: \x1b[2Jinvalid_id")
    finally:
        dashboard.stop()
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    assert terminal.getvalue() == ""
    assert "WARNING client 1.2.3.4:5 closed: \\x1b[2Jinvalid_id" in screen.getvalue()
    assert "\x1b[2J" not in screen.getvalue()  # no escape from a log line reaches the screen
    assert "closed" in log_file.getvalue()
    assert logger.handlers == []


def test_route_logging_is_undone_by_stop():
    logger = logging.getLogger("test_dashboard.restore")
    logger.propagate = False
    original = logging.StreamHandler(FakeTerminal())
    logger.addHandler(original)
    dashboard = LiveDashboard(io.StringIO())
    dashboard.route_logging(logger)
    dashboard.stop()
    try:
        assert logger.handlers == [original]
    finally:
        logger.removeHandler(original)


def test_make_dashboard_picks_the_status_line_off_a_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    assert isinstance(make_dashboard(io.StringIO()), mbroker.StatusLinePrinter)
    assert isinstance(make_dashboard(FakeTerminal()), LiveDashboard)
    monkeypatch.setenv("TERM", "dumb")  # a terminal that cannot move its cursor
    assert isinstance(make_dashboard(FakeTerminal()), mbroker.StatusLinePrinter)


# -- the real broker ---------------------------------------------------------------


def broker_command(*arguments: str) -> list[str]:
    return [sys.executable, str(MBROKER_PATH), "--dashboard", "--host", "127.0.0.1",
            *arguments, "0", "0"]


def test_dashboard_off_a_terminal_prints_plain_status_lines():
    process = subprocess.Popen(broker_command(), cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The first housekeeping tick prints at once; later ones every 5 s.
        ready, _, _ = select.select([process.stdout], [], [], WAIT)
        assert ready, "no status line within the wait"
        first_line = process.stdout.readline().decode()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)
    output = first_line + stdout.decode()
    assert process.returncode == 0, stderr.decode()
    assert first_line.startswith("up ") and "source=disconnected" in first_line
    assert "next_seq=1" in first_line and "slow_consumers=0" in first_line
    assert "\x1b" not in output


class PseudoTerminal:
    """The broker with stdin, stdout and stderr on a pty of a given size."""

    def __init__(self, *arguments: str, columns: int = 80, rows: int = 24):
        import fcntl
        import pty
        import struct
        import termios

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR",
                                      "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
        environment["TERM"] = "xterm-256color"
        self.process = subprocess.Popen(broker_command(*arguments), cwd=ROOT, stdin=slave,
                                        stdout=slave, stderr=slave, env=environment,
                                        start_new_session=True)
        os.close(slave)
        self.output = b""

    def read_until(self, pattern: bytes, timeout: float = WAIT) -> re.Match | None:
        deadline = time.monotonic() + timeout
        start = len(self.output)
        while True:
            match = re.compile(pattern).search(self.output, start)
            if match or time.monotonic() > deadline or not self._read(deadline):
                return match

    def read_to_end(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass

    def _read(self, deadline: float) -> bool:
        """Read what is there; False at end of output or past the deadline."""
        ready, _, _ = select.select([self.master], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every writer closed the pty (the broker exited)
            return False
        self.output += chunk
        return bool(chunk)

    def text(self) -> str:
        return ANSI_ESCAPE.sub("", self.output.decode(errors="replace"))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)
        os.close(self.master)


@pytest.fixture
def pseudo_terminal():
    if not hasattr(mbroker, "render_dashboard"):
        pytest.skip("the dashboard is not pasted into mbroker.py yet")
    pytest.importorskip("pty")
    started = []

    def start(*arguments: str, **size) -> PseudoTerminal:
        terminal = PseudoTerminal(*arguments, **size)
        started.append(terminal)
        return terminal

    yield start
    for terminal in started:
        terminal.close()


def test_live_dashboard_draws_logs_above_and_exits_cleanly_on_sigint(pseudo_terminal):
    terminal = pseudo_terminal(columns=80, rows=24)
    listening = terminal.read_until(LISTENING.pattern.encode())
    assert listening, terminal.text()
    _, client_port = listening_ports(listening.group())
    assert terminal.read_until(rb"deepest client queues"), terminal.text()
    assert b"\x1b[" in terminal.output  # drawn with cursor movement, not printed lines

    # A client that says something that is not a user id is logged as a
    # warning while the view is live; the view is drawn again below it.
    with socket.create_connection(("127.0.0.1", client_port), timeout=WAIT) as bad:
        bad.sendall(b"not-a-number\n")
        assert terminal.read_until(rb"invalid_id"), terminal.text()
    after_log = len(terminal.output)
    assert terminal.read_until(rb"deepest client queues"), terminal.text()
    assert len(terminal.output) > after_log

    with socket.create_connection(("127.0.0.1", client_port), timeout=WAIT) as good:
        good.sendall(b"4242\n")
        assert terminal.read_until(rb"4242 +127\.0\.0\.1:\d+"), terminal.text()

        terminal.process.send_signal(signal.SIGINT)
        terminal.read_to_end()
        assert terminal.process.wait(WAIT) == 0, terminal.text()
    text = terminal.text()
    assert "Traceback" not in text
    assert "stopped" in text
    assert terminal.output.rfind(b"\x1b[?25h") > terminal.output.rfind(b"\x1b[?25l")  # cursor back
    for line in re.split(r"[\r\n]+", text):
        if " INFO " not in line and " WARNING " not in line:  # log lines may wrap
            assert len(line) <= 80, line


def test_queues_come_before_the_recently_closed_list():
    recent = tuple(closed(index) for index in range(10))
    crowded = replace(busy_snapshot(client_count=500), recently_closed=recent)
    text = render_text(crowded, height=24)
    assert_fits(text, 80, 24)
    assert sum("client_quit" in line for line in text.splitlines()) == 2  # only the newest
    quiet = replace(busy_snapshot(client_count=2), recently_closed=recent)
    text = render_text(quiet, height=40)
    assert sum("client_quit" in line for line in text.splitlines()) == 5  # room for more


def test_a_failing_status_display_is_removed_and_the_broker_keeps_serving(start_broker):
    running = start_broker()
    broker = running.broker

    def broken_display(broker, now):
        raise BrokenPipeError(32, "Broken pipe")

    broker.call_in_loop(lambda: broker.observers.append(broken_display))
    wait_until(lambda: broker.snapshot() is not None and not broker.observers)
    client = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    source.sendall(b"1|B\r\n")
    assert receive_exactly(client, 5) == b"1|B\r\n"


def test_a_terminal_that_stops_reading_never_stalls_delivery():
    # Nobody reads the terminal (as under Ctrl-S): frames pile up in the
    # terminal's buffer, and a blocking write would freeze the whole broker.
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    # Fill the terminal's buffer first, so the very first frame meets it full.
    os.set_blocking(slave, False)
    try:
        while True:
            os.write(slave, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(slave, True)
    process = subprocess.Popen(
        [sys.executable, str(MBROKER_PATH), "--dashboard", "--host", "127.0.0.1",
         "0", "0"],
        stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "100"})
    try:
        line = process.stderr.readline().decode()
        ports = listening_ports(line)
        assert ports, line
        event_port, client_port = ports
        client = socket.create_connection(("127.0.0.1", client_port), timeout=WAIT)
        client.sendall(b"5\n")
        source = socket.create_connection(("127.0.0.1", event_port), timeout=WAIT)
        client.settimeout(2.0)
        deadline = time.monotonic() + 2.0  # several frames' worth
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            source.sendall(b"%d|B\r\n" % seq)
            expected = b"%d|B\r\n" % seq
            assert client.recv(100) == expected, f"broadcast {seq} stalled"
            time.sleep(0.1)  # paced, so that the broadcasts span several frames
    finally:
        process.send_signal(signal.SIGINT)
        os.set_blocking(master, False)
        end = time.monotonic() + WAIT
        while process.poll() is None and time.monotonic() < end:
            try:
                os.read(master, 65536)
            except BlockingIOError:
                time.sleep(0.05)
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)
        process.stderr.close()
        os.close(master)
        os.close(slave)


def test_the_log_line_shows_role_connection_position_and_an_edges_lag():
    edge = replace(busy_snapshot(client_count=3), log=mbroker.LogStats(
        role="edge", url="redis://:***@10.0.0.5:6379/0", key="mbroker:events",
        state="reconnecting", position=1_200_000, primary_position=1_234_567, lag_seconds=0.042,
        unwritten=0, entries=300, entries_skipped=0, reconnects=2, snapshots=0,
        snapshot_seq=1_200_000, missed=17, recovery_seconds=0.5, failure=None))
    text = render_text(edge, width=100)
    line = next(line for line in text.splitlines() if line.startswith("log"))
    assert "edge  reconnecting  at 1,200,000  34,567 behind  lag 42 ms  missed 17" in line
    assert colour_of(edge, "reconnecting") == "yellow"
    assert colour_of(edge, "missed 17") == "yellow"
    status = mbroker.format_status_line(edge)
    assert "log=edge:reconnecting position=1200000 newest=1234567 lag=0.042s missed=17" in status


def test_the_log_line_of_a_primary_shows_what_redis_has_not_taken_yet():
    primary = replace(busy_snapshot(client_count=3), log=mbroker.LogStats(
        role="primary", url="redis://127.0.0.1:6379/0", key="mbroker:events",
        state="failed", position=99, primary_position=120, lag_seconds=0.0, unwritten=21,
        entries=5, entries_skipped=0, reconnects=0, snapshots=1, snapshot_seq=50, missed=0,
        recovery_seconds=0.0, failure="cannot append entry 120-0"))
    text = render_text(primary, width=120)
    line = next(line for line in text.splitlines() if line.startswith("log"))
    assert "primary  failed  at 99  unwritten 21  snapshot at 50  cannot append entry" in line
    assert colour_of(primary, "failed") == "red"
    assert "log=primary:failed position=99 newest=120 unwritten=21" in \
        mbroker.format_status_line(primary)


def test_dispatch_latency_is_shown_by_its_quantiles():
    latency = mbroker.LatencyStats(bounds=(0.001, 0.005, float("inf")), counts=(50, 99, 100),
                                   total_seconds=0.3)
    text = render_text(replace(busy_snapshot(client_count=3), dispatch_latency=latency))
    assert "dispatch  p50 <= 1 ms  p99 <= 5 ms  from read to flush" in text
    assert "no notifications yet" in render_text(busy_snapshot(client_count=3))
