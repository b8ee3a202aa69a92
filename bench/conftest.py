"""Shared pieces of the throughput benchmarks.

Every benchmark has two sizes. Under ``--benchmark-only`` or ``--benchmark-enable`` it
runs at full size, several rounds. In the normal test run (pyproject's addopts has
``--benchmark-disable``) pytest-benchmark calls each target once and ``benchmark.disabled``
is true: the benchmarks then run at smoke size, so ``bench/`` stays a quick check that
they still work and still produce correct output.
"""

from __future__ import annotations

import statistics

import pytest

from tests.harness import load_maze


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pyproject's addopts always passes --benchmark-disable, and pytest-benchmark refuses
    # --benchmark-only together with it. Asking for benchmarks only means asking for them
    # to run, so --benchmark-only implies --benchmark-enable here. This runs before
    # pytest-benchmark's own (trylast) pytest_configure reads the options; it applies
    # whenever bench/ is among the paths pytest starts from (its default testpaths too).
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True


@pytest.fixture(scope="session")
def maze():
    """tools/maze.py as a module: the workload generator and its oracle."""
    return load_maze()


@pytest.fixture
def full_size(benchmark) -> bool:
    """True when benchmarks really run; False in the normal (smoke) test run."""
    return not benchmark.disabled


@pytest.fixture
def record_rates(benchmark):
    """record_rates(events, notifications, seconds_per_round): counts and median rates.

    The rates go into the benchmark's extra_info (saved with --benchmark-autosave); the
    per-round rates are kept too, so a noisy round is visible in the saved JSON.
    """

    def record(events: int, notifications: int, seconds: list[float]) -> None:
        median_seconds = statistics.median(seconds)
        benchmark.extra_info.update({
            "events": events,
            "notifications": notifications,
            "seconds": round(median_seconds, 4),
            "events_per_second": round(events / median_seconds),
            "notifications_per_second": round(notifications / median_seconds),
            "events_per_second_rounds": [round(events / s) for s in seconds],
        })

    return record
