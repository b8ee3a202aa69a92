"""The command line and the process (docs/behaviour.md §1.2–§1.4, §4.20, §5.1–§5.3):
--help lists every option with its default, a port in use is one line and exit
code 2, the broker needs nothing beyond the standard library, listens on loopback
by default, and --log-level sets what is logged."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from dataclasses import fields

import pytest

import mbroker
from tests.harness import (
    MBROKER_PATH,
    ROOT,
    WAIT,
    connect_client,
    connect_source,
    expect,
)


def run_mbroker(*arguments: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MBROKER_PATH), *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_option_with_its_default():
    result = run_mbroker("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    defaults = mbroker.BrokerConfig()
    options = [item.name for item in fields(mbroker.BrokerConfig)
               if "help" in item.metadata and not item.metadata["positional"]]
    assert len(options) >= 9
    for name in options:
        option = "--" + name.replace("_", "-")
        assert option in text
        segment = text[text.rindex(option + " "):]  # its entry, not the usage line
        segment = segment[:segment.find(" --", 2)]  # up to the next option's entry
        default = getattr(defaults, name)
        # Options off by default say so in their words ("off: ..."), not "None".
        assert f"(default: {default})" in segment if default is not None else \
            "off" in segment and "None" not in segment, segment
    for option in ("--host", "--max-line", "--max-pending", "--hello-timeout",
                   "--max-client-buffer", "--write-timeout", "--max-buffered",
                   "--drain-timeout", "--log-level", "--dashboard"):
        assert option in text
    assert "(default: 127.0.0.1)" in text
    assert "(default: INFO)" in text
    assert "(default: 9090)" in text and "(default: 9099)" in text


@pytest.mark.parametrize("which", ["event", "client"])
def test_port_already_in_use_is_a_one_line_error_naming_it_with_exit_code_2(which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = [str(port), "0"] if which == "event" else ["0", str(port)]
        result = run_mbroker("--host", "127.0.0.1", *ports)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0]
    assert "in use" in lines[0]
    assert "Traceback" not in result.stderr


def test_importing_mbroker_imports_nothing_outside_the_standard_library():
    code = ("import sys; before = set(sys.modules); import mbroker; "
            "extra = sorted(m for m in set(sys.modules) - before "
            "if m.split('.')[0] not in sys.stdlib_module_names and m != 'mbroker'); "
            "print(repr(extra))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_broker_serves_on_a_python_without_site_packages(start_broker_process):
    """`python -I -S`: no site-packages at all, as on a bare Python 3.11."""
    process = start_broker_process("--log-level", "DEBUG", python_options=("-I", "-S"))
    client = connect_client(process.client_port, 3)
    process.wait_for_registration(3)
    source = connect_source(process.event_port)
    source.sendall(b"1|P|1|3\r\n")
    expect(client, b"1|P|1|3\r\n")
    assert process.stop(signal.SIGTERM, timeout=WAIT) == 0
    assert "Traceback" not in process.log()


def test_by_default_both_ports_listen_on_loopback_only(broker):
    # Whoever reaches the event port can publish to every user (docs/behaviour.md §1.3).
    assert broker.broker.event_listener.sock.getsockname()[0] == "127.0.0.1"
    assert broker.broker.client_listener.sock.getsockname()[0] == "127.0.0.1"


def test_log_level_warning_hides_info_lines_and_debug_shows_registrations(
        start_broker_process):
    # At WARNING the listening line is hidden too: wait for both ports to listen.
    quiet = start_broker_process("--log-level", "WARNING", listening_line=False)
    assert quiet.stop() == 0
    assert " INFO " not in quiet.log() and "listening" not in quiet.log()
    chatty = start_broker_process("--log-level", "DEBUG")
    with connect_client(chatty.client_port, 1):
        chatty.wait_for_log(r"\(user 1\) registered")
    assert chatty.stop() == 0
    assert " DEBUG " in chatty.log() and "(user 1) registered" in chatty.log()


@pytest.mark.parametrize(("arguments", "message"), [
    (["70000", "9099"], "mbroker: EVENT_PORT must be between 0 and 65535, not 70000"),
    (["9090", "-1"], "mbroker: CLIENT_PORT must be between 0 and 65535, not -1"),
    (["9090", "9090"], "mbroker: EVENT_PORT, CLIENT_PORT and --metrics-port must differ"),
    (["--metrics-port", "9099", "9090", "9099"],
     "mbroker: EVENT_PORT, CLIENT_PORT and --metrics-port must differ"),
    (["--max-pending", "0"], "mbroker: --max-pending must be at least 1"),
    (["--write-timeout", "nan"], "mbroker: --write-timeout must be positive"),
    (["--max-line", "5000"], "mbroker: --max-line must be at most 4300 (the longest number "
                             "this Python parses; see sys.set_int_max_str_digits)"),
    (["--edge", "9099"], "mbroker: --edge follows a log: give --log redis://HOST:PORT/DB too"),
    (["--edge", "--log", "redis://127.0.0.1:1/0", "9090", "9099"],
     "mbroker: an edge has no event port: give only CLIENT_PORT"),
    (["--log", "http://127.0.0.1/"],
     "mbroker: --log must be a redis://, rediss:// or unix:// URL, not http://127.0.0.1/"),
])
def test_a_bad_setting_is_one_line_naming_it_as_the_operator_wrote_it_with_exit_code_2(
        arguments, message):
    result = run_mbroker(*arguments)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message]


def test_log_level_is_taken_in_any_case(start_broker_process):
    process = start_broker_process("--log-level", "debug")
    connect_client(process.client_port, 3)
    process.wait_for_log(r"DEBUG client .* \(user 3\) registered")


def test_without_rich_the_dashboard_says_how_to_install_it_and_prints_status_lines(
        monkeypatch, caplog):
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setitem(sys.modules, "rich", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "rich.console", None)
    view = mbroker.make_dashboard(Terminal())
    assert type(view).__name__ == "StatusLinePrinter"
    assert "rich is not installed (pip install rich, or pip install 'mbroker[dashboard]')" \
        in caplog.text
