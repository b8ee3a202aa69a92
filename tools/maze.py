#!/usr/bin/env python3
"""maze: load generator and verifier for mbroker, in the style of the follower-maze harness.

It plays both sides of the broker: it connects the user clients, then connects as the
event source and streams a seeded, batch-shuffled sequence of events. While generating
the events in sequence order it keeps its own follow-graph oracle (docs/behaviour.md,
section 2.1), so it knows the exact bytes every connected client must receive, and it
checks each client's stream byte for byte and in order as it arrives.

Success prints ``\\o/ ALL NOTIFICATIONS RECEIVED \\o/`` and exits 0; any failure prints
a precise description (user, notification number, byte offset, expected and received
line) and exits 1.

The clients can be spread over several client ports (a primary broker and its edges,
all serving one stream). ``--rate`` paces the source, and every run reports end-to-end
latency percentiles over every notification, measured from the source write that
completed the notification's SEQ prefix to the read that completed the notification.

Configuration: the follower-maze environment variables (eventListenerPort,
clientListenerPort, totalEvents, concurrencyLevel, numberOfUsers, randomSeed, timeout,
maxEventSourceBatchSize, logInterval) and equivalent command-line flags; flags win.
Run ``python3 tools/maze.py --help`` for every option; tools/README.md is the manual.

The generator is importable (``WorkloadGenerator``, ``generate_workload``) so that
benchmarks can reuse it. Standard library only.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import itertools
import json
import math
import operator
import os
import random
import selectors
import socket
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

SUCCESS_LINE = "\\o/ ALL NOTIFICATIONS RECEIVED \\o/"

Log = Callable[[str], None]


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ======================================================================================
# Configuration
#
# Rules: defaults, then the harness's environment variables, then flags; a flag wins.
# Every setting is checked here, once, so that the rest of the file can trust it.
# ======================================================================================

DEFAULT_CHUNK_EVENTS = 20_000  # events generated per chunk


@dataclass
class MazeConfig:
    host: str = "127.0.0.1"
    event_port: int = 9090
    # Clients are spread over these ports round robin, in connection order: a primary
    # broker and its edges serve the same stream, so one run verifies them all.
    client_ports: tuple[int, ...] = (9099,)
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
    rate: float | None = None  # events/s the source is paced at; None: as fast as possible

    @property
    def client_port(self) -> int:
        """The first client port (the only one unless several were given)."""
        return self.client_ports[0]



def parse_ports(text: str) -> tuple[int, ...]:
    """Parse ``9099`` or ``9099,9101,9102`` (port numbers 0..65535)."""
    ports = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or not 0 <= int(item) <= 65535:
            raise ValueError(f"{text!r} is not a port or a comma-separated list of ports")
        ports.append(int(item))
    return tuple(ports)


# (environment variable and flag name, config attribute, extra flag spellings, how to
# read the value, help)
HARNESS_SETTINGS = [
    ("eventListenerPort", "event_port", ["--event-port"], int, "event source port (9090)"),
    ("clientListenerPort", "client_ports", ["--client-port"], parse_ports,
     "user client port, or several separated by commas (e.g. 9099,9101): clients are "
     "spread over them round robin (9099)"),
    ("totalEvents", "total_events", ["--total-events"], int, "events to send (10000000)"),
    ("concurrencyLevel", "concurrency", ["--concurrency"], int,
     "connected user clients (100)"),
    ("numberOfUsers", "users", ["--users"], int,
     "user ids 1..N in events (concurrencyLevel*10)"),
    ("randomSeed", "seed", ["--seed"], int,
     "random seed; same settings give the same run (666)"),
    ("timeout", "timeout_ms", ["--timeout-ms"], int,
     "ms a client waits for its next notification, and the source for the broker to read "
     "(20000)"),
    ("maxEventSourceBatchSize", "max_batch", ["--max-batch"], int,
     "the stream is cut into batches of random size 1..N, each shuffled; 1 = in order (100)"),
    ("logInterval", "log_interval_ms", ["--log-interval-ms"], int,
     "ms between progress lines on stderr, 0 = none (1000)"),
]


def as_argument_type(read: Callable[[str], object]) -> Callable[[str], object]:
    """``read`` for argparse: its ValueError becomes a usage error naming the problem."""
    if read is int:
        return int

    def argument(text: str) -> object:
        try:
            return read(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    argument.__name__ = read.__name__
    return argument

# Settings given as plain flags; each one overrides the MazeConfig default if given.
OPTIONAL_SETTINGS = ("max_follows", "grace_ms", "settle_ms", "max_backlog_bytes",
                     "chunk_events", "json_path", "rate")


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
    for name, attribute, aliases, read, help_text in HARNESS_SETTINGS:
        parser.add_argument("--" + name, *aliases, dest=attribute, type=as_argument_type(read),
                            help=help_text)
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
                        help=f"events generated per chunk ({DEFAULT_CHUNK_EVENTS}; with "
                        "--rate, 1 ms of events, so that generating never holds up the "
                        "loop for long)")
    parser.add_argument("--rate", type=float, metavar="EVENTS_PER_S",
                        help="pace the source at this many events/s, in writes of at most "
                        "1 ms of events each, scheduled from the first write (default: as "
                        "fast as the broker reads); latency is meaningful only when paced")
    parser.add_argument("--pregenerate", action="store_true",
                        help="build the whole workload before the clock starts (benchmarking)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only generate the workload, no network; measures the generator")
    parser.add_argument("--sink", action="store_true",
                        help="no broker: stream into an in-process discarding event sink, with "
                        "zero clients; measures the tool's own sending ceiling")
    parser.add_argument("--serve-replay", action="store_true",
                        help="act as a fake broker instead: listen on the event port and "
                        "every client port, and forward each notification that a maze run "
                        "with the same settings expects as soon as the source bytes that "
                        "release it have arrived; measures maze's own ceiling and its own "
                        "share of latency")
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
    for name, attribute, _aliases, read, _help in HARNESS_SETTINGS:
        value = getattr(arguments, attribute)
        if value is None and environ.get(name, "").strip():
            try:
                value = read(environ[name])
            except ValueError as error:
                detail = "is not an integer" if read is int else f"is invalid: {error}"
                parser.error(f"environment variable {name}={environ[name]!r} {detail}")
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
    for attribute in OPTIONAL_SETTINGS:
        value = getattr(arguments, attribute)
        if value is not None:
            setattr(config, attribute, value)
    if config.rate is not None and arguments.chunk_events is None and config.rate > 0:
        config.chunk_events = max(1, min(DEFAULT_CHUNK_EVENTS,
                                         events_per_paced_write(config.rate)))
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
    if config.rate is not None and not 0 < config.rate < math.inf:
        problems.append("--rate must be a positive number of events per second")
    return problems


# ======================================================================================
# Workload generator and oracle (importable)
#
# Rules: a pure function of the settings: the same settings give the same bytes, whatever
# the chunk size (each random stream is drawn in whole words per event or per batch, and
# a chunk holds whole batches). The oracle applies the contract's rules in sequence order
# (docs/behaviour.md 2.1). Memory is bounded by max_follows and one chunk. No sockets,
# no clocks. The hot loop does one Python iteration per event and nothing per byte.
# ======================================================================================

# Event kinds, as small integers in the hot generation loop.
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


@dataclass
class ReleaseOffsets:
    """Where a chunk's lines end, and where each of its notifications is released.

    Offsets count bytes of the whole source stream from its start. A notification for
    SEQ s can only be dispatched once every event with SEQ <= s has reached the broker,
    so it is released at the end of whichever of those lines comes last in the stream.
    """

    line_ends: Sequence[int]  # per source line, in sending order, the offset just past it
    notifications: dict[int, array]  # user id -> 'q': per expected notification, in order


@dataclass
class WorkloadChunk:
    """A run of whole batches: the source bytes and what each connected user must get."""

    source: bytes  # event lines as the source sends them (batches shuffled)
    expected: dict[int, bytes]  # user id -> notification bytes, in sequence order
    events: int
    notifications: int
    release: ReleaseOffsets | None = None  # from a generator made with track_release=True


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

    The follow-graph oracle follows docs/behaviour.md 2.1: F notifies TO and adds the
    follow, U notifies nobody and removes it, B goes to every connected user, P to TO, S
    to every current follower of FROM. Only follows by connected users can ever cause a
    notification, so only those are kept per followed user; the full set of follow pairs
    is kept too (bounded by ``max_follows``) so that unfollows can pick real follows.

    With ``track_release``, each chunk also carries its ReleaseOffsets, for pacing the
    source by whole lines and for measuring latency.

    Memory is bounded by ``max_follows`` and one chunk, whatever ``total_events`` is.
    """

    def __init__(self, total_events: int, concurrency: int, users: int, seed: int = 666,
                 max_batch: int = 100, terminator: bytes = b"\r\n",
                 mix: Mapping[str, float] | None = None, max_follows: int | None = None,
                 track_release: bool = False):
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
        self.track_release = track_release
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
        # Per connected user, the notifications of the chunk being generated, as indexes
        # into the chunk's lines in sequence order (kept across chunks and cleared, so the
        # oracle can hold their append methods). An index, unlike the line itself, also
        # finds the notification's release offset.
        self._notified: dict[int, list[int]] = {user: [] for user in self.connected_users}
        self._appender_of = {user: indexes.append for user, indexes
                             in self._notified.items()}
        self._follow_pairs: list[int] = []  # pair keys, for picking a random existing follow
        self._follow_slot: dict[int, int] = {}  # pair key -> index in _follow_pairs
        # batch size -> [(reorder lines, prefix completions)], see _shuffle_batches
        self._permutations: dict[int, list[tuple[operator.itemgetter,
                                                 Completions | None]]] = {}
        self.events_generated = 0
        self.notifications_generated = 0
        self.source_bytes_generated = 0

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
        lines, notifications = self._generate_lines(first_seq, words[0::3], words[1::3],
                                                    words[2::3])
        if batch_sizes:
            sent, completions = self._shuffle_batches(lines, batch_sizes, batch_words)
        else:
            sent, completions = lines, None
        source = "".join(sent).encode("ascii")
        line_ends = release_of_event = None
        if self.track_release:
            # Lines are ASCII: a line's length in characters is its length in bytes.
            line_ends = list(itertools.accumulate(map(len, sent),
                                                  initial=self.source_bytes_generated))
            del line_ends[0]
            release_of_event = (line_ends if completions is None
                                else prefix_releases(line_ends, batch_sizes, completions))
        expected = {}
        releases = {}
        for user, indexes in self._notified.items():
            if indexes:
                expected[user] = "".join(pick(lines, indexes)).encode("ascii")
                if release_of_event is not None:
                    releases[user] = array("q", pick(release_of_event, indexes))
                indexes.clear()
        self.events_generated = first_seq + count
        self.notifications_generated += notifications
        self.source_bytes_generated += len(source)
        release = ReleaseOffsets(line_ends, releases) if line_ends is not None else None
        return WorkloadChunk(source, expected, count, notifications, release)

    def _shuffle_batches(self, lines: list[str], batch_sizes: list[int], batch_words: list[int],
                         ) -> tuple[list[str], list[Completions | None] | None]:
        """Shuffle each batch; batches stay in order, so the stream is only locally out of
        order (what a real source's reordering looks like).

        Returns the lines in sending order and, with track_release, each batch's prefix
        completions (None for a batch of one line), for prefix_releases."""
        rng = self._shuffle_rng
        shuffled: list[str] = []
        extend = shuffled.extend
        completions: list[Completions | None] | None = [] if self.track_release else None
        start = 0
        if self.max_batch > PERMUTATION_CACHE_MAX_BATCH:
            # Shuffling positions draws the same random numbers as shuffling the lines.
            shuffle = rng.shuffle
            for size in batch_sizes:
                batch = lines[start:start + size]
                order = list(range(size))
                shuffle(order)
                extend(map(batch.__getitem__, order))
                if completions is not None:
                    completions.append(prefix_completions(order))
                start += size
            return shuffled, completions
        # A shuffle per batch costs a Python-level step per line. Instead, reuse a small,
        # seeded set of precomputed permutations per batch size, applied at C speed by an
        # itemgetter; the order is still random per batch and the run still seeded. Each
        # permutation comes with its prefix completions.
        permutations = self._permutations
        for size, choice in zip(batch_sizes, batch_words, strict=True):
            if size == 1:
                shuffled.append(lines[start])
                if completions is not None:
                    completions.append(None)
                start += 1
                continue
            getters = permutations.get(size)
            if getters is None:
                getters = []
                for _ in range(PERMUTATIONS_PER_SIZE):
                    order = list(range(size))
                    rng.shuffle(order)
                    getters.append((operator.itemgetter(*order), prefix_completions(order)
                                    if self.track_release else None))
                permutations[size] = getters
            reorder, completion = getters[choice % PERMUTATIONS_PER_SIZE]
            extend(reorder(lines[start:start + size]))
            if completions is not None:
                completions.append(completion)
            start += size
        return shuffled, completions

    def _random_words(self, count: int) -> array:
        """``count`` random 32-bit words from the event stream, drawn in bulk (C speed)."""
        words = array("I")  # 4 bytes on every platform CPython supports in practice
        words.frombytes(self._event_rng.randbytes(count * words.itemsize))
        if sys.byteorder == "big":  # keep runs identical across machines
            words.byteswap()
        return words

    def _generate_lines(self, first_seq: int, kind_words: array, first_words: array,
                        second_words: array) -> tuple[list[str], int]:
        """The event lines in sequence order, and how many notifications they cause.

        The hot loop: one iteration per event, with as little Python work as possible.
        Each notification appends the event's index in the returned list to its user's
        list of notifications."""
        terminator = self.terminator.decode("ascii")
        users = self.users
        key_base = users + 1
        kind_table = self._kind_table
        table_mask = KIND_TABLE_SIZE - 1
        connected = self._connected
        # followed user -> {connected follower: append method of its notifications}
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
        for index, seq, kind_word, first_word, second_word in zip(
                itertools.count(), itertools.count(first_seq + 1), kind_words, first_words,
                second_words, strict=False):
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
                    append_expected(index)
                    notifications += 1
            elif kind == PRIVATE:
                line = f"{seq}|P|{follower}|{followed}{terminator}"
                append_expected = appender_for(followed)
                if append_expected is not None:
                    append_expected(index)
                    notifications += 1
            elif kind == STATUS:
                line = f"{seq}|S|{follower}{terminator}"
                followers = connected_followers.get(follower)
                if followers:
                    for append_expected in followers.values():
                        append_expected(index)
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
                    append_expected(index)
                notifications += connected_count
            append_line(line)
        return lines, notifications


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


