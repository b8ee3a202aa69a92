"""The broker as a library (docs/behaviour.md §9, docs/python.md): running() and serve(), the
Playground, the console, `python3 -m mbroker`, and the documentation's
examples, run as doctests so that they fail when the API changes."""

from __future__ import annotations

import doctest
import signal
import subprocess
import sys
import threading

import pytest

import mbroker
from tests.harness import (
    LOCALHOST,
    ROOT,
    WAIT,
    BrokerProcess,
    connect_client,
    connect_source,
    listening_ports,
    receive_exactly,
    wait_until,
)

DOCUMENTS = ["docs/python.md", "README.md"]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_the_documented_python_sessions_run_as_written(document):
    results = doctest.testfile(str(ROOT / document), module_relative=False,
                               optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed"
    assert results.attempted >= {"docs/python.md": 10, "README.md": 3}[document]


def test_every_public_name_exists_and_is_documented():
    for name in mbroker.__all__:
        assert hasattr(mbroker, name), name
        assert getattr(mbroker, name).__doc__, f"{name} has no docstring"


def test_two_brokers_run_at_once_on_port_zero():
    with mbroker.running() as first, mbroker.running(max_pending=10) as second:
        assert len({first.event_port, first.client_port,
                    second.event_port, second.client_port}) == 4
        for broker, user in ((first, 1), (second, 2)):
            client = connect_client(broker.client_port, user, wait_registered=broker)
            connect_source(broker.event_port).sendall(b"1|B\r\n")
            assert receive_exactly(client, 5) == b"1|B\r\n"
        assert first.stats().limits.max_pending == 1_000_000
        assert second.stats().limits.max_pending == 10


def test_an_error_inside_the_loop_surfaces_when_the_with_block_ends():
    class Boom(Exception):
        pass

    def fail() -> None:
        raise Boom("from inside the loop")

    with pytest.raises(Boom, match="from inside the loop"), mbroker.running() as broker:
        # call_soon is the loop's own: unlike calls from other threads,
        # which are guarded, an error there ends serve_forever.
        broker.broker.call_in_loop(lambda: broker.broker.reactor.call_soon(fail))
        wait_until(lambda: not broker.broker.running)


def test_a_bad_option_is_a_value_error_before_anything_listens():
    with pytest.raises(ValueError, match="--max-pending must be at least 1"), \
            mbroker.running(max_pending=0):
        pass


SERVE = """
import logging, sys
import mbroker
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
mbroker.serve(0, 0, host="127.0.0.1")
print("serve returned", flush=True)
"""


def test_serve_runs_in_the_calling_thread_and_stops_on_sigterm_with_a_drain():
    # BrokerProcess runs `python -c SERVE`; the arguments it appends are ignored.
    process = BrokerProcess(python_options=("-c", SERVE), script="", ports=())
    try:
        client = connect_client(process.client_port, 5)
        process.wait_for_log(r"\(user 5\) registered")
        source = connect_source(process.event_port)
        source.sendall(b"1|P|1|5\r\n")
        assert receive_exactly(client, 9) == b"1|P|1|5\r\n"
        assert process.stop(signal.SIGTERM) == 0
        assert "draining queued notifications" in process.log()
    finally:
        process.close()


def test_stop_ends_serve_from_another_thread():
    done = threading.Event()

    def run() -> None:
        mbroker.serve(0, 0)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: mbroker._serving and mbroker._serving[0].running)
    mbroker.stop()
    thread.join(WAIT + mbroker.DEFAULTS.drain_timeout)
    assert done.is_set()


def test_the_console_starts_with_the_public_names_and_leaves_on_end_of_input():
    result = subprocess.run([sys.executable, "-m", "mbroker", "console"], cwd=ROOT,
                            input="print(sorted(Playground(connected=[1]).connected))\n",
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "mbroker" in result.stderr and "Playground(" in result.stderr  # the banner
    assert "[1]" in result.stdout


def test_python_m_mbroker_is_the_command_line():
    process = subprocess.Popen([sys.executable, "-m", "mbroker", "--host", LOCALHOST, "0", "0"],
                               cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert listening_ports(line) is not None, line
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)
        process.stderr.close()
