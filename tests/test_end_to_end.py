"""End to end: the real broker (mbroker.py) under load from tools/maze.py.

Each test starts a fresh broker on ephemeral ports (a broker keeps its sequence
state across source connections, so every maze run needs its own broker), runs
maze against it and stops it with SIGINT.
"""

from __future__ import annotations

from tests.harness import BrokerProcess, assert_maze_succeeded, run_maze

MAZE_TIMEOUT = 120


def assert_all_notifications_received(start_broker_process, *arguments: str) -> None:
    broker: BrokerProcess = start_broker_process()
    result = run_maze("--concurrencyLevel", "100", "--timeout", "10000", "--logInterval", "0",
                      *arguments, broker=broker, timeout=MAZE_TIMEOUT)
    exit_code = broker.stop()
    assert_maze_succeeded(result, broker)
    assert exit_code == 0, "the broker did not exit 0 on SIGINT\n" + broker.log(last=50)


def test_broker_delivers_every_notification_for_100k_shuffled_crlf_events(start_broker_process):
    assert_all_notifications_received(start_broker_process, "--totalEvents", "100000",
                                      "--maxEventSourceBatchSize", "100")


def test_broker_delivers_every_notification_for_lf_terminated_events(start_broker_process):
    assert_all_notifications_received(start_broker_process, "--totalEvents", "100000",
                                      "--maxEventSourceBatchSize", "100",
                                      "--terminator", "lf", "--randomSeed", "7")


def test_broker_reorders_batches_of_up_to_10000_events(start_broker_process):
    assert_all_notifications_received(start_broker_process, "--totalEvents", "100000",
                                      "--maxEventSourceBatchSize", "10000",
                                      "--randomSeed", "42")