# A batch's prefix completions: given the batch's slice of line ends (in sending order),
# the offsets where each prefix of the batch, in sequence order, is complete.
Completions = Callable[[Sequence[int]], tuple[int, ...]]


def prefix_completions(order: Sequence[int]) -> Completions:
    """For a batch sent in ``order`` (``order[j]`` is the sequence position of the j-th
    line sent): prefix i is complete once the last-sent of its first i+1 lines is sent."""
    # Plain loops: for a batch of thousands they beat sorted() and accumulate(max).
    sent_at = [0] * len(order)
    for position, line in enumerate(order):
        sent_at[line] = position
    completed_at = []
    last = 0
    for position in sent_at:
        if position > last:
            last = position
        completed_at.append(last)
    return operator.itemgetter(*completed_at)


def prefix_releases(line_ends: list[int], batch_sizes: Sequence[int],
                    completions: Sequence[Completions | None]) -> list[int]:
    """Each event's release offset, in sequence order: the end of the line that completes
    its prefix. Batches never overlap, so a prefix completes inside its own batch."""
    releases: list[int] = []
    extend = releases.extend
    start = 0
    for size, completion in zip(batch_sizes, completions, strict=True):
        if completion is None:
            releases.append(line_ends[start])
        else:
            extend(completion(line_ends[start:start + size]))
        start += size
    return releases


