"""Fixtures: brokers on ephemeral loopback ports, in process or as a child
process, stopped when the test ends. The helpers live in tests/harness.py."""

from __future__ import annotations

import contextlib

import pytest

import mbroker
from tests.harness import BrokerProcess


@pytest.fixture
def start_broker():
    """Factory: start_broker(max_pending=10, ...) -> mbroker.RunningBroker, a
    broker on its own thread (mbroker.running); each is drained and stopped
    when the test ends, and an error of its loop fails the test."""
    with contextlib.ExitStack() as brokers:
        yield lambda **options: brokers.enter_context(mbroker.running(**options))


@pytest.fixture
def broker(start_broker) -> mbroker.RunningBroker:
    return start_broker()


@pytest.fixture
def start_broker_process():
    """Factory: start_broker_process("--max-line", "100") -> BrokerProcess; each
    is killed, if still running, when the test ends."""
    started: list[BrokerProcess] = []

    def start(*arguments: str, **options) -> BrokerProcess:
        process = BrokerProcess(*arguments, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()
