#!/usr/bin/env python3
"""mbroker: a single-threaded follower-maze message broker.

One event source pushes a numbered, out-of-order stream of events; many user
clients each represent one user. mbroker restores sequence order, keeps the
follow graph, and forwards each event, byte for byte, to the clients it
concerns. The behaviour contract is SPEC.md; README.md maps this file.

    python mbroker.py [EVENT_PORT [CLIENT_PORT]]     # defaults 9090 9099

The file is cut into sections, each opened by the rules it keeps:
configuration, protocol, reorder buffer, exchange, transport, reactor,
stats and dashboard, command line. Only transport and reactor touch sockets.
"""

from __future__ import annotations

import argparse
import enum
import errno
import heapq
import logging
import os
import select
import selectors
import signal
import socket
import sys
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, fields
from itertools import compress

__all__ = [
    "BrokerConfig", "LineSplitter", "MalformedLine", "parse_event", "parse_user_id",
    "ReorderBuffer", "Exchange", "EventPipeline", "CloseReason", "Broker", "main",
    "render_dashboard", "LiveDashboard", "make_dashboard",
]

log = logging.getLogger("mbroker")

# Sequence numbers and user ids may have any number of digits. CPython caps
# int() at 4300 digits to stop quadratic parsing; --max-line already bounds
# every field we parse, so the cap only gets in the way.
sys.set_int_max_str_digits(0)


# ============================================================================
# Configuration
#
# Every limit the broker enforces lives here, with its default, and nowhere
# else: the command line, the README and the tests all read these defaults.
# ============================================================================

MIB = 1024 * 1024


@dataclass
class BrokerConfig:
    """Every tunable of the broker; field metadata doubles as --help text."""

    host: str = "127.0.0.1"
    event_port: int = 9090
    client_port: int = 9099
    max_line: int = 4096
    max_pending: int = 1_000_000
    hello_timeout: float = 10.0
    max_client_buffer: int = 16 * MIB
    write_timeout: float = 10.0
    max_buffered: int = 256 * MIB
    drain_timeout: float = 5.0
    max_follows: int = 10_000_000
    # How much the source socket is read per wake-up; how many lines the core
    # takes at a time (a slice's objects should stay in the CPU's cache); and
    # how many lines are dispatched before output is flushed, one send per
    # client, and the limits are checked again.
    read_size: int = 256 * 1024
    dispatch_slice: int = 1024
    flush_lines: int = 4096


# ============================================================================
# Protocol
#
# Rules: bytes in, lines and parsed tuples out; no sockets, no clocks.
# A line is everything before a b"\n"; a b"\r" before the b"\n" stays on the
# line, because clients must receive exactly what the source sent. A line
# longer than max_line is never buffered whole: the splitter drops bytes
# until the next b"\n". Numbers are ASCII digits only (str.isdigit on bytes
# is ASCII-only), compared as integers.
# ============================================================================

FOLLOW, UNFOLLOW, BROADCAST, PRIVATE, STATUS = b"F", b"U", b"B", b"P", b"S"
FIELD_COUNTS = {FOLLOW: 4, UNFOLLOW: 4, PRIVATE: 4, STATUS: 3, BROADCAST: 2}
# The type field as it appears on the wire, mapped to the canonical constant.
KIND_FIELDS = {kind: kind for kind in FIELD_COUNTS}
# The fast path splits lines without stripping the b"\r" first, so there a
# broadcast's type field (its last) may still carry it.
BROADCAST_FIELDS = {BROADCAST, BROADCAST + b"\r"}
WIRE_FIELD_COUNTS = {**FIELD_COUNTS, BROADCAST + b"\r": 2}
TARGETED_KINDS = {FOLLOW, PRIVATE}  # the types that notify TO alone
# Bytes a well-formed chunk of events consists of, except b"\r". When a chunk
# holds nothing else, every b"\r" sits right before a b"\n", no field is
# empty and each line has at most one type letter, a line whose type field
# checks out has only digits in its numbers: int() cannot meet a sign, a
# space, an underscore, a stray b"\r", a letter or nothing, and so is exactly
# as strict as the spec's "ASCII digits only" while costing one C call.
PLAIN_EVENT_BYTES = b"0123456789|\nFUBPS"
EMPTY_FIELD_MARKS = (b"||", b"|\n", b"|\r", b"\n|")
# And no line may hold two type letters: with every letter mapped to b"L" and
# all but letters and b"\n" deleted, b"LL" marks a line with a letter in a
# number, which the hot path would otherwise take for a well-formed event.
LETTERS_AS_L = bytes.maketrans(b"FUBPS", b"LLLLL")
NOT_LETTERS = b"0123456789|\r"
# A consumed malformed SEQ, as the exchange sees it: a split line of no type.
NO_OP = (b"", b"")
MAX_HELLO_LINE = 64
MAX_USER_ID_DIGITS = 32


class MalformedLine(ValueError):
    """An event line that does not parse; `seq` is None when even SEQ is bad."""

    def __init__(self, seq: int | None, reason: str):
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


class LineSplitter:
    """Cuts a byte stream into lines (without their b"\\n") across any reads."""

    __slots__ = ("discarding", "max_line", "overlong", "partial", "plain")

    def __init__(self, max_line: int = 4096):
        self.max_line = max_line
        self.partial = b""
        self.discarding = False  # inside an overlong line, dropping to its end
        self.overlong = 0  # lines dropped for length, ever
        self.plain = True  # the last split's lines hold only plain event bytes

    def split(self, data: bytes) -> list[bytes]:
        if self.discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return []
            data = data[newline + 1:]
            self.discarding = False
        if self.partial:
            data = self.partial + data
        lines = data.split(b"\n")
        tail = lines.pop()
        # See PLAIN_EVENT_BYTES: the lines are plain when nothing but event
        # bytes appear and every b"\r" ends a line (those in the unfinished
        # tail are judged with the read that finishes it).
        stray = data.translate(None, PLAIN_EVENT_BYTES)
        self.plain = (
            not stray
            or stray.count(b"\r") == len(stray) == data.count(b"\r\n") + tail.count(b"\r")
        ) and not data.startswith(b"|") and not any(mark in data for mark in EMPTY_FIELD_MARKS) \
            and b"LL" not in data.translate(LETTERS_AS_L, NOT_LETTERS)
        if len(tail) > self.max_line:
            self.overlong += 1
            self.partial = b""
            self.discarding = True
        else:
            self.partial = tail
        # Only a chunk longer than max_line can hold an overlong line, so the
        # common case pays one C-level max() and no Python loop.
        limit = self.max_line
        if len(data) > limit and lines and max(map(len, lines)) > limit:
            kept = [line for line in lines if len(line) <= limit]
            self.overlong += len(lines) - len(kept)
            lines = kept
        return lines

    def reset(self) -> None:
        """Forget an unterminated line: a new connection never continues it."""
        self.partial = b""
        self.discarding = False


def _parse_number(field: bytes, what: str, seq: int | None) -> int:
    if not field.isdigit():
        raise MalformedLine(seq, f"{what} is not a decimal number: {field[:40]!r}")
    return int(field)


def parse_event(line: bytes) -> tuple[int, bytes, int | None, int | None]:
    """Parse one line (no b"\\n") into (seq, kind, from_user, to_user).

    Raises MalformedLine; its `seq` is set when SEQ itself was valid, so the
    caller can consume that number as a no-op and keep the stream moving.
    """
    body = line[:-1] if line[-1:] == b"\r" else line
    parts = body.split(b"|")
    seq_field = parts[0]
    if not seq_field.isdigit():
        raise MalformedLine(None, f"no valid sequence number in {line[:60]!r}")
    seq = int(seq_field)
    if seq == 0:
        raise MalformedLine(None, "sequence number 0: numbers start at 1")
    if len(parts) < 2:
        raise MalformedLine(seq, "no event type")
    kind = KIND_FIELDS.get(parts[1])
    if kind is None:
        raise MalformedLine(seq, f"unknown event type {parts[1][:20]!r}")
    expected = FIELD_COUNTS[kind]
    if len(parts) != expected:
        raise MalformedLine(seq, f"type {kind.decode()} takes {expected} fields, got {len(parts)}")
    if expected == 2:
        return seq, kind, None, None
    from_user = _parse_number(parts[2], "FROM", seq)
    if expected == 3:
        return seq, kind, from_user, None
    return seq, kind, from_user, _parse_number(parts[3], "TO", seq)