def pick(items: Sequence, indexes: Sequence[int]) -> Sequence:
    """``[items[i] for i in indexes]`` at C speed (indexes not empty)."""
    if len(indexes) == 1:
        return (items[indexes[0]],)
    return operator.itemgetter(*indexes)(items)


def join_chunks(chunks: Iterable[WorkloadChunk]) -> WorkloadChunk:
    """The chunks as one chunk, in order (for building a whole workload up front)."""
    source = bytearray()
    expected: dict[int, bytearray] = collections.defaultdict(bytearray)
    line_ends = array("q")
    releases: dict[int, array] = collections.defaultdict(lambda: array("q"))
    tracked = True
    events = notifications = 0
    for chunk in chunks:
        source += chunk.source
        for user, data in chunk.expected.items():
            expected[user] += data
        events += chunk.events
        notifications += chunk.notifications
        if chunk.release is None:
            tracked = False
        elif tracked:
            line_ends.extend(chunk.release.line_ends)  # an array: far smaller than a list
            for user, offsets in chunk.release.notifications.items():
                releases[user].extend(offsets)
    return WorkloadChunk(bytes(source), {user: bytes(data) for user, data in expected.items()},
                         events, notifications,
                         ReleaseOffsets(line_ends, dict(releases)) if tracked else None)


# ======================================================================================
# Verification of client streams
#
# Rules: received bytes are compared with the expected bytes as whole slices: no per-line
# Python work unless something differs. The first difference stops a stream's checking;
# the bytes after it are kept (up to TAIL_LIMIT_BYTES) and classified only at the end.
# A stream keeps only the expected bytes not yet received, plus the line it is in, so a
# failure can still quote it.
# ======================================================================================

COMPACT_AFTER_BYTES = 1 << 20  # drop verified expected bytes once this many piled up
TAIL_LIMIT_BYTES = 1 << 16  # bytes kept after a first difference, for the diagnosis


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
                 "failure", "latency", "release_offsets", "releases_dropped")

    def __init__(self, user: int, sock: socket.socket | None,
                 latency: LatencyRecorder | None = None):
        self.user = user
        self.sock = sock
        self.expected = bytearray()  # expected bytes; [:position] already received
        self.position = 0
        self.discarded = 0  # verified bytes already dropped from the front of expected
        self.verified_lines = 0
        self.latency = latency
        # Per expected notification, its release offset (see ReleaseOffsets); the first
        # releases_dropped notifications' offsets are gone with the verified bytes.
        self.release_offsets = array("q")
        self.releases_dropped = 0
        self.waiting_since = 0.0  # when the client last got a byte or started waiting
        self.tail: bytearray | None = None  # received bytes from the first difference on
        self.mismatch_index = 0
        self.mismatch_line_number = 0
        self.failure: str | None = None  # a failure not needing a diagnosis (timeout...)

    @property
    def pending_bytes(self) -> int:
        return len(self.expected) - self.position

    @property
    def failed(self) -> bool:
        return self.tail is not None or self.failure is not None

    def add_expected(self, data: bytes, now: float,
                     release_offsets: array | None = None) -> None:
        if self.position == len(self.expected):
            self.waiting_since = now  # the wait for the next notification starts now
        self.expected += data
        if release_offsets is not None:
            self.release_offsets.extend(release_offsets)

    def next_release(self) -> int | None:
        """The release offset of the next notification still to be received, if known."""
        index = self.verified_lines - self.releases_dropped
        return self.release_offsets[index] if index < len(self.release_offsets) else None

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
            completed = data.count(b"\n")
            self.verified_lines += completed
            if completed and self.latency is not None:
                first = self.verified_lines - completed - self.releases_dropped
                if first + completed <= len(self.release_offsets):
                    self.latency.record(self.release_offsets, first, first + completed, now)
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
        del self.release_offsets[:self.verified_lines - self.releases_dropped]
        self.releases_dropped = self.verified_lines

    def _expected_line_at(self, index: int) -> tuple[int, bytes]:
        line_start = self.expected.rfind(b"\n", 0, index) + 1
        line_end = self.expected.find(b"\n", line_start)
        line_end = len(self.expected) if line_end < 0 else line_end + 1
        return line_start, bytes(self.expected[line_start:line_end])

    def time_out(self, timeout_ms: int) -> None:
        self.failure = self.describe_timeout(timeout_ms)

    def close_by_broker(self, reason: str) -> None:
        self.failure = self.describe_closed(reason)

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


class Verifier:
    """Every connected client's stream, and the totals over all of them.

    A client that the broker closes, or whose bytes differ, fails at once and the run
    stops; what it received after a difference is kept for the diagnosis.
    """

    def __init__(self, selector: selectors.BaseSelector, max_backlog_bytes: int,
                 latency: LatencyRecorder | None = None):
        self.selector = selector
        self.latency = latency
        self.streams: list[ClientStream] = []
        self._stream_of_user: dict[int, ClientStream] = {}
        self.max_backlog_bytes = max_backlog_bytes
        self.notification_bytes_expected = 0
        self.notification_bytes_verified = 0
        self.last_verified_time = 0.0
        self.failed = False
        # Only the clients that were given expected bytes can push a backlog past the
        # bound; remembering them avoids scanning every stream on every refill.
        self._backlogged: set[ClientStream] = set()

    def connect(self, user: int, sock: socket.socket) -> None:
        stream = ClientStream(user, sock, self.latency)
        self.streams.append(stream)
        self._stream_of_user[user] = stream
        self.selector.register(sock, selectors.EVENT_READ, stream)

    def expect(self, expected: Mapping[int, bytes], now: float,
               release: ReleaseOffsets | None = None) -> None:
        release_offsets = release.notifications if release is not None else {}
        for user, data in expected.items():
            stream = self._stream_of_user[user]
            stream.add_expected(data, now, release_offsets.get(user))
            self.notification_bytes_expected += len(data)
            if stream.pending_bytes > self.max_backlog_bytes:
                self._backlogged.add(stream)

    def backlogged(self) -> bool:
        """True while some client has more than max_backlog_bytes still to receive."""
        if self._backlogged:
            self._backlogged = {stream for stream in self._backlogged
                                if stream.pending_bytes > self.max_backlog_bytes}
        return bool(self._backlogged)

    @property
    def complete(self) -> bool:
        return self.notification_bytes_verified == self.notification_bytes_expected

    def read(self, stream: ClientStream) -> None:
        try:
            data = stream.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError as error:
            data = None
            reason = str(error)
        else:
            reason = "EOF"
        if not data:
            stream.close_by_broker(reason)
            self.selector.unregister(stream.sock)
            self.failed = True
            return
        now = time.perf_counter()
        verified = stream.receive(data, now)
        if verified:
            self.notification_bytes_verified += verified
            self.last_verified_time = now
        if stream.tail is not None:
            self.failed = True

    def late_streams(self, now: float, source_active_at: float,
                     timeout: float) -> list[ClientStream]:
        """Clients that waited longer than ``timeout`` for their next notification.

        A wait counts from the client's last byte or from ``source_active_at`` (the last
        source write), whichever is later: while the broker is still taking events, it
        may not have received the ones this client waits for yet."""
        return [stream for stream in self.streams if stream.pending_bytes
                and now - max(stream.waiting_since, source_active_at) > timeout]

    def any_failed(self) -> bool:
        return any(stream.failed for stream in self.streams)

    def lowest_pending_release(self, default: int) -> int:
        """The lowest release offset of a notification still to be received, else
        ``default``."""
        pending = [offset for offset in map(ClientStream.next_release, self.streams)
                   if offset is not None]
        return min(pending, default=default)

    def listen(self, seconds: float) -> None:
        """Keep reading every client for ``seconds`` (the end-of-run grace period).

        On success, anything more is an extra notification; after a difference, it
        collects the bytes that tell a missing line from a reordered one."""
        deadline = time.perf_counter() + seconds
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            for key, _mask in self.selector.select(remaining):
                stream = key.data
                if not isinstance(stream, ClientStream):
                    continue
                try:
                    data = stream.sock.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(stream.sock)
                    continue
                stream.receive(data, time.perf_counter())

    def failures(self) -> list[str]:
        failures = []
        for stream in self.streams:
            if stream.tail is not None:
                failures.append(stream.describe_mismatch())
            elif stream.failure is not None:
                failures.append(stream.failure)
        return failures

    def close(self) -> None:
        for stream in self.streams:
            stream.sock.close()


