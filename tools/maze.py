#!/usr/bin/env python3
"""maze: load generator and verifier for mbroker, in the style of the follower-maze harness.

It plays both sides of the broker: it connects the user clients, then connects as the
event source and streams a seeded, batch-shuffled sequence of events. While generating
the events in sequence order it keeps its own follow-graph oracle (SPEC section 2.1), so
it knows the exact bytes every connected client must receive, and it checks each
client's stream byte for byte and in order as it arrives.

Success prints ``\\o/ ALL NOTIFICATIONS RECEIVED \\o/`` and exits 0; any failure prints
a precise description (user, notification number, byte offset, expected and received
line) and exits 1.

Configuration: the follower-maze environment variables (eventListenerPort,
clientListenerPort, totalEvents, concurrencyLevel, numberOfUsers, randomSeed, timeout,
maxEventSourceBatchSize, logInterval) and equivalent command-line flags; flags win.
Run ``python tools/maze.py --help`` for every option.

The generator is importable (``WorkloadGenerator``, ``generate_workload``) so that
benchmarks can reuse it. Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import operator
import os
import random
import selectors
import socket
import sys
import threading
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

SUCCESS_LINE = "\\o/ ALL NOTIFICATIONS RECEIVED \\o/"

# Event kinds, used as small integers in the hot generation loop.
FOLLOW, UNFOLLOW, BROADCAST, PRIVATE, STATUS = range(5)
KIND_LETTERS = "FUBPS"

# Default event mix, as relative weights (per thousand events). Follows and private
# messages are common; unfollows mostly remove a follow that exists; broadcasts are rare
# because each one fans out to every connected client.
DEFAULT_MIX: dict[str, float] = {"F": 350, "U": 150, "B": 2, "P": 250, "S": 248}

# Share of unfollow events that remove an existing follow (the rest pick a random pair,
# which is usually not a follow, exercising "unfollowing a non-follower does nothing").
UNFOLLOW_EXISTING_PER_TEN = 9

# Resolution of the event-kind lookup table: a weight can be as small as 1/65536.
KIND_TABLE_BITS = 16
KIND_TABLE_SIZE = 1 << KIND_TABLE_BITS

# Batches up to this size are shuffled with a cached, seeded set of permutations per size.
PERMUTATION_CACHE_MAX_BATCH = 1024
PERMUTATIONS_PER_SIZE = 32

DEFAULT_CHUNK_EVENTS = 20_000
SEND_SIZE = 1 << 20  # bytes handed to one send() call on the event source
RECEIVE_SIZE = 1 << 18  # bytes asked of one recv() call on a client
REFILL_BELOW_BYTES = 1 << 20  # generate the next chunk when less than this is queued
COMPACT_AFTER_BYTES = 1 << 20  # drop verified expected bytes once this many piled up
TAIL_LIMIT_BYTES = 1 << 16  # bytes kept after a first difference, for the diagnosis


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class MazeConfig:
    host: str = "127.0.0.1"
    event_port: int = 9090
    client_port: int = 9099
    total_events: int = 10_000_000
    concurrency: int = 100
    users: int = 1000
    seed: int = 666
    timeout_ms: int = 20_000
    max_batch: int = 100
    log_interval_ms: int = 1000
    terminator: bytes = b"\r\n"
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    max_follows: int | None = None
    grace_ms: int = 500
    settle_ms: int = 500
    max_backlog_bytes: int = 4 << 20
    chunk_events: int = DEFAULT_CHUNK_EVENTS
    pregenerate: bool = False
    dry_run: bool = False
    sink: bool = False
    serve_replay: bool = False
    json_path: str | None = None


# (environment variable / flag name, config attribute, extra flag spellings, help)
HARNESS_SETTINGS = [
    ("eventListenerPort", "event_port", ["--event-port"], "event source port (9090)"),
    ("clientListenerPort", "client_port", ["--client-port"], "user client port (9099)"),
    ("totalEvents", "total_events", ["--total-events"], "events to send (10000000)"),
    ("concurrencyLevel", "concurrency", ["--concurrency"], "connected user clients (100)"),
    ("numberOfUsers", "users", ["--users"], "user ids 1..N in events (concurrencyLevel*10)"),
    ("randomSeed", "seed", ["--seed"], "random seed; same settings give the same run (666)"),
    ("timeout", "timeout_ms", ["--timeout-ms"],
     "ms a client waits for its next notification, and the source for the broker to read "
     "(20000)"),
    ("maxEventSourceBatchSize", "max_batch", ["--max-batch"],
     "the stream is cut into batches of random size 1..N, each shuffled; 1 = in order (100)"),
    ("logInterval", "log_interval_ms", ["--log-interval-ms"],
     "ms between progress lines on stderr, 0 = none (1000)"),
]


def parse_mix(text: str) -> dict[str, float]:
    """Parse ``F=350,U=150,B=2,P=250,S=248``; kinds left out get weight 0."""
    mix = dict.fromkeys(KIND_LETTERS, 0.0)
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        letter, separator, weight_text = item.partition("=")
        letter = letter.strip().upper()
        if not separator or letter not in mix:
            raise ValueError(f"bad mix item {item!r}: expected KIND=WEIGHT, KIND one of FUBPS")
        weight = float(weight_text)
        if weight < 0:
            raise ValueError(f"negative weight in mix item {item!r}")
        mix[letter] = weight
    if sum(mix.values()) <= 0:
        raise ValueError("the event mix needs at least one positive weight")
    return mix


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maze",
        description="Load generator and verifier for mbroker (follower-maze style). "
        "Each harness setting is read from the environment variable of the same name; "
        "a flag wins over the environment.",
    )
    for name, attribute, aliases, help_text in HARNESS_SETTINGS:
        parser.add_argument("--" + name, *aliases, dest=attribute, type=int, help=help_text)
    parser.add_argument("--host", help="broker host (127.0.0.1)")
    parser.add_argument("--terminator", choices=["crlf", "lf"],
                        help="line terminator of event and id lines (crlf)")
    parser.add_argument("--mix", help="event mix weights, e.g. F=350,U=150,B=2,P=250,S=248 "
                        "(that is the default)")
    parser.add_argument("--max-follows", type=int,
                        help="follow pairs kept in the graph; past it a follow re-follows an "
                        "existing pair (numberOfUsers*20)")
    parser.add_argument("--grace-ms", type=int,
                        help="ms to keep listening for extra notifications at the end (500)")
    parser.add_argument("--settle-ms", type=int,
                        help="ms to wait after connecting clients before the source (500)")
    parser.add_argument("--max-backlog", dest="max_backlog_bytes", type=int,
                        help="pause generation while a client has more expected bytes than "
                        "this not yet received (4194304)")
    parser.add_argument("--chunk-events", type=int,
                        help=f"events generated per chunk ({DEFAULT_CHUNK_EVENTS})")
    parser.add_argument("--pregenerate", action="store_true",
                        help="build the whole workload before the clock starts (benchmarking)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only generate the workload, no network; measures the generator")
    parser.add_argument("--sink", action="store_true",
                        help="no broker: stream into an in-process discarding event sink, with "
                        "zero clients; measures the tool's own sending ceiling")
    parser.add_argument("--serve-replay", action="store_true",
                        help="act as a fake broker instead: listen on the two ports and "
                        "replay the notifications that a maze run with the same settings "
                        "expects; measures maze's verification ceiling without a real broker")
    parser.add_argument("--json", dest="json_path", metavar="PATH",
                        help="also write the final report as JSON to PATH")
    return parser


def parse_config(argv: Sequence[str] | None = None,
                 environ: Mapping[str, str] | None = None) -> MazeConfig:
    """Build a MazeConfig from defaults, then environment variables, then flags."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    arguments = parser.parse_args(argv)
    config = MazeConfig()
    users_given = False
    for name, attribute, _aliases, _help in HARNESS_SETTINGS:
        value = getattr(arguments, attribute)
        if value is None and environ.get(name, "").strip():
            try:
                value = int(environ[name])
            except ValueError:
                parser.error(f"environment variable {name}={environ[name]!r} is not an integer")
        if value is not None:
            setattr(config, attribute, value)
            users_given = users_given or attribute == "users"
    if not users_given:
        config.users = max(1, config.concurrency * 10)
    if arguments.host is not None:
        config.host = arguments.host
    if arguments.terminator is not None:
        config.terminator = b"\n" if arguments.terminator == "lf" else b"\r\n"
    if arguments.mix is not None:
        try:
            config.mix = parse_mix(arguments.mix)
        except ValueError as error:
            parser.error(str(error))
    for attribute in ("max_follows", "grace_ms", "settle_ms", "max_backlog_bytes",
                      "chunk_events", "json_path"):
        value = getattr(arguments, attribute)
        if value is not None:
            setattr(config, attribute, value)
    config.pregenerate = arguments.pregenerate
    config.dry_run = arguments.dry_run
    config.sink = arguments.sink
    config.serve_replay = arguments.serve_replay
    problems = validate_config(config)
    if problems:
        parser.error("; ".join(problems))
    return config