def parse_user_id(line: bytes) -> int:
    """A client's hello line (no b"\\n") to its user id; ValueError if invalid."""
    if len(line) > MAX_HELLO_LINE:
        raise ValueError(f"hello line over {MAX_HELLO_LINE} bytes")
    text = line.strip(b" \t\r")
    if not text.isdigit():
        raise ValueError(f"user id is not a decimal number: {text[:MAX_HELLO_LINE]!r}")
    if len(text) > MAX_USER_ID_DIGITS:
        raise ValueError(f"user id longer than {MAX_USER_ID_DIGITS} digits")
    return int(text)


class RateLimitedLog:
    """At most `burst` lines per key per `window` seconds; the rest are
    counted and summarised on the next line that gets through, so a flood of
    bad input cannot flood the log or slow the loop."""

    def __init__(self, logger: logging.Logger, burst: int = 10, window: float = 5.0,
                 clock=time.monotonic):
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
# Rules: hands out items strictly in sequence order, each SEQ at most once.
# Memory is bounded by max_pending: past it, the lowest gap is declared lost
# (one range, however wide) and delivery resumes. Numbers below next_seq are
# duplicates (or late arrivals of lost numbers) and are dropped.
# ============================================================================


class ReorderBuffer:
    __slots__ = ("next_seq", "highest_seq", "pending", "max_pending", "largest_depth",
                 "duplicates", "late", "skipped", "skipped_ranges", "_lowest_heap",
                 "_lost_below")

    def __init__(self, max_pending: int = 1_000_000, first_seq: int = 1):
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.max_pending = max_pending
        self.next_seq = first_seq
        self.highest_seq = 0
        self.pending: dict[int, object] = {}
        self.largest_depth = 0
        self.duplicates = 0
        self.late = 0  # numbers that arrived after being declared lost
        self.skipped = 0  # numbers declared lost, in total
        # Ranges declared lost and not yet logged: the pipeline takes them after
        # each slice. Past 64, new ranges merge into the last entry, so one
        # huge slice of gaps costs a bounded list and a bounded log.
        self.skipped_ranges: list[tuple[int, int]] = []
        # The lowest pending SEQ is only needed when the buffer overflows, so
        # a heap of pending numbers is kept only while it is nearly full.
        self._lowest_heap: list[int] | None = None
        self._lost_below: list[tuple[int, int]] = []  # ranges declared lost

    def push(self, seq: int, item) -> list:
        """Offer one item; returns the items now deliverable, in order."""
        if seq > self.highest_seq:
            self.highest_seq = seq
        next_seq = self.next_seq
        if seq == next_seq:
            pending = self.pending
            if not pending:
                self.next_seq = seq + 1
                return [item]
            ready = [item]
            seq += 1
            while seq in pending:
                ready.append(pending.pop(seq))
                seq += 1
            self.next_seq = seq
            self._relax_heap()
            return ready
        if seq < next_seq or seq in self.pending:
            self.count_resent(seq)
            return []
        pending = self.pending
        pending[seq] = item
        depth = len(pending)
        if depth > self.largest_depth:
            self.largest_depth = depth
        heap = self._lowest_heap
        if heap is not None:
            heapq.heappush(heap, seq)
            # Delivered numbers stay in the heap until an overflow pops them;
            # rebuild before they outnumber the live ones, or it grows forever.
            if len(heap) > 2 * depth + 1024:
                self._lowest_heap = list(pending)
                heapq.heapify(self._lowest_heap)
        elif depth * 2 >= self.max_pending:
            self._lowest_heap = list(pending)
            heapq.heapify(self._lowest_heap)
        if depth > self.max_pending:
            return self._skip_lowest_gap()
        return []

    def count_resent(self, seq: int) -> None:
        """Count a number that was delivered, is waiting, or was declared lost."""
        if seq < self.next_seq and self._was_lost(seq):
            self.late += 1
        else:
            self.duplicates += 1

    def _skip_lowest_gap(self) -> list:
        lowest = self._lowest_pending()
        first_lost, last_lost = self.next_seq, lowest - 1
        self.skipped += lowest - first_lost
        ranges = self.skipped_ranges
        if len(ranges) < 64:
            ranges.append((first_lost, last_lost))
        else:
            ranges[-1] = (ranges[-1][0], last_lost)
        self._remember_lost(first_lost, last_lost)
        self.next_seq = lowest
        pending = self.pending
        ready = []
        seq = lowest
        while seq in pending:
            ready.append(pending.pop(seq))
            seq += 1
        self.next_seq = seq
        self._relax_heap()
        return ready

    def _lowest_pending(self) -> int:
        heap = self._lowest_heap
        pending = self.pending
        if heap is None or len(heap) > 2 * len(pending) + 1024:
            heap = self._lowest_heap = list(pending)
            heapq.heapify(heap)
        while heap[0] not in pending:
            heapq.heappop(heap)
        return heap[0]

    def _relax_heap(self) -> None:
        if self._lowest_heap is not None and len(self.pending) * 4 < self.max_pending:
            self._lowest_heap = None

    # Lost ranges are remembered (a bounded number of them) only to tell a
    # late arrival from a true duplicate in the counters.
    def _remember_lost(self, first: int, last: int) -> None:
        self._lost_below.append((first, last))
        if len(self._lost_below) > 1024:
            del self._lost_below[:512]

    def _was_lost(self, seq: int) -> bool:
        return any(first <= seq <= last for first, last in reversed(self._lost_below))

    def __len__(self) -> int:
        return len(self.pending)


# ============================================================================
# Exchange
#
# Rules: the follow graph and the routing table, applied strictly in
# sequence order. Follow state is kept for every user, connected or not.
# A subscriber is any object with a `lines` list: dispatch appends the raw
# line to it and records the subscriber in `touched`, and the transport turns
# the lines into bytes later, so many notifications leave in one send.
# ============================================================================


class Subscriber:
    """An in-memory subscriber, for tests and benchmarks: it only collects."""

    __slots__ = ("user_id", "lines")

    def __init__(self, user_id: int):
        self.user_id = user_id
        self.lines: list[bytes] = []

    def take_bytes(self) -> bytes:
        """What the transport would send: every queued line plus b"\\n"."""
        lines, self.lines = self.lines, []
        return b"".join(line + b"\n" for line in lines)