# ======================================================================================
# End-to-end latency
#
# Rules: a notification for SEQ s can only be delivered once every event with SEQ <= s
# has reached the broker. Its latency runs from the moment the source write that
# completed the prefix 1..s returned, to the moment maze read the bytes that complete
# the notification. Every verified notification is counted, never a sample: the
# notifications completed by one read and released by one write share one value, so the
# cost is per read and per write, not per line. Values go into buckets 0.2% wide, which
# bounds memory and keeps percentiles within 0.1%; count, min, mean and max are exact.
# ======================================================================================

LATENCY_FLOOR = 1e-6  # seconds; anything shorter shares the lowest bucket
LATENCY_BUCKET_GROWTH = 1.002  # each bucket's upper bound over its lower bound
LATENCY_BUCKETS = 12_000  # up to 1e-6 * 1.002**12000 s, about 7 hours
CLOCK_TRIM_WRITES = 1 << 16  # write log entries kept before dropping unneeded ones


class ReleaseClock:
    """The source's write log: when the bytes up to an offset had all been written."""

    def __init__(self):
        self.ends = array("q")  # offset just past each logged write, increasing
        self.times = array("d")  # time.perf_counter() when that write's send() returned
        self._trim_at = CLOCK_TRIM_WRITES

    def record(self, end: int, when: float) -> None:
        self.ends.append(end)
        self.times.append(when)

    @property
    def needs_trim(self) -> bool:
        return len(self.ends) >= self._trim_at

    def forget_before(self, offset: int) -> None:
        """Drop the writes that no notification released at ``offset`` or later needs."""
        count = bisect.bisect_left(self.ends, offset)
        del self.ends[:count]
        del self.times[:count]
        # A lagging client can pin old writes: try again only once the log has doubled.
        self._trim_at = max(CLOCK_TRIM_WRITES, 2 * len(self.ends))


class LatencyHistogram:
    """Counts of latencies in logarithmic buckets, with exact count, min, max and sum."""

    _BUCKETS_PER_E = 1 / math.log(LATENCY_BUCKET_GROWTH)

    def __init__(self):
        self.counts = [0] * LATENCY_BUCKETS
        self.count = 0
        self.total = 0.0
        self.minimum = math.inf
        self.maximum = 0.0

    def add(self, seconds: float, count: int = 1) -> None:
        seconds = max(seconds, 0.0)
        if seconds < LATENCY_FLOOR:
            bucket = 0
        else:
            bucket = min(LATENCY_BUCKETS - 1,
                         int(math.log(seconds / LATENCY_FLOOR) * self._BUCKETS_PER_E) + 1)
        self.counts[bucket] += count
        self.count += count
        self.total += seconds * count
        self.minimum = min(self.minimum, seconds)
        self.maximum = max(self.maximum, seconds)

    def percentiles(self, fractions: Sequence[float]) -> list[float]:
        """Nearest-rank percentiles: each the middle of its bucket, kept within the
        exact extremes (so they never decrease and never pass the maximum)."""
        cumulative = list(itertools.accumulate(self.counts))
        values = []
        for fraction in fractions:
            rank = max(1, math.ceil(fraction * self.count))
            bucket = bisect.bisect_left(cumulative, rank)
            middle = LATENCY_FLOOR * LATENCY_BUCKET_GROWTH ** (bucket - 0.5)
            values.append(min(max(middle, self.minimum), self.maximum))
        return values

    def summary(self) -> LatencySummary | None:
        if not self.count:
            return None
        p50, p90, p99, p999 = self.percentiles([0.5, 0.9, 0.99, 0.999])
        return LatencySummary(count=self.count, min=self.minimum,
                              mean=self.total / self.count, p50=p50, p90=p90, p99=p99,
                              p999=p999, max=self.maximum)


class LatencyRecorder:
    """Turns verified notifications into latencies, from their release offsets."""

    def __init__(self, clock: ReleaseClock):
        self.clock = clock
        self.histogram = LatencyHistogram()

    def record(self, release_offsets: Sequence[int], first: int, stop: int,
               received_at: float) -> None:
        """Notifications ``first``..``stop - 1`` of a stream, whose release offsets are
        in ``release_offsets`` (increasing), were completed by a read at ``received_at``.
        """
        ends, times = self.clock.ends, self.clock.times
        write = bisect.bisect_left(ends, release_offsets[first])
        while first < stop:
            if write == len(ends):
                # Delivered before maze logged the write that released it: impossible for
                # a broker that waits for the events, so this is counted as no latency.
                self.histogram.add(0.0, stop - first)
                return
            released_together = bisect.bisect_right(release_offsets, ends[write], first, stop)
            self.histogram.add(received_at - times[write], released_together - first)
            first = released_together
            if first < stop:
                write = bisect.bisect_left(ends, release_offsets[first], write + 1)


# ======================================================================================
# The event-source sender
#
# Rules: the queue holds generated source bytes not yet written, in order. Unpaced, bytes
# go out whenever the socket is writable, at most SEND_SIZE per send(). Paced, they go
# out in pieces of whole lines, at most PACED_WRITE_SECONDS of the schedule each; piece
# k is due at start + k * events_per_write / rate, so a late piece does not push back
# the ones after it and the rate does not drift. EVENT_WRITE is watched only while the
# kernel holds back bytes that may go out now. Every write is logged in the release
# clock. A stall is the broker not taking bytes: a blocked send() shows it, and so do
# written bytes that the broker leaves unread in the kernel.
# ======================================================================================

SEND_SIZE = 1 << 20  # bytes handed to one send() call on the event source
PACED_WRITE_SECONDS = 0.001  # a paced write carries at most this much of the schedule
PACED_WRITES_PER_PASS = 64  # a sender behind schedule still lets the clients be read
LINE_ENDS_KEPT = 1 << 16  # line ends of events already written, dropped past this


def events_per_paced_write(rate: float) -> int:
    return max(1, int(rate * PACED_WRITE_SECONDS))


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


