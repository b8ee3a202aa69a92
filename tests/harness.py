"""The one test harness of tests/ and bench/: brokers to test against, sockets,
/proc readings, log waits, tools/maze.py and hand-made stats snapshots.

Two kinds of broker:

- in process: ``mbroker.running(**options)`` (the ``start_broker`` fixture of
  tests/conftest.py wraps it), a Broker on a background thread whose state is
  read with ``stats()``;
- a child process: ``BrokerProcess(*arguments)``, ``python mbroker.py`` on
  ephemeral loopback ports, read from the outside (its log, /proc, exit code).

Every wait here takes a deadline; only loopback addresses are used, and ports
always come from the broker (port 0).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import mbroker

ROOT = Path(__file__).resolve().parent.parent
MBROKER_PATH = ROOT / "mbroker.py"
MAZE_PATH = ROOT / "tools" / "maze.py"
LOCALHOST = "127.0.0.1"

WAIT = 5.0  # the longest a single wait on a socket or on the broker's state may take
STARTUP_TIMEOUT = 15.0  # for a child broker to log that it listens
STOP_TIMEOUT = 30.0  # for a child broker to drain and exit after a signal
MAZE_TIMEOUT = 300.0  # for one whole maze run, the largest benchmark included

# The first log line of a broker (docs/behaviour.md §5.3), with the ports it bound;
# an edge of a log has no event port.
LISTENING = re.compile(r"listening (?:events=[^\s:]+:(\d+) )?clients=[^\s:]+:(\d+)")


def listening_ports(line: str | bytes) -> tuple[int | None, int] | None:
    """(event port, client port) from a broker's listening line, or None if the
    line is not one; the event port is None for an edge."""
    if isinstance(line, bytes):
        line = line.decode(errors="replace")
    match = LISTENING.search(line)
    if not match:
        return None
    event_port = int(match.group(1)) if match.group(1) else None
    return event_port, int(match.group(2))


# -- waiting ------------------------------------------------------------------------------


def wait_until(condition, timeout: float = WAIT, interval: float = 0.01,
               message: str = "condition not met") -> None:
    """Poll `condition` until it holds; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    if condition():
        return
    raise AssertionError(f"{message} within {timeout} s")


# -- the in-process broker (mbroker.running) ---------------------------------------------


def wait_registered(running: mbroker.RunningBroker, count: int) -> None:
    """Until exactly `count` clients have announced their id."""
    wait_until(lambda: running.stats().clients == count)


def wait_dispatched(running: mbroker.RunningBroker, count: int) -> None:
    wait_until(lambda: running.stats().events_dispatched >= count)


def closes_of(running: mbroker.RunningBroker, reason: mbroker.CloseReason) -> list:
    return [c for c in running.stats().recently_closed if c.reason is reason]


def wait_closed(running: mbroker.RunningBroker, reason: mbroker.CloseReason,
                count: int = 1) -> list:
    """Until `count` connections were closed for `reason`; returns those closes."""
    wait_until(lambda: len(closes_of(running, reason)) >= count)
    return closes_of(running, reason)


def wait_housekeeping_ticks(running: mbroker.RunningBroker, ticks: int = 2) -> None:
    """Until the broker's housekeeping timer (hello and write timeouts, accept
    retries; every 0.25 s) has run `ticks` more times: a test that asserts
    something did *not* happen over time waits for this, not for a sleep."""
    seen: list[float] = []

    def count_tick(_broker, now: float) -> None:
        seen.append(now)

    broker = running.broker
    broker.call_in_loop(lambda: broker.observers.append(count_tick))
    try:
        wait_until(lambda: len(seen) >= ticks)
    finally:
        broker.call_in_loop(lambda: broker.observers.remove(count_tick))


def assert_serving(running: mbroker.RunningBroker, source: socket.socket | None = None,
                   seq: int = 1) -> None:
    """The broker is alive and delivers: a new client gets a new private message
    (SEQ `seq`, sent on `source` or on a new source connection)."""
    assert running.broker.running, "the broker's loop stopped"
    probe = connect_client(running.client_port, 999_999, wait_registered=running)
    if source is None:
        source = connect_source(running.event_port)
    line = b"%d|P|1|999999\r\n" % seq
    source.sendall(line)
    assert receive_exactly(probe, len(line)) == line
    probe.close()


def give_accepted_sockets_small_send_buffers(monkeypatch, sndbuf: int = 4096) -> None:
    """Make an in-process broker's accepted sockets take little from it, as
    remote clients' would, so its own queues rather than loopback's large
    kernel buffers absorb what a stalled client does not read."""
    original_accept = socket.socket.accept

    def accept_with_small_send_buffer(self):
        sock, address = original_accept(self)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        return sock, address

    monkeypatch.setattr(socket.socket, "accept", accept_with_small_send_buffer)