class Exchange:
    def __init__(self, max_follows: int = 10_000_000):
        self.max_follows = max_follows
        # The follow graph by follower, for every user; and, for status
        # updates, an index of only the followers that are connected: a status
        # update then costs its notifications, not a walk over every follower.
        self.following: dict[int, set[int]] = {}  # follower -> the users it follows
        self.watchers: dict[int, set[int]] = {}  # followed user -> connected followers
        self.follow_count = 0
        self.follows_refused = 0
        self.routes: dict[int, list] = {}  # user id -> its connected subscribers
        self.connected_users: set[int] = set()  # the keys of routes, as a set
        self.subscribers: dict[object, None] = {}  # every registered subscriber
        self.touched: set = set()  # subscribers with lines since the last flush
        self.notifications = 0
        self.dispatched = 0
        self.queued_fanout = 0  # bytes broadcasts and status updates queued since take_output

    # -- registration --------------------------------------------------------

    def subscribe(self, user_id: int, subscriber) -> None:
        same_user = self.routes.get(user_id)
        if same_user is None:
            same_user = self.routes[user_id] = []
            self.connected_users.add(user_id)
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
                self.connected_users.discard(user_id)
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
        field may carry the b"\\r" of its terminator: int() ignores it, and the
        joined line is the exact line the source sent. NO_OP stands for a consumed malformed SEQ.
        The pipeline hands over a whole slice at once, so this loop, not a
        call per event, is the hot path.

        budget bounds the bytes that broadcasts and status updates queue
        between two take_output() calls: once they pass it, the rest of the
        events are returned, not applied, so the caller can send what is
        queued and check its limits first. (The other types queue one line per
        connection of one user, which the caller's lines between flushes
        already bound.)
        """
        following = self.following
        watchers = self.watchers
        routes = self.routes
        connected_users = self.connected_users
        touch = self.touched.add
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
                    from_user = int(split_line[2])
                    followed = following.get(from_user)
                    if followed is None or to_user not in followed:
                        if self.follow_count < self.max_follows:
                            if followed is None:
                                followed = following[from_user] = set()
                            followed.add(to_user)
                            self.follow_count += 1
                            if from_user in connected_users:
                                self._watch(to_user, from_user)
                        else:
                            # Refused before any set is made: a refused follow
                            # must cost no memory, or the cap would mean nothing.
                            self.follows_refused += 1
                targets = routes.get(to_user)
                if targets is not None:
                    raw = b"|".join(split_line)
                    for target in targets:
                        target.lines.append(raw)
                        touch(target)
                    delivered += len(targets)
            elif kind == STATUS:
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
                    fanout_bytes += (delivered - reached) * len(raw)
                    if fanout_bytes > budget:
                        held = list(remaining)
                        break
            elif kind == UNFOLLOW:
                from_user = int(split_line[2])
                followed = following.get(from_user)
                if followed is not None:
                    to_user = int(split_line[3])
                    if to_user in followed:
                        followed.remove(to_user)
                        self.follow_count -= 1
                        if not followed:
                            del following[from_user]
                        if from_user in connected_users:
                            self._unwatch(to_user, from_user)
            elif kind in BROADCAST_FIELDS:
                raw = b"|".join(split_line)
                subscribers = self.subscribers
                for target in subscribers:
                    target.lines.append(raw)
                self.touched.update(subscribers)
                delivered += len(subscribers)
                fanout_bytes += len(subscribers) * len(raw)
                if fanout_bytes > budget:
                    held = list(remaining)
                    break
        self.notifications += delivered
        self.dispatched += len(events) - len(held)
        self.queued_fanout = fanout_bytes
        return held

    def take_output(self) -> list[tuple[object, bytes, int]]:
        """(subscriber, bytes, notifications) for each subscriber touched since
        the last call: its new lines joined into one buffer, each line with
        the b"\n" the splitter took off, so it can leave in one send."""
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

    def followers_of(self, user_id: int) -> set[int]:
        """Every follower of user_id, connected or not (a full walk: for tests)."""
        return {follower for follower, followed in self.following.items() if user_id in followed}


class EventPipeline:
    """Bytes from the event source in, dispatched events out.

    `receive` splits bytes into lines and queues them; `run` parses, reorders
    and dispatches up to a budget of lines, so the reactor can flush output
    and check its limits between slices. `feed` does both, for tests.
    """

    def __init__(self, exchange: Exchange, max_line: int = 4096,
                 max_pending: int = 1_000_000, problems: RateLimitedLog | None = None,
                 fanout_budget: int | None = None):
        self.exchange = exchange
        self.splitter = LineSplitter(max_line)
        self.reorder = ReorderBuffer(max_pending)
        self.problems = problems or RateLimitedLog(log)
        self.events_in = 0  # lines with a valid SEQ
        self.malformed = 0  # valid SEQ, rest unparsable: consumed as no-op
        self.unsequenced = 0  # no valid SEQ: dropped
        self._backlog: list[bytes] = []
        self._backlog_clean = True  # see PLAIN_EVENT_BYTES
        self._held: list = []  # in-order events the exchange held back (see run)
        self.fanout_budget = fanout_budget
        # _run_plain's slots reach this far past twice the slice: room for the
        # events a shuffled batch sends early. Later ones wait in the dict.
        self.slot_margin = 256
        self._position = 0
        self._overlong_seen = 0
        self._skipped_logged = 0

    @property
    def overlong(self) -> int:
        return self.splitter.overlong

    @property
    def holding(self) -> bool:
        """Events are held back because the fan-out budget is spent: flush first."""
        return bool(self._held)

    @property
    def backlog(self) -> int:
        return len(self._backlog) - self._position

    def receive(self, data: bytes) -> None:
        lines = self.splitter.split(data)
        if self.splitter.overlong != self._overlong_seen:
            self._overlong_seen = self.splitter.overlong
            self.problems.warning(
                "overlong", "event line longer than --max-line=%d bytes discarded (%d so far)",
                self.splitter.max_line, self._overlong_seen)
        if not lines:
            return
        clean = self.splitter.plain
        if self._position < len(self._backlog):
            self._backlog = self._backlog[self._position:] + lines
            self._backlog_clean = self._backlog_clean and clean
        else:
            self._backlog = lines
            self._backlog_clean = clean
        self._position = 0

    def end_of_stream(self) -> None:
        """The source went away: its unterminated last line is discarded."""
        self.splitter.reset()

    def run(self, max_lines: int | None = None) -> bool:
        """Dispatch queued lines, at most max_lines; True when none are left.

        Also stops early once the slice's broadcasts and status updates have
        queued fanout_budget bytes: the events already taken from the reorder
        buffer but not applied are held, and go first on the next call.
        """
        if self._held:
            held, self._held = self._held, []
            self._apply(held)
            if self._held:
                return False
        lines = self._backlog
        start = self._position
        end = len(lines) if max_lines is None else min(len(lines), start + max_lines)
        if self._backlog_clean:
            self._run_plain(lines, start, end)
        else:
            self._run_strict(lines, start, end)
        if end >= len(lines):
            self._backlog = []
            self._position = 0
        else:
            self._position = end
        self._log_skips()
        return not self._backlog and not self._held

    def _apply(self, events: list) -> None:
        """Hand in-order events to the exchange, keeping what it holds back."""
        if self._held:
            self._held.extend(events)  # behind earlier held events, in order
        elif events:
            self._held = self.exchange.apply(events, self.fanout_budget)

    def _run_plain(self, lines: list[bytes], start: int, end: int) -> None:
        """The hot path, for chunks of plain event bytes (see PLAIN_EVENT_BYTES).

        Each event of the slice is put in a list slot by its distance from
        the next expected SEQ, and the slice's run of consecutive numbers is
        then taken out with one C-level index() and slice: the same result as
        releasing event by event, since nothing else happens in between, for
        a fraction of the work. This loop runs once per event, so each
        bytecode in it is paid millions of times a second; anything unusual
        goes through _odd_line. While many events wait (a stalled gap), the
        strict path's event-by-event release, with its overflow handling,
        takes over.
        """
        reorder = self.reorder
        pending = reorder.pending
        span = 2 * (end - start) + self.slot_margin
        if reorder._lowest_heap is not None or len(pending) > 4 * span or \
                (len(pending) + end - start) * 4 >= reorder.max_pending:
            self._run_strict(lines, start, end)
            return
        base = reorder.next_seq
        slots: list = [None] * span
        if pending:  # what earlier slices left waiting: a few, or a wide batch's worth
            for seq in [seq for seq in pending if seq < base + span]:
                slots[seq - base] = pending.pop(seq)
        field_counts = WIRE_FIELD_COUNTS
        events = end - start
        for line in lines[start:end]:
            event = line.split(b"|")
            try:
                if field_counts[event[1]] != len(event):
                    raise ValueError
                seq = int(event[0])
            except (ValueError, KeyError, IndexError):
                seq, event = self._odd_line(line, slots)
                if event is None:
                    events -= 1
                    continue
            index = seq - base
            if index >= span or index < 0:
                if seq == 0:  # no valid SEQ: the strict parser words and counts it
                    self._odd_line(line, slots)
                    events -= 1
                elif index < 0 or pending.setdefault(seq, event) is not event:
                    reorder.count_resent(seq)
            elif slots[index] is None:
                slots[index] = event
            else:
                reorder.count_resent(seq)
        self.events_in += events
        try:
            ready = slots.index(None)
        except ValueError:  # every slot filled: the run may go on past them
            ready = span
            while base + ready in pending:
                slots.append(pending.pop(base + ready))
                ready += 1
        waiting = slots[ready:]
        if waiting.count(None) != len(waiting):
            numbers = range(base + ready, base + span)
            pending.update(compress(zip(numbers, waiting, strict=True), waiting))
        reorder.next_seq = base + ready
        highest = max(pending) if pending else base + ready - 1
        if highest > reorder.highest_seq:
            reorder.highest_seq = highest
        if len(pending) > reorder.largest_depth:
            reorder.largest_depth = len(pending)
        if ready:
            del slots[ready:]
            self._apply(slots)

    def _run_strict(self, lines: list[bytes], start: int, end: int) -> None:
        """Every line through parse_event and the reorder buffer, one by one."""
        reorder = self.reorder
        events = 0
        for index in range(start, end):
            seq, event = self._odd_line(lines[index])
            if event is not None:
                events += 1
                self._apply(reorder.push(seq, event))
        self.events_in += events

    def _odd_line(self, line: bytes, slots: list | None = None) -> tuple:
        """One line through parse_event, with exact errors for the log.

        Returns (seq, the split line) for a valid event, (seq, NO_OP) for a
        line whose SEQ is valid and the rest not, and (None, None) for a line
        to drop. A malformed line whose SEQ was already seen is a resend,
        counted as a duplicate by the caller whatever its body, not as
        malformed. slots: _run_plain's slots for the waiting events, if any.
        """
        if not line or line == b"\r":
            return None, None
        reorder = self.reorder
        try:
            seq = parse_event(line)[0]
        except MalformedLine as problem:
            if problem.seq is None:
                self.unsequenced += 1
                self.problems.warning("unsequenced", "event line dropped: %s", problem.reason)
                return None, None
            seq = problem.seq
            index = seq - reorder.next_seq
            resent = index < 0 or seq in reorder.pending or (
                slots is not None and index < len(slots) and slots[index] is not None)
            if not resent:
                self.malformed += 1
                self.problems.warning("malformed", "event %d consumed as a no-op: %s",
                                      seq, problem.reason)
            return seq, NO_OP
        return seq, line.split(b"|")

    def feed(self, data: bytes) -> None:
        self.receive(data)
        self.run()

    def _log_skips(self) -> None:
        reorder = self.reorder
        ranges = reorder.skipped_ranges
        if not ranges:
            return
        lost = reorder.skipped - self._skipped_logged
        self._skipped_logged = reorder.skipped
        if len(ranges) <= 8 and lost == sum(last - first + 1 for first, last in ranges):
            for first, last in ranges:
                log.warning("reorder buffer full (--max-pending=%d): sequence numbers %d..%d "
                            "declared lost (%d numbers); delivery resumes at %d",
                            reorder.max_pending, first, last, last - first + 1, last + 1)
        else:
            log.warning("reorder buffer full (--max-pending=%d): %d sequence numbers in "
                        "gaps between %d..%d declared lost; delivery resumes at %d",
                        reorder.max_pending, lost, ranges[0][0], ranges[-1][1],
                        reorder.next_seq)
        ranges.clear()


# ============================================================================
# Transport
#
# Rules: sockets are nonblocking; nothing here ever waits. The write path
# tries to send at once, queues what the kernel will not take, and watches
# EVENT_WRITE only while bytes are queued. Every close names a CloseReason,
# which the logs, the counters and the dashboard all speak.
# ============================================================================


class CloseReason(enum.Enum):
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


def _peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ClientConnection:
    """One user-client socket: its hello state and its outbound bytes."""

    __slots__ = ("sock", "fd", "peer", "user_id", "lines", "outbound", "hello",
                 "connected_at", "last_progress", "notifications_queued",
                 "notifications_sent", "bytes_sent", "closed")

    def __init__(self, sock: socket.socket, peer: str, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.user_id: int | None = None  # set once the hello line is read
        self.lines: list[bytes] = []  # notifications dispatched, not yet bytes
        self.outbound = bytearray()  # bytes the kernel has not taken yet
        self.hello = b""
        self.connected_at = now
        self.last_progress = now
        self.notifications_queued = 0  # ever handed to this connection
        self.notifications_sent = 0  # ever fully written to the kernel
        self.bytes_sent = 0
        self.closed = False

    def describe(self) -> str:
        user = "unregistered" if self.user_id is None else f"user {self.user_id}"
        return f"client {self.peer} ({user})"


class SourceConnection:
    __slots__ = ("sock", "fd", "peer", "connected_at", "bytes_read", "closed")

    def __init__(self, sock: socket.socket, peer: str, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.connected_at = now
        self.bytes_read = 0
        self.closed = False


def open_listener(host: str, port: int, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Reuse lets a restarted broker bind over TIME_WAIT; on Linux it does
        # not let two listeners share a port, so "in use" is still caught.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# ============================================================================
# Reactor
#
# Rules: one thread drives everything. A wake-up reads what is ready,
# dispatches in slices, flushes every touched client once per flush_lines
# lines (sooner when the fan-out budget is spent), and checks the limits;
# timers (hello and write timeouts, accept retry, the dashboard) run from the
# same loop and bound the select timeout. State is only ever changed here, so
# nothing needs a lock.
# ============================================================================

ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# accept(2) passes on errors of the connection being accepted; the man page's
# advice is to treat them like EAGAIN and go on with the next one.
ACCEPT_SKIP_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                      errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                      errno.ENETUNREACH, errno.EPERM, errno.EINTR}
HOUSEKEEPING_INTERVAL = 0.25
ACCEPT_RETRY_DELAY = 0.5
RECENTLY_CLOSED = 32


class Broker:
    def __init__(self, config: BrokerConfig | None = None):
        self.config = config = config or BrokerConfig()
        self.selector = selectors.DefaultSelector()
        self.problems = RateLimitedLog(log)
        self.exchange = Exchange(config.max_follows)
        # Bytes of broadcasts and status updates one slice may queue before it
        # stops early: with thousands of clients, a slice of broadcasts would
        # otherwise queue gigabytes before --max-buffered is checked again.
        fanout_budget = max(64 * 1024, config.max_buffered // 8)
        self.pipeline = EventPipeline(self.exchange, config.max_line, config.max_pending,
                                      self.problems, fanout_budget)
        self.event_listener: socket.socket | None = None
        self.client_listener: socket.socket | None = None
        self.source: SourceConnection | None = None
        self.clients: dict[int, ClientConnection] = {}  # fd -> every client connection
        self.awaiting_hello: dict[int, ClientConnection] = {}
        self.backlogged: set[ClientConnection] = set()  # clients with bytes queued
        self.total_buffered = 0
        self.source_paused = False  # by backpressure (--max-buffered)
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.stopping = False
        self.stop_deadline = 0.0
        self.running = False
        self.close_counts: dict[str, int] = {reason.value: 0 for reason in CloseReason}
        self.recently_closed: deque[dict] = deque(maxlen=RECENTLY_CLOSED)
        self.accept_errors = 0
        self.source_connections = 0
        self.bytes_out = 0
        self._accept_paused_until: dict[socket.socket, float] = {}
        self._next_housekeeping = 0.0
        self._wakeup_reader: socket.socket | None = None
        self._wakeup_writer: socket.socket | None = None
        self.observers: list = []  # called as observer(broker, now) on each housekeeping tick
        self._signals_seen = 0
        self._handles_signals = False
        self._spare_descriptor: int | None = None
        self._calls_from_other_threads: deque = deque()
        self._rate_samples: deque[tuple[float, int, int, int, int]] = deque(maxlen=16)

    # -- lifecycle -----------------------------------------------------------

    def bind(self) -> None:
        """Open both listeners; OSError names the port that failed."""
        config = self.config
        for attribute, port in (("event_listener", config.event_port),
                                ("client_listener", config.client_port)):
            try:
                listener = open_listener(config.host, port)
            except OSError as error:
                self.close_listeners()
                raise PortError(config.host, port, error) from error
            setattr(self, attribute, listener)
        self.selector.register(self.event_listener, selectors.EVENT_READ,
                               (self._on_event_listener, self.event_listener))
        self.selector.register(self.client_listener, selectors.EVENT_READ,
                               (self._on_client_listener, self.client_listener))
        self._wakeup_reader, self._wakeup_writer = socket.socketpair()
        self._wakeup_reader.setblocking(False)
        self._wakeup_writer.setblocking(False)
        self.selector.register(self._wakeup_reader, selectors.EVENT_READ,
                               (self._on_wakeup, self._wakeup_reader))
        if self._handles_signals:
            signal.set_wakeup_fd(self._wakeup_writer.fileno(), warn_on_full_buffer=False)
        self._take_spare_descriptor()
        log.info("listening events=%s:%d clients=%s:%d", config.host, self.event_port,
                 config.host, self.client_port)

    @property
    def event_port(self) -> int:
        return self.event_listener.getsockname()[1] if self.event_listener else 0

    @property
    def client_port(self) -> int:
        return self.client_listener.getsockname()[1] if self.client_listener else 0

    def wake(self) -> None:
        """Safe from a signal handler or another thread: interrupt select()."""
        if self._wakeup_writer is not None:
            try:
                self._wakeup_writer.send(b"\0")
            except OSError:
                pass

    def request_stop(self) -> None:
        """First call: drain and stop. Called again while draining: stop now."""
        if self.stopping:
            self.stop_deadline = 0.0
        self.stopping = True
        self.wake()

    def handle_signal(self, signum, frame) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1:
            # The operator insists: no drain, no cleanup beyond the kernel's,
            # except giving a terminal its cursor back if the live view hid it.
            if self.observers and sys.stdout.isatty():
                os.write(sys.stdout.fileno(), b"\x1b[?25h\n")
            os._exit(128 + signum)
        self.request_stop()

    def call_in_loop(self, function) -> None:
        """Run function() on the loop's thread soon; safe from any thread.

        The one door for other threads (tests, embedders): the loop owns
        every piece of state, so others ask it rather than read it.
        """
        self._calls_from_other_threads.append(function)
        self.wake()

    def snapshot(self, timeout: float = 5.0, top_clients: int | None = 20) -> dict:
        """stats(), taken on the loop's thread; for callers on other threads."""
        if not self.running:
            return self.stats(top_clients)
        result = Future()
        self.call_in_loop(lambda: result.set_result(self.stats(top_clients)))
        return result.result(timeout)

    def install_signal_handlers(self) -> None:
        """Main thread only. Call before bind(): once the "listening" line is
        out, a signal must already mean a clean stop, not a traceback."""
        signal.signal(signal.SIGINT, self.handle_signal)
        signal.signal(signal.SIGTERM, self.handle_signal)
        self._handles_signals = True
        if self._wakeup_writer is not None:
            signal.set_wakeup_fd(self._wakeup_writer.fileno(), warn_on_full_buffer=False)

    def serve_forever(self) -> None:
        if self.event_listener is None:
            self.bind()
        self.running = True
        try:
            while True:
                if self.stopping and self._drain_step():
                    break
                timeout = self._housekeeping_timeout()
                for key, mask in self.selector.select(timeout):
                    handler, target = key.data
                    handler(target, mask)
                self._flush()
        finally:
            self._close_everything()
            self.running = False

    # -- shutdown ------------------------------------------------------------

    def _drain_step(self) -> bool:
        """Returns True when shutdown is complete."""
        now = time.monotonic()
        if self.event_listener is not None:
            log.info("stopping: no new clients or events; draining queued notifications "
                     "(up to %.1f s)", self.config.drain_timeout)
            self.stop_deadline = now + self.config.drain_timeout
            self.close_listeners()
            if self.source is not None:
                self._close_source(CloseReason.SHUTDOWN)
            for connection in list(self.awaiting_hello.values()):
                self._close_client(connection, CloseReason.SHUTDOWN)
            self._flush()
        if not self.backlogged:
            return True
        if now >= self.stop_deadline:
            log.warning("drain timeout: %d clients still had %d bytes queued",
                        len(self.backlogged), self.total_buffered)
            return True
        return False

    def close_listeners(self) -> None:
        for attribute in ("event_listener", "client_listener"):
            listener = getattr(self, attribute)
            if listener is not None:
                self._unregister(listener)
                listener.close()
                setattr(self, attribute, None)
        self._accept_paused_until.clear()

    def _close_everything(self) -> None:
        self.close_listeners()
        if self.source is not None:
            self._close_source(CloseReason.SHUTDOWN)
        for connection in list(self.clients.values()):
            self._close_client(connection, CloseReason.SHUTDOWN)
        if self._handles_signals:
            signal.set_wakeup_fd(-1)  # never let a late signal write to a reused fd
        if self._spare_descriptor is not None:
            os.close(self._spare_descriptor)
            self._spare_descriptor = None
        for sock in (self._wakeup_reader, self._wakeup_writer):
            if sock is not None:
                self._unregister(sock)
                sock.close()
        self._wakeup_reader = self._wakeup_writer = None
        self.selector.close()

    def _unregister(self, sock: socket.socket) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_wakeup(self, sock: socket.socket, mask: int) -> None:
        try:
            while sock.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        calls = self._calls_from_other_threads
        while calls:
            calls.popleft()()

    # -- accepting -----------------------------------------------------------

    def _accept_ready(self, listener: socket.socket):
        """Yield every connection already waiting; on running out of file
        descriptors, stop watching the listener for a short pause instead of
        spinning on a readable socket we cannot accept from."""
        for _ in range(1024):
            try:
                sock, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in ACCEPT_SKIP_ERRNOS:
                    continue  # that connection failed before we took it; take the next
                if error.errno in ACCEPT_ERRNOS and listener is self.event_listener \
                        and self._use_spare_descriptor(listener):
                    continue
                # Out of descriptors or memory, or anything unforeseen: keep
                # serving who is connected, and try accepting again shortly.
                self.accept_errors += 1
                port = listener.getsockname()[1]
                self.problems.warning(f"accept:{port}", "cannot accept on port %d: %s; "
                                      "retrying in %.1f s", port,
                                      os.strerror(error.errno) if error.errno else error,
                                      ACCEPT_RETRY_DELAY)
                self._unregister(listener)
                self._accept_paused_until[listener] = time.monotonic() + ACCEPT_RETRY_DELAY
                return
            sock.setblocking(False)
            yield sock

    def _use_spare_descriptor(self, listener: socket.socket) -> bool:
        """Out of descriptors while an event source knocks: clients must not
        starve the one connection that matters. Give up the descriptor kept
        spare for this, so the next accept can take its place; a new spare is
        taken on a later tick, once one is free again."""
        if self._spare_descriptor is None:
            return False
        os.close(self._spare_descriptor)
        self._spare_descriptor = None
        log.warning("out of file descriptors: using the spare one for the event source")
        return True

    def _take_spare_descriptor(self) -> None:
        if self._spare_descriptor is None:
            try:
                self._spare_descriptor = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass  # still none free; try again next tick

    def _on_client_listener(self, listener: socket.socket, mask: int) -> None:
        now = time.monotonic()
        for sock in self._accept_ready(listener):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            connection = ClientConnection(sock, _peer_name(sock), now)
            self.clients[connection.fd] = connection
            self.awaiting_hello[connection.fd] = connection
            self.selector.register(sock, selectors.EVENT_READ,
                                   (self._on_client_event, connection))
            log.debug("%s connected", connection.describe())

    def _on_event_listener(self, listener: socket.socket, mask: int) -> None:
        now = time.monotonic()
        for sock in self._accept_ready(listener):
            if self.source is not None:
                log.warning("event source %s connected; it takes over from %s",
                            _peer_name(sock), self.source.peer)
                self._close_source(CloseReason.SOURCE_REPLACED)
            self.source = SourceConnection(sock, _peer_name(sock), now)
            self.source_connections += 1
            log.info("event source %s connected; next expected sequence number %d",
                     self.source.peer, self.pipeline.reorder.next_seq)
            if not self.source_paused:
                self.selector.register(sock, selectors.EVENT_READ,
                                       (self._on_source_readable, self.source))

    # -- the event source ----------------------------------------------------

    def _on_source_readable(self, source: SourceConnection, mask: int) -> None:
        if source is not self.source:
            return  # replaced earlier in this same wake-up: its socket is closed
        try:
            data = source.sock.recv(self.config.read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._close_source(CloseReason.SOURCE_ERROR, str(error))
            return
        if not data:
            self._close_source(CloseReason.SOURCE_QUIT)
            return
        source.bytes_read += len(data)
        self.pipeline.receive(data)
        self._dispatch_backlog()

    def _dispatch_backlog(self) -> None:
        """Dispatch in slices, flushing every flush_lines, until done or paused."""
        pipeline = self.pipeline
        slice_size = self.config.dispatch_slice
        flush_lines = self.config.flush_lines
        unflushed = 0
        while not pipeline.run(slice_size):
            unflushed += slice_size
            if unflushed < flush_lines and not pipeline.holding:
                continue
            unflushed = 0
            self._flush()
            if self.total_buffered > self.config.max_buffered:
                self._pause_source()
                return
        self._flush()
        if self.total_buffered > self.config.max_buffered:
            self._pause_source()

    def _pause_source(self) -> None:
        if self.source_paused:
            return
        self.source_paused = True
        log.warning("backpressure: %d bytes queued toward clients (--max-buffered=%d); "
                    "pausing the event source", self.total_buffered, self.config.max_buffered)
        if self.source is not None:
            self._unregister(self.source.sock)

    def _maybe_resume_source(self) -> None:
        if not self.source_paused or self.total_buffered > self.config.max_buffered // 2:
            return
        if self.stopping:
            return  # a drain delivers what was dispatched; nothing more is dispatched
        self.source_paused = False
        log.info("backpressure relieved: %d bytes queued; resuming the event source",
                 self.total_buffered)
        self._dispatch_backlog()
        if not self.source_paused and self.source is not None and not self.stopping:
            self.selector.register(self.source.sock, selectors.EVENT_READ,
                                   (self._on_source_readable, self.source))

    def _close_source(self, reason: CloseReason, detail: str = "") -> None:
        source = self.source
        if source is None:
            return
        self.source = None
        source.closed = True
        self._unregister(source.sock)
        source.sock.close()
        self.pipeline.end_of_stream()
        self._record_close("source", source.peer, None, reason, detail)
        level = logging.INFO if reason in (CloseReason.SOURCE_QUIT, CloseReason.SHUTDOWN) \
            else logging.WARNING
        log.log(level, "event source %s closed: %s%s (read %d bytes; next expected "
                "sequence number %d)", source.peer, reason.value,
                f" ({detail})" if detail else "", source.bytes_read,
                self.pipeline.reorder.next_seq)

    # -- user clients --------------------------------------------------------

    def _on_client_event(self, connection: ClientConnection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and not connection.closed:
            self._write_queued(connection)
        if mask & selectors.EVENT_READ and not connection.closed:
            self._read_client(connection)

    def _read_client(self, connection: ClientConnection) -> None:
        try:
            data = connection.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._close_client(connection, CloseReason.CLIENT_ERROR, str(error))
            return
        if not data:
            self._close_client(connection, CloseReason.CLIENT_QUIT)
            return
        if connection.user_id is not None:
            return  # registered clients have nothing to say; read and discard
        hello = connection.hello + data
        newline = hello.find(b"\n")
        if newline < 0:
            if len(hello) > MAX_HELLO_LINE:
                self._close_client(connection, CloseReason.INVALID_ID,
                                   f"hello line over {MAX_HELLO_LINE} bytes")
            else:
                connection.hello = hello
            return
        try:
            user_id = parse_user_id(hello[:newline])
        except ValueError as problem:
            self._close_client(connection, CloseReason.INVALID_ID, str(problem))
            return
        connection.hello = b""
        connection.user_id = user_id
        del self.awaiting_hello[connection.fd]
        self.exchange.subscribe(user_id, connection)
        log.debug("%s registered", connection.describe())

    def _flush(self) -> None:
        """Turn each touched client's new lines into bytes and send them."""
        max_client_buffer = self.config.max_client_buffer
        for connection, data, count in self.exchange.take_output():
            if connection.closed:
                continue
            connection.notifications_queued += count
            outbound = connection.outbound
            if outbound:
                outbound += data
                self.total_buffered += len(data)
                if len(outbound) > max_client_buffer:
                    self._close_slow_consumer(connection, CloseReason.SLOW_CONSUMER_BUFFER)
                continue
            try:
                sent = connection.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                self._close_client(connection, CloseReason.CLIENT_ERROR, str(error))
                continue
            if sent:
                connection.bytes_sent += sent
                self.bytes_out += sent
                connection.notifications_sent += data.count(b"\n", 0, sent)
            if sent < len(data):
                outbound += memoryview(data)[sent:]
                self.total_buffered += len(data) - sent
                connection.last_progress = time.monotonic()
                self.backlogged.add(connection)
                self.selector.modify(connection.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                     (self._on_client_event, connection))
                if len(outbound) > max_client_buffer:
                    self._close_slow_consumer(connection, CloseReason.SLOW_CONSUMER_BUFFER)

    def _write_queued(self, connection: ClientConnection) -> None:
        outbound = connection.outbound
        try:
            sent = connection.sock.send(outbound)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._close_client(connection, CloseReason.CLIENT_ERROR, str(error))
            return
        if sent:
            connection.notifications_sent += outbound.count(b"\n", 0, sent)
            del outbound[:sent]
            connection.bytes_sent += sent
            self.bytes_out += sent
            self.total_buffered -= sent
            connection.last_progress = time.monotonic()
        if not outbound:
            self.backlogged.discard(connection)
            self.selector.modify(connection.sock, selectors.EVENT_READ,
                                 (self._on_client_event, connection))
        if self.source_paused:
            self._maybe_resume_source()

    def _close_slow_consumer(self, connection: ClientConnection, reason: CloseReason) -> None:
        detail = (f"{len(connection.outbound)} bytes queued, limit "
                  f"{self.config.max_client_buffer}" if reason is CloseReason.SLOW_CONSUMER_BUFFER
                  else f"nothing written for {self.config.write_timeout:g} s with "
                       f"{len(connection.outbound)} bytes queued")
        self._close_client(connection, reason, detail)

    def _close_client(self, connection: ClientConnection, reason: CloseReason,
                      detail: str = "") -> None:
        if connection.closed:
            return
        connection.closed = True
        self.clients.pop(connection.fd, None)
        self.awaiting_hello.pop(connection.fd, None)
        if connection.user_id is not None:
            self.exchange.unsubscribe(connection.user_id, connection)
        self.backlogged.discard(connection)
        self.total_buffered -= len(connection.outbound)
        unsent = connection.notifications_queued - connection.notifications_sent
        connection.outbound = bytearray()
        connection.lines = []
        self._unregister(connection.sock)
        connection.sock.close()
        self._record_close("client", connection.peer, connection.user_id, reason, detail)
        quiet = reason in (CloseReason.CLIENT_QUIT, CloseReason.SHUTDOWN)
        if reason in (CloseReason.HELLO_TIMEOUT, CloseReason.INVALID_ID):
            self.problems.warning(reason.value, "%s closed: %s%s", connection.describe(),
                                  reason.value, f" ({detail})" if detail else "")
        else:
            log.log(logging.INFO if quiet else logging.WARNING,
                    "%s closed: %s%s; %d notifications sent, %d not delivered",
                    connection.describe(), reason.value, f" ({detail})" if detail else "",
                    connection.notifications_sent, max(unsent, 0))
        if self.source_paused:
            self._maybe_resume_source()

    def _record_close(self, kind: str, peer: str, user_id, reason: CloseReason,
                      detail: str) -> None:
        self.close_counts[reason.value] += 1
        self.recently_closed.append({"kind": kind, "peer": peer, "user_id": user_id,
                                     "reason": reason.value, "detail": detail,
                                     "at": time.time()})

    # -- timers --------------------------------------------------------------

    def _housekeeping_timeout(self) -> float:
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._housekeeping(now)
            self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
        return max(0.0, self._next_housekeeping - now)

    def _housekeeping(self, now: float) -> None:
        hello_deadline = now - self.config.hello_timeout
        for connection in [c for c in self.awaiting_hello.values()
                           if c.connected_at <= hello_deadline]:
            self._close_client(connection, CloseReason.HELLO_TIMEOUT,
                               f"no user id within {self.config.hello_timeout:g} s")
        write_deadline = now - self.config.write_timeout
        for connection in [c for c in self.backlogged if c.last_progress <= write_deadline]:
            self._close_slow_consumer(connection, CloseReason.SLOW_CONSUMER_TIMEOUT)
        self.problems.flush()
        if not self.stopping:
            self._take_spare_descriptor()
        for listener, until in list(self._accept_paused_until.items()):
            if now >= until:
                del self._accept_paused_until[listener]
                handler = (self._on_event_listener if listener is self.event_listener
                           else self._on_client_listener)
                self.selector.register(listener, selectors.EVENT_READ, (handler, listener))
        self._rate_samples.append((now, self.pipeline.events_in, self.exchange.dispatched,
                                   self.exchange.notifications, self.bytes_out))
        for observer in list(self.observers):
            try:
                observer(self, now)
            except Exception as error:
                # A view must never take the broker down (a closed pipe, a
                # vanished terminal): drop it and keep serving.
                self.observers.remove(observer)
                log.error("status display stopped and removed: %s: %s",
                          type(error).__name__, error)

    def _rates(self) -> dict:
        """Per-second rates over the last few seconds of housekeeping samples."""
        samples = self._rate_samples
        names = ("events_in", "events_out", "notifications", "bytes_out")
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return dict.fromkeys(names, 0.0)
        first, last = samples[0], samples[-1]
        elapsed = last[0] - first[0]
        return {name: (last[index + 1] - first[index + 1]) / elapsed
                for index, name in enumerate(names)}

    # -- stats ---------------------------------------------------------------

    def stats(self, top_clients: int | None = 20) -> dict:
        """A snapshot of plain data: counters, depths and the deepest queues.

        top_clients bounds the per-connection list (deepest queues first);
        None lists every connection.
        """
        now = time.monotonic()
        pipeline, reorder, exchange = self.pipeline, self.pipeline.reorder, self.exchange
        connections = list(self.clients.values())
        if top_clients is not None and len(connections) > top_clients:
            connections = heapq.nlargest(top_clients, connections,
                                         key=lambda c: len(c.outbound))
        else:
            connections.sort(key=lambda c: len(c.outbound), reverse=True)
        source = self.source
        return {
            "uptime": now - self.started_at,
            "started_at": self.started_wall,
            "stopping": self.stopping,
            "source": {
                "connected": source is not None,
                "peer": source.peer if source else None,
                "paused": self.source_paused,
                "connections": self.source_connections,
                "bytes_read": source.bytes_read if source else 0,
            },
            "next_seq": reorder.next_seq,
            "highest_seq": reorder.highest_seq,
            "reorder_depth": len(reorder),
            "reorder_depth_max": reorder.largest_depth,
            "events_in": pipeline.events_in,
            "events_dispatched": exchange.dispatched,
            "notifications": exchange.notifications,
            "bytes_out": self.bytes_out,
            "clients": len(exchange.subscribers),
            "connections": len(self.clients),
            "awaiting_hello": len(self.awaiting_hello),
            "known_users": len(exchange.following),
            "follows": exchange.follow_count,
            "bytes_queued": self.total_buffered,
            "rates": self._rates(),
            "counters": {
                "malformed": pipeline.malformed,
                "unsequenced": pipeline.unsequenced,
                "overlong": pipeline.overlong,
                "duplicate": reorder.duplicates,
                "late": reorder.late,
                "skipped": reorder.skipped,
                "slow_consumers": sum(count for reason, count in self.close_counts.items()
                                      if CloseReason(reason).is_slow_consumer),
                "follows_refused": exchange.follows_refused,
                "accept_errors": self.accept_errors,
            },
            "closes": dict(self.close_counts),
            "limits": {field.name: getattr(self.config, field.name)
                       for field in fields(self.config)},
            "top_clients": [
                {
                    "user_id": c.user_id,
                    "peer": c.peer,
                    "queued_notifications": len(c.lines) + max(
                        c.notifications_queued - c.notifications_sent, 0),
                    "queued_bytes": len(c.outbound),
                    "notifications_sent": c.notifications_sent,
                    "bytes_sent": c.bytes_sent,
                    "connected_seconds": now - c.connected_at,
                }
                for c in connections
            ],
            "recently_closed": list(self.recently_closed),
        }


class PortError(OSError):
    def __init__(self, host: str, port: int, error: OSError):
        self.host, self.port, self.error = host, port, error
        if error.errno == errno.EADDRINUSE:
            message = f"port {port} is already in use on {host}"
        else:
            message = f"cannot listen on {host}:{port}: {error.strerror or error}"
        super().__init__(error.errno, message)
        self.message = message


# ============================================================================
# Stats and dashboard
#
# Rules: everything runs on the loop's thread, from the housekeeping timer;
# rendering is a pure function of a stats() snapshot; rich is imported only
# when --dashboard asks for it, so the broker runs on a bare Python.
# ============================================================================

STATUS_LINE_INTERVAL = 5.0


def format_status_line(snapshot: dict) -> str:
    """One plain line for logs and non-terminal --dashboard output."""
    counters = snapshot["counters"]
    source = snapshot["source"]
    source_state = ("paused" if source["paused"] else "connected") if source["connected"] \
        else "disconnected"
    return (f"up {snapshot['uptime']:.0f}s source={source_state} "
            f"next_seq={snapshot['next_seq']} highest_seq={snapshot['highest_seq']} "
            f"reorder={snapshot['reorder_depth']} events={snapshot['events_dispatched']} "
            f"notifications={snapshot['notifications']} clients={snapshot['clients']} "
            f"queued_bytes={snapshot['bytes_queued']} malformed={counters['malformed']} "
            f"duplicate={counters['duplicate']} skipped={counters['skipped']} "
            f"slow_consumers={counters['slow_consumers']}")


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


def _source_parts(snapshot: dict) -> list:
    source = snapshot["source"]
    if not source["connected"]:
        so_far = source["connections"]
        return ["not connected" + (f" ({so_far} connections so far)" if so_far else "")]
    parts = [f"connected {source['peer']}  "]
    if source["paused"]:
        # Backpressure: the broker has stopped reading so the source's TCP
        # window fills; the operator must see this before anything else.
        parts.append(("PAUSED by backpressure", "bold red"))
    else:
        parts.append("reading")
    parts.append(f"  {_size(source['bytes_read'])} read")
    return parts


def _header_lines(snapshot: dict, width: int) -> list:
    from rich.text import Text

    limits = snapshot["limits"]
    rates = snapshot["rates"]
    counters = snapshot["counters"]

    title = Text(no_wrap=True, overflow="ellipsis")
    title.append("mbroker", style="bold")
    title.append(f"  up {_duration(snapshot['uptime'])}")
    if snapshot.get("stopping"):
        title.append("  STOPPING: draining queued notifications", style="bold yellow")

    depth, max_pending = snapshot["reorder_depth"], limits["max_pending"]
    queued, max_buffered = snapshot["bytes_queued"], limits["max_buffered"]
    awaiting = snapshot["awaiting_hello"]
    lines = [
        title,
        _line("source", *_source_parts(snapshot)),
        _line("sequence", f"next {_count(snapshot['next_seq'])}"
                          f"  highest seen {_count(snapshot['highest_seq'])}"),
        _line("reorder", (f"{_count(depth)} waiting", _fill_style(depth, max_pending)),
              f"  largest {_count(snapshot['reorder_depth_max'])}"
              f"  limit {_count(max_pending)}"),
        _line("rates", f"events in {_rate(rates['events_in'])}"
                       f"  out {_rate(rates['events_out'])}"
                       f"  notifications {_rate(rates['notifications'])}"),
        _line("output", f"{_size(rates['bytes_out'])}/s  ",
              (f"{_size(queued)} queued", _fill_style(queued, max_buffered)),
              f" (source pauses at {_size(max_buffered)})"),
        _line("clients", f"{_count(snapshot['connections'])} connections"
                         f"  {_count(snapshot['clients'])} users",
              (f"  {_count(awaiting)} awaiting id" if awaiting else "")),
        _line("graph", f"{_count(snapshot['known_users'])} known users"
                       f"  {_count(snapshot['follows'])} follows"),
    ]
    # Zero counters are dimmed so the ones that moved stand out; the names
    # are the ones the logs and stats() use, so an operator can grep for them.
    lines += _packed_lines("counters", [
        (name, _count(value), "" if value else "dim") for name, value in counters.items()
    ], width)
    closes = [(reason, _count(count), "yellow" if reason.startswith("slow_consumer") else "")
              for reason, count in snapshot["closes"].items() if count]
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


def _client_rows(snapshot: dict, rows: int, width: int) -> list:
    """The deepest queues as fixed-width lines, header first.

    Laid out by hand rather than with rich's Table: measuring a Table costs
    milliseconds per frame, and this runs on the broker's loop four times a
    second. Each cell is a plain string, so widths are just len().
    """
    from rich.text import Text

    max_client_buffer = snapshot["limits"]["max_client_buffer"]
    cell_rows, styles = [], []
    for client in snapshot["top_clients"][:rows]:
        queued_bytes = client["queued_bytes"]
        style = _fill_style(queued_bytes, max_client_buffer)
        bytes_cell = _size(queued_bytes)
        if style:
            # Near the limit: say how near, since past it the client is cut off.
            bytes_cell += f" {100 * queued_bytes / max_client_buffer:.0f}%"
        user = client["user_id"]
        cell_rows.append(("(no id)" if user is None else str(user),
                          client["peer"],
                          _count(client["queued_notifications"]),
                          bytes_cell,
                          _count(client["notifications_sent"]),
                          _duration(client["connected_seconds"])))
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


def _closed_line(closed: dict):
    from rich.text import Text

    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(time.strftime("%H:%M:%S", time.localtime(closed["at"])) + "  ")
    who = closed["kind"]
    if closed["user_id"] is not None:
        who += f" {closed['user_id']}"
    line.append(f"{who}  {closed['peer']}  ")
    reason = closed["reason"]
    line.append(reason, style="yellow" if reason.startswith("slow_consumer") else "")
    if closed["detail"]:
        line.append(f"  {closed['detail']}")
    return line


def render_dashboard(snapshot: dict, width: int = 80, height: int = 24):
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
    top_clients = snapshot["top_clients"]
    closed = list(reversed(snapshot["recently_closed"][-DASHBOARD_CLOSED_ROWS:]))

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
        total = snapshot["connections"]
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
    MAX_PENDING further output (log lines) is dropped rather than buffered.
    """

    MAX_PENDING = 1 << 20

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
        if len(self.pending) > self.MAX_PENDING:
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
        log.warning("rich is not installed: --dashboard prints a status line every %g s",
                    STATUS_LINE_INTERVAL)
        return StatusLinePrinter(stream)
    if not dashboard.console.is_interactive:
        return StatusLinePrinter(stream)
    return dashboard


# ============================================================================
# Command line
#
# Rules: parse, configure logging, bind (a busy port is one line and exit
# code 2), serve until a signal, exit 0. No traceback reaches the operator.
# ============================================================================

OPTION_HELP = {
    "host": "address to listen on (the event port lets anyone publish to every user)",
    "max_line": "longest event line in bytes before its newline; longer ones are discarded",
    "max_pending": "reorder buffer size in events; past it the lowest missing "
                   "sequence numbers are declared lost",
    "hello_timeout": "seconds a new client has to send its user id",
    "max_client_buffer": "bytes queued for one client before it is cut off as a slow consumer",
    "write_timeout": "seconds a client may have bytes queued with none written "
                     "before it is cut off as a slow consumer",
    "max_buffered": "bytes queued for all clients together before the event source is "
                    "paused (resumed below half)",
    "drain_timeout": "seconds to deliver queued notifications on SIGINT/SIGTERM",
    "max_follows": "follow relations kept at most; new follows past it are refused "
                   "(counted as follows_refused)",
}


def build_argument_parser() -> argparse.ArgumentParser:
    defaults = BrokerConfig()
    parser = argparse.ArgumentParser(
        prog="mbroker",
        description="Follower-maze message broker: reorders the event source's stream "
                    "and forwards each event to the user clients it concerns.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("event_port", nargs="?", type=int, default=defaults.event_port,
                        help="port the event source connects to (0: any free port)")
    parser.add_argument("client_port", nargs="?", type=int, default=defaults.client_port,
                        help="port user clients connect to (0: any free port)")
    for name, help_text in OPTION_HELP.items():
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default),
                            default=default, help=help_text)
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold (logs go to stderr)")
    parser.add_argument("--dashboard", action="store_true",
                        help="live rich view on a terminal; a plain status line every "
                             f"{STATUS_LINE_INTERVAL:g} s otherwise")
    return parser


def config_from_arguments(arguments: argparse.Namespace) -> BrokerConfig:
    config = BrokerConfig(event_port=arguments.event_port, client_port=arguments.client_port)
    for name in OPTION_HELP:
        setattr(config, name, getattr(arguments, name))
    return config


def validate_config(config: BrokerConfig) -> str | None:
    for name in ("event_port", "client_port"):
        if not 0 <= getattr(config, name) <= 65535:
            return f"--{name.replace('_', '-')} must be between 0 and 65535"
    for name in ("max_line", "max_pending", "max_client_buffer", "max_buffered"):
        if getattr(config, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    for name in ("hello_timeout", "write_timeout", "drain_timeout"):
        if not getattr(config, name) > 0:  # also refuses nan
            return f"--{name.replace('_', '-')} must be positive"
    return None


def main(argv: list[str] | None = None) -> int:
    arguments = build_argument_parser().parse_args(argv)
    config = config_from_arguments(arguments)
    problem = validate_config(config)
    if problem:
        print(f"mbroker: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=arguments.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    broker = Broker(config)
    broker.install_signal_handlers()
    try:
        broker.bind()
    except PortError as error:
        print(f"mbroker: {error.message}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