class SourceSender:
    """The event source connection: queued source bytes out to the broker, unpaced or
    at ``rate`` events per second."""

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 clock: ReleaseClock, rate: float | None = None):
        self.sock = sock
        self.selector = selector
        self.clock = clock
        self._queue: collections.deque[memoryview] = collections.deque()
        self.queued_bytes = 0
        self.bytes_written = 0
        self.writes = 0
        self.first_write_time: float | None = None
        self.last_write_time = 0.0
        self.failure: str | None = None
        self._watching_writes = False
        self._blocked = False  # the kernel did not take all it was offered
        # The source waits for the broker since its last write, or since bytes became
        # writable (queued on an empty queue, or a paced piece fell due), whichever is later.
        self._waiting_since = time.perf_counter()
        # Otherwise a stall shows as written bytes left unread: the count of bytes the
        # broker has taken stops moving.
        self._acknowledged = 0
        self._acknowledged_since = 0.0
        # Pacing.
        self.rate = rate
        self.events_per_write = events_per_paced_write(rate) if rate else 0
        self.events_queued = 0
        self._line_ends = array("q")  # line ends of the queued events, paced only
        self._line_ends_base = 0  # event number of _line_ends[0]
        self._events_in_pieces = 0  # events handed to pieces so far
        self._piece_end: int | None = None  # offset where the piece being written ends
        self._piece_due = 0.0
        self.schedule_start: float | None = None
        self.pieces_written = 0
        self._first_piece_events = 0
        self._events_in_finished_pieces = 0
        self._last_piece_time = 0.0
        self.max_lag = 0.0
        self.final_lag = 0.0
        sock.setblocking(False)
        # A paced piece must leave at once, not wait for the previous one's ACK (Nagle).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector.register(sock, selectors.EVENT_READ, self)

    @property
    def idle(self) -> bool:
        return not self._queue

    def enqueue(self, data: bytes, events: int, line_ends: Sequence[int] | None,
                now: float) -> None:
        if not data:
            return
        if not self._queue and not self.rate:
            self._waiting_since = now
        self._queue.append(memoryview(data))
        self.queued_bytes += len(data)
        self.events_queued += events
        if self.rate:
            if line_ends is None:
                raise ValueError("a paced source needs the chunk's line ends")
            self._line_ends.extend(line_ends)

    def pump(self, now: float) -> None:
        """Paced: write the pieces that are due (the kernel permitting)."""
        if self.rate and not self._blocked and self.failure is None:
            self._write_due_pieces(now)

    def seconds_until_due(self, now: float, longest: float) -> float:
        """How long select() may wait before the next paced piece is due."""
        if not self.rate or self._piece_end is not None:
            return longest
        if self._events_in_pieces >= self.events_queued or self.schedule_start is None:
            return longest
        return min(longest, max(0.0, self._due_time(self._events_in_pieces) - now))

    def update_interest(self) -> None:
        wanted = bool(self._queue) and (self._blocked or not self.rate)
        if wanted != self._watching_writes:
            self.selector.modify(self.sock, selectors.EVENT_READ
                                 | (selectors.EVENT_WRITE if wanted else 0), self)
            self._watching_writes = wanted

    def on_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and self._queue:
            self._blocked = False
            if self.rate:
                self._write_due_pieces(time.perf_counter())
            else:
                self._send(SEND_SIZE)
        elif mask & selectors.EVENT_READ:
            self._read_unexpected()

    def _due_time(self, event: int) -> float:
        piece = event // self.events_per_write
        return self.schedule_start + piece * self.events_per_write / self.rate

    def _write_due_pieces(self, now: float) -> None:
        for _ in range(PACED_WRITES_PER_PASS):
            if self._piece_end is None and not self._start_piece(now):
                return
            if not self._send(self._piece_end - self.bytes_written):
                return
            if self.bytes_written == self._piece_end:
                self._finish_piece()

    def _start_piece(self, now: float) -> bool:
        first = self._events_in_pieces
        if first >= self.events_queued:
            return False
        if self.schedule_start is None:
            self.schedule_start = now
        due = self._due_time(first)
        if due > now:
            return False
        # Up to the next multiple of events_per_write: a piece that had to wait for
        # generation is not followed by an extra, shorter one.
        last = min((first // self.events_per_write + 1) * self.events_per_write,
                   self.events_queued)
        self._piece_end = self._line_ends[last - 1 - self._line_ends_base]
        self._piece_due = due
        self._events_in_pieces = last
        self._waiting_since = max(self._waiting_since, now)
        if not self.pieces_written:
            self._first_piece_events = last
        if last - self._line_ends_base > LINE_ENDS_KEPT:
            del self._line_ends[:last - self._line_ends_base]
            self._line_ends_base = last
        return True

    def _finish_piece(self) -> None:
        lag = self.last_write_time - self._piece_due
        self.max_lag = max(self.max_lag, lag)
        self.final_lag = lag
        self.pieces_written += 1
        self._events_in_finished_pieces = self._events_in_pieces
        self._last_piece_time = self.last_write_time
        self._piece_end = None

    def _send(self, limit: int) -> bool:
        """Send up to ``limit`` bytes from the head of the queue; True if the kernel took
        everything offered."""
        view = self._queue[0]
        limit = min(limit, SEND_SIZE)
        if self.rate and len(view) < limit and len(self._queue) > 1:
            # A paced piece that spans two generated chunks still goes out in one write.
            offered = b"".join((view, self._queue[1][:limit - len(view)]))
        else:
            offered = view[:limit]
        try:
            sent = self.sock.send(offered)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self.failure = (f"event source: connection failed after {self.bytes_written} "
                            f"bytes written: {error}")
            return False
        if not sent:
            self._blocked = True
            return False
        written_before = self.bytes_written
        now = time.perf_counter()
        if self.first_write_time is None:
            self.first_write_time = now
        self.last_write_time = self._waiting_since = now
        self.bytes_written += sent
        self.queued_bytes -= sent
        self.writes += 1
        self.clock.record(self.bytes_written, now)
        while sent:
            view = self._queue[0]
            if sent < len(view):
                self._queue[0] = view[sent:]
                break
            sent -= len(view)
            self._queue.popleft()
        self._blocked = self.bytes_written - written_before < len(offered)
        return not self._blocked

    def _read_unexpected(self) -> None:
        # The broker sends nothing on the event port: this is EOF or junk.
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as error:
            reason = str(error)
        else:
            reason = "EOF" if not data else f"unexpected bytes {data[:40]!r}"
        self.failure = (f"event source: broker closed or wrote on the event connection "
                        f"({reason}) after {self.bytes_written} bytes written")
        self.selector.unregister(self.sock)

    def stalled_for(self, now: float) -> float:
        """Seconds the broker has not taken source bytes although some were waiting."""
        if self._queue and (not self.rate or self._piece_end is not None):
            return now - self._waiting_since
        # Nothing may be written right now, but the kernel may still hold bytes the
        # broker has not taken: a stall that send() alone cannot see.
        unread = unacknowledged_bytes(self.sock)
        acknowledged = self.bytes_written - unread
        if not unread or acknowledged != self._acknowledged:
            self._acknowledged, self._acknowledged_since = acknowledged, now
        return now - self._acknowledged_since if unread else 0.0

    def stall_message(self, stalled_for: float, timeout_ms: int) -> str:
        return (f"event source stalled: the broker has not read the event source for "
                f"{stalled_for * 1000:.0f} ms (timeout {timeout_ms} ms); "
                f"{self.bytes_written} bytes written "
                f"({unacknowledged_bytes(self.sock)} of them not yet taken by the broker), "
                f"{self.queued_bytes} more queued")

    def summary(self) -> SenderSummary:
        achieved = None
        if self.rate and self.pieces_written > 1 and self._last_piece_time > self.schedule_start:
            # Events after the first piece over the time since it: exactly the rate when
            # every piece leaves on time.
            achieved = ((self._events_in_finished_pieces - self._first_piece_events)
                        / (self._last_piece_time - self.schedule_start))
        return SenderSummary(
            rate=self.rate, events_per_write=self.events_per_write or None,
            writes=self.writes, achieved_events_per_second=achieved,
            max_lag_seconds=self.max_lag if self.rate else None,
            final_lag_seconds=self.final_lag if self.rate else None)

    def finish(self) -> None:
        """Tell the peer the stream is complete (EOF), keeping the socket open."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


# ======================================================================================
# The run loop
#
# Rules: one thread; nothing blocks except select(), whose timeout bounds every check.
# Clients connect first, then the source, after a settle wait so that the broker has
# read every id before the first event is dispatched. Each pass generates (if there is
# room), writes, reads and verifies, then checks the deadlines: the run stops at the
# first failure, or once everything generated is written and every expected byte
# verified. The clock runs from the first source byte written to the last notification
# verified.
# ======================================================================================

RECEIVE_SIZE = 1 << 18  # bytes asked of one recv() call on a client
REFILL_BELOW_BYTES = 1 << 20  # generate the next chunk when less than this is queued
SELECT_INTERVAL = 0.05  # seconds; also how often the deadlines are checked


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

    def wait_until_read(self, timeout: float) -> None:
        """Wait for the sender's EOF to reach the sink (everything has been read)."""
        self.thread.join(timeout)


class WorkloadFeed:
    """Hands generated chunks to the verifier (expected bytes) and the sender (source).

    Generation pauses while the source queue holds REFILL_BELOW_BYTES or a client lags
    more than --max-backlog behind, so memory stays bounded whatever totalEvents is.
    """

    def __init__(self, chunks: Iterator[WorkloadChunk], sender: SourceSender,
                 verifier: Verifier):
        self._chunks = chunks
        self._sender = sender
        self._verifier = verifier
        self.done = False
        self.events = 0
        self.notifications = 0

    def refill(self) -> None:
        while not self.done and self._sender.queued_bytes < REFILL_BELOW_BYTES:
            if self._verifier.backlogged():
                return
            chunk = next(self._chunks, None)
            if chunk is None:
                self.done = True
                return
            now = time.perf_counter()
            self._verifier.expect(chunk.expected, now, chunk.release)
            self.notifications += chunk.notifications
            self.events += chunk.events
            self._sender.enqueue(chunk.source, chunk.events,
                                 chunk.release.line_ends if chunk.release else None, now)


class Watchdog:
    """The run's deadlines: a stalled source and clients waiting too long."""

    def __init__(self, timeout_ms: int, sender: SourceSender, verifier: Verifier):
        self.timeout_ms = timeout_ms
        self.sender = sender
        self.verifier = verifier
        self._next_check = 0.0

    def check(self, now: float) -> list[str] | None:
        """None while the run may go on. Otherwise the run stops, with these failures
        (a client's own failure is kept on its stream and reported from there)."""
        if now < self._next_check:
            return None
        self._next_check = now + SELECT_INTERVAL
        timeout = self.timeout_ms / 1000
        stalled_for = self.sender.stalled_for(now)
        if stalled_for > timeout:
            return [self.sender.stall_message(stalled_for, self.timeout_ms)]
        late = self.verifier.late_streams(now, self.sender.last_write_time, timeout)
        if not late:
            return None
        if stalled_for > timeout / 2:
            # Clients starve because the broker stopped reading: that is the root cause
            # to report; the starving clients are its consequence.
            return [self.sender.stall_message(stalled_for, self.timeout_ms),
                    f"as a consequence {len(late)} client(s) miss notifications; the "
                    f"first: {late[0].describe_timeout(self.timeout_ms)}"]
        for stream in late:
            stream.time_out(self.timeout_ms)
        return []


class ProgressLog:
    """A progress line on stderr every --logInterval ms (none if 0)."""

    def __init__(self, interval_ms: int, log: Log, total_events: int, feed: WorkloadFeed,
                 sender: SourceSender, verifier: Verifier):
        self.interval = interval_ms / 1000
        self.log = log
        self.total_events = total_events
        self.feed = feed
        self.sender = sender
        self.verifier = verifier
        self.started = time.perf_counter()
        self._next_line = self.started + self.interval

    def maybe_log(self, now: float) -> None:
        if not self.interval or now < self._next_line:
            return
        self._next_line = now + self.interval
        elapsed = now - (self.sender.first_write_time or self.started)
        events = self.feed.events
        self.log(f"maze: {events}/{self.total_events} events generated, "
                 f"{self.sender.bytes_written} source bytes written, "
                 f"{self.verifier.notification_bytes_verified}/"
                 f"{self.verifier.notification_bytes_expected} notification bytes verified, "
                 f"{events / elapsed if elapsed > 0 else 0:,.0f} events/s")


class MazeRun:
    """One run: connect, stream, verify, report. ``MazeRun(config).run()``."""

    def __init__(self, config: MazeConfig, log: Log | None = None):
        self.config = config
        self.log = log or log_to_stderr
        concurrency = 0 if config.sink else config.concurrency
        self.generator = WorkloadGenerator(
            config.total_events, concurrency, config.users, config.seed, config.max_batch,
            config.terminator, config.mix, config.max_follows, track_release=True)

    def run(self) -> RunReport:
        config = self.config
        if config.dry_run:
            return self._dry_run()
        chunks = self._chunks()
        cpu_start = time.process_time()
        sink = DiscardingSink(config.host) if config.sink else None
        selector = selectors.DefaultSelector()
        clock = ReleaseClock()
        latency = LatencyRecorder(clock)
        verifier = Verifier(selector, config.max_backlog_bytes, latency)
        sender = None
        try:
            clients_per_port = self._connect_clients(verifier)
            sender = SourceSender(self._connect_source(sink.port if sink else
                                                       config.event_port),
                                  selector, clock, config.rate)
            feed = WorkloadFeed(chunks, sender, verifier)
            failures = self._drive(selector, feed, sender, verifier)
            end_time = max(verifier.last_verified_time, sender.last_write_time)
            if sink is not None and not failures and not verifier.any_failed():
                # Count the time until the sink has actually read everything.
                sender.finish()
                sink.wait_until_read(config.timeout_ms / 1000)
                end_time = max(end_time, sink.last_read)
                if sink.bytes_read != sender.bytes_written:
                    failures.append(f"sink read {sink.bytes_read} of {sender.bytes_written} "
                                    f"bytes")
            if verifier.streams:
                verifier.listen(config.grace_ms / 1000)
            failures += verifier.failures()
        finally:
            verifier.close()
            if sender is not None:
                sender.close()
            selector.close()
        started = sender.first_write_time
        return RunReport.measured(
            events=feed.events,
            notifications=feed.notifications,
            source_bytes=sender.bytes_written,
            notification_bytes=verifier.notification_bytes_expected,
            seconds=end_time - started if started is not None else 0.0,
            cpu_seconds=time.process_time() - cpu_start,
            mode=("sink" if sink else "broker")
            + (", pregenerated" if config.pregenerate else ", streaming")
            + (f", paced at {config.rate:,.0f} events/s" if config.rate else ""),
            failures=failures,
            clients_per_port=clients_per_port,
            latency=latency.histogram.summary(),
            sender=sender.summary(),
        )

    def _chunks(self) -> Iterator[WorkloadChunk]:
        if not self.config.pregenerate:
            return self.generator.chunks(self.config.chunk_events)
        # Build the whole workload before the clock starts, as one big chunk.
        started = time.perf_counter()
        whole = join_chunks(self.generator.chunks(self.config.chunk_events))
        self.log(f"maze: pregenerated {whole.events} events, {whole.notifications} "
                 f"notifications, {len(whole.source)} source bytes in "
                 f"{time.perf_counter() - started:.2f} s")
        return iter([whole])

    def _connect_clients(self, verifier: Verifier) -> dict[int, int]:
        """Connect every client, round robin over the client ports; clients per port."""
        config = self.config
        clients_per_port = dict.fromkeys(config.client_ports, 0)
        ports = itertools.cycle(config.client_ports)
        for user in self.generator.connected_users:
            port = next(ports)
            try:
                sock = socket.create_connection((config.host, port),
                                                timeout=config.timeout_ms / 1000)
                sock.sendall(self.generator.id_line(user))
            except OSError as error:
                raise MazeFailure(f"cannot connect user {user} to client port "
                                  f"{config.host}:{port}: {error}") from None
            sock.setblocking(False)
            verifier.connect(user, sock)
            clients_per_port[port] += 1
        if verifier.streams:
            # The broker (and every edge, which lags it) must have read every id before
            # the first event is dispatched.
            time.sleep(config.settle_ms / 1000)
        return clients_per_port

    def _connect_source(self, port: int) -> socket.socket:
        try:
            return socket.create_connection((self.config.host, port),
                                            timeout=self.config.timeout_ms / 1000)
        except OSError as error:
            raise MazeFailure(f"cannot connect the event source to {self.config.host}:"
                              f"{port}: {error}") from None

    def _drive(self, selector: selectors.BaseSelector, feed: WorkloadFeed,
               sender: SourceSender, verifier: Verifier) -> list[str]:
        """The loop; returns the run-level failures (clients keep their own)."""
        watchdog = Watchdog(self.config.timeout_ms, sender, verifier)
        progress = ProgressLog(self.config.log_interval_ms, self.log,
                               self.config.total_events, feed, sender, verifier)
        clock = sender.clock
        while True:
            feed.refill()
            now = time.perf_counter()
            # Writes wait for the end of a pass over the ready clients: writing between
            # reads keeps the schedule a little closer, but the notifications it
            # releases then wait for the rest of the pass, which raised the measured
            # floor (p50 0.37 -> 0.6 ms at 100,000 events/s against the replay broker).
            sender.pump(now)
            sender.update_interest()
            for key, mask in selector.select(sender.seconds_until_due(now, SELECT_INTERVAL)):
                if key.data is sender:
                    sender.on_ready(mask)
                else:
                    verifier.read(key.data)
            if sender.failure is not None:
                return [sender.failure]
            if verifier.failed:
                return []
            if feed.done and sender.idle and verifier.complete:
                return []
            now = time.perf_counter()
            failures = watchdog.check(now)
            if failures is not None:
                return failures
            progress.maybe_log(now)
            if clock.needs_trim:
                clock.forget_before(verifier.lowest_pending_release(sender.bytes_written + 1))

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
        return RunReport.measured(
            events=events, notifications=notifications, source_bytes=source_bytes,
            notification_bytes=notification_bytes, seconds=time.perf_counter() - started,
            cpu_seconds=time.process_time() - cpu_start, mode="dry-run (generation only)",
            failures=[])


# ======================================================================================
# Replay broker (--serve-replay)
#
# Rules: a fake broker that costs far less than maze, so that a run against it measures
# maze itself: its ceiling (unpaced) and its share of latency (paced). It regenerates the
# workload of a maze run with the same settings, reads and discards the event stream,
# and forwards each notification as soon as the source bytes that release it (see
# ReleaseOffsets) have arrived: what an infinitely fast broker would do. No parsing, no
# graph; the work per read is C-speed slicing plus a step per user that gets bytes. It
# serves clients on every --clientListenerPort, all of one stream, and exits once the
# source has closed and every queued byte is sent.
# ======================================================================================

REPLAY_IDLE_SECONDS = 60  # beyond --timeout, how long it waits for a source or client


class ReplayClient:
    """One client connection of the replay broker."""

    __slots__ = ("sock", "user", "hello", "outbox")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.user: int | None = None  # known once its id line has arrived
        self.hello = b""
        self.outbox: collections.deque[memoryview] = collections.deque()

    def read_hello(self, data: bytes) -> bool:
        """Take bytes before the id is known; True once the id line is complete."""
        self.hello += data
        if b"\n" not in self.hello:
            return False
        self.user = int(self.hello.split(b"\n")[0].strip())
        return True


class ReplayBroker:
    """A fake broker for measuring maze itself (``--serve-replay``)."""

    def __init__(self, config: MazeConfig, log: Log | None = None):
        self.config = config
        self.log = log or log_to_stderr
        generator = WorkloadGenerator(
            config.total_events, config.concurrency, config.users, config.seed,
            config.max_batch, config.terminator, config.mix, config.max_follows,
            track_release=True)
        whole = join_chunks(generator.chunks(config.chunk_events))
        self._stream_of: dict[int, bytes] = whole.expected  # user -> its whole stream
        self._forwarded: dict[int, int] = dict.fromkeys(whole.expected, 0)  # bytes so far
        # Every notification of the run, ordered by the source offset that releases it:
        # its release offset, its user, and where it ends in that user's stream. A stable
        # sort keeps each user's notifications in order.
        self._releases_of = whole.release.notifications  # user -> release offsets
        self._ends_of: dict[int, array] = {}  # user -> where each notification ends
        releases, users, ends = array("q"), array("q"), array("q")
        for user, data in whole.expected.items():
            user_releases = self._releases_of[user]
            user_ends = array("q", itertools.accumulate(
                map(len, data.splitlines(keepends=True))))
            assert len(user_ends) == len(user_releases)
            self._ends_of[user] = user_ends
            releases.extend(user_releases)
            users.extend(itertools.repeat(user, len(user_releases)))
            ends.extend(user_ends)
        order = sorted(range(len(releases)), key=releases.__getitem__)
        self._releases = array("q", map(releases.__getitem__, order))
        self._users = array("q", map(users.__getitem__, order))
        self._ends = array("q", map(ends.__getitem__, order))
        self._released = 0  # notifications released so far (a position in the above)
        self._selector = selectors.DefaultSelector()
        self._clients: dict[socket.socket, ReplayClient] = {}
        self._connections_of: dict[int, list[ReplayClient]] = collections.defaultdict(list)
        self._source_bytes = 0
        self._source_done = False
        self._buffer = bytearray(1 << 22)
        self._idle_deadline = 0.0

    def serve(self) -> int:
        config = self.config
        event_listener = socket.create_server((config.host, config.event_port))
        client_listeners = [socket.create_server((config.host, port))
                            for port in config.client_ports]
        self._selector.register(event_listener, selectors.EVENT_READ,
                                (self._accept_source, event_listener))
        for listener in client_listeners:
            self._selector.register(listener, selectors.EVENT_READ,
                                    (self._accept_client, listener))
        for listener in (event_listener, *client_listeners):
            listener.setblocking(False)
        client_addresses = ",".join(f"{config.host}:{listener.getsockname()[1]}"
                                    for listener in client_listeners)
        self.log(f"replay broker listening events={config.host}:"
                 f"{event_listener.getsockname()[1]} clients={client_addresses}")
        self._extend_idle_deadline()
        try:
            while time.monotonic() < self._idle_deadline:
                if self._source_done and not any(client.outbox for client
                                                 in self._clients.values()):
                    break
                for key, mask in self._selector.select(0.1):
                    handler, target = key.data
                    handler(target, mask)
        finally:
            for sock in list(self._clients):
                sock.close()
            for listener in (event_listener, *client_listeners):
                listener.close()
            self._selector.close()
        return 0

    def _extend_idle_deadline(self) -> None:
        self._idle_deadline = (time.monotonic() + self.config.timeout_ms / 1000
                               + REPLAY_IDLE_SECONDS)

    def _accept_source(self, listener: socket.socket, _mask: int) -> None:
        try:
            connection, _address = listener.accept()
        except BlockingIOError:
            return
        connection.setblocking(False)
        self._selector.register(connection, selectors.EVENT_READ,
                                (self._read_source, connection))

    def _accept_client(self, listener: socket.socket, _mask: int) -> None:
        try:
            connection, _address = listener.accept()
        except BlockingIOError:
            return
        connection.setblocking(False)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = ReplayClient(connection)
        self._clients[connection] = client
        self._selector.register(connection, selectors.EVENT_READ, (self._serve_client, client))

    def _read_source(self, sock: socket.socket, _mask: int) -> None:
        try:
            size = sock.recv_into(self._buffer)
        except BlockingIOError:
            return
        if not size:
            self._selector.unregister(sock)
            sock.close()
            self._source_done = True
            return
        self._source_bytes += size
        self._forward_released()
        self._extend_idle_deadline()

    def _forward_released(self) -> None:
        first = self._released
        stop = bisect.bisect_right(self._releases, self._source_bytes, first)
        if stop == first:
            return
        self._released = stop
        if stop - first > 4 * len(self._stream_of):
            # A big read: a search per user costs less than a step per notification.
            for user, user_releases in self._releases_of.items():
                released = bisect.bisect_right(user_releases, self._source_bytes)
                if released:
                    self._forward(user, self._ends_of[user][released - 1])
            return
        # Each user's notifications end in increasing order, so the last one wins: where
        # that user's stream is released up to.
        released = zip(self._users[first:stop], self._ends[first:stop], strict=True)
        for user, end in dict(released).items():
            self._forward(user, end)

    def _forward(self, user: int, end: int) -> None:
        """Send ``user``'s stream up to ``end`` to its connections."""
        start = self._forwarded[user]
        if end <= start:
            return
        self._forwarded[user] = end
        clients = self._connections_of.get(user)
        if clients:  # nobody connected as this user: dropped, as a broker would
            piece = memoryview(self._stream_of[user])[start:end]
            for client in clients:
                self._queue(client, piece)

    def _queue(self, client: ReplayClient, data: memoryview) -> None:
        if client.outbox:
            client.outbox.append(data)
            return
        # Send at once: a round through select() per client would be the replay broker's
        # own latency, not maze's.
        sent = self._send(client, data)
        if sent < len(data):
            client.outbox.append(data[sent:])
            self._selector.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                  (self._serve_client, client))

    def _send(self, client: ReplayClient, data: memoryview) -> int:
        try:
            return client.sock.send(data[:SEND_SIZE])
        except BlockingIOError:
            return 0
        except OSError:
            return len(data)  # the client went away: nothing left to send it

    def _serve_client(self, client: ReplayClient, mask: int) -> None:
        if mask & selectors.EVENT_READ and not self._read_client(client):
            return
        if mask & selectors.EVENT_WRITE and client.outbox:
            self._write_client(client)

    def _read_client(self, client: ReplayClient) -> bool:
        """Read the id line, discard anything after it; False once the client is gone."""
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._selector.unregister(client.sock)
            client.sock.close()
            del self._clients[client.sock]
            if client.user is not None:
                self._connections_of[client.user].remove(client)
            return False
        if client.user is None and client.read_hello(data):
            self._connections_of[client.user].append(client)
        return True

    def _write_client(self, client: ReplayClient) -> None:
        view = client.outbox[0]
        sent = self._send(client, view)
        if sent == len(view):
            client.outbox.popleft()
        elif sent:
            client.outbox[0] = view[sent:]
        if not client.outbox:
            self._selector.modify(client.sock, selectors.EVENT_READ,
                                  (self._serve_client, client))