# -- the broker as a child process --------------------------------------------------------


def open_file_limit_raiser(needed: int):
    """A preexec_fn that lets a child open `needed` files, up to the hard limit.

    Only the children get the higher limit; the pytest process keeps its own.
    """

    def raise_limit() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            new_soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))

    return raise_limit


class BrokerProcess:
    """`python mbroker.py --host 127.0.0.1 ARGUMENTS 0 0` as a child process.

    A thread reads its stderr line by line, so the broker never blocks on a
    full pipe and tests can wait for a log line. The constructor returns once
    the broker listens: it reads the ports from the listening line, or, when
    `listening_line` is False (a --log-level that hides it), waits until the
    process has its ports open and leaves the ports unknown (None).

    ports: the positional port arguments ("0" each: any free port). open_files:
    raise the child's soft RLIMIT_NOFILE to this many (for runs with thousands
    of clients). python_options: options for the interpreter itself, e.g.
    ("-I", "-S"). script: another broker file (bench/compare_brokers.py).
    expect_exit: the broker is expected to exit by itself at start (an invalid
    setting): return at once, and let the test call wait_exit().
    """

    def __init__(self, *arguments: str, ports: tuple[str, ...] = ("0", "0"),
                 script: Path | str = MBROKER_PATH, python_options: tuple[str, ...] = (),
                 open_files: int | None = None, listening_line: bool = True,
                 expect_exit: bool = False, startup_timeout: float = STARTUP_TIMEOUT):
        self.process = subprocess.Popen(
            [sys.executable, *python_options, str(script), "--host", LOCALHOST, *arguments,
             *ports],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace",
            preexec_fn=open_file_limit_raiser(open_files) if open_files else None)
        self.pid = self.process.pid
        self.lines: list[str] = []  # every stderr line so far, without its newline
        self._changed = threading.Condition()
        self._at_end = False
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.event_port: int | None = None
        self.client_port: int | None = None
        if expect_exit:
            return
        try:
            if listening_line:
                line = self.wait_for_log(LISTENING.pattern, timeout=startup_timeout)
                self.event_port, self.client_port = listening_ports(line)
            else:
                wait_until(lambda: self.process.poll() is not None
                           or listening_sockets(self.pid) == (1 if "--edge" in arguments else 2),
                           timeout=startup_timeout)
                assert self.process.poll() is None, "the broker exited"
        except AssertionError:
            self.close()
            raise AssertionError(f"the broker did not start:\n{self.log()}") from None

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._at_end = True
            self._changed.notify_all()

    def log(self, last: int | None = None) -> str:
        """Its stderr so far (the `last` lines only, if given)."""
        with self._changed:
            lines = self.lines if last is None else self.lines[-last:]
            return "\n".join(lines)

    def wait_for_log(self, pattern: str, timeout: float = WAIT, start: int = 0) -> str:
        """The first stderr line from index `start` on that matches `pattern` (a regex)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if regex.search(line):
                        return line
                start = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._at_end or remaining <= 0:
                    break
                self._changed.wait(remaining)
        raise AssertionError(f"no log line matching {pattern!r} within {timeout} s:\n"
                             f"{self.log(last=50)}")

    def wait_for_registration(self, user_id: int, timeout: float = WAIT) -> None:
        """Until a client has registered as `user_id`; the broker must have been
        started with --log-level DEBUG, the level that logs registrations."""
        self.wait_for_log(rf"\(user {user_id}\) registered", timeout)

    def send_signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def exited_within(self, timeout: float) -> bool:
        """Whether the broker exits within `timeout` seconds (it is not signalled)."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit code of a broker that exits by itself within `timeout`; once
        it has exited, its whole stderr is in `lines`."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the broker did not exit within {timeout} s:\n"
                                 f"{self.log(last=50)}") from None
        self._reader.join(WAIT)
        return code

    def stop(self, signum: int = signal.SIGINT, timeout: float = STOP_TIMEOUT) -> int:
        """Send `signum` (a clean stop: drain, then exit) and return the exit code."""
        self.send_signal(signum)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)

    def close(self) -> None:
        """Kill it if it still runs and release the pipe; safe to call twice."""
        self.kill()
        self._reader.join(WAIT)
        self.process.stderr.close()

    def usage(self) -> tuple[float, float]:
        """(CPU seconds so far, peak RSS in MiB) while the broker runs."""
        return cpu_seconds(self.pid), rss_kib(self.pid, peak=True) / 1024


# -- /proc readings of a child process ----------------------------------------------------