def validate_config(config: MazeConfig) -> list[str]:
    problems = []
    if config.total_events < 0:
        problems.append("totalEvents must be >= 0")
    if config.concurrency < 0:
        problems.append("concurrencyLevel must be >= 0")
    if config.users < 1:
        problems.append("numberOfUsers must be >= 1")
    if config.concurrency > config.users and not config.sink:
        problems.append("concurrencyLevel must not exceed numberOfUsers (ids are distinct)")
    if config.max_batch < 1:
        problems.append("maxEventSourceBatchSize must be >= 1")
    if config.timeout_ms <= 0:
        problems.append("timeout must be > 0")
    if config.chunk_events < 1:
        problems.append("--chunk-events must be >= 1")
    if config.max_backlog_bytes < 1:
        problems.append("--max-backlog must be >= 1")
    if config.grace_ms < 0 or config.settle_ms < 0 or config.log_interval_ms < 0:
        problems.append("times must be >= 0")
    return problems


# --------------------------------------------------------------------------------------
# Workload generation (importable)
# --------------------------------------------------------------------------------------


@dataclass
class WorkloadChunk:
    """A run of whole batches: the source bytes and what each connected user must get."""

    source: bytes  # event lines as the source sends them (batches shuffled)
    expected: dict[int, bytes]  # user id -> notification bytes, in sequence order
    events: int
    notifications: int


def build_kind_table(mix: Mapping[str, float]) -> bytes:
    """A lookup table mapping 16 random bits to an event kind with the mix's weights."""
    weighted = [(KIND_LETTERS.index(letter), weight)
                for letter, weight in ((letter, mix.get(letter, 0)) for letter in KIND_LETTERS)
                if weight > 0]
    if not weighted:
        raise ValueError("the event mix needs at least one positive weight")
    total = sum(weight for _kind, weight in weighted)
    table = bytearray(KIND_TABLE_SIZE)
    start = 0
    cumulative = 0.0
    for position, (kind, weight) in enumerate(weighted):
        cumulative += weight
        end = round(cumulative / total * KIND_TABLE_SIZE)
        # Every kind with a positive weight gets at least one slot, so it can appear.
        end = max(end, start + 1)
        if position == len(weighted) - 1:
            end = KIND_TABLE_SIZE
        end = min(end, KIND_TABLE_SIZE - (len(weighted) - 1 - position))
        table[start:end] = bytes([kind]) * (end - start)
        start = end
    return bytes(table)