# ======================================================================================
# Report
#
# Rules: built once, at the end, from keyword arguments; immutable afterwards. The text
# lines and the JSON keys are an interface (benchmarks read them): add, never rename.
# Times are seconds in the JSON, milliseconds in the text.
# ======================================================================================


@dataclass(frozen=True)
class LatencySummary:
    """End-to-end latency over every verified notification, in seconds."""

    count: int
    min: float
    mean: float
    p50: float
    p90: float
    p99: float
    p999: float
    max: float

    def line(self, paced: bool) -> str:
        values = ", ".join(f"{name} {seconds * 1000:.3f} ms" for name, seconds in (
            ("p50", self.p50), ("p90", self.p90), ("p99", self.p99), ("p99.9", self.p999),
            ("max", self.max)))
        note = "" if paced else "; unpaced, so mostly time spent queued"
        return f"latency: {values} ({self.count:,} notifications{note})"


@dataclass(frozen=True)
class SenderSummary:
    """How the source kept to its schedule (lags and achieved rate only when paced)."""

    rate: float | None  # events/s asked for with --rate; None: as fast as possible
    events_per_write: int | None
    writes: int
    achieved_events_per_second: float | None
    max_lag_seconds: float | None  # how far a write fell behind its due time, at most
    final_lag_seconds: float | None  # the same for the last write

    def line(self) -> str:
        if self.rate is None:
            return f"sender: unpaced, {self.writes:,} writes"
        achieved = ("n/a" if self.achieved_events_per_second is None
                    else f"{self.achieved_events_per_second:,.0f}")
        return (f"sender: paced at {self.rate:,.0f} events/s, {self.events_per_write} "
                f"events per write, {self.writes:,} writes; achieved {achieved} events/s; "
                f"behind schedule by at most {self.max_lag_seconds * 1000:.3f} ms, "
                f"{self.final_lag_seconds * 1000:.3f} ms at the end")