def rss_kib(pid: int, peak: bool = False) -> int:
    """Resident set size of a process in KiB (VmRSS), or its peak so far (VmHWM)."""
    field = "VmHWM:" if peak else "VmRSS:"
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    # After the ")" closing the command name, utime and stime are the 12th and
    # 13th fields (fields 14 and 15 of proc(5)).
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def listening_sockets(pid: int) -> int:
    """How many TCP sockets of a process are listening."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    except (FileNotFoundError, ProcessLookupError):
        return 0  # the process is gone, or a descriptor closed while listed
    listening = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as sockets:
            next(sockets)  # the heading
            for row in sockets:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                    listening += 1
    return listening


# -- sockets ------------------------------------------------------------------------------


def connect_client(port: int, user_id: int | bytes,
                   wait_registered: mbroker.RunningBroker | None = None) -> socket.socket:
    """Connect a user client and send its id (an int, or the raw hello bytes);
    with `wait_registered` (an in-process broker), return once it is registered."""
    sock = socket.create_connection((LOCALHOST, port), timeout=WAIT)
    hello = user_id if isinstance(user_id, bytes) else f"{user_id}\r\n".encode()
    sock.sendall(hello)
    if wait_registered is not None:
        user = int(hello.strip() or 0)
        wait_until(lambda: any(c.user_id == user for c in
                               wait_registered.stats(top_clients=None).top_clients))
    return sock


def connect_source(port: int) -> socket.socket:
    return socket.create_connection((LOCALHOST, port), timeout=WAIT)


def raw_client(port: int) -> socket.socket:
    """A connection to the client port that has sent nothing yet."""
    return socket.create_connection((LOCALHOST, port), timeout=WAIT)


def tiny_receiver(port: int, user_id: int, rcvbuf: int = 4096) -> socket.socket:
    """A user client whose kernel receive buffer is made small before connecting,
    so a client that does not read pushes back on the broker quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(WAIT)
    sock.connect((LOCALHOST, port))
    sock.sendall(f"{user_id}\r\n".encode())
    return sock


def small_sender(port: int, sndbuf: int = 16384) -> socket.socket:
    """An event source with a small send buffer, so backpressure reaches it fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.settimeout(WAIT)
    sock.connect((LOCALHOST, port))
    return sock


def local_peer(sock: socket.socket) -> str:
    """The peer name the broker gives this socket."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def receive_exactly(sock: socket.socket, size: int, timeout: float = WAIT) -> bytes:
    """Read until `size` bytes arrived; fewer if the peer closes or `timeout` passes."""
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def expect(sock: socket.socket, expected: bytes) -> None:
    """The next bytes on `sock` are exactly `expected`."""
    assert receive_exactly(sock, len(expected)) == expected


def assert_nothing_more(sock: socket.socket, wait: float = 0.2) -> None:
    """No byte arrives on `sock` within `wait` seconds (nor does it close)."""
    sock.settimeout(wait)
    try:
        extra = sock.recv(65536)
    except TimeoutError:
        return
    assert extra == b"", f"unexpected extra bytes: {extra!r}"


@dataclass(frozen=True)
class Ending:
    """How reading a connection to its end went: "eof", "reset", or "open"
    (still open at the deadline or at the byte limit), and every byte received."""

    how: str
    data: bytes

    @property
    def closed(self) -> bool:
        return self.how != "open"


def read_until_closed(sock: socket.socket, timeout: float = WAIT,
                      limit: int = 64 * 1024 * 1024) -> Ending:
    """Read until the peer closes this connection (EOF or reset), `timeout`
    passes or `limit` bytes arrived."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while len(received) < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except (ConnectionResetError, BrokenPipeError):
            return Ending("reset", bytes(received))
        if not data:
            return Ending("eof", bytes(received))
        received += data
    return Ending("open", bytes(received))


def send_until_blocked(sock: socket.socket, data: bytes, stall: float = 0.5,
                       budget: float = WAIT) -> int:
    """Send `data` on a nonblocking socket until it is all out, or the kernel has
    refused every byte for `stall` seconds, or `budget` runs out; returns how
    many bytes went out (the caller sends the rest later)."""
    sock.setblocking(False)
    offset = 0
    now = time.monotonic()
    deadline, last_progress = now + budget, now
    try:
        while offset < len(data) and now < deadline:
            try:
                sent = sock.send(data[offset:offset + 65536])
            except BlockingIOError:
                sent = 0
            now = time.monotonic()
            if sent:
                offset += sent
                last_progress = now
            elif now - last_progress >= stall:
                break
            else:
                time.sleep(0.005)
    finally:
        sock.settimeout(WAIT)
    return offset


class Reader(threading.Thread):
    """Reads a socket on its own thread until `expected` bytes arrived, the peer
    closed, or `timeout` passed; `start_event`, when given, holds the reading
    back until it is set (a client that stalls, then reads)."""

    def __init__(self, sock: socket.socket, expected: int, timeout: float = WAIT,
                 start_event: threading.Event | None = None, chunk: int = 65536):
        super().__init__(daemon=True)
        self.sock, self.expected, self.timeout = sock, expected, timeout
        self.start_event, self.chunk = start_event, chunk
        self.data = bytearray()
        self.closed = False

    def run(self) -> None:
        if self.start_event is not None and not self.start_event.wait(self.timeout):
            return
        deadline = time.monotonic() + self.timeout
        while len(self.data) < self.expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(min(self.chunk, self.expected - len(self.data)))
            except TimeoutError:
                return
            except OSError:
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            self.data += data

    def result(self) -> bytes:
        self.join(self.timeout + (WAIT if self.start_event is not None else 0) + 1.0)
        return bytes(self.data)


# -- tools/maze.py ------------------------------------------------------------------------


def load_maze() -> ModuleType:
    """tools/maze.py as the module "maze" (tools/ is not a package).

    The module is registered in sys.modules before it runs, because its
    dataclasses look their module up there; later calls return that module.
    """
    if "maze" in sys.modules:
        return sys.modules["maze"]
    spec = importlib.util.spec_from_file_location("maze", MAZE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["maze"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["maze"]
        raise
    return module


def run_maze(*arguments: str, broker: BrokerProcess | None = None,
             open_files: int | None = None,
             timeout: float = MAZE_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `python tools/maze.py ARGUMENTS`, against `broker`'s ports if given."""
    ports = [] if broker is None else [
        "--eventListenerPort", str(broker.event_port),
        "--clientListenerPort", str(broker.client_port)]
    return subprocess.run(
        [sys.executable, str(MAZE_PATH), *ports, *arguments], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout,
        preexec_fn=open_file_limit_raiser(open_files) if open_files else None)