class WorkloadGenerator:
    """Streams a seeded event workload in chunks, with the notifications it implies.

    The follow-graph oracle follows SPEC 2.1: F notifies TO and adds the follow, U
    notifies nobody and removes it, B goes to every connected user, P to TO, S to every
    current follower of FROM. Only follows by connected users can ever cause a
    notification, so only those are kept per followed user; the full set of follow pairs
    is kept too (bounded by ``max_follows``) so that unfollows can pick real follows.

    Memory is bounded by ``max_follows`` and one chunk, whatever ``total_events`` is.
    """

    def __init__(self, total_events: int, concurrency: int, users: int, seed: int = 666,
                 max_batch: int = 100, terminator: bytes = b"\r\n",
                 mix: Mapping[str, float] | None = None, max_follows: int | None = None):
        if users < 1 or concurrency < 0 or concurrency > users:
            raise ValueError("need users >= 1 and 0 <= concurrency <= users")
        if max_batch < 1 or total_events < 0:
            raise ValueError("need max_batch >= 1 and total_events >= 0")
        if terminator not in (b"\r\n", b"\n"):
            raise ValueError("terminator must be b'\\r\\n' or b'\\n'")
        self.total_events = total_events
        self.users = users
        self.max_batch = max_batch
        self.terminator = terminator
        self.max_follows = users * 20 if max_follows is None else max(1, max_follows)
        self._kind_table = build_kind_table(DEFAULT_MIX if mix is None else mix)
        self._rng = random.Random(seed)
        # Separate seeded streams for event contents, batch cuts and shuffles, each drawn
        # in whole 32-bit words: the run is then the same whatever the chunk size.
        self._event_rng = random.Random(f"{seed}/events")
        self._batch_rng = random.Random(f"{seed}/batches")
        self._shuffle_rng = random.Random(f"{seed}/shuffles")
        # Which users are connected is part of the seeded run.
        self.connected_users: list[int] = self._rng.sample(range(1, users + 1), concurrency)
        self._connected = frozenset(self.connected_users)
        self._connected_followers: dict[int, dict[int, object]] = {}
        # Per connected user, the expected lines of the chunk being generated (kept across
        # chunks and cleared, so the oracle can hold their append methods).
        self._expected_lines: dict[int, list[str]] = {user: [] for user in
                                                      self.connected_users}
        self._appender_of = {user: lines.append for user, lines
                             in self._expected_lines.items()}
        self._follow_pairs: list[int] = []  # pair keys, for picking a random existing follow
        self._follow_slot: dict[int, int] = {}  # pair key -> index in _follow_pairs
        self._permutations: dict[int, list[operator.itemgetter]] = {}
        self.events_generated = 0
        self.notifications_generated = 0

    def id_line(self, user: int) -> bytes:
        return b"%d%s" % (user, self.terminator)

    def chunks(self, chunk_events: int = DEFAULT_CHUNK_EVENTS) -> Iterator[WorkloadChunk]:
        while self.events_generated < self.total_events:
            yield self.next_chunk(chunk_events)

    def next_chunk(self, chunk_events: int = DEFAULT_CHUNK_EVENTS) -> WorkloadChunk:
        """Generate whole batches until at least ``chunk_events`` events (or the end)."""
        first_seq = self.events_generated
        remaining = self.total_events - first_seq
        target = min(max(1, chunk_events), remaining)
        if target <= 0:
            return WorkloadChunk(b"", {}, 0, 0)
        max_batch = self.max_batch
        batch_sizes: list[int] = []
        batch_words: list[int] = []
        count = 0
        if max_batch > 1:
            getrandbits = self._batch_rng.getrandbits
            while count < target:
                word = getrandbits(32)
                size = min(1 + word % max_batch, remaining - count)
                batch_sizes.append(size)
                batch_words.append(word // max_batch)
                count += size
        else:
            count = target
        words = self._random_words(3 * count)
        lines = self._generate_lines(first_seq, words[0::3], words[1::3], words[2::3])
        if batch_sizes:
            lines = self._shuffle_batches(lines, batch_sizes, batch_words)
        source = "".join(lines).encode("ascii")
        expected = {}
        for user, user_lines in self._expected_lines.items():
            if user_lines:
                expected[user] = "".join(user_lines).encode("ascii")
                user_lines.clear()
        notifications = self._chunk_notifications
        self.events_generated = first_seq + count
        self.notifications_generated += notifications
        return WorkloadChunk(source, expected, count, notifications)

    def _shuffle_batches(self, lines: list[str], batch_sizes: list[int],
                         batch_words: list[int]) -> list[str]:
        """Shuffle each batch; batches stay in order, so the stream is only locally out of
        order (what a real source's reordering looks like)."""
        rng = self._shuffle_rng
        shuffled: list[str] = []
        extend = shuffled.extend
        start = 0
        if self.max_batch > PERMUTATION_CACHE_MAX_BATCH:
            shuffle = rng.shuffle
            for size in batch_sizes:
                batch = lines[start:start + size]
                shuffle(batch)
                extend(batch)
                start += size
            return shuffled
        # A shuffle per batch costs a Python-level step per line. Instead, reuse a small,
        # seeded set of precomputed permutations per batch size, applied at C speed by an
        # itemgetter; the order is still random per batch and the run still seeded.
        permutations = self._permutations
        for size, choice in zip(batch_sizes, batch_words, strict=True):
            if size == 1:
                shuffled.append(lines[start])
                start += 1
                continue
            getters = permutations.get(size)
            if getters is None:
                getters = []
                for _ in range(PERMUTATIONS_PER_SIZE):
                    order = list(range(size))
                    rng.shuffle(order)
                    getters.append(operator.itemgetter(*order))
                permutations[size] = getters
            extend(getters[choice % PERMUTATIONS_PER_SIZE](lines[start:start + size]))
            start += size
        return shuffled

    def _random_words(self, count: int) -> array:
        """``count`` random 32-bit words from the event stream, drawn in bulk (C speed)."""
        words = array("I")  # 4 bytes on every platform CPython supports in practice
        words.frombytes(self._event_rng.randbytes(count * words.itemsize))
        if sys.byteorder == "big":  # keep runs identical across machines
            words.byteswap()
        return words

    def _generate_lines(self, first_seq: int, kind_words: array, first_words: array,
                        second_words: array) -> list[str]:
        """The hot loop: one iteration per event, with as little Python work as possible."""
        terminator = self.terminator.decode("ascii")
        users = self.users
        key_base = users + 1
        kind_table = self._kind_table
        table_mask = KIND_TABLE_SIZE - 1
        connected = self._connected
        # followed user -> {connected follower: append method of that follower's lines}
        connected_followers = self._connected_followers
        follow_pairs = self._follow_pairs
        follow_slot = self._follow_slot
        max_follows = self.max_follows
        appender_of = self._appender_of
        appender_for = appender_of.get
        every_appender = list(appender_of.values())
        connected_count = len(every_appender)
        lines: list[str] = []
        append_line = lines.append
        notifications = 0
        for seq, kind_word, first_word, second_word in zip(
                itertools.count(first_seq + 1), kind_words, first_words, second_words,
                strict=False):
            kind = kind_table[kind_word & table_mask]
            follower = first_word % users + 1
            followed = second_word % users + 1
            if kind == FOLLOW:
                pair = follower * key_base + followed
                if pair not in follow_slot:
                    if len(follow_pairs) >= max_follows:
                        # Graph full: re-follow an existing pair instead (exercises
                        # "following twice is the same as once" and bounds memory).
                        pair = follow_pairs[first_word % len(follow_pairs)]
                        follower, followed = divmod(pair, key_base)
                    else:
                        follow_slot[pair] = len(follow_pairs)
                        follow_pairs.append(pair)
                        if follower in connected:
                            followers = connected_followers.get(followed)
                            if followers is None:
                                followers = connected_followers[followed] = {}
                            followers[follower] = appender_of[follower]
                line = f"{seq}|F|{follower}|{followed}{terminator}"
                append_expected = appender_for(followed)
                if append_expected is not None:
                    append_expected(line)
                    notifications += 1
            elif kind == PRIVATE:
                line = f"{seq}|P|{follower}|{followed}{terminator}"
                append_expected = appender_for(followed)
                if append_expected is not None:
                    append_expected(line)
                    notifications += 1
            elif kind == STATUS:
                line = f"{seq}|S|{follower}{terminator}"
                followers = connected_followers.get(follower)
                if followers:
                    for append_expected in followers.values():
                        append_expected(line)
                    notifications += len(followers)
            elif kind == UNFOLLOW:
                if follow_pairs and (kind_word >> KIND_TABLE_BITS) % 10 < UNFOLLOW_EXISTING_PER_TEN:
                    slot = first_word % len(follow_pairs)
                    pair = follow_pairs[slot]
                    follower, followed = divmod(pair, key_base)
                else:
                    pair = follower * key_base + followed
                    slot = follow_slot.get(pair)
                if slot is not None:
                    # Swap-remove keeps removal O(1).
                    last_pair = follow_pairs.pop()
                    if slot < len(follow_pairs):
                        follow_pairs[slot] = last_pair
                        follow_slot[last_pair] = slot
                    del follow_slot[pair]
                    if follower in connected:
                        del connected_followers[followed][follower]
                line = f"{seq}|U|{follower}|{followed}{terminator}"
            else:  # BROADCAST
                line = f"{seq}|B{terminator}"
                for append_expected in every_appender:
                    append_expected(line)
                notifications += connected_count
            append_line(line)
        self._chunk_notifications = notifications
        return lines


def generate_workload(total_events: int, concurrency: int, users: int, seed: int = 666,
                      max_batch: int = 100, terminator: bytes = b"\r\n",
                      mix: Mapping[str, float] | None = None,
                      chunk_events: int = DEFAULT_CHUNK_EVENTS,
                      ) -> tuple[list[int], Iterator[bytes], dict[int, bytes]]:
    """Whole-workload convenience for small runs and benchmarks.

    Returns ``(connected_users, source_chunks, expected_per_user)``: the connected user
    ids in connection order, an iterator over the source byte chunks (concatenate them
    for the full stream), and every connected user's complete expected bytes.
    """
    generator = WorkloadGenerator(total_events, concurrency, users, seed, max_batch,
                                  terminator, mix)
    source_chunks: list[bytes] = []
    expected: dict[int, bytearray] = {user: bytearray() for user in generator.connected_users}
    for chunk in generator.chunks(chunk_events):
        source_chunks.append(chunk.source)
        for user, data in chunk.expected.items():
            expected[user] += data
    return (generator.connected_users, iter(source_chunks),
            {user: bytes(data) for user, data in expected.items()})


# --------------------------------------------------------------------------------------
# Verification of one client's stream
# --------------------------------------------------------------------------------------


def first_difference(expected: bytes, received: bytes) -> int:
    """Index of the first differing byte (or the shorter length if one is a prefix)."""
    low, high = 0, min(len(expected), len(received))
    # Binary search on prefix equality: C-speed comparisons, O(n log n) bytes at worst.
    while low < high:
        middle = (low + high) // 2
        if expected[low:middle + 1] == received[low:middle + 1]:
            low = middle + 1
        else:
            high = middle
    return low


def _has_line(haystack: bytes, line: bytes) -> int:
    """Index of ``line`` as a whole line at a line start of ``haystack``, or -1."""
    if haystack.startswith(line):
        return 0
    found = haystack.find(b"\n" + line)
    return found + 1 if found >= 0 else -1


class ClientStream:
    """One connected user: the bytes it must still receive and how far it got."""

    __slots__ = ("user", "sock", "expected", "position", "discarded", "verified_lines",
                 "waiting_since", "tail", "mismatch_index", "mismatch_line_number",
                 "failure", "closed")

    def __init__(self, user: int, sock: socket.socket | None):
        self.user = user
        self.sock = sock
        self.expected = bytearray()  # expected bytes; [:position] already received
        self.position = 0
        self.discarded = 0  # verified bytes already dropped from the front of expected
        self.verified_lines = 0
        self.waiting_since = 0.0  # when the client last got a byte or started waiting
        self.tail: bytearray | None = None  # received bytes from the first difference on
        self.mismatch_index = 0
        self.mismatch_line_number = 0
        self.failure: str | None = None  # a failure not needing a diagnosis (timeout...)
        self.closed = False

    @property
    def pending_bytes(self) -> int:
        return len(self.expected) - self.position

    @property
    def failed(self) -> bool:
        return self.tail is not None or self.failure is not None

    def add_expected(self, data: bytes, now: float) -> None:
        if self.position == len(self.expected):
            self.waiting_since = now  # the wait for the next notification starts now
        self.expected += data

    def receive(self, data: bytes, now: float) -> int:
        """Check received bytes; returns how many were verified (all, or up to a diff)."""
        if self.tail is not None:
            if len(self.tail) < TAIL_LIMIT_BYTES:
                self.tail += data[:TAIL_LIMIT_BYTES - len(self.tail)]
            return 0
        position = self.position
        size = len(data)
        expected_slice = self.expected[position:position + size]
        if expected_slice == data:
            self.position = position + size
            self.verified_lines += data.count(b"\n")
            self.waiting_since = now
            if self.position >= COMPACT_AFTER_BYTES:
                self._compact()
            return size
        difference = first_difference(expected_slice, data)
        self.mismatch_index = position + difference
        self.mismatch_line_number = (self.verified_lines
                                     + self.expected.count(b"\n", position,
                                                           position + difference) + 1)
        self.tail = bytearray(data[difference:difference + TAIL_LIMIT_BYTES])
        self.position = position + difference
        return difference

    def _compact(self) -> None:
        # Keep the line the position is in, so a later failure can still quote it.
        cut = self.expected.rfind(b"\n", 0, self.position) + 1
        if cut > 0:
            del self.expected[:cut]
            self.position -= cut
            self.discarded += cut

    def _expected_line_at(self, index: int) -> tuple[int, bytes]:
        line_start = self.expected.rfind(b"\n", 0, index) + 1
        line_end = self.expected.find(b"\n", line_start)
        line_end = len(self.expected) if line_end < 0 else line_end + 1
        return line_start, bytes(self.expected[line_start:line_end])

    def describe_timeout(self, timeout_ms: int) -> str:
        line_start, expected_line = self._expected_line_at(self.position)
        still_expected = self.expected.count(b"\n", self.position)
        partial = bytes(self.expected[line_start:self.position])
        received = f"received only {partial!r} of it" if partial else "nothing received"
        return (f"user {self.user}: missing notification #{self.verified_lines + 1} "
                f"(byte offset {self.discarded + line_start}): expected {expected_line!r}, "
                f"{received} within {timeout_ms} ms; {still_expected} notification(s) "
                f"still expected, {self.verified_lines} received correctly")

    def describe_closed(self, reason: str) -> str:
        if self.pending_bytes == 0:
            return (f"user {self.user}: broker closed the connection ({reason}) after "
                    f"{self.verified_lines} notification(s)")
        line_start, expected_line = self._expected_line_at(self.position)
        return (f"user {self.user}: broker closed the connection ({reason}) before "
                f"notification #{self.verified_lines + 1} (byte offset "
                f"{self.discarded + line_start}): expected {expected_line!r}")

    def describe_mismatch(self) -> str:
        """Classify the first difference: terminator, order, missing, extra or bytes."""
        index = self.mismatch_index
        line_start = self.expected.rfind(b"\n", 0, index) + 1
        tail = bytes(self.tail or b"")
        newline = tail.find(b"\n")
        received_rest = tail[:newline + 1] if newline >= 0 else tail
        received_line = bytes(self.expected[line_start:index]) + received_rest
        received_after = tail[newline + 1:] if newline >= 0 else b""
        number = self.mismatch_line_number
        where = (f"notification #{number} (byte offset {self.discarded + line_start}, "
                 f"first differing byte at offset {self.discarded + index})")
        if line_start >= len(self.expected):
            return (f"user {self.user}: extra notification #{number} (byte offset "
                    f"{self.discarded + line_start}): only {number - 1} were expected, "
                    f"received {received_line!r}")
        _start, expected_line = self._expected_line_at(index)
        heading = f"user {self.user}: "
        detail = f"{where}: expected {expected_line!r}, received {received_line!r}"
        if (received_line != expected_line and received_line.endswith(b"\n")
                and received_line.rstrip(b"\r\n") == expected_line.rstrip(b"\r\n")):
            return heading + "wrong terminator at " + detail
        expected_after = bytes(self.expected[line_start + len(expected_line):])
        complete = received_line.endswith(b"\n")
        later_in_expected = _has_line(expected_after, received_line) if complete else -1
        arrived_later = _has_line(received_after, expected_line)
        if later_in_expected >= 0 and arrived_later >= 0:
            return heading + "wrong order at " + detail + (
                "; the expected line arrived later")
        if later_in_expected >= 0:
            skipped = expected_after.count(b"\n", 0, later_in_expected) + 1
            return heading + f"missing notification(s) at {detail} ({skipped} expected " \
                "line(s) skipped, never received)"
        if arrived_later >= 0:
            return heading + "extra notification at " + detail + (
                " (an unexpected line before the expected one)")
        return heading + "wrong bytes at " + detail


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@dataclass
class RunReport:
    result: str  # "success" or "failure"
    events: int
    notifications: int
    source_bytes: int
    notification_bytes: int
    seconds: float
    events_per_second: float
    notifications_per_second: float
    cpu_seconds: float
    mode: str
    failures: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"mode: {self.mode}",
            f"events: {self.events}",
            f"notifications: {self.notifications}",
            f"bytes: {self.source_bytes + self.notification_bytes} "
            f"(source {self.source_bytes}, notifications {self.notification_bytes})",
            f"seconds: {self.seconds:.3f}",
            f"events/s: {self.events_per_second:,.0f}",
            f"notifications/s: {self.notifications_per_second:,.0f}",
            f"tool cpu seconds: {self.cpu_seconds:.3f}",
        ]