@dataclass(frozen=True)
class RunReport:
    result: str  # "success" or "failure"
    events: int
    notifications: int
    source_bytes: int
    notification_bytes: int
    seconds: float  # from the first source byte written to the last notification verified
    events_per_second: float
    notifications_per_second: float
    cpu_seconds: float  # the tool's own CPU time (process time) during the run
    mode: str
    failures: tuple[str, ...] = ()
    clients_per_port: dict[int, int] = field(default_factory=dict)
    latency: LatencySummary | None = None  # None: no notification was verified
    sender: SenderSummary | None = None  # None: nothing was sent (a dry run)

    @classmethod
    def measured(cls, *, events: int, notifications: int, source_bytes: int,
                 notification_bytes: int, seconds: float, cpu_seconds: float, mode: str,
                 failures: Sequence[str], clients_per_port: Mapping[int, int] | None = None,
                 latency: LatencySummary | None = None,
                 sender: SenderSummary | None = None) -> RunReport:
        return cls(result="failure" if failures else "success", events=events,
                   notifications=notifications, source_bytes=source_bytes,
                   notification_bytes=notification_bytes, seconds=seconds,
                   events_per_second=events / seconds if seconds > 0 else 0.0,
                   notifications_per_second=notifications / seconds if seconds > 0 else 0.0,
                   cpu_seconds=cpu_seconds, mode=mode, failures=tuple(failures),
                   clients_per_port=dict(clients_per_port or {}), latency=latency,
                   sender=sender)

    @classmethod
    def failed_early(cls, failure: str, cpu_seconds: float) -> RunReport:
        """A run that failed before any event was sent (e.g. cannot connect)."""
        return cls.measured(events=0, notifications=0, source_bytes=0, notification_bytes=0,
                            seconds=0.0, cpu_seconds=cpu_seconds, mode="broker",
                            failures=[failure])

    def lines(self) -> list[str]:
        lines = [f"mode: {self.mode}"]
        if self.clients_per_port:
            lines.append("clients per port: " + ", ".join(
                f"{port}: {count}" for port, count in self.clients_per_port.items()))
        return lines + [
            f"events: {self.events}",
            f"notifications: {self.notifications}",
            f"bytes: {self.source_bytes + self.notification_bytes} "
            f"(source {self.source_bytes}, notifications {self.notification_bytes})",
            f"seconds: {self.seconds:.3f}",
            f"events/s: {self.events_per_second:,.0f}",
            f"notifications/s: {self.notifications_per_second:,.0f}",
            *([self.latency.line(paced=self.sender is not None
                                 and self.sender.rate is not None)] if self.latency else []),
            *([self.sender.line()] if self.sender else []),
            f"tool cpu seconds: {self.cpu_seconds:.3f}",
        ]


def write_json(path: str, report: RunReport) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(asdict(report), handle, indent=2)
        handle.write("\n")


# ======================================================================================
# Command line
#
# Rules: exit 0 with SUCCESS_LINE as the last line on success (a dry run has no success
# line); exit 1 with FAILURE: lines on any failure; no traceback for a failed run.
# ======================================================================================

FAILURES_SHOWN = 10


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    if config.serve_replay:
        return ReplayBroker(config).serve()
    try:
        report = MazeRun(config).run()
    except MazeFailure as error:
        report = RunReport.failed_early(str(error), time.process_time())
    for line in report.lines():
        print(line)
    if config.json_path:
        write_json(config.json_path, report)
    if report.failures:
        for failure in report.failures[:FAILURES_SHOWN]:
            print(f"FAILURE: {failure}")
        if len(report.failures) > FAILURES_SHOWN:
            print(f"FAILURE: ... and {len(report.failures) - FAILURES_SHOWN} more")
        return 1
    if config.dry_run:
        print("dry run: workload generated, nothing sent")
        return 0
    print(SUCCESS_LINE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