def assert_maze_succeeded(result: subprocess.CompletedProcess,
                          broker: BrokerProcess | None = None) -> None:
    """maze exited 0 and printed its success line (it verified every notification)."""
    details = f"maze stdout:\n{result.stdout}\nmaze stderr:\n{result.stderr}"
    if broker is not None:
        details += f"\nbroker log (last lines):\n{broker.log(last=50)}"
    assert result.returncode == 0, details
    assert load_maze().SUCCESS_LINE in result.stdout.splitlines(), details


# -- stats snapshots, made by hand, and the dashboard drawn from them ----------------------

MIB = 1024 * 1024


def empty_snapshot(**config) -> mbroker.BrokerStats:
    """stats() of a broker that has seen nothing yet (never bound, never served)."""
    broker = mbroker.Broker(mbroker.BrokerConfig(event_port=0, client_port=0, **config))
    try:
        return broker.stats()
    finally:
        broker.reactor.close()


def fake_client(user_id, queued_bytes=0, queued_notifications=0, sent=0, peer=None,
                connected_seconds=60.0) -> mbroker.ClientStats:
    """One row of stats().top_clients."""
    return mbroker.ClientStats(
        user_id=user_id, peer=peer or f"127.0.0.1:{40000 + (user_id or 0) % 20000}",
        queued_notifications=queued_notifications, queued_bytes=queued_bytes,
        notifications_sent=sent, bytes_sent=sent * 20, connected_seconds=connected_seconds)


def busy_snapshot(client_count: int = 1000) -> mbroker.BrokerStats:
    """A broker under load: a connected source, many clients, deepest queue first."""
    return replace(
        empty_snapshot(), uptime=3723.0, next_seq=1_234_568, highest_seq=1_240_000,
        reorder_depth=5_432, reorder_depth_max=9_999, events_in=1_240_000,
        events_dispatched=1_234_567, notifications=4_567_890, bytes_out=98_765_432,
        clients=client_count - min(client_count, 3), connections=client_count,
        awaiting_hello=min(client_count, 3), known_users=10_000, follows=123_456,
        bytes_queued=3 * MIB,
        source=mbroker.SourceStats(connected=True, peer="127.0.0.1:51234", paused=False,
                                   connections=1, bytes_read=123_456_789),
        rates=mbroker.Rates(events_in=120_000.0, events_out=119_800.0,
                            notifications=450_000.0, bytes_out=33_000_000.0),
        top_clients=tuple(
            fake_client(user_id=1000 + index, queued_bytes=(client_count - index) * 1000,
                        queued_notifications=(client_count - index) * 10, sent=50_000 + index)
            for index in range(client_count)))


def dashboard_console(width: int, height: int, color: bool = False):
    """An in-memory rich Console of a terminal's size; its text is console.file.getvalue()."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=width, height=height, force_terminal=color,
                   color_system="standard" if color else None, legacy_windows=False)


def render_text(snapshot: mbroker.BrokerStats, width: int = 80, height: int = 24,
                color: bool = False) -> str:
    """What the terminal shows of the dashboard: plain text, or with ANSI colour codes."""
    console = dashboard_console(width, height, color)
    console.print(mbroker.render_dashboard(snapshot, width=width, height=height))
    return console.file.getvalue()
