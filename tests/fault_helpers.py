"""Helpers for the fault, limit and bad-input tests (test_bad_input.py and friends).

Everything here is bounded in time: each wait takes a deadline, each send a
budget. Only loopback addresses are used; ports always come from the broker.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time

from conftest import WAIT

LOCALHOST = "127.0.0.1"


# -- /proc readings of a broker subprocess ----------------------------------------------

def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (KiB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2:].split()
    # after the command name: state is field 3, utime 14, stime 15 (1-based)
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


# -- sockets ------------------------------------------------------------------------------

def tiny_receiver(port: int, user_id: int, rcvbuf: int = 4096) -> socket.socket:
    """A user client whose kernel receive buffer is made small before connecting,
    so a client that does not read pushes back on the broker quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(WAIT)
    sock.connect((LOCALHOST, port))
    sock.sendall(f"{user_id}\r\n".encode())
    return sock


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


def small_sender(port: int, sndbuf: int = 16384) -> socket.socket:
    """An event source with a small send buffer, so backpressure reaches it fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.settimeout(WAIT)
    sock.connect((LOCALHOST, port))
    return sock


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


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


def read_until_closed(sock: socket.socket, timeout: float = WAIT,
                      limit: int = 64 * 1024 * 1024) -> tuple[bool, bytes]:
    """Read until the broker closes this connection (EOF or reset) or `timeout`
    passes; returns (closed, every byte received)."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while len(received) < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, bytes(received)
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False, bytes(received)
        except (ConnectionResetError, BrokenPipeError):
            return True, bytes(received)
        if not data:
            return True, bytes(received)
        received += data
    return False, bytes(received)


def wait_for_log(process, pattern: str, timeout: float = WAIT) -> str:
    """The first stderr line of a BrokerProcess matching `pattern` (a regex)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(process.stderr_lines):
            text = line.decode(errors="replace")
            if regex.search(text):
                return text
        time.sleep(0.02)
    raise AssertionError(f"no log line matching {pattern!r} within {timeout} s:\n"
                         f"{process.stderr_text()[-3000:]}")


class Reader(threading.Thread):
    """Reads a socket on its own thread until `expected` bytes arrived, the peer
    closed, or `timeout` passed; `start_event`, when given, holds the reading
    back until it is set (a client that stalls, then reads)."""

    def __init__(self, sock: socket.socket, expected: int, timeout: float = WAIT,
                 start_event: threading.Event | None = None, chunk: int = 65536,
                 pause: float = 0.0):
        super().__init__(daemon=True)
        self.sock, self.expected, self.timeout = sock, expected, timeout
        self.start_event, self.chunk, self.pause = start_event, chunk, pause
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
            if self.pause:
                time.sleep(self.pause)

    def result(self) -> bytes:
        self.join(self.timeout + (WAIT if self.start_event is not None else 0) + 1.0)
        return bytes(self.data)