def unacknowledged_bytes(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that the peer has not yet taken (Linux SIOCOUTQ); 0 where
    the platform cannot tell."""
    try:
        import fcntl
        import termios

        answer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (ImportError, AttributeError, OSError):
        return 0
    return max(0, int.from_bytes(answer, sys.byteorder, signed=True))


class MazeFailure(Exception):
    """A failure found before the verification loop (e.g. cannot connect)."""


class DiscardingSink:
    """Trivial event-port server for --sink: accepts one connection and discards it."""

    def __init__(self, host: str):
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.bytes_read = 0
        self.last_read = 0.0
        self.thread = threading.Thread(target=self._serve, name="maze-sink", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(30)
        try:
            connection, _address = self.listener.accept()
        except OSError:
            return
        buffer = bytearray(1 << 22)
        with connection:
            connection.settimeout(60)
            while True:
                try:
                    size = connection.recv_into(buffer)
                except OSError:
                    break
                if not size:
                    break
                self.bytes_read += size
                self.last_read = time.perf_counter()
        self.listener.close()


class MazeRun:
    def __init__(self, config: MazeConfig, log=None):
        self.config = config
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        users_in_events = config.users
        concurrency = 0 if config.sink else config.concurrency
        self.generator = WorkloadGenerator(
            config.total_events, concurrency, users_in_events, config.seed, config.max_batch,
            config.terminator, config.mix, config.max_follows)
        self.streams: list[ClientStream] = []
        self.stream_of_user: dict[int, ClientStream] = {}

    # -- helpers -------------------------------------------------------------------

    def _chunk_source(self) -> Iterator[WorkloadChunk]:
        if not self.config.pregenerate:
            return self.generator.chunks(self.config.chunk_events)
        # Build the whole workload before the clock starts, as one big chunk.
        started = time.perf_counter()
        source = bytearray()
        expected: dict[int, bytearray] = collections.defaultdict(bytearray)
        events = notifications = 0
        for chunk in self.generator.chunks(self.config.chunk_events):
            source += chunk.source
            for user, data in chunk.expected.items():
                expected[user] += data
            events += chunk.events
            notifications += chunk.notifications
        self.log(f"maze: pregenerated {events} events, {notifications} notifications, "
                 f"{len(source)} source bytes in {time.perf_counter() - started:.2f} s")
        whole = WorkloadChunk(bytes(source), {user: bytes(data) for user, data
                                              in expected.items()}, events, notifications)
        return iter([whole])

    def run(self) -> RunReport:
        config = self.config
        if config.dry_run:
            return self._dry_run()
        chunks = self._chunk_source()
        cpu_start = time.process_time()
        sink = DiscardingSink(config.host) if config.sink else None
        event_port = sink.port if sink else config.event_port
        selector = selectors.DefaultSelector()
        timeout = config.timeout_ms / 1000
        source_sock = None
        try:
            for user in self.generator.connected_users:
                try:
                    sock = socket.create_connection((config.host, config.client_port),
                                                    timeout=timeout)
                    sock.sendall(self.generator.id_line(user))
                except OSError as error:
                    raise MazeFailure(f"cannot connect user {user} to client port "
                                      f"{config.host}:{config.client_port}: {error}") from None
                sock.setblocking(False)
                stream = ClientStream(user, sock)
                self.streams.append(stream)
                self.stream_of_user[user] = stream
                selector.register(sock, selectors.EVENT_READ, stream)
            if self.streams:
                # The broker must have read every id before the first event is dispatched.
                time.sleep(config.settle_ms / 1000)
            try:
                source_sock = socket.create_connection((config.host, event_port),
                                                       timeout=timeout)
            except OSError as error:
                raise MazeFailure(f"cannot connect the event source to {config.host}:"
                                  f"{event_port}: {error}") from None
            source_sock.setblocking(False)
            selector.register(source_sock, selectors.EVENT_READ, None)
            report = self._loop(selector, source_sock, chunks, sink)
        finally:
            for stream in self.streams:
                stream.sock.close()
            if source_sock is not None:
                source_sock.close()
            selector.close()
        report.cpu_seconds = time.process_time() - cpu_start
        return report

    def _dry_run(self) -> RunReport:
        cpu_start = time.process_time()
        started = time.perf_counter()
        events = notifications = source_bytes = notification_bytes = 0
        # Always streamed here: the point is to time the generator itself.
        for chunk in self.generator.chunks(self.config.chunk_events):
            events += chunk.events
            notifications += chunk.notifications
            source_bytes += len(chunk.source)
            notification_bytes += sum(map(len, chunk.expected.values()))
        seconds = time.perf_counter() - started
        return RunReport("success", events, notifications, source_bytes, notification_bytes,
                         seconds, events / seconds if seconds else 0.0,
                         notifications / seconds if seconds else 0.0,
                         time.process_time() - cpu_start, "dry-run (generation only)")

    def _loop(self, selector, source_sock, chunks, sink) -> RunReport:
        config = self.config
        timeout = config.timeout_ms / 1000
        streams = self.streams
        stream_of_user = self.stream_of_user
        source_queue: collections.deque[memoryview] = collections.deque()
        queued_source_bytes = 0
        generation_done = False
        events_queued = 0
        notifications_expected = 0
        notification_bytes_expected = 0
        notification_bytes_verified = 0
        source_bytes_written = 0
        first_write_time = None
        last_write_time = 0.0
        last_verified_time = 0.0
        source_progress_time = time.perf_counter()
        failures: list[str] = []
        source_failure: str | None = None
        writing = False
        client_failed = False
        last_unread, unread_since = 0, 0.0
        log_interval = config.log_interval_ms / 1000
        next_log = time.perf_counter() + log_interval
        next_check = 0.0
        run_started = time.perf_counter()
        max_backlog = config.max_backlog_bytes
        # Only the clients that were given expected bytes can push a backlog past the
        # bound; remembering them avoids scanning every stream on every refill.
        backlog_watch: set[ClientStream] = set()

        while True:
            now = time.perf_counter()
            # Refill the source queue: generation is paused while the queue is full or a
            # client lags too far behind, so memory stays bounded.
            while not generation_done and queued_source_bytes < REFILL_BELOW_BYTES:
                if backlog_watch:
                    backlog_watch = {stream for stream in backlog_watch
                                     if stream.pending_bytes > max_backlog}
                    if backlog_watch:
                        break
                chunk = next(chunks, None)
                if chunk is None:
                    generation_done = True
                    break
                now = time.perf_counter()
                for user, data in chunk.expected.items():
                    stream = stream_of_user[user]
                    stream.add_expected(data, now)
                    notification_bytes_expected += len(data)
                    if stream.pending_bytes > max_backlog:
                        backlog_watch.add(stream)
                notifications_expected += chunk.notifications
                events_queued += chunk.events
                if chunk.source:
                    if not source_queue:
                        source_progress_time = now  # the source's wait starts now
                    source_queue.append(memoryview(chunk.source))
                    queued_source_bytes += len(chunk.source)
            want_write = bool(source_queue)
            if want_write != writing:
                selector.modify(source_sock, selectors.EVENT_READ
                                | (selectors.EVENT_WRITE if want_write else 0), None)
                writing = want_write
            for key, mask in selector.select(0.05):
                stream = key.data
                if stream is None:
                    if mask & selectors.EVENT_WRITE and source_queue:
                        view = source_queue[0]
                        try:
                            sent = source_sock.send(view[:SEND_SIZE])
                        except BlockingIOError:
                            sent = 0
                        except OSError as error:
                            source_failure = (f"event source: connection failed after "
                                              f"{source_bytes_written} bytes written: {error}")
                            break
                        if sent:
                            now = time.perf_counter()
                            if first_write_time is None:
                                first_write_time = now
                            last_write_time = source_progress_time = now
                            source_bytes_written += sent
                            queued_source_bytes -= sent
                            if sent == len(view):
                                source_queue.popleft()
                            else:
                                source_queue[0] = view[sent:]
                    elif mask & selectors.EVENT_READ:
                        # The broker sends nothing on the event port: EOF or junk.
                        try:
                            data = source_sock.recv(4096)
                        except BlockingIOError:
                            continue
                        except OSError as error:
                            data = b""
                            reason = str(error)
                        else:
                            reason = "EOF" if not data else f"unexpected bytes {data[:40]!r}"
                        if not data or source_failure is None:
                            source_failure = (f"event source: broker closed or wrote on the "
                                              f"event connection ({reason}) after "
                                              f"{source_bytes_written} bytes written")
                        selector.unregister(source_sock)
                        break
                    continue
                try:
                    data = stream.sock.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError as error:
                    data = None
                    reason = str(error)
                else:
                    reason = "EOF"
                if not data:
                    stream.closed = True
                    stream.failure = stream.describe_closed(reason)
                    selector.unregister(stream.sock)
                    client_failed = True
                    continue
                verified = stream.receive(data, time.perf_counter())
                if verified:
                    notification_bytes_verified += verified
                    last_verified_time = time.perf_counter()
                if stream.tail is not None:
                    client_failed = True

            now = time.perf_counter()
            if source_failure is not None:
                failures.append(source_failure)
                break
            if client_failed:
                break
            if (generation_done and not source_queue
                    and notification_bytes_verified == notification_bytes_expected):
                break
            if now >= next_check:
                next_check = now + 0.05
                if source_queue:
                    source_stalled_for = now - source_progress_time
                else:
                    # Everything is written, but the kernel may still hold bytes the broker
                    # has not taken: a stall that send() alone cannot see.
                    unread = unacknowledged_bytes(source_sock)
                    if unread != last_unread:
                        last_unread, unread_since = unread, now
                    source_stalled_for = now - unread_since if unread else 0.0
                if source_stalled_for > timeout:
                    failures.append(self._stall_message(
                        source_stalled_for, source_bytes_written, queued_source_bytes,
                        unacknowledged_bytes(source_sock)))
                    break
                # A client's wait counts from its last byte or from the last source write,
                # whichever is later: while the broker is still taking events, it may not
                # have received the ones this client waits for.
                late = [stream for stream in streams if stream.pending_bytes
                        and now - max(stream.waiting_since, last_write_time) > timeout]
                if late:
                    if source_stalled_for > timeout / 2:
                        # Clients starve because the broker stopped reading: that is the
                        # root cause to report; the starving clients are its consequence.
                        failures.append(self._stall_message(
                            source_stalled_for, source_bytes_written, queued_source_bytes,
                            unacknowledged_bytes(source_sock)))
                        failures.append(f"as a consequence {len(late)} client(s) miss "
                                        f"notifications; the first: "
                                        f"{late[0].describe_timeout(config.timeout_ms)}")
                    else:
                        for stream in late:
                            stream.failure = stream.describe_timeout(config.timeout_ms)
                    break
            if log_interval and now >= next_log:
                next_log = now + log_interval
                elapsed = now - (first_write_time or run_started)
                self.log(f"maze: {events_queued}/{config.total_events} events generated, "
                         f"{source_bytes_written} source bytes written, "
                         f"{notification_bytes_verified}/{notification_bytes_expected} "
                         f"notification bytes verified, "
                         f"{events_queued / elapsed if elapsed > 0 else 0:,.0f} events/s")

        end_time = max(last_verified_time, last_write_time)
        if sink is not None and not failures and not any(s.failed for s in streams):
            # Count the time until the sink has actually read everything.
            source_sock.shutdown(socket.SHUT_WR)
            sink.thread.join(timeout)
            end_time = max(end_time, sink.last_read)
            if sink.bytes_read != source_bytes_written:
                failures.append(f"sink read {sink.bytes_read} of {source_bytes_written} bytes")
        # Grace period: on success, anything more is an extra notification; on failure, it
        # collects the bytes after a first difference so the diagnosis can tell a missing
        # line from a reordered one.
        if streams:
            self._listen(selector, config.grace_ms / 1000)
        for stream in streams:
            if stream.tail is not None:
                failures.append(stream.describe_mismatch())
            elif stream.failure is not None:
                failures.append(stream.failure)
        seconds = end_time - first_write_time if first_write_time is not None else 0.0
        events = events_queued
        return RunReport(
            result="failure" if failures else "success",
            events=events,
            notifications=notifications_expected,
            source_bytes=source_bytes_written,
            notification_bytes=notification_bytes_expected,
            seconds=seconds,
            events_per_second=events / seconds if seconds > 0 else 0.0,
            notifications_per_second=notifications_expected / seconds if seconds > 0 else 0.0,
            cpu_seconds=0.0,
            mode=("sink" if sink else "broker") + (", pregenerated" if config.pregenerate
                                                   else ", streaming"),
            failures=failures,
        )

    def _stall_message(self, stalled_for: float, written: int, queued: int,
                       unread: int) -> str:
        return (f"event source stalled: the broker has not read the event source for "
                f"{stalled_for * 1000:.0f} ms (timeout {self.config.timeout_ms} ms); "
                f"{written} bytes written ({unread} of them not yet taken by the broker), "
                f"{queued} more queued")

    def _listen(self, selector, seconds: float) -> None:
        """Keep reading every client for ``seconds`` (the end-of-run grace period)."""
        deadline = time.perf_counter() + seconds
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            for key, _mask in selector.select(remaining):
                stream = key.data
                if stream is None:
                    continue
                try:
                    data = stream.sock.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(stream.sock)
                    continue
                stream.receive(data, time.perf_counter())


class ReplayBroker:
    """A fake broker for measuring maze itself (``--serve-replay``).

    It regenerates the workload that a maze run with the same settings produces, then
    plays the broker: it reads and discards the event stream and, each time the source
    bytes of a whole chunk have arrived, queues that chunk's expected bytes to each user.
    No parsing, no graph: it costs far less than maze, so a run against it measures
    maze's own ceiling with clients connected.
    """

    def __init__(self, config: MazeConfig, log=None):
        self.config = config
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        generator = WorkloadGenerator(
            config.total_events, config.concurrency, config.users, config.seed,
            config.max_batch, config.terminator, config.mix, config.max_follows)
        self.chunk_ends: list[int] = []
        self.chunk_expected: list[dict[int, bytes]] = []
        source_bytes = 0
        for chunk in generator.chunks(config.chunk_events):
            source_bytes += len(chunk.source)
            self.chunk_ends.append(source_bytes)
            self.chunk_expected.append(chunk.expected)

    def serve(self) -> int:
        config = self.config
        selector = selectors.DefaultSelector()
        event_listener = socket.create_server((config.host, config.event_port))
        client_listener = socket.create_server((config.host, config.client_port))
        for listener in (event_listener, client_listener):
            listener.setblocking(False)
            selector.register(listener, selectors.EVENT_READ, ("listener", listener))
        self.log(f"replay broker listening events={config.host}:"
                 f"{event_listener.getsockname()[1]} clients={config.host}:"
                 f"{client_listener.getsockname()[1]}")
        # connection -> [user or None, bytes read before the id line, queued output]
        clients: dict[socket.socket, list] = {}
        connections_of: dict[int, list[socket.socket]] = collections.defaultdict(list)
        buffer = bytearray(1 << 22)
        source_bytes = 0
        next_chunk = 0
        source_done = False
        idle_deadline = time.monotonic() + config.timeout_ms / 1000 + 60
        while time.monotonic() < idle_deadline:
            if source_done and not any(state[2] for state in clients.values()):
                break
            for key, mask in selector.select(0.1):
                role, sock = key.data
                if role == "listener":
                    try:
                        connection, _address = sock.accept()
                    except BlockingIOError:
                        continue
                    connection.setblocking(False)
                    if sock is event_listener:
                        selector.register(connection, selectors.EVENT_READ,
                                          ("source", connection))
                    else:
                        clients[connection] = [None, b"", collections.deque()]
                        selector.register(connection, selectors.EVENT_READ,
                                          ("client", connection))
                    continue
                if role == "source":
                    try:
                        size = sock.recv_into(buffer)
                    except BlockingIOError:
                        continue
                    if not size:
                        selector.unregister(sock)
                        sock.close()
                        source_done = True
                        continue
                    source_bytes += size
                    while (next_chunk < len(self.chunk_ends)
                           and source_bytes >= self.chunk_ends[next_chunk]):
                        for user, data in self.chunk_expected[next_chunk].items():
                            for connection in connections_of.get(user, ()):
                                clients[connection][2].append(memoryview(data))
                                selector.modify(connection, selectors.EVENT_READ
                                                | selectors.EVENT_WRITE, key_data(connection))
                        self.chunk_expected[next_chunk] = {}
                        next_chunk += 1
                    idle_deadline = time.monotonic() + config.timeout_ms / 1000 + 60
                    continue
                state = clients[sock]
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        data = None
                    except OSError:
                        data = b""
                    if data == b"":
                        selector.unregister(sock)
                        sock.close()
                        user = clients.pop(sock)[0]
                        if user is not None:
                            connections_of[user].remove(sock)
                        continue
                    if data and state[0] is None:
                        state[1] += data
                        if b"\n" in state[1]:
                            state[0] = int(state[1].split(b"\n")[0].strip())
                            connections_of[state[0]].append(sock)
                if mask & selectors.EVENT_WRITE and state[2]:
                    view = state[2][0]
                    try:
                        sent = sock.send(view[:SEND_SIZE])
                    except BlockingIOError:
                        sent = 0
                    except OSError:
                        state[2].clear()  # the client went away: nothing left to send
                        selector.modify(sock, selectors.EVENT_READ, key_data(sock))
                        continue
                    if sent == len(view):
                        state[2].popleft()
                    else:
                        state[2][0] = view[sent:]
                    if not state[2]:
                        selector.modify(sock, selectors.EVENT_READ, key_data(sock))
        for sock in list(clients):
            sock.close()
        event_listener.close()
        client_listener.close()
        selector.close()
        return 0


def key_data(connection: socket.socket) -> tuple[str, socket.socket]:
    return ("client", connection)


def write_json(path: str, report: RunReport) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(asdict(report), handle, indent=2)
        handle.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    if config.serve_replay:
        return ReplayBroker(config).serve()
    run = MazeRun(config)
    try:
        report = run.run()
    except MazeFailure as error:
        report = RunReport("failure", 0, 0, 0, 0, 0.0, 0.0, 0.0, time.process_time(),
                           "broker", [str(error)])
    for line in report.lines():
        print(line)
    if config.json_path:
        write_json(config.json_path, report)
    if report.failures:
        shown = report.failures[:10]
        for failure in shown:
            print(f"FAILURE: {failure}")
        if len(report.failures) > len(shown):
            print(f"FAILURE: ... and {len(report.failures) - len(shown)} more")
        return 1
    if config.dry_run:
        print("dry run: workload generated, nothing sent")
        return 0
    print(SUCCESS_LINE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
