"""The maze load generator/verifier (tools/maze.py) must pass a correct broker and be
able to fail: each fake broker below breaks one rule and maze must name that failure.

The fake brokers are small threaded servers bound to 127.0.0.1 port 0. The correct one
is written independently of maze's oracle (it parses, reorders and keeps its own follow
graph), so a maze success against it also cross-checks maze's expectations.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
import re
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MAZE_PATH = REPO_ROOT / "tools" / "maze.py"
CLIENT_PATH = REPO_ROOT / "tools" / "client.py"
SUCCESS_LINE = "\\o/ ALL NOTIFICATIONS RECEIVED \\o/"

# Small, fast runs: every wait in maze is bounded by these.
SMALL_RUN = ["--totalEvents", "2000", "--concurrencyLevel", "20", "--numberOfUsers", "100",
             "--timeout", "1000", "--settle-ms", "100", "--grace-ms", "300",
             "--logInterval", "0"]
FAULT_AT_NOTIFICATION = 40


def load_maze():
    spec = importlib.util.spec_from_file_location("maze", MAZE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("maze", module)
    spec.loader.exec_module(module)
    return module


maze = load_maze()


class FakeBroker:
    """A tiny broker following docs/behaviour.md section 2, with one optional fault.

    fault: None (correct), "drop" (skips one notification), "reorder" (swaps two
    notifications of one user), "terminator" (sends one notification with "\\n" instead of
    "\\r\\n"), "extra" (after the last event, sends one more line to one user), "stall"
    (stops reading the event source after a few kilobytes).

    client_listeners > 1 serves clients on that many ports, all of one stream (like a
    primary broker and its edges); ``accepted`` counts the clients each port got.
    """

    def __init__(self, fault: str | None = None, total_events: int = 2000,
                 client_listeners: int = 1):
        self.fault = fault
        self.total_events = total_events
        self.client_listeners = [socket.create_server(("127.0.0.1", 0))
                                 for _ in range(client_listeners)]
        self.event_listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if fault == "stall":
            # A small receive buffer makes the kernel push back on the source quickly.
            self.event_listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.event_listener.bind(("127.0.0.1", 0))
        self.event_listener.listen()
        self.client_ports = [listener.getsockname()[1] for listener in self.client_listeners]
        self.client_port = self.client_ports[0]
        self.accepted = dict.fromkeys(self.client_ports, 0)
        self.event_port = self.event_listener.getsockname()[1]
        self.clients: dict[int, list[socket.socket]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.notifications_sent = 0
        self.fault_done = False
        self.threads = [threading.Thread(target=self._serve_events, daemon=True)]
        self.threads += [threading.Thread(target=self._accept_clients, args=(listener,),
                                          daemon=True) for listener in self.client_listeners]
        for thread in self.threads:
            thread.start()

    def ports(self) -> list[str]:
        return ["--eventListenerPort", str(self.event_port),
                "--clientListenerPort", ",".join(map(str, self.client_ports))]

    def close(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(5)
        for listener in self.client_listeners:
            listener.close()
        self.event_listener.close()
        with self.lock:
            for sockets in self.clients.values():
                for sock in sockets:
                    sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- clients ---------------------------------------------------------------------

    def _accept_clients(self, listener: socket.socket) -> None:
        listener.settimeout(0.1)
        port = listener.getsockname()[1]
        while not self.stopping.is_set():
            try:
                sock, _address = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(5)
            data = b""
            try:
                while b"\n" not in data and len(data) < 64:
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                sock.close()
                continue
            user = int(data.split(b"\n")[0].strip())
            with self.lock:
                self.clients.setdefault(user, []).append(sock)
                self.accepted[port] += 1

    # -- event source ----------------------------------------------------------------

    def _serve_events(self) -> None:
        self.event_listener.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                source, _address = self.event_listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with source:
                self._read_source(source)
            return

    def _read_source(self, source: socket.socket) -> None:
        source.settimeout(0.1)
        followers: dict[int, set[int]] = {}
        waiting: dict[int, tuple[list[bytes], bytes]] = {}
        next_seq = 1
        buffered = b""
        bytes_read = 0
        while not self.stopping.is_set():
            if self.fault == "stall" and bytes_read >= 4096:
                self.stopping.wait(0.1)  # stop reading, but keep the connection open
                continue
            try:
                data = source.recv(4096 if self.fault == "stall" else 65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            bytes_read += len(data)
            buffered += data
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                payload = line[:-1] if line.endswith(b"\r") else line
                if not payload:
                    continue
                fields = payload.split(b"|")
                waiting[int(fields[0])] = (fields, line + b"\n")
            outgoing: dict[int, list[bytes]] = {}
            while next_seq in waiting:
                fields, line = waiting.pop(next_seq)
                for user in self._recipients(fields, followers):
                    outgoing.setdefault(user, []).append(line)
                if self.fault == "extra" and next_seq == self.total_events:
                    first_user = min(self.clients)
                    outgoing.setdefault(first_user, []).append(
                        b"%d|P|1|%d\r\n" % (next_seq + 1, first_user))
                next_seq += 1
            self._send(outgoing)

    def _recipients(self, fields: list[bytes], followers: dict[int, set[int]]) -> list[int]:
        kind = fields[1]
        if kind == b"F":
            follower, followed = int(fields[2]), int(fields[3])
            followers.setdefault(followed, set()).add(follower)
            return [followed]
        if kind == b"U":
            followers.get(int(fields[3]), set()).discard(int(fields[2]))
            return []
        if kind == b"B":
            return list(self.clients)
        if kind == b"P":
            return [int(fields[3])]
        if kind == b"S":
            return list(followers.get(int(fields[2]), ()))
        raise AssertionError(f"unexpected event {fields!r}")

    def _send(self, outgoing: dict[int, list[bytes]]) -> None:
        for user, lines in outgoing.items():
            sockets = self.clients.get(user)
            if not sockets:
                continue  # nobody connected as this user: dropped silently
            lines = self._apply_fault(lines)
            for sock in sockets:
                try:
                    sock.sendall(b"".join(lines))
                except OSError:
                    pass

    def _apply_fault(self, lines: list[bytes]) -> list[bytes]:
        first_number = self.notifications_sent + 1
        self.notifications_sent += len(lines)
        if self.fault_done or self.notifications_sent < FAULT_AT_NOTIFICATION:
            return lines
        index = max(0, FAULT_AT_NOTIFICATION - first_number)
        lines = list(lines)
        if self.fault == "drop":
            del lines[index]
        elif self.fault == "reorder":
            if index + 1 >= len(lines):
                return lines  # try again with the next user that gets two lines
            lines[index], lines[index + 1] = lines[index + 1], lines[index]
        elif self.fault == "terminator":
            lines[index] = lines[index][:-2] + b"\n"
        else:
            return lines
        self.fault_done = True
        return lines


def run_maze(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAZE_PATH), *arguments], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


# -- success -------------------------------------------------------------------------


def test_correct_broker_passes_and_report_is_written(tmp_path):
    report_path = tmp_path / "report.json"
    with FakeBroker() as broker:
        result = run_maze(*SMALL_RUN, *broker.ports(), "--json", str(report_path))
    assert result.returncode == 0, output_of(result)
    assert SUCCESS_LINE in result.stdout.splitlines()
    for label in ("events: 2000", "notifications:", "bytes:", "seconds:", "events/s:",
                  "notifications/s:", "tool cpu seconds:"):
        assert label in result.stdout
    report = json.loads(report_path.read_text())
    assert report["result"] == "success"
    assert report["events"] == 2000
    assert report["notifications"] > 0
    assert report["failures"] == []
    # Unpaced: latency is still measured (mostly queueing), and there is no schedule.
    assert report["latency"]["count"] == report["notifications"]
    assert "unpaced, so mostly time spent queued" in result.stdout
    assert report["sender"]["rate"] is None
    assert report["sender"]["max_lag_seconds"] is None


def test_paced_run_reports_latency_of_every_notification_and_the_schedule(tmp_path):
    report_path = tmp_path / "report.json"
    with FakeBroker() as broker:
        result = run_maze(*SMALL_RUN, *broker.ports(), "--rate", "20000",
                          "--json", str(report_path))
    assert result.returncode == 0, output_of(result)
    assert SUCCESS_LINE in result.stdout.splitlines()
    report = json.loads(report_path.read_text())
    latency = report["latency"]
    assert set(latency) == {"count", "min", "mean", "p50", "p90", "p99", "p999", "max"}
    assert latency["count"] == report["notifications"] > 0
    assert 0 <= latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] \
        <= latency["p999"] <= latency["max"]
    assert latency["min"] <= latency["mean"] <= latency["max"]
    sender = report["sender"]
    assert sender["rate"] == 20000
    assert sender["events_per_write"] == 20  # 1 ms of events
    assert sender["writes"] >= 2000 // 20
    assert sender["achieved_events_per_second"] > 0
    assert 0 <= sender["final_lag_seconds"] <= sender["max_lag_seconds"]
    # The last of 100 writes is due 99 ms after the schedule's start, and the
    # first is at most max_lag late: the writes were spread, not sent at once.
    assert report["seconds"] >= 0.099 - sender["max_lag_seconds"]
    assert "mode: broker, streaming, paced at 20,000 events/s" in result.stdout
    assert "latency: p50 " in result.stdout
    assert "sender: paced at 20,000 events/s, 20 events per write" in result.stdout


def test_correct_broker_passes_with_lf_terminators_ordered_stream_and_pregeneration():
    with FakeBroker() as broker:
        result = run_maze(*SMALL_RUN, *broker.ports(), "--terminator", "lf",
                          "--maxEventSourceBatchSize", "1", "--pregenerate")
    assert result.returncode == 0, output_of(result)
    assert SUCCESS_LINE in result.stdout


def test_generation_pauses_for_a_lagging_client_and_still_passes():
    # A tiny backlog bound and tiny chunks force many pauses of the generator.
    with FakeBroker() as broker:
        result = run_maze(*SMALL_RUN, *broker.ports(), "--max-backlog", "200",
                          "--chunk-events", "50")
    assert result.returncode == 0, output_of(result)
    assert SUCCESS_LINE in result.stdout


def test_environment_variables_configure_the_run():
    with FakeBroker() as broker:
        environment = {"eventListenerPort": str(broker.event_port),
                       "clientListenerPort": str(broker.client_port),
                       "totalEvents": "500", "concurrencyLevel": "5", "timeout": "1000",
                       "logInterval": "0", "PATH": ""}
        result = subprocess.run([sys.executable, str(MAZE_PATH), "--settle-ms", "100",
                                 "--grace-ms", "100"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=60, env=environment)
    assert result.returncode == 0, output_of(result)
    assert "events: 500" in result.stdout


def test_clients_are_spread_round_robin_over_several_client_ports(tmp_path):
    report_path = tmp_path / "report.json"
    with FakeBroker(client_listeners=3) as broker:
        result = run_maze(*SMALL_RUN, *broker.ports(), "--json", str(report_path))
        accepted = dict(broker.accepted)
    assert result.returncode == 0, output_of(result)
    assert SUCCESS_LINE in result.stdout.splitlines()
    # 20 clients over 3 ports, in connection order: 7, 7, 6.
    counts = dict(zip(broker.client_ports, [7, 7, 6], strict=True))
    assert accepted == counts
    report = json.loads(report_path.read_text())
    assert report["clients_per_port"] == {str(port): count for port, count in counts.items()}
    assert "clients per port: " + ", ".join(f"{port}: {count}" for port, count
                                            in counts.items()) in result.stdout


# -- failures ------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "expected_words"), [
    ("drop", "missing notification"),
    ("reorder", "wrong order"),
    ("terminator", "wrong terminator"),
    ("extra", "extra notification"),
])
def test_faulty_broker_is_reported_with_the_failure_named(fault, expected_words):
    with FakeBroker(fault) as broker:
        result = run_maze(*SMALL_RUN, *broker.ports())
    output = output_of(result)
    assert result.returncode == 1, output
    assert SUCCESS_LINE not in output
    failure_lines = [line for line in result.stdout.splitlines()
                     if line.startswith("FAILURE:")]
    assert failure_lines, output
    assert expected_words in failure_lines[0], output
    # The failure names the user and the position of the first difference.
    assert "user " in failure_lines[0]
    assert "notification #" in failure_lines[0]
    if fault != "extra":
        assert "expected b'" in failure_lines[0] and "received" in failure_lines[0]


def test_broker_that_stops_reading_the_event_source_is_reported_stalled():
    with FakeBroker("stall", total_events=50_000) as broker:
        result = run_maze(*SMALL_RUN, "--totalEvents", "50000", *broker.ports())
    output = output_of(result)
    assert result.returncode == 1, output
    assert "event source stalled" in output


def unused_port() -> int:
    """A port that is (almost certainly) not listening: bound, then closed."""
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def test_unreachable_broker_fails_clearly():
    port = unused_port()
    result = run_maze(*SMALL_RUN, "--eventListenerPort", str(port),
                      "--clientListenerPort", str(port))
    assert result.returncode == 1
    assert "cannot connect user" in result.stdout
    assert f"127.0.0.1:{port}" in result.stdout


def test_replay_broker_mode_serves_a_maze_run_with_the_same_settings():
    settings = ["--totalEvents", "5000", "--concurrencyLevel", "10", "--randomSeed", "3"]
    replay = subprocess.Popen(
        [sys.executable, str(MAZE_PATH), "--serve-replay", "--eventListenerPort", "0",
         "--clientListenerPort", "0,0", "--timeout", "1000", *settings],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        readable, _, _ = select.select([replay.stderr], [], [], 30)
        assert readable, "the replay broker did not start"
        match = re.search(r"events=[^\s:]+:(\d+) clients=(\S+)", replay.stderr.readline())
        assert match
        client_ports = [address.rsplit(":", 1)[1] for address in match.group(2).split(",")]
        assert len(client_ports) == 2
        result = run_maze(*SMALL_RUN, *settings, "--eventListenerPort", match.group(1),
                          "--clientListenerPort", ",".join(client_ports), "--rate", "50000")
        assert result.returncode == 0, output_of(result)
        assert SUCCESS_LINE in result.stdout
        assert f"clients per port: {client_ports[0]}: 5, {client_ports[1]}: 5" in result.stdout
        assert replay.wait(30) == 0  # it exits once the source closed and all is sent
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait(10)
        replay.stderr.close()


# -- generator -----------------------------------------------------------------------


@pytest.mark.parametrize(("max_batch", "chunk_events"), [(100, 7), (1, 500), (3000, 1000)])
def test_release_offsets_are_where_each_prefix_of_the_stream_completes(max_batch,
                                                                        chunk_events):
    """Recomputed by brute force from the bytes: a notification for SEQ s is released
    at the end of the line that completes SEQs 1..s."""
    generator = maze.WorkloadGenerator(4000, 10, 60, seed=5, max_batch=max_batch,
                                       track_release=True)
    whole = maze.join_chunks(generator.chunks(chunk_events))
    lines = whole.source.split(b"\r\n")[:-1]
    line_ends = list(itertools.accumulate(len(line) + 2 for line in lines))
    assert list(whole.release.line_ends) == line_ends
    seen: set[int] = set()
    complete = 0
    release_of_seq = {}
    for line, end in zip(lines, line_ends, strict=True):
        seen.add(int(line.split(b"|")[0]))
        while complete + 1 in seen:
            complete += 1
            release_of_seq[complete] = end
    for user, data in whole.expected.items():
        seqs = [int(line.split(b"|")[0]) for line in data.split(b"\r\n")[:-1]]
        assert list(whole.release.notifications[user]) == [release_of_seq[seq]
                                                           for seq in seqs]
    # Tracking does not change the workload.
    untracked = maze.join_chunks(maze.WorkloadGenerator(
        4000, 10, 60, seed=5, max_batch=max_batch).chunks(chunk_events))
    assert (untracked.source, untracked.expected) == (whole.source, whole.expected)


def test_latency_recorder_measures_from_the_write_that_released_each_notification():
    clock = maze.ReleaseClock()
    for end, when in ((100, 1.0), (250, 2.0), (400, 3.0)):
        clock.record(end, when)
    recorder = maze.LatencyRecorder(clock)
    # Released at offsets 100 (write 1), 150 and 250 (write 2), 400 (write 3); one read
    # at t=5 completes all four.
    recorder.record([90, 100, 150, 250, 400], 1, 5, 5.0)
    summary = recorder.histogram.summary()
    assert summary.count == 4
    assert summary.min == pytest.approx(2.0)
    assert summary.max == pytest.approx(4.0)
    assert summary.mean == pytest.approx((4 + 3 + 3 + 2) / 4)
    clock.forget_before(300)
    assert list(clock.ends) == [400]


def test_latency_percentiles_stay_within_a_fraction_of_a_percent_of_exact():
    rng = random.Random(1)
    values = [rng.lognormvariate(-7, 1.5) for _ in range(20_000)] + [0.0, 5e-7]
    histogram = maze.LatencyHistogram()
    for value in values:
        histogram.add(value)
    values.sort()
    fractions = [0.5, 0.9, 0.99, 0.999]
    for fraction, estimate in zip(fractions, histogram.percentiles(fractions), strict=True):
        exact = values[math.ceil(fraction * len(values)) - 1]
        assert estimate == pytest.approx(exact, rel=0.002)
    summary = histogram.summary()
    assert (summary.count, summary.min, summary.max) == (len(values), 0.0, values[-1])


def workload_bytes(**overrides):
    settings = dict(total_events=3000, concurrency=10, users=100, seed=666, max_batch=100)
    settings.update(overrides)
    users, source_chunks, expected = maze.generate_workload(**settings)
    return users, b"".join(source_chunks), expected


def test_same_seed_gives_same_bytes_and_another_seed_differs():
    first = workload_bytes()
    assert workload_bytes() == first
    assert workload_bytes(seed=667) != first
    # Chunking is an implementation detail: it must not change the run.
    users, source_chunks, expected = maze.generate_workload(3000, 10, 100, 666, 100,
                                                            chunk_events=7)
    assert (users, b"".join(source_chunks)) == first[:2]


def test_generated_stream_uses_every_sequence_number_once_in_shuffled_batches():
    _users, source, _expected = workload_bytes(total_events=5000)
    lines = source.split(b"\r\n")
    assert lines[-1] == b""
    numbers = [int(line.split(b"|")[0]) for line in lines[:-1]]
    assert sorted(numbers) == list(range(1, 5001))
    assert numbers != sorted(numbers)  # batches are shuffled
    # No event is further from its place than one maximal batch.
    assert max(abs(number - (index + 1)) for index, number in enumerate(numbers)) < 100
    _users, ordered, _expected = workload_bytes(max_batch=1)
    ordered_numbers = [int(line.split(b"|")[0]) for line in ordered.split(b"\r\n")[:-1]]
    assert ordered_numbers == list(range(1, 3001))


def test_event_mix_is_configurable_and_terminator_applies_everywhere():
    users, source, expected = workload_bytes(mix=maze.parse_mix("B=1"), terminator=b"\n")
    lines = source.split(b"\n")[:-1]
    assert all(line.endswith(b"|B") for line in lines)
    assert b"\r" not in source
    # Every connected user gets every broadcast.
    assert all(data.count(b"\n") == 3000 for data in expected.values())
    assert sorted(expected) == sorted(users)


def test_generator_memory_stays_bounded_by_max_follows():
    generator = maze.WorkloadGenerator(200_000, 10, 100, seed=1, max_follows=500)
    for _chunk in generator.chunks(50_000):
        assert len(generator._follow_pairs) <= 500
    assert generator.events_generated == 200_000


def test_flags_win_over_environment_variables():
    config = maze.parse_config(["--totalEvents", "7", "--terminator", "lf"],
                               {"totalEvents": "5", "concurrencyLevel": "3",
                                "randomSeed": "9"})
    assert config.total_events == 7
    assert config.concurrency == 3
    assert config.users == 30  # concurrencyLevel * 10
    assert config.seed == 9
    assert config.terminator == b"\n"
    defaults = maze.parse_config([], {})
    assert defaults.client_ports == (9099,)
    assert (defaults.event_port, defaults.client_port, defaults.total_events,
            defaults.concurrency, defaults.users, defaults.seed, defaults.timeout_ms,
            defaults.max_batch, defaults.log_interval_ms) == (
        9090, 9099, 10_000_000, 100, 1000, 666, 20_000, 100, 1000)


def test_client_ports_are_a_comma_separated_list_from_flag_or_environment():
    assert maze.parse_config(["--clientListenerPort", "9099, 9101,9102"], {}).client_ports \
        == (9099, 9101, 9102)
    assert maze.parse_config([], {"clientListenerPort": "9101,9102"}).client_ports \
        == (9101, 9102)
    for bad in ("9099,", "port", "70000", "9099;9101"):
        with pytest.raises(SystemExit):
            maze.parse_config(["--clientListenerPort", bad], {})
        with pytest.raises(SystemExit):
            maze.parse_config([], {"clientListenerPort": bad})


# -- tools/client.py -----------------------------------------------------------------


@pytest.mark.parametrize("mode", [["user", "42"], ["source"]])
def test_client_names_the_address_it_cannot_connect_to(mode):
    port = unused_port()
    result = subprocess.run([sys.executable, str(CLIENT_PATH), *mode, "--port", str(port)],
                            input="1|B\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith(f"client.py: cannot connect to 127.0.0.1:{port}: "), \
        result.stderr
    assert "Connection refused" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
