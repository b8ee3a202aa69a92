#!/usr/bin/env python3
"""mbroker: a single-threaded follower-maze message broker.

One event source pushes a numbered, out-of-order stream of events; many user
clients each represent one user. mbroker restores sequence order, keeps the
follow graph, and forwards each event, byte for byte, to the clients it
concerns. The behaviour contract is docs/behaviour.md; README.md is the guide.

    python3 mbroker.py [EVENT_PORT [CLIENT_PORT]]     # defaults 9090 9099

The file is cut into sections, each opened by the rules it keeps:
configuration, protocol, reorder buffer, exchange, transport, reactor, log,
stats, metrics, dashboard, and command line and Python entry points. The
first four are the pure core: bytes and events in, deliveries out, no
sockets. Transport and reactor drive the loop's sockets; the log (Redis)
and the metrics (HTTP) have their own threads, which reach the loop only
through Reactor.call_in_loop.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import enum
import errno
import gc
import heapq
import itertools
import logging
import os
import queue
import select
import selectors
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, replace
from functools import partial
from itertools import compress

__version__ = "0.2.0"
__all__ = [
    # running a broker
    "serve", "stop", "running", "RunningBroker", "Broker", "BrokerConfig", "main", "console",
    # what it reports
    "BrokerStats", "SourceStats", "Rates", "Counters", "ClientStats", "ClosedConnection",
    "LatencyStats", "LogStats", "CloseReason", "format_status_line", "render_dashboard",
    "make_dashboard",
    # playing with the core
    "Playground", "Exchange", "EventPipeline", "ReorderBuffer", "Subscriber", "LineSplitter",
    "parse_event", "parse_hello", "is_plain_event_text", "MalformedLine",
    # errors
    "PortError", "LogError", "MetricsUnavailable",
]

log = logging.getLogger("mbroker")


# ============================================================================
# Configuration
#
# Rules: every limit the broker enforces, on input, memory and time, lives
# here with its default, once. The operator's options are the BrokerConfig
# fields whose metadata carries help text: the command line is built from
# that metadata, so --help, the defaults and the code cannot drift apart.
# The other fields tune the core (tests and benchmarks set them); the fixed
# limits are the constants below the class.
# ============================================================================

MIB = 1024 * 1024


def option(default, help_text: str, *, positional: str | None = None, kind: type | None = None):
    """A BrokerConfig field that is also a command-line option (kind: its
    type, when the default's does not say)."""
    return field(default=default, metadata={"help": help_text, "positional": positional,
                                            "kind": kind or type(default)})


@dataclass
class BrokerConfig:
    """Every option and tunable of the broker, with its default."""

    event_port: int = option(9090, "port the event source connects to (0: any free port)",
                             positional="EVENT_PORT")
    client_port: int = option(9099, "port user clients connect to (0: any free port)",
                              positional="CLIENT_PORT")
    host: str = option("127.0.0.1", "address to listen on (whoever reaches the event port "
                                    "can publish to every user)")
    max_line: int = option(4096, "longest event line in bytes before its newline; longer "
                                 "ones are discarded")
    max_pending: int = option(1_000_000, "reorder buffer size in events; past it the lowest "
                                         "missing sequence numbers are declared lost")
    hello_timeout: float = option(10.0, "seconds a new client has to send its user id")
    max_client_buffer: int = option(16 * MIB, "bytes queued for one client before it is cut "
                                              "off as a slow consumer")
    write_timeout: float = option(10.0, "seconds a client may have bytes queued with none "
                                        "written before it is cut off as a slow consumer")
    max_buffered: int = option(256 * MIB, "bytes queued for all clients together before the "
                                          "event source is paused (resumed below half)")
    drain_timeout: float = option(5.0, "seconds to deliver queued notifications on "
                                       "SIGINT/SIGTERM")
    max_follows: int = option(10_000_000, "follow relations kept at most; new follows past "
                                          "it are refused (counted as follows_refused)")
    log: str | None = option(None, "durable log on Redis: redis://[:PASSWORD@]HOST:PORT/DB "
                                   "(or rediss://); off: one process, state in memory",
                             kind=str)
    log_key: str = option("mbroker:events", "the log's Redis stream; its snapshot is kept "
                                            "at KEY:snapshot")
    edge: bool = option(False, "follow the log (--log) and serve clients on CLIENT_PORT, "
                               "with no event port")
    snapshot_every: int = option(100_000, "the primary snapshots the follow graph every so "
                                           "many sequence numbers, and trims the log")
    log_retention: float = option(5.0, "seconds of entries the primary keeps in the log at "
                                       "least when it trims, so that an edge that far behind "
                                       "reads on instead of reloading from a snapshot")
    metrics_port: int | None = option(None, "serve Prometheus metrics (GET /metrics) and "
                                            "GET /healthz on this port, at the same address as "
                                            "the others (0: any free port); off: no HTTP",
                                      kind=int)
    # Tuning of the core, not options. How much the source socket is read per
    # wake-up; how many lines the core takes at a time (a slice's objects
    # should stay in the CPU's cache); how many lines are dispatched before
    # output is flushed (one send per client) and the limits checked again;
    # and how many reorder slots a slice gets beyond twice its length, room
    # for the events a shuffled batch sends early.
    read_size: int = 256 * 1024
    dispatch_slice: int = 1024
    flush_lines: int = 4096
    reorder_slot_margin: int = 256
    min_fanout_budget: int = 64 * 1024  # see fanout_budget

    @property
    def fanout_budget(self) -> int:
        """Bytes of broadcasts and status updates queued between two flushes
        before dispatch stops early: with thousands of clients, a slice of
        broadcasts would otherwise queue gigabytes before --max-buffered is
        checked again."""
        return max(self.min_fanout_budget, self.max_buffered // FANOUT_BUDGET_SHARE)

    def problem(self) -> str | None:
        """What is wrong with these settings, in the operator's words; None if nothing."""
        for item in fields(self):
            value = getattr(self, item.name)
            name = item.metadata.get("positional") or "--" + item.name.replace("_", "-")
            if item.name.endswith("_port") and value is not None and not 0 <= value <= 65535:
                return f"{name} must be between 0 and 65535, not {value}"
            if item.name.startswith("max_") and value < 1 or \
                    item.name == "snapshot_every" and value < 1:
                return f"{name} must be at least 1"
            if item.name == "log_retention" and not value >= 0:  # also refuses nan
                return f"{name} must be 0 or more"
            if item.name.endswith("_timeout") and not value > 0:  # also refuses nan
                return f"{name} must be positive"
        ports = [port for port in (None if self.edge else self.event_port, self.client_port,
                                   self.metrics_port) if port]
        if len(set(ports)) < len(ports):
            return "EVENT_PORT, CLIENT_PORT and --metrics-port must differ"
        if self.edge and not self.log:
            return "--edge follows a log: give --log redis://HOST:PORT/DB too"
        if self.log is not None and \
                urllib.parse.urlsplit(self.log).scheme not in ("redis", "rediss", "unix"):
            return f"--log must be a redis://, rediss:// or unix:// URL, not {masked(self.log)}"
        digits = sys.get_int_max_str_digits()
        if digits and self.max_line > digits:
            # Every number on a line must be parsable; this Python parses at
            # most that many digits, and mbroker leaves its limit alone.
            return (f"--max-line must be at most {digits} (the longest number this Python "
                    f"parses; see sys.set_int_max_str_digits)")
        return None


DEFAULTS = BrokerConfig()

MAX_HELLO_LINE = 64  # bytes of a client's first line, before its b"\n"
MAX_USER_ID_DIGITS = 32
FANOUT_BUDGET_SHARE = 8  # the fan-out budget's share of --max-buffered
SKIPPED_RANGES_KEPT = 64  # lost ranges kept for one log summary; more merge into the last
LOST_RANGES_KEPT = 1024  # lost ranges remembered to tell late arrivals from duplicates
HEAP_SLACK = 1024  # stale numbers the reorder heap may hold beyond twice the live ones
RECENTLY_CLOSED_KEPT = 32  # closed connections kept for the dashboard
TERMINAL_MAX_PENDING = MIB  # text kept for a terminal that stopped reading; the rest is dropped
LOG_BURST, LOG_WINDOW = 10, 5.0  # lines per kind of problem per window (seconds)
HOUSEKEEPING_INTERVAL = 0.25  # seconds between timer runs; also bounds the select timeout
ACCEPT_RETRY_DELAY = 0.5  # seconds accepting pauses after running out of descriptors
ACCEPTS_PER_WAKEUP = 1024  # connections taken from one listener per wake-up
CLIENT_READ_SIZE = 4096  # bytes read from a client per wake-up (its id, then discarded)
LISTEN_BACKLOG = 1024
# The command's process (not an embedding one) lets the garbage collector's
# youngest generation grow to this many objects before a collection, from
# CPython's 700: the broker's split lines live for one slice of 1,024 events
# and die by reference counting, and at 700 each collection walks the live
# slice and promotes it, which makes full collections (walking the follow
# graph) frequent. Measured: 1.29x events/s end to end, 12% less broker CPU.
GC_YOUNGEST_THRESHOLD = 10_000
LOG_ENTRY_ID_LIMIT = 2**64  # a Redis stream id's first part is a 64-bit number
LOG_MAX_UNWRITTEN = 100_000  # events handed to the log's writer, not yet in Redis, before
#                              the source pauses (resumed below half)
LOG_WRITE_BATCH = 64  # entries per round trip to Redis
LOG_READ_BATCH = 128  # entries an edge reads per XREAD
LOG_RECOVERY_BATCH = 1024  # entries per XRANGE while recovering
LOG_READ_BLOCK = 1.0  # seconds an edge's XREAD waits for new entries
LOG_SOCKET_TIMEOUT = 5.0  # seconds a Redis command may take before the connection is retried
LOG_RETRY_FIRST, LOG_RETRY_MAX = 0.1, 5.0  # seconds between reconnects, doubling
SNAPSHOT_STEP = 20_000  # followers a snapshot serializes per loop iteration
SNAPSHOT_FORMAT = b"mbroker-snapshot 1"
METRICS_SNAPSHOT_TIMEOUT = 5.0  # seconds a scrape waits for the loop's snapshot
HEALTH_TIMEOUT = 1.0  # seconds /healthz waits for the loop to answer


# ============================================================================
# Protocol
#
# Rules: bytes in, lines and parsed tuples out; no sockets, and no clock but
# the rate-limited log's, which tests replace. A line is everything before a
# b"\n"; a b"\r" before the b"\n" stays on the line, because clients must
# receive exactly what the source sent. A line longer than max_line is never
# buffered whole: the splitter drops bytes until the next b"\n". Numbers are
# ASCII digits only (bytes.isdigit is ASCII-only), compared as integers.
# ============================================================================

FOLLOW, UNFOLLOW, BROADCAST, PRIVATE, STATUS = b"F", b"U", b"B", b"P", b"S"
FIELD_COUNTS = {FOLLOW: 4, UNFOLLOW: 4, PRIVATE: 4, STATUS: 3, BROADCAST: 2}
# The fast path splits lines without taking the b"\r" off first, so there a
# broadcast's type field (its last) may still carry it.
BROADCAST_FIELDS = {BROADCAST, BROADCAST + b"\r"}
WIRE_FIELD_COUNTS = {**FIELD_COUNTS, BROADCAST + b"\r": 2}
TARGETED_KINDS = {FOLLOW, PRIVATE}  # the types that notify TO alone
EVENT_TYPE_NAMES = {FOLLOW: "follow", UNFOLLOW: "unfollow", BROADCAST: "broadcast",
                    PRIVATE: "private", STATUS: "status"}
# A consumed malformed SEQ, as the exchange sees it: a split line of no type.
NO_OP = (b"", b"")

_PLAIN_BYTES_BUT_CR = b"0123456789|\nFUBPS"
_NEWLINE_AS_BAR = bytes.maketrans(b"\n", b"|")
_LETTERS_TO_L = bytes.maketrans(b"FUBPS", b"LLLLL")
_NOT_LETTER_OR_NEWLINE = b"0123456789|\r"


def is_plain_event_text(text: bytes) -> bool:
    """Whether text, whole lines each ended by b"\n", needs no strict parsing.

    True when all of these hold:

    1. text holds only ASCII digits, b"|", b"\r", b"\n" and the five type
       letters F U B P S;
    2. every b"\r" stands right before a b"\n";
    3. no field is empty: with the b"\r"s deleted and each b"\n" read as a
       b"|", no b"|" starts the text or follows another (so an empty line,
       too, sends the text to the strict parser);
    4. no line holds two type letters.

    Why the fast path may then trust int(): it takes a line only when its
    second field is a type letter (F U P S, or B or B\r as the last field)
    and the field count is that type's. By (4) that letter is the line's
    only one, so every other field holds digits, by (1), plus at most a
    b"\r" at the very end of the line, by (2); by (3) it holds at least one
    digit. int() accepts exactly that, since it ignores surrounding
    whitespace and b"\r" is whitespace; and a field of digits and a final
    b"\r" is a valid field, its b"\r" the terminator's. So int() meets no
    sign, space, underscore, letter or empty field, and is exactly as strict
    as the protocol's "ASCII digits only". Any line the fast path does not
    take goes through parse_event.

    Each rule is one or two C-level passes over the text (this runs once per
    read, not per line).
    """
    stray = text.translate(None, _PLAIN_BYTES_BUT_CR)  # what remains: b"\r"s and strays
    if not stray.count(b"\r") == len(stray) == text.count(b"\r\n"):
        return False
    fields = text.translate(_NEWLINE_AS_BAR, b"\r")
    return (not fields.startswith(b"|") and b"||" not in fields
            and b"LL" not in text.translate(_LETTERS_TO_L, _NOT_LETTER_OR_NEWLINE))


class MalformedLine(ValueError):
    """An event line that does not parse; `seq` is None when even SEQ is bad."""

    def __init__(self, seq: int | None, reason: str):
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


class LineSplitter:
    """Cuts a byte stream into lines (without their b"\\n") across any reads."""

    __slots__ = ("discarding", "max_line", "overlong", "partial")

    def __init__(self, max_line: int = DEFAULTS.max_line):
        self.max_line = max_line
        self.partial = b""
        self.discarding = False  # inside an overlong line, dropping to its end
        self.overlong = 0  # lines dropped for length, ever

    def split(self, data: bytes) -> tuple[list[bytes], bool]:
        """(the lines data completes, whether is_plain_event_text holds for them)."""
        if self.discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return [], True
            data = data[newline + 1:]
            self.discarding = False
        if self.partial:
            data = self.partial + data
        end = data.rfind(b"\n") + 1
        tail = data[end:]
        if len(tail) > self.max_line:
            self.overlong += 1
            self.partial = b""
            self.discarding = True
        else:
            self.partial = tail
        if not end:
            return [], True
        text = data[:end] if tail else data
        lines = text.split(b"\n")
        lines.pop()  # the empty string after the last b"\n"
        # Only a chunk longer than max_line can hold an overlong line, so the
        # common case pays one C-level max() and no Python loop.
        limit = self.max_line
        if end > limit and max(map(len, lines)) > limit:
            kept = [line for line in lines if len(line) <= limit]
            self.overlong += len(lines) - len(kept)
            lines = kept
        return lines, is_plain_event_text(text)

    def reset(self) -> None:
        """Forget an unterminated line: a new connection never continues it."""
        self.partial = b""
        self.discarding = False


def _parse_number(field_bytes: bytes, what: str, seq: int | None) -> int:
    if not field_bytes.isdigit():
        raise MalformedLine(seq, f"{what} is not a decimal number: {field_bytes[:40]!r}")
    try:
        return int(field_bytes)
    except ValueError:  # longer than this Python's integer digit limit
        raise MalformedLine(seq, f"{what} has {len(field_bytes)} digits, more than this "
                                 f"Python parses") from None


def parse_event(line: bytes) -> tuple[int, bytes, int | None, int | None]:
    """Parse one line (no b"\\n") into (seq, kind, from_user, to_user).

    Raises MalformedLine; its `seq` is set when SEQ itself was valid, so the
    caller can consume that number as a no-op and keep the stream moving.
    """
    body = line[:-1] if line[-1:] == b"\r" else line
    parts = body.split(b"|")
    if not parts[0].isdigit():
        raise MalformedLine(None, f"no valid sequence number in {line[:60]!r}")
    seq = _parse_number(parts[0], "SEQ", None)
    if seq == 0:
        raise MalformedLine(None, "sequence number 0: numbers start at 1")
    if len(parts) < 2:
        raise MalformedLine(seq, "no event type")
    kind = parts[1]
    expected = FIELD_COUNTS.get(kind)
    if expected is None:
        raise MalformedLine(seq, f"unknown event type {kind[:20]!r}")
    if len(parts) != expected:
        raise MalformedLine(seq, f"type {kind.decode()} takes {expected} fields, got {len(parts)}")
    if expected == 2:
        return seq, kind, None, None
    from_user = _parse_number(parts[2], "FROM", seq)
    if expected == 3:
        return seq, kind, from_user, None
    return seq, kind, from_user, _parse_number(parts[3], "TO", seq)


def parse_hello(received: bytes) -> int | None:
    """A client's first bytes to its user id: None while its line is not
    complete, ValueError once it cannot be a valid id line."""
    newline = received.find(b"\n")
    line = received if newline < 0 else received[:newline]
    if len(line) > MAX_HELLO_LINE:
        raise ValueError(f"hello line over {MAX_HELLO_LINE} bytes")
    if newline < 0:
        return None
    text = line.strip(b" \t\r")
    if not text.isdigit():
        raise ValueError(f"user id is not a decimal number: {text!r}")
    if len(text) > MAX_USER_ID_DIGITS:
        raise ValueError(f"user id longer than {MAX_USER_ID_DIGITS} digits")
    return int(text)


class RateLimitedLog:
    """At most `burst` lines per key per `window` seconds; the rest are
    counted and summarised on the next line that gets through, so a flood of
    bad input cannot flood the log or slow the loop."""

    def __init__(self, logger: logging.Logger, burst: int = LOG_BURST,
                 window: float = LOG_WINDOW, clock=time.monotonic):
        self.logger = logger
        self.burst = burst
        self.window = window
        self.clock = clock
        self._windows: dict[str, list] = {}  # key -> [window start, lines, suppressed]

    def warning(self, key: str, message: str, *args) -> None:
        now = self.clock()
        state = self._windows.get(key)
        if state is None or now - state[0] >= self.window:
            suppressed = state[2] if state else 0
            state = self._windows[key] = [now, 0, 0]
            if suppressed:
                message += f" ({suppressed} similar lines suppressed)"
        if state[1] >= self.burst:
            state[2] += 1
            return
        state[1] += 1
        self.logger.warning(message, *args)

    def flush(self) -> None:
        """Report what was suppressed in windows that have ended, so a flood
        that stops still leaves its count in the log; called by the timer."""
        now = self.clock()
        for key, state in self._windows.items():
            if state[2] and now - state[0] >= self.window:
                self.logger.warning("%d similar lines suppressed (%s)", state[2], key)
                state[2] = 0


# ============================================================================
# Reorder buffer
#
# Rules: hands out items strictly in sequence order, each SEQ at most once,
# and is the only keeper of the sequence state (next, highest, pending, the
# counters). Memory is bounded by max_pending: past it, the lowest gap is
# declared lost (one range, however wide) and delivery resumes. Numbers below
# next_seq are duplicates (or late arrivals of lost numbers) and are dropped.
# One routine, _release_from, hands out a run of consecutive numbers.
# ============================================================================


class ReorderBuffer:
    """Others read next_seq, highest_seq, largest_depth and the counters;
    only this class writes them."""

    __slots__ = ("next_seq", "highest_seq", "max_pending", "slot_margin", "largest_depth",
                 "duplicates", "late", "skipped", "_pending", "_lowest_heap", "_lost_ranges",
                 "_unlogged_skips", "_unlogged_duplicates", "_unnumbered")

    def __init__(self, max_pending: int = DEFAULTS.max_pending, first_seq: int = 1,
                 slot_margin: int = DEFAULTS.reorder_slot_margin):
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.max_pending = max_pending
        self.slot_margin = slot_margin
        self.next_seq = first_seq
        self.highest_seq = 0
        self.largest_depth = 0
        self.duplicates = 0
        self.late = 0  # numbers that arrived after being declared lost
        self.skipped = 0  # numbers declared lost, in total
        self._pending: dict[int, object] = {}
        # The lowest pending SEQ is only needed when the buffer overflows, so
        # a heap of pending numbers is kept only while it is nearly full.
        self._lowest_heap: list[int] | None = None
        self._lost_ranges: list[tuple[int, int]] = []  # to tell late from duplicate
        self._unlogged_skips: list[tuple[int, int]] = []  # see take_skipped_ranges
        self._unlogged_duplicates: list[int] = []  # [count, lowest, highest] or empty
        self._unnumbered: list = []  # see push_slice

    def __len__(self) -> int:
        return len(self._pending)

    def has_seen(self, seq: int) -> bool:
        """Whether seq was released, declared lost, or is waiting."""
        return seq < self.next_seq or seq in self._pending

    def push(self, seq: int, item) -> list:
        """Offer one item; returns the items now deliverable, in order."""
        if seq > self.highest_seq:
            self.highest_seq = seq
        if seq == self.next_seq:
            if not self._pending:
                self.next_seq = seq + 1
                return [item]
            return self._release_from(seq + 1, [item])
        pending = self._pending
        if seq < self.next_seq or seq in pending:
            self._count_resent(seq)
            return []
        pending[seq] = item
        depth = len(pending)
        if depth > self.largest_depth:
            self.largest_depth = depth
        heap = self._lowest_heap
        if heap is not None:
            heapq.heappush(heap, seq)
            if self._heap_is_stale():
                self._rebuild_heap()
        elif depth * 2 >= self.max_pending:
            self._rebuild_heap()
        if depth > self.max_pending:
            return self._skip_lowest_gap()
        return []

    def push_slice(self, events: list) -> list:
        """Offer many events at once: lines split at b"|" whose first field
        is their SEQ in ASCII digits (as in plain text: see
        is_plain_event_text). Returns the events now deliverable, in order:
        the same as push() one by one. An event numbered 0 is no event: it is
        set aside for take_unnumbered().

        The fast path: each event goes into a list slot by its distance from
        next_seq, and the run of consecutive numbers then leaves with one
        C-level index() and slice instead of a dict pop per event. While many
        events wait (a stalled gap, or the buffer filling up), push() one by
        one, with its overflow handling, takes over.
        """
        count = len(events)
        if not count:
            return []
        pending = self._pending
        span = 2 * count + self.slot_margin
        if self._lowest_heap is not None or len(pending) > 4 * span or \
                (len(pending) + count) * 4 >= self.max_pending:
            ready = []
            for event in events:
                seq = int(event[0])
                if seq:
                    ready += self.push(seq, event)
                else:
                    self._unnumbered.append(event)
            return ready
        base = self.next_seq
        slots: list = [None] * span
        if pending:  # what earlier slices left waiting: a few, or a wide batch's worth
            for seq in [seq for seq in pending if seq < base + span]:
                slots[seq - base] = pending.pop(seq)
        for event in events:
            seq = int(event[0])
            index = seq - base
            if 0 <= index < span:
                if slots[index] is None:
                    slots[index] = event
                else:
                    self._count_resent(seq)
            elif index >= span:
                if pending.setdefault(seq, event) is not event:
                    self._count_resent(seq)
            elif seq:
                self._count_resent(seq)
            else:
                self._unnumbered.append(event)
        try:
            ready = slots.index(None)
        except ValueError:  # every slot filled: the run may go on in pending
            ready = span
        waiting = slots[ready:]
        if waiting.count(None) != len(waiting):
            numbers = range(base + ready, base + span)
            pending.update(compress(zip(numbers, waiting, strict=True), waiting))
        del slots[ready:]
        released = self._release_from(base + ready, slots)
        # What this slice brought is now released, waiting, or was a resend
        # of a lower number; so the highest number seen is one of those.
        highest = max(pending) if pending else self.next_seq - 1
        if highest > self.highest_seq:
            self.highest_seq = highest
        if len(pending) > self.largest_depth:
            self.largest_depth = len(pending)
        return released

    def take_unnumbered(self) -> list:
        """The events push_slice() set aside for their SEQ of 0, if any."""
        unnumbered, self._unnumbered = self._unnumbered, []
        return unnumbered

    def advance_to(self, seq: int) -> None:
        """Everything below seq was handled elsewhere (a log being replayed):
        go on from seq, dropping what waits below it."""
        if seq <= self.next_seq:
            return
        self._pending = {number: item for number, item in self._pending.items()
                         if number >= seq}
        self._lowest_heap = None
        self.next_seq = seq
        if seq - 1 > self.highest_seq:
            self.highest_seq = seq - 1

    def take_skipped_ranges(self) -> list[tuple[int, int]]:
        """Ranges declared lost since the last call, for the log. Past
        SKIPPED_RANGES_KEPT, new ranges merge into the last one, so one huge
        slice of gaps costs a bounded list and a bounded log."""
        ranges, self._unlogged_skips = self._unlogged_skips, []
        return ranges

    def take_duplicates(self) -> tuple[int, int, int] | None:
        """(count, lowest, highest) of the duplicates dropped since the last
        call, for the log; None when there were none."""
        if not self._unlogged_duplicates:
            return None
        count, lowest, highest = self._unlogged_duplicates
        self._unlogged_duplicates = []
        return count, lowest, highest

    # -- internals -----------------------------------------------------------

    def _release_from(self, seq: int, ready: list) -> list:
        """Append the waiting run seq, seq+1, ... to ready; next_seq follows it."""
        pending = self._pending
        while seq in pending:
            ready.append(pending.pop(seq))
            seq += 1
        self.next_seq = seq
        if self._lowest_heap is not None and len(pending) * 4 < self.max_pending:
            self._lowest_heap = None
        return ready

    def _count_resent(self, seq: int) -> None:
        """Count a number that was delivered, is waiting, or was declared lost."""
        if seq < self.next_seq and any(first <= seq <= last
                                       for first, last in reversed(self._lost_ranges)):
            self.late += 1
            return
        self.duplicates += 1
        unlogged = self._unlogged_duplicates
        if not unlogged:
            self._unlogged_duplicates = [1, seq, seq]
        else:
            unlogged[0] += 1
            if seq < unlogged[1]:
                unlogged[1] = seq
            elif seq > unlogged[2]:
                unlogged[2] = seq

    def _skip_lowest_gap(self) -> list:
        lowest = self._lowest_pending()
        first_lost, last_lost = self.next_seq, lowest - 1
        self.skipped += lowest - first_lost
        ranges = self._unlogged_skips
        if len(ranges) < SKIPPED_RANGES_KEPT:
            ranges.append((first_lost, last_lost))
        else:
            ranges[-1] = (ranges[-1][0], last_lost)
        # Lost ranges are remembered (a bounded number of them) only to tell a
        # late arrival from a true duplicate in the counters.
        self._lost_ranges.append((first_lost, last_lost))
        if len(self._lost_ranges) > LOST_RANGES_KEPT:
            del self._lost_ranges[:LOST_RANGES_KEPT // 2]
        return self._release_from(lowest, [])

    def _lowest_pending(self) -> int:
        if self._lowest_heap is None or self._heap_is_stale():
            self._rebuild_heap()
        heap, pending = self._lowest_heap, self._pending
        while heap[0] not in pending:
            heapq.heappop(heap)
        return heap[0]

    def _heap_is_stale(self) -> bool:
        # Released numbers stay in the heap until an overflow pops them;
        # rebuild before they outnumber the live ones, or it grows forever.
        return len(self._lowest_heap) > 2 * len(self._pending) + HEAP_SLACK

    def _rebuild_heap(self) -> None:
        self._lowest_heap = list(self._pending)
        heapq.heapify(self._lowest_heap)


# ============================================================================
# Exchange
#
# Rules: the follow graph and the routing table, applied strictly in
# sequence order. Follow state is kept for every user, connected or not.
# A subscriber is any object with a `lines` list and a write(data, count)
# method: dispatch appends the raw line to `lines` and records the
# subscriber as touched; take_output() later joins each touched subscriber's
# lines into one buffer, so many notifications leave in one send.
# EventPipeline.dispatch is the one driver of the core: the reactor, the
# benchmarks and the tests all call it.
# ============================================================================

Output = list[tuple[object, bytes, int]]  # (subscriber, bytes, notifications)


class Subscriber:
    """An in-memory subscriber, for tests, benchmarks and play: it collects."""

    __slots__ = ("user_id", "lines", "received")

    def __init__(self, user_id: int):
        self.user_id = user_id
        self.lines: list[bytes] = []  # dispatched, not yet taken by take_output()
        self.received = bytearray()  # what write() was handed

    def write(self, data: bytes, count: int) -> None:
        self.received += data

    def take_bytes(self) -> bytes:
        """Everything dispatched to this subscriber since the last call, as
        the transport would send it: each line plus b"\\n"."""
        data = bytes(self.received) + b"".join(line + b"\n" for line in self.lines)
        self.received.clear()
        self.lines = []
        return data


def write_output(output: Output) -> bool:
    """Hand each subscriber its bytes; the simplest deliver() for dispatch()."""
    for subscriber, data, count in output:
        subscriber.write(data, count)
    return True


class Exchange:
    """The follow graph and the routing table; see the section's banner."""

    def __init__(self, max_follows: int = DEFAULTS.max_follows):
        self.max_follows = max_follows
        # The follow graph by follower, for every user; and, for status
        # updates, an index of only the followers that are connected: a status
        # update then costs its notifications, not a walk over every follower.
        self.following: dict[int, set[int]] = {}  # follower -> the users it follows
        self.watchers: dict[int, set[int]] = {}  # followed user -> connected followers
        self.follow_count = 0
        self.follows_refused = 0
        self.routes: dict[int, list] = {}  # connected user id -> its subscribers
        # The keys of routes again, as a set: follows and unfollows test
        # whether their follower is connected, and a set's test reads one
        # table where a dict's reads two (1.05x on the 1,000-of-10,000-users
        # core benchmark). subscribe() and unsubscribe() keep the two equal.
        self.route_keys: set[int] = set()
        self.subscribers: dict[object, None] = {}  # every registered subscriber
        self.touched: set = set()  # subscribers with lines since the last take_output
        self.notifications = 0
        self.dispatched = 0  # events applied, consumed malformed numbers included
        self.dispatched_by_type = dict.fromkeys(EVENT_TYPE_NAMES.values(), 0)
        self.queued_fanout = 0  # bytes broadcasts and status updates queued since take_output

    # -- registration --------------------------------------------------------

    def subscribe(self, user_id: int, subscriber) -> None:
        same_user = self.routes.get(user_id)
        if same_user is None:
            same_user = self.routes[user_id] = []
            self.route_keys.add(user_id)
            for followed in self.following.get(user_id, ()):
                self._watch(followed, user_id)
        same_user.append(subscriber)
        self.subscribers[subscriber] = None

    def unsubscribe(self, user_id: int, subscriber) -> None:
        if subscriber not in self.subscribers:
            return
        del self.subscribers[subscriber]
        same_user = self.routes.get(user_id)
        if same_user is not None:
            same_user.remove(subscriber)
            if not same_user:
                del self.routes[user_id]
                self.route_keys.discard(user_id)
                for followed in self.following.get(user_id, ()):
                    self._unwatch(followed, user_id)
        self.touched.discard(subscriber)

    # The index of connected followers changes only when a connected user
    # follows or unfollows, or when a user's first connection arrives or its
    # last one leaves; these two keep it free of empty sets.
    def _watch(self, followed: int, follower: int) -> None:
        watching = self.watchers.get(followed)
        if watching is None:
            self.watchers[followed] = {follower}
        else:
            watching.add(follower)

    def _unwatch(self, followed: int, follower: int) -> None:
        watching = self.watchers[followed]
        watching.remove(follower)
        if not watching:
            del self.watchers[followed]

    # -- events --------------------------------------------------------------

    def dispatch(self, line: bytes) -> None:
        """Apply one in-order, well-formed event line (no b"\\n"); see apply()."""
        self.apply((line.split(b"|"),))

    def apply(self, events, budget: int | None = None) -> list:
        """Apply in-order events, each a well-formed line split at b"|".

        The line is kept split rather than parsed into a tuple: most events
        reach nobody, so a user id is parsed only when the type needs it and
        the line is joined back only when somebody is notified. A line's last
        field may carry the b"\\r" of its terminator: int() ignores it (see
        is_plain_event_text), and the joined line is the exact line the source
        sent. NO_OP stands for a consumed malformed SEQ. The pipeline hands
        over a whole slice at once, so this loop, not a call per event, is
        the hot path.

        budget bounds the bytes that broadcasts and status updates queue
        between two take_output() calls: once they pass it, the rest of the
        events are returned, not applied, so the caller can send what is
        queued and check its limits first. (The other types queue one line per
        connection of one user, which the lines between flushes already bound.)
        """
        following = self.following
        watchers = self.watchers
        routes = self.routes
        connected = self.route_keys
        touch = self.touched.add
        follow_count, max_follows = self.follow_count, self.max_follows
        follows = privates = statuses = unfollows = broadcasts = 0  # applied, by type
        delivered = 0
        fanout_bytes = self.queued_fanout
        if budget is None:
            budget = sys.maxsize
        held: list = []
        remaining = iter(events)
        for split_line in remaining:
            kind = split_line[1]
            if kind in TARGETED_KINDS:
                to_user = int(split_line[3])
                if kind == FOLLOW:
                    follows += 1
                    from_user = int(split_line[2])
                    followed = following.get(from_user)
                    if followed is None or to_user not in followed:
                        if follow_count < max_follows:
                            if followed is None:
                                followed = following[from_user] = set()
                            followed.add(to_user)
                            follow_count += 1
                            if from_user in connected:
                                self._watch(to_user, from_user)
                        else:
                            # Refused before any set is made: a refused follow
                            # must cost no memory, or the cap would mean nothing.
                            self.follows_refused += 1
                else:
                    privates += 1
                targets = routes.get(to_user)
                if targets is not None:
                    raw = b"|".join(split_line)
                    for target in targets:
                        target.lines.append(raw)
                        touch(target)
                    delivered += len(targets)
            elif kind == STATUS:
                statuses += 1
                watching = watchers.get(int(split_line[2]))
                if watching:
                    reached = delivered
                    raw = b"|".join(split_line)
                    for follower in watching:
                        targets = routes[follower]
                        for target in targets:
                            target.lines.append(raw)
                            touch(target)
                        delivered += len(targets)
                    fanout_bytes += (delivered - reached) * (len(raw) + 1)  # + b"\n"
                    if fanout_bytes > budget:
                        held = list(remaining)
                        break
            elif kind == UNFOLLOW:
                unfollows += 1
                from_user = int(split_line[2])
                followed = following.get(from_user)
                if followed is not None:
                    to_user = int(split_line[3])
                    if to_user in followed:
                        followed.remove(to_user)
                        follow_count -= 1
                        if not followed:
                            del following[from_user]
                        if from_user in connected:
                            self._unwatch(to_user, from_user)
            elif kind in BROADCAST_FIELDS:
                broadcasts += 1
                raw = b"|".join(split_line)
                subscribers = self.subscribers
                for target in subscribers:
                    target.lines.append(raw)
                self.touched.update(subscribers)
                delivered += len(subscribers)
                fanout_bytes += len(subscribers) * (len(raw) + 1)
                if fanout_bytes > budget:
                    held = list(remaining)
                    break
        self.follow_count = follow_count
        by_type = self.dispatched_by_type
        by_type["follow"] += follows
        by_type["private"] += privates
        by_type["status"] += statuses
        by_type["unfollow"] += unfollows
        by_type["broadcast"] += broadcasts
        self.notifications += delivered
        self.dispatched += len(events) - len(held)
        self.queued_fanout = fanout_bytes
        return held

    def take_output(self) -> Output:
        """(subscriber, bytes, notifications) for each subscriber touched since
        the last call: its new lines joined into one buffer, each line with
        the b"\\n" the splitter took off, so it can leave in one send."""
        touched = self.touched
        self.queued_fanout = 0
        if not touched:
            return []
        self.touched = set()
        output = []
        for subscriber in touched:
            lines = subscriber.lines
            if lines:
                subscriber.lines = []
                count = len(lines)
                lines.append(b"")
                output.append((subscriber, b"\n".join(lines), count))
        return output

    def follow_graph(self) -> Iterator[tuple[int, set[int]]]:
        """(follower, the users it follows) for every follower: for snapshots.
        The sets are the exchange's own; read them before the next event."""
        return iter(self.following.items())

    def replace_follow_graph(self, following: dict[int, set[int]]) -> None:
        """Start from another follow graph (a snapshot), connected users kept."""
        self.following = following
        self.follow_count = sum(map(len, following.values()))
        self.watchers = {}
        for follower in self.routes:
            for followed in following.get(follower, ()):
                self._watch(followed, follower)

    def followers_of(self, user_id: int) -> set[int]:
        """Every follower of user_id, connected or not (a full walk: for tests)."""
        return {follower for follower, followed in self.following.items() if user_id in followed}


class EventPipeline:
    """Bytes from the event source in, dispatched events out.

    receive() splits bytes into lines and queues them; dispatch() parses,
    reorders and applies them in slices, handing the output to the caller
    between slices so it can send and check its limits.
    """

    def __init__(self, exchange: Exchange, config: BrokerConfig = DEFAULTS,
                 problems: RateLimitedLog | None = None):
        self.exchange = exchange
        self.splitter = LineSplitter(config.max_line)
        self.reorder = ReorderBuffer(config.max_pending, slot_margin=config.reorder_slot_margin)
        self.problems = problems or RateLimitedLog(log)
        self.slice_lines = config.dispatch_slice
        self.flush_lines = config.flush_lines
        self.fanout_budget = config.fanout_budget
        self.events_in = 0  # lines with a valid SEQ
        self.malformed = 0  # valid SEQ, rest unparsable: consumed as no-op
        self.unsequenced = 0  # no valid SEQ: dropped
        self._backlog: list[bytes] = []  # lines received, not yet dispatched
        self._backlog_plain = True  # is_plain_event_text held for every one
        self._position = 0  # the backlog's first line not yet dispatched
        self._backlog_ordered = False  # the backlog came from a log: no reordering
        self._held: list = []  # in-order events the exchange held back (see dispatch)
        # Called as on_release(events, last_seq) with each run the reorder
        # buffer releases, in order (NO_OP for a consumed malformed SEQ):
        # the seam a durable log appends from.
        self.on_release: Callable[[list, int], None] | None = None
        self._overlong_logged = 0
        self._skipped_logged = 0

    @property
    def overlong(self) -> int:
        return self.splitter.overlong

    @property
    def holding(self) -> bool:
        """Events released by the reorder buffer wait, held back by the
        fan-out budget, for the next dispatch()."""
        return bool(self._held)

    @property
    def backlog(self) -> int:
        """Lines received and not yet dispatched."""
        return len(self._backlog) - self._position

    def receive(self, data: bytes) -> None:
        """Bytes from the event source: any order, any cut."""
        lines, plain = self.splitter.split(data)
        if self.splitter.overlong != self._overlong_logged:
            self._overlong_logged = self.splitter.overlong
            self.problems.warning(
                "overlong", "event line longer than --max-line=%d bytes discarded (%d so far)",
                self.splitter.max_line, self._overlong_logged)
        self._queue(lines, plain, ordered=False)

    def receive_ordered(self, text: bytes, last_seq: int) -> None:
        """Whole lines already in sequence order, up to last_seq (a log's
        entry): they skip the reorder buffer, which goes on from last_seq + 1.
        A pipeline reads either a source or a log at a time, never both."""
        lines = text.split(b"\n")
        lines.pop()  # text ends with b"\n"
        self._queue(lines, is_plain_event_text(text), ordered=True)
        self.reorder.advance_to(last_seq + 1)

    def _queue(self, lines: list[bytes], plain: bool, ordered: bool) -> None:
        if not lines:
            return
        if self._position < len(self._backlog):
            if ordered != self._backlog_ordered:
                raise RuntimeError("a pipeline reads a source or a log, not both at once")
            self._backlog = self._backlog[self._position:] + lines
            self._backlog_plain = self._backlog_plain and plain
        else:
            self._backlog = lines
            self._backlog_plain = plain
            self._backlog_ordered = ordered
        self._position = 0

    def end_of_stream(self) -> None:
        """The source went away: its unterminated last line is discarded."""
        self.splitter.reset()

    def dispatch(self, deliver: Callable[[Output], bool] = write_output) -> bool:
        """Dispatch every queued line, handing the output to deliver().

        Lines go through in slices of dispatch_slice; every flush_lines lines,
        once the slice's broadcasts and status updates have queued
        fanout_budget bytes, and at the end, deliver() gets
        exchange.take_output(). It returns False to stop (the caller is over
        its limits); events already taken from the reorder buffer then wait,
        held, and go first on the next call. Returns deliver()'s last answer.
        """
        unflushed = 0
        proceed = True
        while self._held or self._position < len(self._backlog):
            if self._held:
                held, self._held = self._held, []
                self._apply(held)
            else:
                start = self._position
                end = min(len(self._backlog), start + self.slice_lines)
                lines = self._backlog[start:end]
                self._position = end
                if end == len(self._backlog):
                    self._backlog = []
                    self._position = 0
                if self._backlog_ordered:
                    self._dispatch_ordered(lines, self._backlog_plain)
                elif self._backlog_plain:
                    self._dispatch_plain(lines)
                else:
                    self._dispatch_strictly(lines)
                unflushed += end - start
            if unflushed >= self.flush_lines or self._held:
                unflushed = 0
                proceed = deliver(self.exchange.take_output())
                if not proceed:
                    break
        else:
            proceed = deliver(self.exchange.take_output())
        self._log_sequence_problems()
        return proceed

    def feed(self, data: bytes) -> None:
        """receive() and dispatch() to subscribers' write(): for tests and play."""
        self.receive(data)
        self.dispatch()

    # -- internals -----------------------------------------------------------

    def _apply(self, events: list) -> None:
        """Hand in-order events to the exchange, keeping what it holds back."""
        if self._held:
            self._held.extend(events)  # behind earlier held events, in order
        elif events:
            self._held = self.exchange.apply(events, self.fanout_budget)

    def _dispatch_plain(self, lines: list[bytes]) -> None:
        """The hot path, for lines of plain event text (see is_plain_event_text).

        This loop runs once per event, so each bytecode in it is paid millions
        of times a second: a line is split and its type and field count
        checked, and the slice goes to the reorder buffer at once, which
        parses the SEQs as it places them. Any other line (empty, malformed)
        goes through the strict parser, after the events before it, so the
        counters see what the strict path would.
        """
        field_counts = WIRE_FIELD_COUNTS
        events: list = []
        for line in lines:
            event = line.split(b"|")
            try:
                if field_counts[event[1]] == len(event):
                    events.append(event)
                    continue
            except (KeyError, IndexError):
                pass
            if line and line != b"\r":  # an empty line is no event
                self._push_plain(events)
                events = []
                self._dispatch_strictly((line,))
        self._push_plain(events)

    def _push_plain(self, events: list) -> None:
        reorder = self.reorder
        ready = reorder.push_slice(events)
        unnumbered = reorder.take_unnumbered()
        self.events_in += len(events) - len(unnumbered)
        self._release(ready)
        if unnumbered:  # SEQ 0: the strict parser words and counts it
            self._dispatch_strictly([b"|".join(event) for event in unnumbered])

    def _dispatch_strictly(self, lines) -> None:
        """Every line through parse_event and the reorder buffer, one by one."""
        reorder = self.reorder
        for line in lines:
            seq, event = self._parse_strictly(line)
            if event is not None:
                self.events_in += 1
                self._release(reorder.push(seq, event))

    def _release(self, ready: list) -> None:
        if ready:
            if self.on_release is not None:
                self.on_release(ready, self.reorder.next_seq - 1)
            self._apply(ready)

    def _dispatch_ordered(self, lines: list[bytes], plain: bool) -> None:
        """Lines from a log, in order already: checked as strictly as the
        source's (a foreign or damaged line is dropped and logged), then
        applied."""
        field_counts = WIRE_FIELD_COUNTS
        events = []
        for line in lines:
            event = line.split(b"|")
            if plain and len(event) > 1 and field_counts.get(event[1]) == len(event):
                events.append(event)
                continue
            try:
                parse_event(line)
            except MalformedLine as problem:
                self.malformed += 1
                self.problems.warning("malformed", "line from the log dropped: %s",
                                      problem.reason)
                continue
            events.append(event)
        self.events_in += len(events)
        self._apply(events)

    def _parse_strictly(self, line: bytes) -> tuple:
        """One line through parse_event, with exact errors for the log.

        Returns (seq, the split line) for a valid event, (seq, NO_OP) for a
        line whose SEQ is valid and the rest not, and (None, None) for a line
        to drop. A malformed line whose SEQ was already seen is a resend,
        counted as a duplicate by the reorder buffer whatever its body, not
        as malformed.
        """
        if not line or line == b"\r":
            return None, None  # an empty line is no event
        try:
            seq = parse_event(line)[0]
        except MalformedLine as problem:
            if problem.seq is None:
                self.unsequenced += 1
                self.problems.warning("unsequenced", "event line dropped: %s", problem.reason)
                return None, None
            seq = problem.seq
            if not self.reorder.has_seen(seq):
                self.malformed += 1
                self.problems.warning("malformed", "event %d consumed as a no-op: %s",
                                      seq, problem.reason)
            return seq, NO_OP
        return seq, line.split(b"|")

    def _log_sequence_problems(self) -> None:
        reorder = self.reorder
        duplicates = reorder.take_duplicates()
        if duplicates:
            count, lowest, highest = duplicates
            self.problems.warning(
                "duplicate", "%d events dropped as duplicates (sequence numbers %d..%d were "
                "already dispatched or waiting; next expected %d); a source that starts a new "
                "stream from 1 needs a fresh broker", count, lowest, highest, reorder.next_seq)
        ranges = reorder.take_skipped_ranges()
        if not ranges:
            return
        lost = reorder.skipped - self._skipped_logged
        self._skipped_logged = reorder.skipped
        # Past SKIPPED_RANGES_KEPT, ranges merge, and their lengths no longer
        # add up to what was lost: then only the count and the span are told.
        if len(ranges) <= 8 and lost == sum(last - first + 1 for first, last in ranges):
            for first, last in ranges:
                log.warning("reorder buffer full (--max-pending=%d): sequence numbers %d..%d "
                            "declared lost (%d numbers); delivery resumes at %d",
                            reorder.max_pending, first, last, last - first + 1, last + 1)
        else:
            log.warning("reorder buffer full (--max-pending=%d): %d sequence numbers in "
                        "gaps between %d..%d declared lost; delivery resumes at %d",
                        reorder.max_pending, lost, ranges[0][0], ranges[-1][1], reorder.next_seq)


# ============================================================================
# Transport
#
# Rules: sockets are nonblocking; nothing here ever waits. A client
# connection owns its write path, as asyncio's selector transports and
# tornado's IOStream do: write() sends at once, queues what the kernel will
# not take, and has the reactor watch EVENT_WRITE only while bytes are
# queued; the WriteTotals they share are written by client connections
# alone. Every close names a CloseReason, which the logs, the counters and
# the dashboard all speak.
# ============================================================================


class CloseReason(enum.Enum):
    """Why a connection was closed: the one vocabulary of logs, counters and views."""

    CLIENT_QUIT = "client_quit"  # the client closed its end (EOF)
    CLIENT_ERROR = "client_error"  # reset or other socket error
    HELLO_TIMEOUT = "hello_timeout"  # no user id within --hello-timeout
    INVALID_ID = "invalid_id"  # first line not a valid user id
    SLOW_CONSUMER_BUFFER = "slow_consumer_buffer"  # queue passed --max-client-buffer
    SLOW_CONSUMER_TIMEOUT = "slow_consumer_timeout"  # no progress for --write-timeout
    SOURCE_QUIT = "source_quit"  # event source closed its end
    SOURCE_ERROR = "source_error"  # event source socket error
    SOURCE_REPLACED = "source_replaced"  # a newer event source took over
    SHUTDOWN = "shutdown"  # the broker is stopping

    @property
    def is_slow_consumer(self) -> bool:
        return self in (CloseReason.SLOW_CONSUMER_BUFFER, CloseReason.SLOW_CONSUMER_TIMEOUT)


def peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class WriteTotals:
    """What every client connection's write path adds up to, for backpressure
    and stats: written by ClientConnection only, read by anyone."""

    __slots__ = ("backlogged", "bytes_sent", "queued_bytes")

    def __init__(self):
        self.queued_bytes = 0  # bytes the kernel has not taken yet, all clients
        self.bytes_sent = 0
        self.backlogged: set[ClientConnection] = set()  # connections with bytes queued


class ClientConnection:
    """One user-client socket: its hello, its outbound bytes and their accounting.

    on_registered(connection) is called once its user id is read;
    on_closed(connection, reason, detail) once it is closed, by itself or by
    the broker; both belong to the owner, which keeps the routing table.
    """

    __slots__ = ("sock", "peer", "user_id", "lines", "connected_at", "last_progress",
                 "notifications_queued", "notifications_sent", "bytes_sent", "closed",
                 "_hello", "_outbound", "_reactor", "_totals", "_max_buffer",
                 "_on_registered", "_on_closed")

    def __init__(self, sock: socket.socket, now: float, reactor: Reactor, totals: WriteTotals,
                 max_buffer: int, on_registered, on_closed):
        self.sock = sock
        self.peer = peer_name(sock)
        self.user_id: int | None = None  # set once the hello line is read
        self.lines: list[bytes] = []  # notifications dispatched, not yet bytes
        self.connected_at = now
        self.last_progress = now
        self.notifications_queued = 0  # ever handed to write()
        self.notifications_sent = 0  # ever fully written to the kernel
        self.bytes_sent = 0
        self.closed = False
        self._hello = b""
        self._outbound = bytearray()  # bytes the kernel has not taken yet
        self._reactor = reactor
        self._totals = totals
        self._max_buffer = max_buffer
        self._on_registered = on_registered
        self._on_closed = on_closed
        reactor.watch(sock, self.on_ready, selectors.EVENT_READ)

    @property
    def queued_bytes(self) -> int:
        return len(self._outbound)

    @property
    def queued_notifications(self) -> int:
        return len(self.lines) + max(self.notifications_queued - self.notifications_sent, 0)

    def describe(self) -> str:
        user = "unregistered" if self.user_id is None else f"user {self.user_id}"
        return f"client {self.peer} ({user})"

    def on_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and not self.closed:
            self._send_queued()
        if mask & selectors.EVENT_READ and not self.closed:
            self._read()

    def write(self, data: bytes, count: int) -> None:
        """Send data (count notifications) now; queue what the kernel leaves."""
        if self.closed:
            return
        self.notifications_queued += count
        if self._outbound:
            self._queue(data)
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            self.close(CloseReason.CLIENT_ERROR, str(error))
            return
        if sent:
            self._count_sent(data, sent)
        if sent < len(data):
            self.last_progress = time.monotonic()  # the write timeout starts now
            self._totals.backlogged.add(self)
            self._reactor.watch(self.sock, self.on_ready,
                                selectors.EVENT_READ | selectors.EVENT_WRITE)
            self._queue(memoryview(data)[sent:])

    def stalled(self, now: float, timeout: float) -> bool:
        """Bytes queued, and none written for timeout seconds."""
        return bool(self._outbound) and now - self.last_progress >= timeout

    def close(self, reason: CloseReason, detail: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        unsent = max(self.notifications_queued - self.notifications_sent, 0)
        self._totals.queued_bytes -= len(self._outbound)
        self._totals.backlogged.discard(self)
        self._outbound = bytearray()
        self.lines = []
        self._reactor.forget(self.sock)
        self.sock.close()
        self._on_closed(self, reason, detail, unsent)

    def _queue(self, data) -> None:
        self._outbound += data
        self._totals.queued_bytes += len(data)
        if len(self._outbound) > self._max_buffer:
            self.close(CloseReason.SLOW_CONSUMER_BUFFER,
                       f"{len(self._outbound)} bytes queued, limit {self._max_buffer}")

    def _count_sent(self, data, sent: int) -> None:
        self.notifications_sent += data.count(b"\n", 0, sent)
        self.bytes_sent += sent
        self._totals.bytes_sent += sent

    def _send_queued(self) -> None:
        outbound = self._outbound
        try:
            sent = self.sock.send(outbound)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.close(CloseReason.CLIENT_ERROR, str(error))
            return
        if sent:
            self._count_sent(outbound, sent)
            del outbound[:sent]
            self._totals.queued_bytes -= sent
            self.last_progress = time.monotonic()
        if not outbound:
            self._totals.backlogged.discard(self)
            self._reactor.watch(self.sock, self.on_ready, selectors.EVENT_READ)

    def _read(self) -> None:
        try:
            data = self.sock.recv(CLIENT_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.close(CloseReason.CLIENT_ERROR, str(error))
            return
        if not data:
            self.close(CloseReason.CLIENT_QUIT)
            return
        if self.user_id is not None:
            return  # registered clients have nothing to say; read and discard
        self._hello += data
        try:
            user_id = parse_hello(self._hello)
        except ValueError as problem:
            self.close(CloseReason.INVALID_ID, str(problem))
            return
        if user_id is not None:
            self._hello = b""
            self.user_id = user_id
            self._on_registered(self)


class ClientTable:
    """Every client connection: accepted, registered with the exchange once
    its id is read, timed out, closed with its reason, and reported.

    It owns the connections and the WriteTotals their write paths share.
    """

    def __init__(self, config: BrokerConfig, reactor: Reactor, exchange: Exchange,
                 closes: CloseLedger, problems: RateLimitedLog):
        self.totals = WriteTotals()
        self._config = config
        self._reactor = reactor
        self._exchange = exchange
        self._closes = closes
        self._problems = problems
        self._connections: dict[ClientConnection, None] = {}
        self._awaiting_hello: dict[ClientConnection, None] = {}

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self) -> Iterator[ClientConnection]:
        return iter(list(self._connections))

    @property
    def awaiting_hello(self) -> int:
        return len(self._awaiting_hello)

    def accept(self, sock: socket.socket) -> None:
        """The client listener's on_accept."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        connection = ClientConnection(sock, time.monotonic(), self._reactor, self.totals,
                                      self._config.max_client_buffer,
                                      self._registered, self._closed)
        self._connections[connection] = None
        self._awaiting_hello[connection] = None
        log.debug("%s connected", connection.describe())

    def check_timeouts(self, now: float) -> None:
        """Close who sent no id within --hello-timeout, and who had bytes
        queued and none written for --write-timeout."""
        config = self._config
        for connection in [c for c in self._awaiting_hello
                           if now - c.connected_at >= config.hello_timeout]:
            connection.close(CloseReason.HELLO_TIMEOUT,
                             f"no user id within {config.hello_timeout:g} s")
        for connection in [c for c in self.totals.backlogged
                           if c.stalled(now, config.write_timeout)]:
            connection.close(CloseReason.SLOW_CONSUMER_TIMEOUT,
                             f"nothing written for {config.write_timeout:g} s with "
                             f"{connection.queued_bytes} bytes queued")

    def close(self, reason: CloseReason, awaiting_hello_only: bool = False) -> None:
        for connection in list(self._awaiting_hello if awaiting_hello_only
                               else self._connections):
            connection.close(reason)

    def deepest(self, count: int | None, now: float) -> tuple[ClientStats, ...]:
        """The connections with the most bytes queued, deepest first (None: all)."""
        connections = list(self._connections)
        if count is not None and len(connections) > count:
            connections = heapq.nlargest(count, connections, key=lambda c: c.queued_bytes)
        else:
            connections.sort(key=lambda c: c.queued_bytes, reverse=True)
        return tuple(ClientStats(user_id=c.user_id, peer=c.peer,
                                 queued_notifications=c.queued_notifications,
                                 queued_bytes=c.queued_bytes,
                                 notifications_sent=c.notifications_sent,
                                 bytes_sent=c.bytes_sent,
                                 connected_seconds=now - c.connected_at)
                     for c in connections)

    def _registered(self, connection: ClientConnection) -> None:
        del self._awaiting_hello[connection]
        self._exchange.subscribe(connection.user_id, connection)
        log.debug("%s registered", connection.describe())

    def _closed(self, connection: ClientConnection, reason: CloseReason, detail: str,
                unsent: int) -> None:
        self._connections.pop(connection, None)
        self._awaiting_hello.pop(connection, None)
        if connection.user_id is not None:
            self._exchange.unsubscribe(connection.user_id, connection)
        self._closes.record("client", connection.peer, connection.user_id, reason, detail)
        said = f" ({detail})" if detail else ""
        if reason in (CloseReason.HELLO_TIMEOUT, CloseReason.INVALID_ID):
            self._problems.warning(reason.value, "%s closed: %s%s", connection.describe(),
                                   reason.value, said)
        else:
            quiet = reason in (CloseReason.CLIENT_QUIT, CloseReason.SHUTDOWN)
            log.log(logging.INFO if quiet else logging.WARNING,
                    "%s closed: %s%s; %d notifications sent, %d not delivered",
                    connection.describe(), reason.value, said,
                    connection.notifications_sent, unsent)


class SourceConnection:
    """The event source's socket: read while not paused, hand the bytes on."""

    __slots__ = ("sock", "peer", "connected_at", "bytes_read", "duplicates_at_start",
                 "closed", "_reactor", "_read_size", "_on_data", "_on_closed")

    def __init__(self, sock: socket.socket, now: float, reactor: Reactor, read_size: int,
                 duplicates_at_start: int, on_data, on_closed):
        self.sock = sock
        self.peer = peer_name(sock)
        self.connected_at = now
        self.bytes_read = 0
        self.duplicates_at_start = duplicates_at_start  # to tell this source's share
        self.closed = False
        self._reactor = reactor
        self._read_size = read_size
        self._on_data = on_data
        self._on_closed = on_closed

    def read_when_ready(self, reading: bool) -> None:
        """Watch the socket (reading) or not (paused: TCP pushes back on the source)."""
        if not self.closed:
            self._reactor.watch(self.sock, self.on_ready,
                                selectors.EVENT_READ if reading else 0)

    def on_ready(self, mask: int) -> None:
        if self.closed:
            return  # replaced earlier in this same wake-up: its socket is closed
        try:
            data = self.sock.recv(self._read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.close(CloseReason.SOURCE_ERROR, str(error))
            return
        if not data:
            self.close(CloseReason.SOURCE_QUIT)
            return
        self.bytes_read += len(data)
        self._on_data(data)

    def close(self, reason: CloseReason, detail: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self._reactor.forget(self.sock)
        self.sock.close()
        self._on_closed(self, reason, detail)


class Listener:
    """A listening socket that takes every waiting connection per wake-up.

    On running out of descriptors or memory it stops watching for a short
    pause instead of spinning on a readable socket it cannot accept from. A
    listener given a spare descriptor (the event port's) first gives that
    up: clients must not starve the one connection that matters.
    """

    # accept(2) passes on errors of the connection being accepted; the man
    # page's advice is to treat them like EAGAIN and go on with the next one.
    SKIP_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                   errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                   errno.ENETUNREACH, errno.EPERM, errno.EINTR}
    EXHAUSTION_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

    def __init__(self, host: str, port: int, reactor: Reactor, on_accept, on_error,
                 problems: RateLimitedLog, keeps_spare: bool = False):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Reuse lets a restarted broker bind over TIME_WAIT; on Linux it
            # does not let two listeners share a port, so "in use" is caught.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            raise PortError(host, port, error) from error
        self.sock = sock
        self.port = sock.getsockname()[1]
        self._reactor = reactor
        self._on_accept = on_accept
        self._on_error = on_error
        self._problems = problems
        self._paused_until: float | None = None
        self._spare: int | None = None
        self._keeps_spare = keeps_spare
        self.take_spare()
        reactor.watch(sock, self.on_ready, selectors.EVENT_READ)

    def on_ready(self, mask: int) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in self.SKIP_ERRNOS:
                    continue  # that connection failed before we took it
                if error.errno in self.EXHAUSTION_ERRNOS and self._spare is not None:
                    os.close(self._spare)  # the next accept takes its place
                    self._spare = None
                    log.warning("out of file descriptors: using the spare one for the "
                                "event source")
                    continue
                self._pause(error)
                return
            sock.setblocking(False)
            self._on_accept(sock)

    def _pause(self, error: OSError) -> None:
        # Out of descriptors or memory, or anything unforeseen: the owner
        # keeps serving who is connected, and accepting is tried again soon.
        self._on_error()
        self._problems.warning(f"accept:{self.port}", "cannot accept on port %d: %s; "
                               "retrying in %.1f s", self.port,
                               os.strerror(error.errno) if error.errno else error,
                               ACCEPT_RETRY_DELAY)
        self._reactor.watch(self.sock, self.on_ready, 0)
        self._paused_until = time.monotonic() + ACCEPT_RETRY_DELAY

    def take_spare(self) -> None:
        """Hold a spare descriptor again, once one is free (timer)."""
        if self._keeps_spare and self._spare is None:
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass  # still none free; try again next tick

    def resume_if_due(self, now: float) -> None:
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            self._reactor.watch(self.sock, self.on_ready, selectors.EVENT_READ)

    def close(self) -> None:
        self._reactor.forget(self.sock)
        self.sock.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None


class PortError(OSError):
    """A port we cannot listen on: one line for the operator, exit code 2."""

    def __init__(self, host: str, port: int, error: OSError):
        self.host, self.port, self.error = host, port, error
        if error.errno == errno.EADDRINUSE:
            message = f"port {port} is already in use on {host}"
        else:
            message = f"cannot listen on {host}:{port}: {error.strerror or error}"
        super().__init__(error.errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ============================================================================
# Reactor
#
# Rules: one thread drives everything. The selector's data for a socket is
# the one handler to call with its ready mask; watch() is the only way a
# socket's interest changes. A wake-up reads what is ready; the event
# source's bytes are dispatched in slices, every touched client is flushed
# once per flush_lines lines (sooner when the fan-out budget is spent), and
# the limits are checked after each flush. Timers (hello and write timeouts,
# accept retry, the dashboard) run from the same loop and bound the select
# timeout. Other threads only ever ask the loop, through call_in_loop(); a
# call that fails is logged and the loop goes on. State is only ever
# changed on the loop's thread, so nothing needs a lock.
# ============================================================================


class Reactor:
    """The selectors loop, its timers, and the one door for other threads."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self._wakeup_reader, self._wakeup_writer = socket.socketpair()
        self._wakeup_reader.setblocking(False)
        self._wakeup_writer.setblocking(False)
        self._calls: deque[Callable[[], object]] = deque()  # from other threads
        self._soon: deque[Callable[[], object]] = deque()  # from the loop itself
        self._timers: list[list] = []  # [next due, interval, callback]
        self.watch(self._wakeup_reader, self._on_wakeup, selectors.EVENT_READ)

    def watch(self, sock: socket.socket, handler: Callable[[int], None], events: int) -> None:
        """Call handler(mask) when sock is ready for events; 0 stops watching."""
        try:
            if events:
                try:
                    self.selector.modify(sock, events, handler)
                except KeyError:
                    self.selector.register(sock, events, handler)
            else:
                self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass  # not watched, or already closed

    def forget(self, sock: socket.socket) -> None:
        self.watch(sock, None, 0)

    def every(self, interval: float, callback: Callable[[float], None]) -> None:
        """Call callback(now) every interval seconds, from the loop."""
        self._timers.append([0.0, interval, callback])

    def run_once(self) -> None:
        """Run due timers, wait for readiness (no longer than the next timer,
        and not at all while calls are due), call each ready socket's
        handler, then the calls made soon."""
        now = time.monotonic()
        next_due = now + HOUSEKEEPING_INTERVAL
        for timer in self._timers:
            if now >= timer[0]:
                timer[0] = now + timer[1]
                timer[2](now)
            next_due = min(next_due, timer[0])
        timeout = 0.0 if self._soon else max(0.0, next_due - time.monotonic())
        for key, mask in self.selector.select(timeout):
            key.data(mask)
        for _ in range(len(self._soon)):
            self._soon.popleft()()

    def call_soon(self, function: Callable[[], object]) -> None:
        """Run function() after this iteration's handlers; loop thread only
        (work cut into steps, so the loop serves sockets in between)."""
        self._soon.append(function)

    def call_in_loop(self, function: Callable[[], object]) -> None:
        """Run function() on the loop's thread soon; safe from any thread."""
        self._calls.append(function)
        self.wake()

    def wake(self) -> None:
        """Interrupt select(); safe from a signal handler or another thread."""
        try:
            self._wakeup_writer.send(b"\0")
        except OSError:
            pass  # already woken (buffer full) or closed

    def wakeup_descriptor(self) -> int:
        """For signal.set_wakeup_fd: a signal then interrupts select() too."""
        return self._wakeup_writer.fileno()

    def close(self) -> None:
        for sock in (self._wakeup_reader, self._wakeup_writer):
            self.forget(sock)
            sock.close()
        self.selector.close()

    def _on_wakeup(self, mask: int) -> None:
        try:
            while self._wakeup_reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        calls = self._calls
        while calls:
            function = calls.popleft()
            try:
                function()
            except Exception:
                # Another thread's call must not end serve_forever.
                log.exception("a call from another thread failed")


class SignalStop:
    """SIGINT and SIGTERM for a broker in the main thread: the first asks it
    to drain and stop, a second exits at once with 128 + the signal's number."""

    def __init__(self, broker: Broker):
        self._broker = broker
        self._seen = 0
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        signal.set_wakeup_fd(broker.reactor.wakeup_descriptor(), warn_on_full_buffer=False)

    def uninstall(self) -> None:
        """The default handlers again; a late signal never writes to a reused fd."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        self._seen += 1
        if self._seen > 1:
            # The operator insists: no drain, no cleanup beyond the kernel's,
            # except giving a terminal its cursor back if the live view hid it.
            if self._broker.observers and sys.stdout.isatty():
                os.write(sys.stdout.fileno(), b"\x1b[?25h\n")
            os._exit(128 + signum)
        self._broker.request_stop()


class Broker:
    """The event source, the user clients and the core, driven by one Reactor."""

    def __init__(self, config: BrokerConfig | None = None):
        self.config = config = config or BrokerConfig()
        self.reactor = Reactor()
        self.problems = RateLimitedLog(log)
        self.exchange = Exchange(config.max_follows)
        self.pipeline = EventPipeline(self.exchange, config, self.problems)
        self.event_listener: Listener | None = None
        self.client_listener: Listener | None = None
        self.source: SourceConnection | None = None
        self.source_connections = 0
        self.source_paused = False  # by backpressure (--max-buffered, or the log's)
        self._paused_by_clients = False  # ... and by the clients' queues
        self.accept_errors = 0
        self.closes = CloseLedger()
        self.clients = ClientTable(config, self.reactor, self.exchange, self.closes,
                                   self.problems)
        self.log: LogAppender | LogFollower | None = None  # see open()
        self.rates = RateMeter()
        self.latency = LatencyHistogram()
        self._oldest_read: float | None = None  # the first read not yet flushed
        self._notifications_flushed = 0
        self.metrics: MetricsServer | None = None  # with --metrics-port
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.stopping = False
        self.running = False
        self.observers: list = []  # called as observer(broker, now) on each housekeeping tick
        self._stop_deadline: float | None = None  # set when the drain starts
        self._stop_now = False  # a second stop request: no more draining
        self._signals: SignalStop | None = None  # see install_signal_handlers()
        self.reactor.every(HOUSEKEEPING_INTERVAL, self._housekeeping)

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> None:
        """Recover from the log, if there is one, then listen: the ports open
        only once the state is back. LogError or PortError say what failed."""
        if self.config.log and self.log is None:
            self.log = open_log(self.config, self.reactor, self.pipeline,
                                self._apply_log_entries)
        self.bind()
        if self.log is not None:
            self.log.start()

    def bind(self) -> None:
        """Open the listeners (an edge has no event port) and the metrics
        port; PortError names the port that failed."""
        config = self.config
        if not config.edge:
            self.event_listener = Listener(config.host, config.event_port, self.reactor,
                                           self._on_source_accepted, self._count_accept_error,
                                           self.problems, keeps_spare=True)
        try:
            self.client_listener = Listener(config.host, config.client_port, self.reactor,
                                            self.clients.accept, self._count_accept_error,
                                            self.problems)
            if config.metrics_port is not None:
                self.metrics = MetricsServer(self, config.host, config.metrics_port)
        except (PortError, MetricsUnavailable):
            self._close_listeners()
            raise
        if config.edge:
            log.info("listening clients=%s:%d as an edge of the log %s at %s", config.host,
                     self.client_port, config.log_key, masked(config.log))
        else:
            log.info("listening events=%s:%d clients=%s:%d", config.host, self.event_port,
                     config.host, self.client_port)
        if self.metrics is not None:
            log.info("metrics at http://%s:%d/metrics (health at /healthz)", config.host,
                     self.metrics.port)

    @property
    def event_port(self) -> int:
        return self.event_listener.port if self.event_listener else 0

    @property
    def client_port(self) -> int:
        return self.client_listener.port if self.client_listener else 0

    def install_signal_handlers(self) -> None:
        """Main thread only. Call before bind(): once the "listening" line is
        out, a signal must already mean a clean stop, not a traceback."""
        self._signals = SignalStop(self)

    def request_stop(self) -> None:
        """First call: drain and stop. Called again while draining: stop now.
        Safe from any thread."""
        if self.stopping:
            self._stop_now = True
        self.stopping = True
        self.reactor.wake()

    def call_in_loop(self, function: Callable[[], object]) -> None:
        """Run function() on the loop's thread soon; safe from any thread.

        The one door for other threads (tests, embedders): the loop owns
        every piece of state, so others ask it rather than read it.
        """
        self.reactor.call_in_loop(function)

    def health(self) -> tuple[int, bytes]:
        """(HTTP status, body) for /healthz: 200 while the loop answers, 503
        while it drains or does not answer in time; safe from any thread."""
        if self.stopping:
            return 503, b"draining\n"
        if self.running:
            answered: Future = Future()
            self.call_in_loop(lambda: answered.set_result(True))
            try:
                answered.result(HEALTH_TIMEOUT)
            except TimeoutError:
                return 503, b"the loop did not answer in time\n"
        return 200, b"ok\n"

    def snapshot(self, timeout: float = 5.0, top_clients: int | None = 20) -> BrokerStats:
        """stats(), taken on the loop's thread; for callers on other threads."""
        if not self.running:
            return self.stats(top_clients)
        result: Future = Future()
        self.call_in_loop(lambda: result.set_result(self.stats(top_clients)))
        return result.result(timeout)

    def serve_forever(self) -> None:
        if self.client_listener is None:
            self.open()
        self.running = True
        try:
            while not (self.stopping and self._drain_step()):
                self.reactor.run_once()
                if self.source_paused:
                    self._maybe_resume_source()  # clients may have drained
        finally:
            self._close_everything()
            self.running = False

    def _drain_step(self) -> bool:
        """Returns True when shutdown is complete."""
        now = time.monotonic()
        if self._stop_deadline is None:
            log.info("stopping: no new clients or events; draining queued notifications "
                     "(up to %.1f s)", self.config.drain_timeout)
            self._stop_deadline = now + self.config.drain_timeout
            self._close_listeners()
            if self.source is not None:
                self.source.close(CloseReason.SHUTDOWN)
            if self.config.edge and self.log is not None:
                self.log.read_when_ready(False)  # an edge's input is the log
            self.clients.close(CloseReason.SHUTDOWN, awaiting_hello_only=True)
        if not self.clients.totals.backlogged:
            return True
        if now >= self._stop_deadline or self._stop_now:
            log.warning("drain timeout: %d clients still had %d bytes queued",
                        len(self.clients.totals.backlogged), self.clients.totals.queued_bytes)
            return True
        return False

    def _close_listeners(self) -> None:
        for listener in (self.event_listener, self.client_listener):
            if listener is not None:
                listener.close()
        self.event_listener = self.client_listener = None

    def _close_everything(self) -> None:
        self._close_listeners()
        if self.source is not None:
            self.source.close(CloseReason.SHUTDOWN)
        if self.log is not None:
            # What the primary dispatched goes to the log before it exits.
            self.log.stop(max(self.config.drain_timeout, 1.0))
        if self.metrics is not None:
            self.metrics.stop()
        self.clients.close(CloseReason.SHUTDOWN)
        if self._signals is not None:
            self._signals.uninstall()
        self.reactor.close()

    # -- the event source ----------------------------------------------------

    def _on_source_accepted(self, sock: socket.socket) -> None:
        if self.source is not None:
            log.warning("event source %s connected; it takes over from %s",
                        peer_name(sock), self.source.peer)
            self.source.close(CloseReason.SOURCE_REPLACED)
        self.source = SourceConnection(sock, time.monotonic(), self.reactor,
                                       self.config.read_size,
                                       self.pipeline.reorder.duplicates,
                                       self._on_source_data, self._on_source_closed)
        self.source_connections += 1
        log.info("event source %s connected; next expected sequence number %d",
                 self.source.peer, self.pipeline.reorder.next_seq)
        self.source.read_when_ready(not self.source_paused)

    def _on_source_data(self, data: bytes) -> None:
        if self._oldest_read is None:
            self._oldest_read = time.monotonic()
        self.pipeline.receive(data)
        self._dispatch()

    def _dispatch(self) -> None:
        proceed = self.pipeline.dispatch(self._deliver)
        if self.log is not None and self.log.snapshot_due() and not self.pipeline.holding:
            # Every released event is applied: the graph stands at a SEQ, and
            # must stand still while it is written.
            self.log.start_snapshot(self.exchange, self._maybe_resume_source)
            self._pause_source()
        elif not proceed:
            self._pause_source()
        if not self.pipeline.backlog and not self.pipeline.holding:
            self._oldest_read = None  # all flushed: the next read starts the clock

    def _deliver(self, output: Output) -> bool:
        """The pipeline's deliver(): write, end the log's entry, then say
        whether to go on."""
        write_output(output)
        notifications = self.exchange.notifications - self._notifications_flushed
        if notifications and self._oldest_read is not None:
            self.latency.observe(time.monotonic() - self._oldest_read, notifications)
        self._notifications_flushed = self.exchange.notifications
        if self.log is not None:
            self.log.cut()
            if not self.log.may_continue():
                return False
        return self.clients.totals.queued_bytes <= self.config.max_buffered

    def _input(self) -> SourceConnection | LogFollower | None:
        """Where events come from: the event source, or an edge's log."""
        return self.log if self.config.edge else self.source

    def _pause_source(self) -> None:
        if self.source_paused:
            return
        self.source_paused = True
        self._paused_by_clients = self.clients.totals.queued_bytes > self.config.max_buffered
        if self._paused_by_clients:
            log.warning("backpressure: %d bytes queued toward clients (--max-buffered=%d); "
                        "pausing the event source", self.clients.totals.queued_bytes,
                        self.config.max_buffered)
        else:
            log.debug("pausing the event source while the log catches up")
        if self._input() is not None:
            self._input().read_when_ready(False)

    def _maybe_resume_source(self) -> None:
        if not self.source_paused or self.stopping or \
                self.clients.totals.queued_bytes > self.config.max_buffered // 2 or \
                self.log is not None and not self.log.may_resume():
            return  # a drain delivers what was dispatched; nothing more is dispatched
        self.source_paused = False
        log.log(logging.INFO if self._paused_by_clients else logging.DEBUG,
                "backpressure relieved: %d bytes queued; resuming the event source",
                self.clients.totals.queued_bytes)
        self._dispatch()
        if not self.source_paused and self._input() is not None:
            self._input().read_when_ready(True)

    def _apply_log_entries(self, entries: list[LogEntry], reload: tuple | None) -> None:
        """An edge's input: entries from the log, in order (after a reload
        from a snapshot, when it fell behind the trimmed part)."""
        if self._oldest_read is None:
            self._oldest_read = time.monotonic()
        if reload is not None:
            seq, graph, _missed_from = reload
            self.exchange.replace_follow_graph(graph)
            self.pipeline.reorder.advance_to(seq + 1)
        for entry in entries:
            self.pipeline.receive_ordered(entry.text, entry.last)
        self._dispatch()
        if not self.source_paused and not self.stopping:
            self.log.read_when_ready(True)

    def _on_source_closed(self, source: SourceConnection, reason: CloseReason,
                          detail: str) -> None:
        if source is self.source:
            self.source = None
        self.pipeline.end_of_stream()
        self.closes.record("source", source.peer, None, reason, detail)
        duplicates = self.pipeline.reorder.duplicates - source.duplicates_at_start
        level = logging.INFO if reason in (CloseReason.SOURCE_QUIT, CloseReason.SHUTDOWN) \
            else logging.WARNING
        log.log(level, "event source %s closed: %s%s (read %d bytes, %d events dropped as "
                "duplicates; next expected sequence number %d)", source.peer, reason.value,
                f" ({detail})" if detail else "", source.bytes_read, duplicates,
                self.pipeline.reorder.next_seq)

    def _count_accept_error(self) -> None:
        self.accept_errors += 1

    # -- timers --------------------------------------------------------------

    def _housekeeping(self, now: float) -> None:
        """Every HOUSEKEEPING_INTERVAL: timeouts, accept retries, rates, and
        the observers (the dashboard)."""
        self.clients.check_timeouts(now)
        self.problems.flush()
        for listener in (self.event_listener, self.client_listener):
            if listener is not None:
                listener.resume_if_due(now)
                listener.take_spare()
        self.rates.sample(now, self.pipeline.events_in, self.exchange.dispatched,
                          self.exchange.notifications, self.clients.totals.bytes_sent)
        for observer in list(self.observers):
            try:
                observer(self, now)
            except Exception as error:
                # A view must never take the broker down (a closed pipe, a
                # vanished terminal): drop it and keep serving.
                self.observers.remove(observer)
                log.error("status display stopped and removed: %s: %s",
                          type(error).__name__, error)

    # -- stats ---------------------------------------------------------------

    def stats(self, top_clients: int | None = 20) -> BrokerStats:
        """A typed snapshot: counters, depths and the deepest queues.

        top_clients bounds the per-connection list (deepest queues first);
        None lists every connection. Call on the loop's thread (see snapshot()).
        """
        now = time.monotonic()
        pipeline, reorder, exchange = self.pipeline, self.pipeline.reorder, self.exchange
        source = self.source
        return BrokerStats(
            uptime=now - self.started_at,
            started_at=self.started_wall,
            stopping=self.stopping,
            source=SourceStats(connected=source is not None,
                               peer=source.peer if source else None,
                               paused=self.source_paused,
                               connections=self.source_connections,
                               bytes_read=source.bytes_read if source else 0),
            next_seq=reorder.next_seq,
            highest_seq=reorder.highest_seq,
            reorder_depth=len(reorder),
            reorder_depth_max=reorder.largest_depth,
            events_in=pipeline.events_in,
            events_dispatched=exchange.dispatched,
            notifications=exchange.notifications,
            bytes_out=self.clients.totals.bytes_sent,
            clients=len(exchange.subscribers),
            connections=len(self.clients),
            awaiting_hello=self.clients.awaiting_hello,
            known_users=len(exchange.following),
            follows=exchange.follow_count,
            bytes_queued=self.clients.totals.queued_bytes,
            rates=self.rates.per_second(),
            log=self.log.stats() if self.log is not None else None,
            counters=Counters(
                malformed=pipeline.malformed,
                unsequenced=pipeline.unsequenced,
                overlong=pipeline.overlong,
                duplicate=reorder.duplicates,
                late=reorder.late,
                skipped=reorder.skipped,
                slow_consumers=self.closes.slow_consumers(),
                follows_refused=exchange.follows_refused,
                accept_errors=self.accept_errors),
            closes=self.closes.counts(),
            limits=replace(self.config),
            top_clients=self.clients.deepest(top_clients, now),
            recently_closed=self.closes.recent(),
            events_by_type=dict(exchange.dispatched_by_type),
            dispatch_latency=self.latency.stats(),
        )


# ============================================================================
# Log
#
# Rules: the durable log is a Redis stream, spoken to through redis-py
# (imported only when --log asks for it), and only this section knows it.
# Redis is used from this section's own threads alone: the loop hands work
# over through a queue and takes results back through call_in_loop, so it
# never waits for Redis. The primary appends what its reorder buffer
# releases, in order, one entry per flush, each with the id <last SEQ>-0:
# Redis refuses an id it already holds, so an append retried after a lost
# reply or a restart never adds an entry twice. Every --snapshot-every
# events the primary writes the follow graph with the SEQ it covers, built
# on the loop a step at a time while dispatch waits, and trims the entries
# older than the snapshot before it. Recovery, on either role, is the latest
# snapshot plus the entries after it, fed to the pipeline as ordered events.
# A URL's password is masked wherever the URL is shown.
# ============================================================================


class LogError(Exception):
    """The log cannot be used as it is: one line for the operator."""


def masked(url: str) -> str:
    """url with its password, if any, replaced by ***."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _log_problem(error: BaseException, url: str) -> str:
    """An error's text for the operator, never with the URL's password."""
    text = f"{error}" or type(error).__name__
    password = urllib.parse.urlsplit(url).password
    return text.replace(password, "***") if password else text


def _lost_connection(error: BaseException, url: str) -> str:
    """What went wrong with the connection, naming the URL once."""
    if isinstance(error, LogError):
        return str(error)  # connect_to_log's, which names it
    return f"connection to {masked(url)} lost: {_log_problem(error, url)}"


def connect_to_log(url: str, timeout: float):
    """A redis-py client for url that answered PING; LogError if none."""
    try:
        import redis
    except ImportError:
        raise LogError("--log needs the redis package: pip install 'mbroker[log]'") from None
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        # No retries inside redis-py: a lost connection reaches this
        # section's own reconnect loop, which backs off, logs and counts it.
        client = redis.Redis.from_url(url, socket_timeout=timeout,
                                      socket_connect_timeout=timeout,
                                      retry=Retry(NoBackoff(), 0))
        client.ping()
    except (redis.RedisError, ValueError, OSError) as error:
        raise LogError(f"cannot reach the log at {masked(url)}: "
                       f"{_log_problem(error, url)}") from None
    return client


def _connection_errors() -> tuple[type[BaseException], ...]:
    """The errors after which a client reconnects (redis-py is imported by then)."""
    import redis

    return (redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass(frozen=True)
class LogEntry:
    """One stream entry: the events with SEQ in (after, last], in order.

    Numbers in that range with no line were consumed as no-ops or declared
    lost by the primary's reorder buffer; an edge skips them just the same.
    """

    after: int  # the previous entry's last SEQ
    last: int  # the highest SEQ covered, and so the entry's id
    text: bytes  # the event lines, each as the source sent it, plus b"\n"
    written_at: float  # the primary's wall clock when it handed the entry over

    @property
    def entry_id(self) -> str:
        return f"{self.last}-0"

    def fields(self) -> dict[bytes, bytes]:
        return {b"after": b"%d" % self.after, b"lines": self.text,
                b"t": b"%.3f" % self.written_at}

    @classmethod
    def decode(cls, entry_id: bytes, fields: dict) -> LogEntry:
        """LogError for anything that is not an entry mbroker wrote."""
        number, _, sequence = entry_id.partition(b"-")
        try:
            entry = cls(int(fields[b"after"]), int(number), fields[b"lines"],
                        float(fields[b"t"]))
        except (KeyError, ValueError, TypeError):
            names = b", ".join(sorted(fields)).decode(errors="replace")[:80]
            raise LogError(f"entry {entry_id.decode(errors='replace')} is not an mbroker "
                           f"entry (fields: {names})") from None
        if sequence != b"0" or not 0 <= entry.after < entry.last or \
                (entry.text and not entry.text.endswith(b"\n")):
            raise LogError(f"entry {entry_id.decode(errors='replace')} is damaged")
        return entry


def snapshot_key(key: str) -> str:
    return f"{key}:snapshot"


class SnapshotBuilder:
    """The follow graph as text, serialized SNAPSHOT_STEP followers at a time
    on the loop, while dispatch waits so the graph stands still:

        mbroker-snapshot 1 SEQ FOLLOWS
        FOLLOWER FOLLOWED,FOLLOWED,...
    """

    def __init__(self, seq: int, graph: Iterator[tuple[int, set[int]]], follows: int):
        self.seq = seq
        self._graph = graph
        self._parts = [b"%s %d %d\n" % (SNAPSHOT_FORMAT, seq, follows)]

    def step(self) -> bool:
        """Serialize the next followers; True once the whole graph is done."""
        parts = self._parts
        before = len(parts)
        for follower, followed in itertools.islice(self._graph, SNAPSHOT_STEP):
            parts.append(b"%d %s\n" % (follower, b",".join(map(b"%d".__mod__, followed))))
        return len(parts) - before < SNAPSHOT_STEP

    def text(self) -> bytes:
        return b"".join(self._parts)


def decode_snapshot(text: bytes) -> tuple[int, dict[int, set[int]]]:
    """(the SEQ it covers, the follow graph); LogError if it is damaged."""
    header, _, body = text.partition(b"\n")
    fields_ = header.split(b" ")
    try:
        if b" ".join(fields_[:2]) != SNAPSHOT_FORMAT or len(fields_) != 4:
            raise ValueError
        seq, follows = int(fields_[2]), int(fields_[3])
        graph: dict[int, set[int]] = {}
        for line in body.split(b"\n"):
            if line:
                follower, _, followed = line.partition(b" ")
                graph[int(follower)] = set(map(int, followed.split(b",")))
    except ValueError:
        raise LogError("the snapshot is damaged or not mbroker's") from None
    if sum(map(len, graph.values())) != follows:
        raise LogError("the snapshot is damaged: its follow count does not add up")
    return seq, graph


@dataclass(frozen=True)
class Recovery:
    """What a start-up rebuilt from the log."""

    snapshot_seq: int | None
    entries: int
    last_seq: int
    entries_skipped: int
    seconds: float


def recover_from_log(client, key: str, pipeline: EventPipeline) -> Recovery:
    """Rebuild the follow graph and the next SEQ: the latest snapshot, then
    every entry after it, through the pipeline's ordered path (nobody is
    subscribed yet, so only the graph and the sequence state change)."""
    started = time.monotonic()
    snapshot_seq = None
    text = client.get(snapshot_key(key))
    last = 0
    if text is not None:
        snapshot_seq, graph = decode_snapshot(text)
        pipeline.exchange.replace_follow_graph(graph)
        pipeline.reorder.advance_to(snapshot_seq + 1)
        last = snapshot_seq
    entries = skipped = 0
    start = "-"
    while True:
        batch = client.xrange(key, min=start, max="+", count=LOG_RECOVERY_BATCH)
        if not batch:
            break
        for entry_id, fields_ in batch:
            start = b"(" + entry_id
            try:
                entry = LogEntry.decode(entry_id, fields_)
            except LogError as problem:
                skipped += 1
                log.error("log %s: %s; skipped", key, problem)
                continue
            if entry.last <= last:
                continue  # already in the snapshot
            if entry.after > last:
                log.warning("log %s: sequence numbers %d..%d are missing (trimmed without a "
                            "snapshot?); the follow graph lacks their follows", key,
                            last + 1, entry.after)
            pipeline.receive_ordered(entry.text, entry.last)
            pipeline.dispatch()
            last = entry.last
            entries += 1
    return Recovery(snapshot_seq, entries, last, skipped, time.monotonic() - started)


class LogThread:
    """A thread of the log's, with its own connection to Redis: it connects,
    and after a lost connection reconnects with backoff (LOG_RETRY_FIRST,
    doubling to LOG_RETRY_MAX), logs each loss and counts it, and tells the
    loop its state through call_in_loop. A subclass says when there is work
    (_wait_for_work), what a round of it is (_work), and what an error other
    than a lost connection means (_fails)."""

    def __init__(self, url: str, key: str, reactor: Reactor, name: str, timeout: float):
        self.url, self.key = url, key
        self.state = "connecting"
        self.reconnects = 0
        self.failure: str | None = None  # set when the work cannot go on
        self._reactor = reactor
        self._timeout = timeout
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        call = self._reactor.call_in_loop
        client = None
        delay = LOG_RETRY_FIRST
        while self._wait_for_work():
            try:
                if client is None:
                    client = connect_to_log(self.url, self._timeout)
                    call(partial(self._state_changed, "connected"))
                    self._connected()
                self._work(client)
                delay = LOG_RETRY_FIRST
            except Exception as error:
                if client is not None and not isinstance(error, _connection_errors()):
                    if self._fails(_log_problem(error, self.url), delay):
                        return
                else:
                    call(partial(self._state_changed, "reconnecting"))
                    log.warning("log %s: %s; retrying in %.1f s", self.key,
                                _lost_connection(error, self.url), delay)
                client = None
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, LOG_RETRY_MAX)

    def _state_changed(self, state: str, failure: str | None = None) -> None:
        """On the loop: the thread's news."""
        if state == "reconnecting" and self.state != "reconnecting":
            self.reconnects += 1
        self.state = state
        if failure is not None:
            self.failure = failure

    def _wait_for_work(self) -> bool:
        """Block until there is work (True) or the thread is to end (False)."""
        raise NotImplementedError

    def _work(self, client) -> None:
        raise NotImplementedError

    def _connected(self) -> None:
        """Connected (again): for the log line."""

    def _fails(self, problem: str, delay: float) -> bool:
        """An error that is not a lost connection: True ends the thread."""
        raise NotImplementedError


def open_log(config: BrokerConfig, reactor: Reactor, pipeline: EventPipeline,
             apply_entries: Callable) -> LogAppender | LogFollower:
    """Recover config.log into pipeline, then the role that goes on from
    there: an edge's LogFollower, which hands entries to apply_entries, or a
    primary's LogAppender, hooked to the pipeline's releases. LogError when
    the log cannot be reached or read."""
    client = connect_to_log(config.log, LOG_SOCKET_TIMEOUT)
    where = f"the log {config.log_key} at {masked(config.log)}"
    try:
        recovery = recover_from_log(client, config.log_key, pipeline)
    except LogError as problem:
        raise LogError(f"cannot recover from {where}: {problem}") from None
    except Exception as error:  # the connection failed halfway
        raise LogError(f"cannot recover from {where}: "
                       f"{_log_problem(error, config.log)}") from None
    finally:
        client.close()
    if recovery.snapshot_seq is not None:
        read = f"the snapshot at {recovery.snapshot_seq} and {recovery.entries} entries"
    else:
        read = f"{recovery.entries} entries"
    log.info("recovered from the log %s in %.3f s: %s (%d skipped); %d follows; next "
             "expected sequence number %d", config.log_key, recovery.seconds, read,
             recovery.entries_skipped, pipeline.exchange.follow_count,
             pipeline.reorder.next_seq)
    if config.edge:
        return LogFollower(config.log, config.log_key, reactor, recovery, apply_entries)
    appender = LogAppender(config.log, config.log_key, config.snapshot_every,
                           config.log_retention, reactor, recovery)
    pipeline.on_release = appender.record
    return appender


class LogAppender(LogThread):
    """The primary's side of the log: the loop records what the reorder
    buffer releases and cuts it into entries; the thread writes them, in
    order, retrying until Redis has each one."""

    def __init__(self, url: str, key: str, snapshot_every: int, retention: float,
                 reactor: Reactor, recovery: Recovery):
        super().__init__(url, key, reactor, "mbroker-log-writer", LOG_SOCKET_TIMEOUT)
        self.snapshot_every = snapshot_every
        self.retention = retention
        self.position = recovery.last_seq  # the last SEQ Redis holds
        self.recovery = recovery
        self.entries_written = 0
        self.snapshots = 0
        self.snapshot_seq = recovery.snapshot_seq
        self.unwritten = 0  # events handed to the writer, not yet in Redis
        self._after = self._last = recovery.last_seq
        self._lines: list[bytes] = []  # released since the last cut, joined per release
        self._line_count = 0
        self._since_snapshot = 0
        # (SEQ, time) of the snapshots the stream may still be trimmed to, oldest first.
        self._trim_points: deque[tuple[int, float]] = deque()
        if recovery.snapshot_seq is not None:
            self._trim_points.append((recovery.snapshot_seq, time.monotonic()))
        self._snapshot: SnapshotBuilder | None = None
        self._on_snapshot_done: Callable[[], None] | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # to the thread; None: stop
        self._pending: deque = deque()  # the thread's: taken from the queue, not in Redis
        self._stop_seen = False  # the thread's

    # -- the loop's side -----------------------------------------------------

    def record(self, events: list, last_seq: int) -> None:
        """EventPipeline.on_release: the run just released, in order.

        Joined back into lines here, by C-level passes, so that the split
        lines still die with their slice: kept for a whole entry, they would
        outlive the garbage collector's youngest generation and make its
        full collections (which walk the follow graph) frequent.
        """
        if NO_OP in events:
            events = [event for event in events if event is not NO_OP]
        if events:
            self._lines.append(b"\n".join(map(b"|".join, events)))
            self._line_count += len(events)
        self._last = last_seq

    def cut(self) -> None:
        """End the current entry and hand it to the writer (at each flush)."""
        if self._last == self._after:
            return
        if self._last >= LOG_ENTRY_ID_LIMIT and self.failure is None:
            self._state_changed("failed", f"sequence number {self._last} is past what a Redis "
                                          f"stream id holds ({LOG_ENTRY_ID_LIMIT - 1}); nothing "
                                          f"more can be logged")
            log.error("log %s: %s; the event source stays paused", self.key, self.failure)
        if self.failure is not None:
            return  # kept back; the source is paused (may_continue)
        text = b"\n".join(self._lines) + b"\n" if self._lines else b""
        self._queue.put(LogEntry(self._after, self._last, text, time.time()))
        self.unwritten += self._line_count
        self._lines, self._line_count = [], 0
        self._since_snapshot += self._last - self._after
        self._after = self._last

    def may_continue(self) -> bool:
        """Whether the loop may dispatch more (deliver's answer): not while
        Redis is away or the writer far behind, nor once a snapshot is due."""
        return self.unwritten <= LOG_MAX_UNWRITTEN and self.state != "reconnecting" and \
            self.failure is None and self._snapshot is None and not self.snapshot_due()

    def may_resume(self) -> bool:
        return self.unwritten <= LOG_MAX_UNWRITTEN // 2 and self.state != "reconnecting" \
            and self.failure is None and self._snapshot is None

    def snapshot_due(self) -> bool:
        return self._since_snapshot >= self.snapshot_every and self._snapshot is None and \
            self.failure is None

    def start_snapshot(self, exchange: Exchange, on_done: Callable[[], None]) -> None:
        """Serialize the follow graph as it stands, a step per loop iteration;
        the caller dispatches nothing until on_done() is called."""
        self.cut()
        self._since_snapshot = 0
        self._snapshot = SnapshotBuilder(self._after, exchange.follow_graph(),
                                         exchange.follow_count)
        self._on_snapshot_done = on_done
        self._reactor.call_soon(self._snapshot_step)

    def _snapshot_step(self) -> None:
        if not self._snapshot.step():
            self._reactor.call_soon(self._snapshot_step)
            return
        snapshot, self._snapshot = self._snapshot, None
        # Trim to the newest earlier snapshot that is at least --log-retention
        # old, never to this one: an edge that less far behind reads on
        # instead of reloading, and Redis holds at most that many seconds of
        # entries plus an interval.
        now = time.monotonic()
        points = self._trim_points
        trim_below = None
        while points and now - points[0][1] >= self.retention:
            trim_below = points.popleft()[0]
        points.append((snapshot.seq, now))
        self._queue.put(("snapshot", snapshot.seq, snapshot.text(), trim_below))
        self._on_snapshot_done()

    def stop(self, timeout: float) -> None:
        """Write what was handed over (up to timeout), then end the thread."""
        self.cut()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._stopping.set()
        if self._thread.is_alive() or self.unwritten:
            log.warning("log %s: %d events were not written before exit (up to sequence "
                        "number %d is in the log)", self.key, self.unwritten, self.position)

    def stats(self) -> LogStats:
        return LogStats(role="primary", url=masked(self.url), key=self.key, state=self.state,
                        position=self.position, primary_position=self._after,
                        lag_seconds=0.0, unwritten=self.unwritten,
                        entries=self.entries_written,
                        entries_skipped=self.recovery.entries_skipped,
                        reconnects=self.reconnects, snapshots=self.snapshots,
                        snapshot_seq=self.snapshot_seq, missed=0,
                        recovery_seconds=self.recovery.seconds, failure=self.failure)

    def _written(self, last_seq: int, events: int) -> None:
        self.position = last_seq
        self.unwritten -= events
        self.entries_written += 1

    def _snapshot_written(self, seq: int) -> None:
        self.snapshots += 1
        self.snapshot_seq = seq

    # -- the writer thread ---------------------------------------------------

    def _wait_for_work(self) -> bool:
        pending = self._pending
        while len(pending) < LOG_WRITE_BATCH and not self._stop_seen:
            try:
                item = self._queue.get(block=not pending)
            except queue.Empty:
                break
            if item is None:
                self._stop_seen = True
            else:
                pending.append(item)
        return bool(pending)

    def _work(self, client) -> None:
        self._write(client, self._pending)

    def _connected(self) -> None:
        log.info("log %s at %s: connected", self.key, masked(self.url))

    def _fails(self, problem: str, delay: float) -> bool:
        self._reactor.call_in_loop(partial(self._state_changed, "failed", problem))
        log.error("log %s: %s; the event source stays paused", self.key, problem)
        return True

    def _write(self, client, pending: deque) -> None:
        """Write pending items in order, removing each once Redis has it."""
        call = self._reactor.call_in_loop
        while pending:
            if not isinstance(pending[0], LogEntry):
                _, seq, text, trim_below = pending[0]
                with client.pipeline(transaction=True) as commands:
                    commands.set(snapshot_key(self.key), text)
                    if trim_below is not None:
                        commands.xtrim(self.key, minid=f"{trim_below + 1}-0", approximate=False)
                    commands.execute()
                pending.popleft()
                call(partial(self._snapshot_written, seq))
                continue
            batch = list(itertools.takewhile(lambda item: isinstance(item, LogEntry),
                                             itertools.islice(pending, LOG_WRITE_BATCH)))
            self._append(client, batch)
            for entry in batch:
                pending.popleft()
                call(partial(self._written, entry.last, entry.text.count(b"\n")))

    def _append(self, client, entries: list[LogEntry]) -> None:
        with client.pipeline(transaction=False) as commands:
            for entry in entries:
                commands.xadd(self.key, entry.fields(), id=entry.entry_id)
            results = commands.execute(raise_on_error=False)
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, Exception):
                if isinstance(result, _connection_errors()):
                    raise result
                self._check_written_before(client, entry, result)

    def _check_written_before(self, client, entry: LogEntry, refusal: Exception) -> None:
        """Redis refused an entry: fine if it is ours, appended by an earlier
        try whose reply was lost; anything else stops the appending."""
        found = client.xrange(self.key, entry.entry_id, entry.entry_id)
        if found:
            try:
                if LogEntry.decode(*found[0]).after == entry.after:
                    log.info("log %s: entry %s was in the log already (the reply to an "
                             "earlier try was lost); not appended again", self.key,
                             entry.entry_id)
                    return
            except LogError:
                pass
        newest = client.xrevrange(self.key, count=1)
        newest_id = newest[0][0].decode(errors="replace") if newest else "none"
        raise LogError(f"cannot append entry {entry.entry_id} ({refusal}); the stream's newest "
                       f"entry is {newest_id}: is another primary writing to {self.key}?")


class LogFollower(LogThread):
    """An edge's side of the log: a thread reads the stream with a blocking
    XREAD on its own connection and hands the loop one batch of entries at
    a time; it reads the next batch only once the loop has dispatched the
    last one and is not paused, so clients that fall behind slow the edge,
    never its memory. An edge that finds entries trimmed away (it fell more
    than a snapshot interval behind) reloads from the latest snapshot."""

    def __init__(self, url: str, key: str, reactor: Reactor, recovery: Recovery,
                 apply: Callable[[list[LogEntry], tuple | None], None]):
        super().__init__(url, key, reactor, "mbroker-log-reader",
                         LOG_READ_BLOCK + LOG_SOCKET_TIMEOUT)
        self.recovery = recovery
        self.position = recovery.last_seq  # the last SEQ applied
        self.primary_position = recovery.last_seq  # the newest SEQ in the stream, last seen
        self.lag_seconds = 0.0  # how late the last entry was applied
        self.entries_read = 0
        self.entries_skipped = recovery.entries_skipped
        self.missed = 0  # SEQ numbers skipped over by reloading from a snapshot
        self.snapshot_seq = recovery.snapshot_seq
        self._apply = apply
        self._cursor = f"{recovery.last_seq}-0"  # the thread's: the last id read
        self._read_up_to = recovery.last_seq  # the thread's: the last SEQ read
        self._may_read = threading.Event()
        self._may_read.set()

    def read_when_ready(self, reading: bool) -> None:
        """Let the thread read the next batch (reading) or hold it back."""
        if reading:
            self._may_read.set()
        else:
            self._may_read.clear()

    # An edge's flow control is read_when_ready(): it writes no entries and
    # takes no snapshots, so these have nothing to do.
    def cut(self) -> None:
        pass

    def may_continue(self) -> bool:
        return True

    def may_resume(self) -> bool:
        return True

    def snapshot_due(self) -> bool:
        return False

    def stats(self) -> LogStats:
        return LogStats(role="edge", url=masked(self.url), key=self.key, state=self.state,
                        position=self.position, primary_position=self.primary_position,
                        lag_seconds=self.lag_seconds, unwritten=0, entries=self.entries_read,
                        entries_skipped=self.entries_skipped, reconnects=self.reconnects,
                        snapshots=0, snapshot_seq=self.snapshot_seq, missed=self.missed,
                        recovery_seconds=self.recovery.seconds, failure=None)

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self._may_read.set()
        self._thread.join(timeout)

    # -- the loop's side -----------------------------------------------------

    def _hand_over(self, entries: list[LogEntry], reload: tuple | None, skipped: int,
                   primary_position: int) -> None:
        self.entries_skipped += skipped
        if reload is not None:
            seq, _graph, missed_from = reload
            self.missed += seq - missed_from + 1
            self.snapshot_seq = seq
            log.warning("log %s: this edge fell behind the trimmed log; sequence numbers "
                        "%d..%d were missed by its clients (%d numbers); reloaded the follow "
                        "graph from the snapshot at %d", self.key, missed_from, seq,
                        seq - missed_from + 1, seq)
            self.position = seq
        self._apply(entries, reload)
        if entries:
            self.position = entries[-1].last
            self.lag_seconds = max(time.time() - entries[-1].written_at, 0.0)
            self.entries_read += len(entries)
        self.primary_position = max(primary_position, self.position)

    # -- the reader thread ---------------------------------------------------

    def _wait_for_work(self) -> bool:
        while not self._may_read.wait(LOG_READ_BLOCK):
            pass  # held back by the loop (backpressure), or about to stop
        return not self._stopping.is_set()

    def _work(self, client) -> None:
        batch = self._read(client)
        if batch is not None:
            self._may_read.clear()  # the loop sets it again once it has dispatched
            self._reactor.call_in_loop(partial(self._hand_over, *batch))

    def _connected(self) -> None:
        log.info("log %s at %s: connected; reading after sequence number %d", self.key,
                 masked(self.url), self._read_up_to)

    def _fails(self, problem: str, delay: float) -> bool:
        log.error("log %s: %s; reading again in %.1f s", self.key, problem, delay)
        return False

    def _read(self, client) -> tuple | None:
        """The next batch, as _hand_over's arguments; None if nothing came.
        The thread's position moves only once the whole batch is read: a
        connection lost halfway reads the same entries again."""
        reply = client.xread({self.key: self._cursor}, count=LOG_READ_BATCH,
                             block=int(LOG_READ_BLOCK * 1000))
        if not reply:
            return None
        cursor, read_up_to = self._cursor, self._read_up_to
        entries, skipped, reload = [], 0, None
        for entry_id, fields_ in reply[0][1]:
            cursor = entry_id
            try:
                entry = LogEntry.decode(entry_id, fields_)
            except LogError as problem:
                skipped += 1
                log.error("log %s: %s; skipped", self.key, problem)
                continue
            if entry.last <= read_up_to:
                continue
            if entry.after > read_up_to and not entries:
                # Entries between were trimmed: start again from the snapshot.
                reload, reloaded, cursor = self._reload(client, read_up_to)
                if reload is not None:
                    entries = reloaded
                    read_up_to = entries[-1].last if entries else reload[0]
                    break
            entries.append(entry)
            read_up_to = entry.last
        if len(reply[0][1]) < LOG_READ_BATCH:
            primary_position = read_up_to  # a short read: nothing newer is there
        else:  # behind: how far? (the newest entry comes whole; a full read is rare)
            newest = client.xrevrange(self.key, count=1)
            primary_position = int(newest[0][0].partition(b"-")[0]) if newest else 0
        self._cursor, self._read_up_to = cursor, read_up_to
        return entries, reload, skipped, primary_position

    def _reload(self, client, read_up_to: int) -> tuple[tuple | None, list[LogEntry], str]:
        """((snapshot SEQ, graph, first missed SEQ), the entries after it, the
        cursor after them); (None, [], cursor) when there is no snapshot."""
        text = client.get(snapshot_key(self.key))
        if text is None:
            return None, [], self._cursor
        seq, graph = decode_snapshot(text)
        entries, cursor = [], f"{seq}-0"
        for entry_id, fields_ in client.xrange(self.key, min=f"({seq}-0", max="+"):
            cursor = entry_id
            try:
                entries.append(LogEntry.decode(entry_id, fields_))
            except LogError as problem:
                log.error("log %s: %s; skipped", self.key, problem)
        return (seq, graph, read_up_to + 1), entries, cursor


# ============================================================================
# Stats
#
# Rules: Broker.stats() returns a BrokerStats, a frozen snapshot of plain
# values taken on the loop's thread; the status line, the dashboard, the
# benchmarks and the tests all read that one type, never the broker's
# insides. Counters are named as the logs name them. Rates come from
# samples the housekeeping timer takes, so reading them costs the loop
# nothing.
# ============================================================================

STATUS_LINE_INTERVAL = 5.0  # seconds between plain status lines
# Dispatch latency buckets (seconds): from a tenth of a millisecond, the
# fastest a flush can be here, to ten seconds, a drain's worth of backpressure.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_SAMPLES = 16  # housekeeping samples the rates average over (about 4 s)


@dataclass(frozen=True)
class SourceStats:
    connected: bool
    peer: str | None
    paused: bool  # by backpressure
    connections: int  # ever accepted
    bytes_read: int  # by the current connection


@dataclass(frozen=True)
class Rates:
    """Per second, over the last few seconds."""

    events_in: float
    events_out: float
    notifications: float
    bytes_out: float


@dataclass(frozen=True)
class Counters:
    """Inputs dropped or refused and connections cut off, by the names the
    logs and docs/behaviour.md use."""

    malformed: int
    unsequenced: int
    overlong: int
    duplicate: int
    late: int
    skipped: int
    slow_consumers: int
    follows_refused: int
    accept_errors: int

    def items(self) -> list[tuple[str, int]]:
        return [(item.name, getattr(self, item.name)) for item in fields(self)]


@dataclass(frozen=True)
class ClientStats:
    user_id: int | None  # None until its hello line is read
    peer: str
    queued_notifications: int
    queued_bytes: int
    notifications_sent: int
    bytes_sent: int
    connected_seconds: float


@dataclass(frozen=True)
class ClosedConnection:
    kind: str  # "client" or "source"
    peer: str
    user_id: int | None
    reason: CloseReason
    detail: str
    at: float  # wall-clock time


@dataclass(frozen=True)
class LatencyStats:
    """A histogram of dispatch latency: counts[i] notifications took at most
    bounds[i] seconds (cumulative, as Prometheus has it; the last bound is
    infinity), from the read that completed their event's release to the
    flush that handed them to the kernel."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total_seconds: float  # summed over notifications

    def quantile(self, fraction: float) -> float | None:
        """The bound below which that fraction of notifications fell; None if none."""
        if not self.counts or not self.counts[-1]:
            return None
        wanted = fraction * self.counts[-1]
        return next(bound for bound, count in zip(self.bounds, self.counts, strict=True)
                    if count >= wanted)


@dataclass(frozen=True)
class LogStats:
    """The durable log, as this broker sees it."""

    role: str  # "primary" (appends) or "edge" (follows)
    url: str  # password masked
    key: str
    state: str  # connecting, connected, reconnecting, failed
    position: int  # primary: the last SEQ Redis holds; edge: the last SEQ applied
    primary_position: int  # the newest SEQ in the log (primary: handed to its writer)
    lag_seconds: float  # edge: how late its last entry was applied, by the primary's clock
    unwritten: int  # primary: events handed to the writer, not yet in Redis
    entries: int  # written (primary) or read (edge)
    entries_skipped: int  # foreign or damaged entries
    reconnects: int
    snapshots: int  # written by this primary
    snapshot_seq: int | None  # the SEQ the latest snapshot covers
    missed: int  # edge: SEQ numbers its clients missed after it fell behind the trimmed log
    recovery_seconds: float
    failure: str | None  # why the primary stopped appending, if it did


@dataclass(frozen=True)
class BrokerStats:
    uptime: float
    started_at: float  # wall-clock time
    stopping: bool
    source: SourceStats
    next_seq: int
    highest_seq: int
    reorder_depth: int
    reorder_depth_max: int
    events_in: int  # lines with a valid sequence number
    events_dispatched: int
    notifications: int
    bytes_out: int
    clients: int  # registered connections
    connections: int  # every client connection, registered or not
    awaiting_hello: int
    known_users: int  # users that follow someone
    follows: int
    bytes_queued: int
    rates: Rates
    counters: Counters
    closes: dict[str, int]  # by CloseReason value
    limits: BrokerConfig
    top_clients: tuple[ClientStats, ...]  # deepest queues first
    recently_closed: tuple[ClosedConnection, ...]  # oldest first
    events_by_type: dict[str, int] = field(default_factory=dict)  # dispatched
    dispatch_latency: LatencyStats | None = None
    log: LogStats | None = None  # with --log


class CloseLedger:
    """Every close, counted by reason, and the last few for the dashboard."""

    def __init__(self):
        self._counts = dict.fromkeys(CloseReason, 0)
        self._recent: deque[ClosedConnection] = deque(maxlen=RECENTLY_CLOSED_KEPT)

    def record(self, kind: str, peer: str, user_id: int | None, reason: CloseReason,
               detail: str) -> None:
        self._counts[reason] += 1
        self._recent.append(ClosedConnection(kind, peer, user_id, reason, detail, time.time()))

    def counts(self) -> dict[str, int]:
        return {reason.value: count for reason, count in self._counts.items()}

    def slow_consumers(self) -> int:
        return sum(count for reason, count in self._counts.items() if reason.is_slow_consumer)

    def recent(self) -> tuple[ClosedConnection, ...]:
        return tuple(self._recent)


class LatencyHistogram:
    """Dispatch latency, observed once per flush for all its notifications
    (a bisect and three additions per flush; never per event)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS):
        self.bounds = (*bounds, float("inf"))
        self._counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self._total_seconds = 0.0

    def observe(self, seconds: float, notifications: int) -> None:
        self._counts[bisect.bisect_left(self.bounds, seconds)] += notifications
        self._total_seconds += seconds * notifications

    def stats(self) -> LatencyStats:
        return LatencyStats(self.bounds, tuple(itertools.accumulate(self._counts)),
                            self._total_seconds)


class RateMeter:
    """Per-second rates from the counters' values at the last few ticks."""

    def __init__(self):
        self._samples: deque[tuple[float, int, int, int, int]] = deque(maxlen=RATE_SAMPLES)

    def sample(self, now: float, events_in: int, events_out: int, notifications: int,
               bytes_out: int) -> None:
        self._samples.append((now, events_in, events_out, notifications, bytes_out))

    def per_second(self) -> Rates:
        samples = self._samples
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return Rates(0.0, 0.0, 0.0, 0.0)
        first, last = samples[0], samples[-1]
        elapsed = last[0] - first[0]
        return Rates(*((last[index] - first[index]) / elapsed for index in range(1, 5)))


def format_status_line(snapshot: BrokerStats) -> str:
    """One plain line for logs and non-terminal --dashboard output."""
    counters = snapshot.counters
    source = snapshot.source
    source_state = ("paused" if source.paused else "connected") if source.connected \
        else "disconnected"
    return (f"up {snapshot.uptime:.0f}s source={source_state} "
            f"next_seq={snapshot.next_seq} highest_seq={snapshot.highest_seq} "
            f"reorder={snapshot.reorder_depth} events={snapshot.events_dispatched} "
            f"notifications={snapshot.notifications} clients={snapshot.clients} "
            f"queued_bytes={snapshot.bytes_queued} malformed={counters.malformed} "
            f"duplicate={counters.duplicate} skipped={counters.skipped} "
            f"slow_consumers={counters.slow_consumers}{_log_status(snapshot.log)}")


def _log_status(log_stats: LogStats | None) -> str:
    if log_stats is None:
        return ""
    text = (f" log={log_stats.role}:{log_stats.state} position={log_stats.position} "
            f"newest={log_stats.primary_position}")
    if log_stats.role == "edge":
        return text + f" lag={log_stats.lag_seconds:.3f}s missed={log_stats.missed}"
    return text + f" unwritten={log_stats.unwritten}"


class StatusLinePrinter:
    """--dashboard when stdout is not a terminal: a plain line every few seconds."""

    def __init__(self, stream=None, interval: float = STATUS_LINE_INTERVAL):
        self.stream = stream or sys.stdout
        self.interval = interval
        self.next_due = 0.0

    def __call__(self, broker: Broker, now: float) -> None:
        if now < self.next_due:
            return
        self.next_due = now + self.interval
        if not _can_write_now(self.stream):
            return  # a reader that stopped reading must not stall delivery
        print(format_status_line(broker.stats(top_clients=0)), file=self.stream, flush=True)


def _can_write_now(stream) -> bool:
    """Whether a write to stream would not block the loop (as far as select
    can tell: a terminal under Ctrl-S or a pipe nobody reads says no)."""
    try:
        descriptor = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return True  # an in-memory stream never blocks
    try:
        return bool(select.select([], [descriptor], [], 0)[1])
    except (OSError, ValueError):
        return True


# ============================================================================
# Metrics
#
# Rules: --metrics-port serves GET /metrics, the Prometheus text format made
# by prometheus_client from one BrokerStats, and GET /healthz, from an HTTP
# thread of its own. A scrape asks the loop for that snapshot through
# call_in_loop, the door for other threads: the loop spends one stats() on
# it and never waits for a client's HTTP, and it stays the only reader of
# its own state. Names follow Prometheus's conventions: an mbroker_ prefix,
# counters ending in _total, seconds and bytes as units. prometheus_client
# is imported only when --metrics-port asks for it.
# ============================================================================


class MetricsUnavailable(Exception):
    """--metrics-port cannot be served: one line for the operator."""


def metric_families(stats: BrokerStats) -> list:
    """Every number the dashboard shows (rates excepted: Prometheus derives
    those from the counters), as prometheus_client metric families."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    families = []

    def gauge(name: str, documentation: str, value: float) -> None:
        families.append(GaugeMetricFamily(f"mbroker_{name}", documentation, value=value))

    def counter(name: str, documentation: str, value: float) -> None:
        families.append(CounterMetricFamily(f"mbroker_{name}", documentation, value=value))

    role = "standalone" if stats.log is None else stats.log.role
    info = GaugeMetricFamily("mbroker_info", "Always 1; the broker's role in its labels.",
                             labels=["role"])
    info.add_metric([role], 1)
    families.append(info)
    gauge("start_time_seconds", "When the broker started, in seconds since the epoch.",
          stats.started_at)
    gauge("stopping", "1 while the broker drains after SIGINT/SIGTERM.", stats.stopping)
    gauge("source_connected", "1 while an event source is connected.", stats.source.connected)
    gauge("source_paused", "1 while the event source is not read (backpressure).",
          stats.source.paused)
    gauge("source_read_bytes", "Bytes read from the current event source connection.",
          stats.source.bytes_read)
    counter("source_connections", "Event source connections accepted.",
            stats.source.connections)
    gauge("next_sequence_number", "The next sequence number to dispatch.", stats.next_seq)
    gauge("highest_sequence_number", "The highest sequence number seen.", stats.highest_seq)
    gauge("reorder_events", "Events waiting in the reorder buffer.", stats.reorder_depth)
    gauge("reorder_events_max", "The most events that ever waited in the reorder buffer.",
          stats.reorder_depth_max)
    counter("events_received", "Event lines with a valid sequence number.", stats.events_in)
    dispatched = CounterMetricFamily("mbroker_events_dispatched",
                                     "Events dispatched in sequence order, by type.",
                                     labels=["type"])
    for kind, count in stats.events_by_type.items():
        dispatched.add_metric([kind], count)
    families.append(dispatched)
    counter("notifications", "Notifications handed to client connections.",
            stats.notifications)
    counter("client_sent_bytes", "Bytes the kernel took from client connections.",
            stats.bytes_out)
    gauge("clients", "Client connections that announced their user id.", stats.clients)
    gauge("connections", "Client connections, with or without a user id.", stats.connections)
    gauge("clients_awaiting_hello", "Client connections yet to announce their id.",
          stats.awaiting_hello)
    gauge("known_users", "Users that follow someone.", stats.known_users)
    gauge("follows", "Follow relations in the follow graph.", stats.follows)
    gauge("queued_bytes", "Bytes queued toward clients, all together.", stats.bytes_queued)
    gauge("deepest_queue_bytes", "Bytes queued toward the client with the most.",
          stats.top_clients[0].queued_bytes if stats.top_clients else 0)
    limits = stats.limits
    for name, documentation, value in (
            ("max_pending_events", "--max-pending.", limits.max_pending),
            ("max_buffered_bytes", "--max-buffered.", limits.max_buffered),
            ("max_client_buffer_bytes", "--max-client-buffer.", limits.max_client_buffer),
            ("max_follows", "--max-follows.", limits.max_follows)):
        gauge(name, f"The limit {documentation}", value)
    for name, value in stats.counters.items():
        counter(name, f"The {name} counter (docs/behaviour.md §4).", value)
    closed = CounterMetricFamily("mbroker_connections_closed",
                                 "Connections closed, by reason (docs/behaviour.md §4).",
                                 labels=["reason"])
    for reason, count in stats.closes.items():
        closed.add_metric([reason], count)
    families.append(closed)
    latency = stats.dispatch_latency
    if latency is not None:
        buckets = [("+Inf" if bound == float("inf") else repr(bound), count)
                   for bound, count in zip(latency.bounds, latency.counts, strict=True)]
        families.append(HistogramMetricFamily(
            "mbroker_dispatch_latency_seconds",
            "Per notification: from the read that completed its event's release to the "
            "flush that handed it to the kernel.", buckets=buckets,
            sum_value=latency.total_seconds))
    if stats.log is not None:
        families += _log_metric_families(stats.log, gauge, counter)
    return families


def _log_metric_families(log_stats: LogStats, gauge, counter) -> list:
    from prometheus_client.core import GaugeMetricFamily

    state = GaugeMetricFamily("mbroker_log_state", "1 for the log connection's state.",
                              labels=["state"])
    for name in ("connecting", "connected", "reconnecting", "failed"):
        state.add_metric([name], log_stats.state == name)
    gauge("log_position", "Primary: the last sequence number Redis holds; edge: the last "
          "applied.", log_stats.position)
    gauge("log_newest_position", "The newest sequence number in the log, as last seen.",
          log_stats.primary_position)
    gauge("log_lag_seconds", "Edge: how late its last entry was applied, by the primary's "
          "clock.", log_stats.lag_seconds)
    gauge("log_unwritten_events", "Primary: events handed to the writer, not yet in Redis.",
          log_stats.unwritten)
    counter("log_entries", "Entries written (primary) or read (edge).", log_stats.entries)
    counter("log_entries_skipped", "Foreign or damaged entries skipped.",
            log_stats.entries_skipped)
    counter("log_reconnects", "Times the connection to Redis was lost.", log_stats.reconnects)
    counter("log_snapshots", "Snapshots this primary wrote.", log_stats.snapshots)
    counter("log_missed", "Edge: sequence numbers its clients missed after it fell behind "
            "the trimmed log.", log_stats.missed)
    gauge("log_snapshot_sequence_number", "The sequence number the latest snapshot covers.",
          log_stats.snapshot_seq or 0)
    gauge("log_recovery_seconds", "How long the start-up recovery took.",
          log_stats.recovery_seconds)
    return [state]


class MetricsServer:
    """GET /metrics and GET /healthz on a thread of its own (see the banner)."""

    def __init__(self, broker: Broker, host: str, port: int):
        try:
            from prometheus_client import CollectorRegistry, ProcessCollector
            from prometheus_client.exposition import choose_encoder
        except ImportError:
            raise MetricsUnavailable("--metrics-port needs the prometheus_client package: "
                                     "pip install 'mbroker[metrics]'") from None
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SnapshotCollector(broker))
        ProcessCollector(registry=registry)  # process_cpu_seconds_total and friends

        class Handler(BaseHTTPRequestHandler):
            server_version = "mbroker"

            def do_GET(self) -> None:
                path = self.path.partition("?")[0]
                content_type = "text/plain; charset=utf-8"
                if path == "/metrics":
                    encode, content_type = choose_encoder(self.headers.get("Accept"))
                    try:
                        status, body = 200, encode(registry)
                    except TimeoutError:
                        status, body = 503, b"the broker's loop did not answer in time\n"
                elif path == "/healthz":
                    status, body = broker.health()
                else:
                    status, body = 404, b"not found: try /metrics or /healthz\n"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                pass  # scrapes every few seconds are no news for the log

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as error:
            raise PortError(host, port, error) from error
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="mbroker-metrics")
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _SnapshotCollector:
    """prometheus_client's collector interface, answered from one snapshot."""

    def __init__(self, broker: Broker):
        self._broker = broker

    def collect(self):
        return iter(metric_families(self._broker.snapshot(METRICS_SNAPSHOT_TIMEOUT,
                                                          top_clients=1)))


# ============================================================================
# Dashboard
#
# Rules: everything runs on the loop's thread, from the housekeeping timer,
# and never makes the loop wait: a terminal or pipe that stops reading makes
# the view skip frames. Rendering is a pure function of a BrokerStats. rich
# is imported only when --dashboard asks for it, so the broker runs on a
# bare Python.
# ============================================================================

DASHBOARD_MAX_CLIENT_ROWS = 100  # most queue rows ever asked of stats(), however tall the terminal
DASHBOARD_MIN_CLIENT_ROWS = 3  # queue rows kept before the recently-closed list gets any room
DASHBOARD_CLOSED_ROWS = 5  # recently closed connections shown when every queue row fits
DASHBOARD_GUARANTEED_CLOSED_ROWS = 2  # ...and shown even when queue rows must make room
# A queue or buffer past WARNING of its limit is drawn yellow, past DANGER red:
# red means the broker is about to act (cut a client off, skip events, pause the source).
WARNING_FRACTION = 0.5
DANGER_FRACTION = 0.9
LABEL_WIDTH = 10  # the left column of the header ("source", "reorder", ...)
LONGEST_NUMBER = 19  # sequence numbers may have any number of digits; longer ones are elided
# Control characters in a log message (an escape sequence above all) would move
# the cursor under the live view and tear it; they are shown as \xNN instead.
CONTROL_CHARACTERS = {code: f"\\x{code:02x}" for code in [*range(32), 127] if chr(code) != "\t"}


def _count(number: int) -> str:
    """1234567 -> '1,234,567'; absurdly long numbers keep their head and tail."""
    text = f"{number:,}"
    if len(text) > LONGEST_NUMBER:
        text = f"{text[:7]}…{text[-11:]}"
    return text


def _size(byte_count: float) -> str:
    """Bytes in binary units, as the limits are given (16 MiB, 256 MiB)."""
    if byte_count < 1024:
        return f"{byte_count:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        byte_count /= 1024
        if byte_count < 1024 or unit == "TiB":
            break
    return f"{byte_count:.1f} {unit}"


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}/s"


def _duration(seconds: float) -> str:
    """Two most significant units: '42s', '5m 07s', '3h 02m', '2d 04h'."""
    seconds = int(max(seconds, 0))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def _fill_style(amount: float, limit: float) -> str:
    """'' while comfortably under the limit, yellow past half, red when about to hit it."""
    if limit <= 0:
        return ""
    fraction = amount / limit
    if fraction > DANGER_FRACTION:
        return "bold red"
    if fraction > WARNING_FRACTION:
        return "yellow"
    return ""


def _line(label: str, *parts):
    """One header line: a label column, then (text, style) parts; never wraps."""
    from rich.text import Text

    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(label.ljust(LABEL_WIDTH), style="bold")
    for part in parts:
        if isinstance(part, tuple):
            line.append(*part)
        else:
            line.append(part)
    return line


def _packed_lines(label: str, items: list, width: int) -> list:
    """Lay out (name, value, style) items after a label, as many per line as fit.

    Counters wrap by whole items, so a name is never split from its value and
    the number of lines is known before anything is drawn.
    """
    lines = [_line(label)]
    for name, value, style in items:
        entry_length = len(name) + 1 + len(value)
        current = lines[-1]
        used = len(current.plain)
        if used > LABEL_WIDTH and used + 2 + entry_length > width:
            current = _line("")
            lines.append(current)
        elif used > LABEL_WIDTH:
            current.append("  ")
        current.append(name, style=style or "")
        current.append(" " + value, style=style or "")
    return lines


def _source_parts(snapshot: BrokerStats) -> list:
    source = snapshot.source
    if not source.connected:
        so_far = source.connections
        return ["not connected" + (f" ({so_far} connections so far)" if so_far else "")]
    parts = [f"connected {source.peer}  "]
    if source.paused:
        # Backpressure: the broker has stopped reading so the source's TCP
        # window fills; the operator must see this before anything else.
        parts.append(("PAUSED by backpressure", "bold red"))
    else:
        parts.append("reading")
    parts.append(f"  {_size(source.bytes_read)} read")
    return parts


def _latency_text(latency: LatencyStats | None) -> str:
    """Dispatch latency by its histogram's buckets: an upper bound per quantile."""
    quantiles = [(name, latency.quantile(fraction)) for name, fraction in
                 (("p50", 0.5), ("p99", 0.99))] if latency is not None else []
    if not quantiles or quantiles[0][1] is None:
        return "no notifications yet"
    return "  ".join(
        f"{name} {'over 10 s' if bound == float('inf') else f'<= {bound * 1000:g} ms'}"
        for name, bound in quantiles) + "  from read to flush"


def _log_parts(log_stats: LogStats) -> list:
    """The log's line: role, Redis connection, position and lag; trouble in colour."""
    state_style = {"connected": "", "failed": "bold red"}.get(log_stats.state, "bold yellow")
    parts = [f"{log_stats.role}  ", (log_stats.state, state_style),
             f"  at {_count(log_stats.position)}"]
    behind = log_stats.primary_position - log_stats.position
    if log_stats.role == "edge":
        parts.append(f"  {_count(behind)} behind  lag {log_stats.lag_seconds * 1000:,.0f} ms")
        if log_stats.missed:
            parts.append((f"  missed {_count(log_stats.missed)}", "yellow"))
    else:
        parts.append(f"  unwritten {_count(log_stats.unwritten)}")
        if log_stats.snapshot_seq is not None:
            parts.append(f"  snapshot at {_count(log_stats.snapshot_seq)}")
    if log_stats.failure:
        parts.append((f"  {log_stats.failure}", "bold red"))
    return parts


def _header_lines(snapshot: BrokerStats, width: int) -> list:
    from rich.text import Text

    limits = snapshot.limits
    rates = snapshot.rates
    counters = snapshot.counters

    title = Text(no_wrap=True, overflow="ellipsis")
    title.append("mbroker", style="bold")
    title.append(f"  up {_duration(snapshot.uptime)}")
    if snapshot.stopping:
        title.append("  STOPPING: draining queued notifications", style="bold yellow")

    depth, max_pending = snapshot.reorder_depth, limits.max_pending
    queued, max_buffered = snapshot.bytes_queued, limits.max_buffered
    awaiting = snapshot.awaiting_hello
    lines = [
        title,
        _line("source", *_source_parts(snapshot)),
        _line("sequence", f"next {_count(snapshot.next_seq)}"
                          f"  highest seen {_count(snapshot.highest_seq)}"),
        _line("reorder", (f"{_count(depth)} waiting", _fill_style(depth, max_pending)),
              f"  largest {_count(snapshot.reorder_depth_max)}"
              f"  limit {_count(max_pending)}"),
        _line("rates", f"events in {_rate(rates.events_in)}"
                       f"  out {_rate(rates.events_out)}"
                       f"  notifications {_rate(rates.notifications)}"),
        _line("dispatch", _latency_text(snapshot.dispatch_latency)),
        _line("output", f"{_size(rates.bytes_out)}/s  ",
              (f"{_size(queued)} queued", _fill_style(queued, max_buffered)),
              f" (source pauses at {_size(max_buffered)})"),
        _line("clients", f"{_count(snapshot.connections)} connections"
                         f"  {_count(snapshot.clients)} users",
              (f"  {_count(awaiting)} awaiting id" if awaiting else "")),
        _line("graph", f"{_count(snapshot.known_users)} known users"
                       f"  {_count(snapshot.follows)} follows"),
    ]
    if snapshot.log is not None:
        lines.append(_line("log", *_log_parts(snapshot.log)))
    # Zero counters are dimmed so the ones that moved stand out; the names
    # are the ones the logs and stats() use, so an operator can grep for them.
    lines += _packed_lines("counters", [
        (name, _count(value), "" if value else "dim") for name, value in counters.items()
    ], width)
    closes = [(reason, _count(count), "yellow" if reason.startswith("slow_consumer") else "")
              for reason, count in snapshot.closes.items() if count]
    lines += _packed_lines("closes", closes, width) if closes else [_line("closes", "none yet")]
    return lines


# The queue table's columns: header, alignment, and the widest a cell may get
# (None: the peer column, which takes whatever width the others leave).
CLIENT_COLUMNS = (
    ("user", "left", 12),
    ("peer", "left", None),
    ("queued", "right", 11),
    ("queued bytes", "right", 14),
    ("sent", "right", 13),
    ("connected", "right", 9),
)
COLUMN_GAP = 2
MIN_PEER_WIDTH = 9


def _client_rows(snapshot: BrokerStats, rows: int, width: int) -> list:
    """The deepest queues as fixed-width lines, header first.

    Laid out by hand rather than with rich's Table: measuring a Table costs
    milliseconds per frame, and this runs on the broker's loop four times a
    second. Each cell is a plain string, so widths are just len().
    """
    from rich.text import Text

    max_client_buffer = snapshot.limits.max_client_buffer
    cell_rows, styles = [], []
    for client in snapshot.top_clients[:rows]:
        queued_bytes = client.queued_bytes
        style = _fill_style(queued_bytes, max_client_buffer)
        bytes_cell = _size(queued_bytes)
        if style:
            # Near the limit: say how near, since past it the client is cut off.
            bytes_cell += f" {100 * queued_bytes / max_client_buffer:.0f}%"
        user = client.user_id
        cell_rows.append(("(no id)" if user is None else str(user),
                          client.peer,
                          _count(client.queued_notifications),
                          bytes_cell,
                          _count(client.notifications_sent),
                          _duration(client.connected_seconds)))
        styles.append(style)

    widths = []
    for index, (header, _, widest) in enumerate(CLIENT_COLUMNS):
        natural = max([len(header), *(len(cells[index]) for cells in cell_rows)])
        widths.append(natural if widest is None else min(natural, widest))
    peer = 1
    others = sum(widths) - widths[peer] + COLUMN_GAP * (len(widths) - 1)
    widths[peer] = max(MIN_PEER_WIDTH, min(widths[peer], width - others))

    def layout(cells, cell_styles, line_style=""):
        line = Text(no_wrap=True, overflow="ellipsis", style=line_style)
        for index, (cell, (_, align, _), cell_width) in enumerate(
                zip(cells, CLIENT_COLUMNS, widths, strict=True)):
            if len(cell) > cell_width:
                cell = cell[:cell_width - 1] + "…"
            cell = cell.ljust(cell_width) if align == "left" else cell.rjust(cell_width)
            if index:
                line.append(" " * COLUMN_GAP)
            line.append(cell, style=cell_styles[index])
        return line

    no_styles = [""] * len(CLIENT_COLUMNS)
    lines = [layout([header for header, _, _ in CLIENT_COLUMNS], no_styles, "bold")]
    bytes_column = 3
    for cells, style in zip(cell_rows, styles, strict=True):
        cell_styles = list(no_styles)
        cell_styles[bytes_column] = style
        lines.append(layout(cells, cell_styles))
    return lines


def _closed_line(closed: ClosedConnection):
    from rich.text import Text

    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(time.strftime("%H:%M:%S", time.localtime(closed.at)) + "  ")
    who = closed.kind
    if closed.user_id is not None:
        who += f" {closed.user_id}"
    line.append(f"{who}  {closed.peer}  ")
    reason = closed.reason
    line.append(reason.value, style="yellow" if reason.is_slow_consumer else "")
    if closed.detail:
        line.append(f"  {closed.detail}")
    return line


def render_dashboard(snapshot: BrokerStats, width: int = 80, height: int = 24):
    """The dashboard for one stats() snapshot, fitted to width x height.

    Pure: no clock but for formatting timestamps, no broker; the live view and
    the tests both call it. Every line is a single no-wrap line, so the height
    is known before drawing: the header first, then the deepest queues, then
    the last closed connections, as room allows.
    """
    from rich.console import Group
    from rich.text import Text

    header = _header_lines(snapshot, width)[:height]
    room = height - len(header)
    top_clients = snapshot.top_clients
    closed = list(reversed(snapshot.recently_closed[-DASHBOARD_CLOSED_ROWS:]))

    # The queue table costs a blank line, its title and its header; the
    # recently-closed list a blank line and its title. The queues come first:
    # the closed list gets a couple of rows, and more only if every queue fits.
    table_overhead, closed_overhead = 3, 2
    room_for_rows = room - table_overhead - closed_overhead
    guaranteed_closed = min(len(closed), DASHBOARD_GUARANTEED_CLOSED_ROWS)
    if room_for_rows - guaranteed_closed < min(len(top_clients), DASHBOARD_MIN_CLIENT_ROWS):
        guaranteed_closed = 0  # too short a terminal: the queues only
    closed = closed[:max(guaranteed_closed, room_for_rows - len(top_clients))]
    client_rows = room - table_overhead - (closed_overhead + len(closed) if closed else 0)

    parts = [*header]
    if client_rows >= 1:
        parts.append(Text(""))
        total = snapshot.connections
        title = Text("deepest client queues", style="bold", no_wrap=True, overflow="ellipsis")
        if top_clients:
            shown = min(len(top_clients), client_rows)
            title.append(f"  {shown} of {_count(total)} connections", style="")
            parts += [title, *_client_rows(snapshot, shown, width)]
        else:
            parts += [title, Text("no clients connected", style="dim")]
    if closed:
        parts += [Text(""), Text("recently closed", style="bold"), *map(_closed_line, closed)]
    return Group(*parts)


class LiveLogHandler(logging.Handler):
    """Prints log records through the live view's console, above the view.

    Rich redraws the live view below whatever is printed through its console,
    so log lines scroll up above the dashboard instead of tearing it.
    """

    def __init__(self, console, level: int = logging.NOTSET):
        super().__init__(level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        from rich.text import Text

        try:
            message = self.format(record).translate(CONTROL_CHARACTERS)
            self.console.print(Text(message), soft_wrap=True)
        except Exception:
            self.handleError(record)


class LiveDashboard:
    """--dashboard on a terminal: a rich live view redrawn on the housekeeping tick.

    Called as an observer, on the loop's thread, about four times a second.
    Rich's own refresh thread stays off (auto_refresh=False): it would render
    from another thread while the loop changes the broker's state.
    """

    def __init__(self, stream=None):
        from rich.console import Console
        from rich.live import Live

        stream = stream or sys.stdout
        self.terminal = NonBlockingTerminal.open(stream)
        self.console = Console(file=self.terminal or stream)
        # No stdout/stderr redirection: the broker prints nothing itself, and
        # logging is routed explicitly (route_logging) so that logs sent to a
        # file stay in that file.
        self.live = Live(console=self.console, auto_refresh=False, redirect_stdout=False,
                         redirect_stderr=False, vertical_overflow="crop")
        self._replaced_handlers: list[tuple[logging.Logger, logging.Handler,
                                            logging.Handler]] = []
        self.frames_skipped = 0
        self.frames = 0
        self.seconds_drawing = 0.0  # CPU time spent on frames: what the view costs the loop

    def __call__(self, broker: Broker, now: float) -> None:
        width, height = self.console.size
        # One line is left free: a view exactly as tall as the terminal would
        # scroll it by a line on every redraw.
        height = max(height - 1, 1)
        if self.terminal is not None:
            self.terminal.flush()
            if self.terminal.pending:
                self.frames_skipped += 1  # a stalled terminal must not stall delivery
                return
        started = time.process_time()
        snapshot = broker.stats(top_clients=min(height, DASHBOARD_MAX_CLIENT_ROWS))
        renderable = render_dashboard(snapshot, width=width, height=height)
        if not self.live.is_started:
            self.live.start()
        self.live.update(renderable, refresh=True)
        self.frames += 1
        self.seconds_drawing += time.process_time() - started

    def route_logging(self, logger: logging.Logger | None = None) -> None:
        """Send logger's handlers that write to a terminal through the live console.

        Handlers writing elsewhere (a file, a pipe) are left alone: they cannot
        tear the view, and the operator asked for the logs there.
        """
        logger = logger or logging.getLogger()
        for handler in list(logger.handlers):
            stream = getattr(handler, "stream", None)
            if not isinstance(handler, logging.StreamHandler) or not _is_terminal(stream):
                continue
            replacement = LiveLogHandler(self.console, handler.level)
            replacement.setFormatter(handler.formatter)
            logger.removeHandler(handler)
            logger.addHandler(replacement)
            self._replaced_handlers.append((logger, handler, replacement))

    def stop(self) -> None:
        """Leave the last frame on screen and give logging its handlers back."""
        self.live.stop()
        if self.terminal is not None:
            self.terminal.close()
        for logger, original, replacement in self._replaced_handlers:
            logger.removeHandler(replacement)
            logger.addHandler(original)
        self._replaced_handlers.clear()
        if self.frames:
            log.info("dashboard: %d frames drawn in %.2f s of CPU (%.1f ms each), "
                     "%d skipped while the terminal was not reading", self.frames,
                     self.seconds_drawing, 1000 * self.seconds_drawing / self.frames,
                     self.frames_skipped)


class NonBlockingTerminal:
    """The live view's way to a terminal, which never makes the loop wait.

    The terminal is opened anew, so O_NONBLOCK applies to this file
    description only, not to stdout or stderr. What the terminal does not
    take now (Ctrl-S, a stuck tmux pane, a stalled ssh session) is kept and
    sent on later ticks; meanwhile the dashboard skips frames, and past
    TERMINAL_MAX_PENDING further output (log lines) is dropped rather than buffered.
    """

    def __init__(self, descriptor: int, encoding: str):
        self.descriptor = descriptor
        self.encoding = encoding
        self.pending = bytearray()
        self.dropped = 0  # bytes dropped while the terminal was stalled

    @classmethod
    def open(cls, stream) -> NonBlockingTerminal | None:
        """None when stream is not a terminal we can reopen (tests' StringIO)."""
        try:
            path = os.ttyname(stream.fileno())
            descriptor = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except (AttributeError, OSError, ValueError):
            return None
        return cls(descriptor, getattr(stream, "encoding", None) or "utf-8")

    def write(self, text: str) -> int:
        if len(self.pending) > TERMINAL_MAX_PENDING:
            self.dropped += len(text)
        else:
            self.pending += text.encode(self.encoding, "replace")
        return len(text)

    def flush(self) -> None:
        while self.pending:
            try:
                written = os.write(self.descriptor, self.pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.pending.clear()  # the terminal is gone: nothing to keep
                return
            del self.pending[:written]

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.descriptor

    def close(self) -> None:
        self.flush()
        os.close(self.descriptor)


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or already closed
        return False


def make_dashboard(stream=None) -> LiveDashboard | StatusLinePrinter:
    """The --dashboard observer: a live view on a terminal, a status line otherwise.

    The status line is also the fallback when rich is not installed or the
    terminal cannot move its cursor (TERM=dumb), so --dashboard always shows
    something and never prints escape codes into a file.
    """
    stream = stream or sys.stdout
    if not _is_terminal(stream):
        return StatusLinePrinter(stream)
    try:
        dashboard = LiveDashboard(stream)
    except ImportError:
        log.warning("rich is not installed (pip install rich, or pip install "
                    "'mbroker[dashboard]'): --dashboard prints a status line every %g s "
                    "instead", STATUS_LINE_INTERVAL)
        return StatusLinePrinter(stream)
    if not dashboard.console.is_interactive:
        return StatusLinePrinter(stream)
    return dashboard


# ============================================================================
# Command line and Python entry points
#
# Rules: the options come from BrokerConfig's fields, nowhere else: the
# command line, serve() and running() take the same names with the same
# defaults. The command: parse, configure logging, bind (a busy port is one
# line and exit code 2), serve until a signal, exit 0; a bad option value is
# one line and exit code 2; no traceback reaches the operator. serve() is
# the command's broker in the calling thread, running() the same on a
# background thread, Playground an exchange to feed by hand, and
# `python3 -m mbroker console` a prompt with all of them imported. The
# public names are __all__; nothing else is promised.
# ============================================================================

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, but for options that are off by default (None),
    whose help says so, and the ports, whose help states their default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbroker",
        description="Follower-maze message broker: reorders the event source's stream "
                    "and forwards each event to the user clients it concerns.",
        formatter_class=_HelpFormatter)
    for item in fields(BrokerConfig):
        help_text = item.metadata.get("help")
        if help_text is None:
            continue  # tuning, not an option
        positional = item.metadata["positional"]
        if positional:
            # None: not given, which an edge must know (its one port is CLIENT_PORT).
            parser.add_argument(item.name, metavar=positional, nargs="?", default=None,
                                type=item.metadata["kind"],
                                help=f"{help_text} (default: {item.default})")
        elif item.metadata["kind"] is bool:
            parser.add_argument("--" + item.name.replace("_", "-"), action="store_true",
                                help=help_text)
        else:
            parser.add_argument("--" + item.name.replace("_", "-"), type=item.metadata["kind"],
                                default=item.default, help=help_text)
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="logging threshold, in any case (logs go to stderr)")
    parser.add_argument("--dashboard", action="store_true",
                        help="live rich view on a terminal; a plain status line every "
                             f"{STATUS_LINE_INTERVAL:g} s otherwise")
    return parser


def config_from_arguments(arguments: argparse.Namespace) -> BrokerConfig | str:
    """The configuration the arguments ask for, or what is wrong with them."""
    values = {item.name: getattr(arguments, item.name)
              for item in fields(BrokerConfig) if "help" in item.metadata}
    if values["edge"]:
        if values["client_port"] is not None:
            return "an edge has no event port: give only CLIENT_PORT"
        values["client_port"], values["event_port"] = values["event_port"], None
    for name in ("event_port", "client_port"):
        if values[name] is None:
            values[name] = getattr(DEFAULTS, name)
    config = BrokerConfig(**values)
    return config.problem() or config


def main(argv: list[str] | None = None) -> int:
    """The command line (`python3 mbroker.py --help`); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["console"]:
        return console(argv[1:])
    arguments = build_argument_parser().parse_args(argv)
    config = config_from_arguments(arguments)
    if isinstance(config, str):
        print(f"mbroker: {config}", file=sys.stderr)
        return 2
    logging.basicConfig(level=arguments.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    gc.set_threshold(GC_YOUNGEST_THRESHOLD, *gc.get_threshold()[1:])  # this process is ours
    broker = Broker(config)
    broker.install_signal_handlers()
    try:
        broker.open()
    except (PortError, LogError, MetricsUnavailable) as error:
        print(f"mbroker: {error}", file=sys.stderr)
        return 2
    dashboard = make_dashboard() if arguments.dashboard else None
    if dashboard is not None:
        broker.observers.append(dashboard)
    if isinstance(dashboard, LiveDashboard):
        dashboard.route_logging()  # log lines print above the live view
    try:
        broker.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if isinstance(dashboard, LiveDashboard):
            dashboard.stop()  # the last frame stays; the cursor and logging come back
    log.info("stopped")
    return 0


_serving: list[Broker] = []  # the brokers serve() runs, for stop()


def serve(event_port: int = DEFAULTS.event_port, client_port: int = DEFAULTS.client_port,
          **options) -> None:
    """Run a broker in the calling thread, as the command line does, until
    SIGINT/SIGTERM (handled in the main thread only) or stop(); then drain
    and return. Options are BrokerConfig's fields, by the same names as the
    command line's (max_pending=..., log=..., metrics_port=...). Logging is
    the caller's: configure the "mbroker" logger as you like.

    Raises ValueError for a bad option, PortError for a busy port, LogError
    or MetricsUnavailable when --log or --metrics-port cannot be served.
    """
    config = BrokerConfig(event_port=event_port, client_port=client_port, **options)
    problem = config.problem()
    if problem:
        raise ValueError(problem)
    broker = Broker(config)
    if threading.current_thread() is threading.main_thread():
        broker.install_signal_handlers()
    _serving.append(broker)
    try:
        broker.open()
        broker.serve_forever()
    finally:
        _serving.remove(broker)


def stop() -> None:
    """Drain and stop every broker serve() runs; safe from any thread."""
    for broker in list(_serving):
        broker.request_stop()


class RunningBroker:
    """A broker serving on a background thread; see running()."""

    def __init__(self, config: BrokerConfig):
        self.broker = Broker(config)
        self.broker.open()
        self.event_port = self.broker.event_port
        self.client_port = self.broker.client_port
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"mbroker:{self.event_port}")
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.broker.serve_forever()
        except BaseException as error:  # handed to the thread that calls stop()
            self._error = error

    def stats(self, top_clients: int | None = 20, timeout: float = 5.0) -> BrokerStats:
        """A snapshot taken on the broker's own thread."""
        return self.broker.snapshot(timeout, top_clients)

    def stop(self, timeout: float | None = None) -> None:
        """Drain and stop (as SIGTERM would); re-raise any error of the loop."""
        self.broker.request_stop()
        self._thread.join(timeout if timeout is not None
                          else self.broker.config.drain_timeout + 5.0)
        if self._thread.is_alive():
            raise TimeoutError("the broker did not stop in time")
        if self._error is not None:
            error, self._error = self._error, None
            raise error


@contextlib.contextmanager
def running(event_port: int = 0, client_port: int = 0, **options) -> Iterator[RunningBroker]:
    """A broker on a background thread for the with block: its ports listen
    (port 0: any free one; read .event_port and .client_port) when the block
    starts; .stats() gives a BrokerStats taken on its thread; leaving the
    block, or .stop(), drains and stops it and re-raises any error from its
    loop. Options are BrokerConfig's fields, as for serve(). Any number may
    run at once."""
    config = BrokerConfig(event_port=event_port, client_port=client_port, **options)
    problem = config.problem()
    if problem:
        raise ValueError(problem)
    broker = RunningBroker(config)
    try:
        yield broker
    finally:
        broker.stop()


class Playground:
    """An exchange to feed by hand: event lines in, who was notified out.

    The broker's own core (pipeline, reorder buffer, exchange) with
    in-memory subscribers instead of sockets; it wraps them and changes
    nothing in them, so it costs the broker nothing. Lines may be str or
    bytes, with or without their terminator ("\\n" is added when missing).
    """

    def __init__(self, connected=(), **options):
        self.config = BrokerConfig(**options)
        self.exchange = Exchange(self.config.max_follows)
        self.pipeline = EventPipeline(self.exchange, self.config)
        self._subscribers: dict[int, Subscriber] = {}
        for user_id in connected:
            self.connect(user_id)

    def connect(self, user_id: int) -> None:
        """User user_id connects: it receives what is dispatched from now on."""
        if user_id not in self._subscribers:
            self._subscribers[user_id] = Subscriber(user_id)
            self.exchange.subscribe(user_id, self._subscribers[user_id])

    def disconnect(self, user_id: int) -> None:
        subscriber = self._subscribers.pop(user_id, None)
        if subscriber is not None:
            self.exchange.unsubscribe(user_id, subscriber)

    @property
    def connected(self) -> list[int]:
        return sorted(self._subscribers)

    def send(self, *lines) -> dict[int, list]:
        """Feed event lines; returns {user: [the lines it was notified of]}
        for what they released (the lines as str when given as str)."""
        as_text = bool(lines) and isinstance(lines[0], str)
        for line in lines:
            line = line if isinstance(line, bytes) else line.encode()
            self.pipeline.feed(line if line.endswith(b"\n") else line + b"\n")
        notified = {}
        for user_id, subscriber in self._subscribers.items():
            received = subscriber.take_bytes().splitlines()
            if received:
                notified[user_id] = [line.decode() if as_text else line
                                     for line in received]
        return dict(sorted(notified.items()))

    @property
    def follows(self) -> dict[int, list[int]]:
        """The follow graph: {follower: the users it follows}, sorted."""
        return {follower: sorted(followed)
                for follower, followed in sorted(self.exchange.follow_graph())}

    def followers_of(self, user_id: int) -> list[int]:
        return sorted(self.exchange.followers_of(user_id))

    @property
    def next_seq(self) -> int:
        return self.pipeline.reorder.next_seq

    @property
    def waiting(self) -> int:
        """Events held in the reorder buffer for a missing lower number."""
        return len(self.pipeline.reorder)


CONSOLE_BANNER = """\
mbroker {version} console: the names of mbroker are imported. Try
    play = Playground(connected=[1, 2])
    play.send("1|F|1|2", "2|S|2")     # who is notified of what
    play.follows                       # the follow graph
    with running() as broker: ...      # a broker on free ports, for a socket
Ctrl-D leaves."""


def console(argv: list[str] | None = None) -> int:
    """`python3 -m mbroker console`: an interactive prompt with mbroker's names."""
    import code

    names = {name: globals()[name] for name in __all__}
    names["mbroker"] = sys.modules[__name__]
    code.interact(banner=CONSOLE_BANNER.format(version=__version__), local=names,
                  exitmsg="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
