"""Core throughput, in memory: parser -> reorder buffer -> exchange, no sockets.

A seeded workload from tools/maze.py's generator is built before the clock starts. Each
round then feeds the event stream to a fresh EventPipeline + Exchange with one in-memory
mbroker.Subscriber per connected user, through EventPipeline.dispatch, the driver the
reactor calls: the stream arrives in pieces of the reactor's read size, is dispatched in
slices of dispatch_slice lines, and every flush_lines lines (or sooner, when the fan-out
budget is spent) each touched subscriber's lines are handed over, joined into one buffer.
The bytes handed over in the last round are compared with the generator's expected bytes
for every user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

import mbroker

FULL_EVENTS = 300_000
SMOKE_EVENTS = 20_000
FULL_ROUNDS = 5
SEED = 666

# 50 times the default broadcast weight (2 -> 100, status updates giving way): about 10%
# of the events are broadcasts, each one a notification for every connected client.
BROADCAST_HEAVY_MIX = {"F": 350, "U": 150, "B": 100, "P": 250, "S": 150}


@dataclass(frozen=True)
class Scenario:
    concurrency: int  # connected users
    users: int  # user ids in the events
    max_batch: int  # maze's maxEventSourceBatchSize: 1 = in order
    mix: dict[str, float] | None = None  # None: maze's default mix


SCENARIOS = [
    pytest.param(Scenario(100, 1_000, 100), id="default-100-of-1000"),
    pytest.param(Scenario(1_000, 10_000, 100), id="default-1000-of-10000"),
    pytest.param(Scenario(100, 1_000, 100, BROADCAST_HEAVY_MIX), id="broadcast-heavy"),
    pytest.param(Scenario(100, 1_000, 1), id="ordered-batch-1"),
    pytest.param(Scenario(100, 1_000, 10_000), id="shuffled-batch-10000"),
]


class CoreRound:
    """One round's fresh broker core, with the user subscribers already connected."""

    def __init__(self, connected_users: list[int], config: mbroker.BrokerConfig):
        self.exchange = mbroker.Exchange(config.max_follows)
        self.pipeline = mbroker.EventPipeline(self.exchange, config)
        # What each user was "sent", one bytes object per hand-over.
        self.sent: dict[int, list[bytes]] = {user: [] for user in connected_users}
        for user in connected_users:
            self.exchange.subscribe(user, mbroker.Subscriber(user))
        self.seconds = 0.0

    def run(self, pieces: list[bytes]) -> CoreRound:
        """The measured work: every piece through the pipeline's one driver,
        EventPipeline.dispatch, which the reactor calls too."""
        started = time.perf_counter()
        pipeline = self.pipeline
        deliver = self._deliver
        for piece in pieces:
            pipeline.receive(piece)
            pipeline.dispatch(deliver)
        self.seconds = time.perf_counter() - started
        return self

    def _deliver(self, output) -> bool:
        # The reactor's deliver, minus the socket: one joined buffer per touched client.
        sent = self.sent
        for subscriber, data, _count in output:
            sent[subscriber.user_id].append(data)
        return True

    def output(self) -> dict[int, bytes]:
        return {user: b"".join(chunks) for user, chunks in self.sent.items()}


def split_into_reads(stream: bytes, read_size: int) -> list[bytes]:
    """The stream as the reactor's recv() calls would return it at most: read_size
    pieces, which cut lines anywhere, so the line splitter's carry-over is exercised."""
    return [stream[start:start + read_size] for start in range(0, len(stream), read_size)]


@pytest.mark.benchmark(group="core")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_core_throughput(benchmark, maze, full_size, record_rates, scenario):
    total_events = FULL_EVENTS if full_size else SMOKE_EVENTS
    connected_users, source_chunks, expected = maze.generate_workload(
        total_events=total_events, concurrency=scenario.concurrency, users=scenario.users,
        seed=SEED, max_batch=scenario.max_batch, terminator=b"\r\n", mix=scenario.mix)
    config = mbroker.BrokerConfig()
    pieces = split_into_reads(b"".join(source_chunks), config.read_size)
    rounds: list[CoreRound] = []

    def fresh_round():
        # Untimed: a new core per round, so no round inherits another's follow graph.
        core_round = CoreRound(connected_users, config)
        rounds.append(core_round)
        return (core_round, pieces), {}

    last_round = benchmark.pedantic(CoreRound.run, setup=fresh_round,
                                    rounds=FULL_ROUNDS if full_size else 1)

    assert last_round.pipeline.events_in == total_events
    assert last_round.pipeline.backlog == 0 and len(last_round.pipeline.reorder) == 0
    output = last_round.output()
    mismatched = [user for user in connected_users if output[user] != expected[user]]
    assert not mismatched, f"{len(mismatched)} user(s) got other bytes than expected, " \
                           f"e.g. user {mismatched[0]}"
    notifications = last_round.exchange.notifications
    assert notifications == sum(data.count(b"\n") for data in expected.values())
    record_rates(total_events, notifications, [core_round.seconds for core_round in rounds])
    benchmark.extra_info.update({"connected_users": scenario.concurrency,
                                 "users": scenario.users, "max_batch": scenario.max_batch,
                                 "mix": scenario.mix or maze.DEFAULT_MIX})
