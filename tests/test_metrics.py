"""Monitoring (docs/behaviour.md §8): --metrics-port serves the Prometheus text
format made by prometheus_client, and /healthz. The tests scrape a running
broker over real HTTP and read the answer with prometheus_client's own parser.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

import pytest

import mbroker
from tests.harness import (
    BrokerProcess,
    connect_client,
    connect_source,
    receive_exactly,
    tiny_receiver,
    wait_until,
)

parser = pytest.importorskip("prometheus_client.parser")

# Every metric the documentation promises, with its type.
DOCUMENTED = {
    "mbroker_info": "gauge",
    "mbroker_start_time_seconds": "gauge",
    "mbroker_stopping": "gauge",
    "mbroker_source_connected": "gauge",
    "mbroker_source_paused": "gauge",
    "mbroker_source_read_bytes": "gauge",
    "mbroker_source_connections": "counter",
    "mbroker_next_sequence_number": "gauge",
    "mbroker_highest_sequence_number": "gauge",
    "mbroker_reorder_events": "gauge",
    "mbroker_reorder_events_max": "gauge",
    "mbroker_events_received": "counter",
    "mbroker_events_dispatched": "counter",
    "mbroker_notifications": "counter",
    "mbroker_client_sent_bytes": "counter",
    "mbroker_clients": "gauge",
    "mbroker_connections": "gauge",
    "mbroker_clients_awaiting_hello": "gauge",
    "mbroker_known_users": "gauge",
    "mbroker_follows": "gauge",
    "mbroker_queued_bytes": "gauge",
    "mbroker_deepest_queue_bytes": "gauge",
    "mbroker_max_pending_events": "gauge",
    "mbroker_max_buffered_bytes": "gauge",
    "mbroker_max_client_buffer_bytes": "gauge",
    "mbroker_max_follows": "gauge",
    "mbroker_malformed": "counter",
    "mbroker_unsequenced": "counter",
    "mbroker_overlong": "counter",
    "mbroker_duplicate": "counter",
    "mbroker_late": "counter",
    "mbroker_skipped": "counter",
    "mbroker_slow_consumers": "counter",
    "mbroker_follows_refused": "counter",
    "mbroker_accept_errors": "counter",
    "mbroker_connections_closed": "counter",
    "mbroker_dispatch_latency_seconds": "histogram",
    "process_cpu_seconds": "counter",
}
LOG_DOCUMENTED = {
    "mbroker_log_state": "gauge",
    "mbroker_log_position": "gauge",
    "mbroker_log_newest_position": "gauge",
    "mbroker_log_lag_seconds": "gauge",
    "mbroker_log_unwritten_events": "gauge",
    "mbroker_log_entries": "counter",
    "mbroker_log_entries_skipped": "counter",
    "mbroker_log_reconnects": "counter",
    "mbroker_log_snapshots": "counter",
    "mbroker_log_missed": "counter",
    "mbroker_log_snapshot_sequence_number": "gauge",
    "mbroker_log_recovery_seconds": "gauge",
}


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> dict[str, object]:
    """name -> family, from prometheus_client's parser."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    return {family.name: family for family in parser.text_string_to_metric_families(text)}


def value(families: dict, name: str, **labels) -> float:
    samples = [sample for sample in families[name].samples
               if sample.labels == labels and sample.name in (name, name + "_total")]
    (sample,) = samples
    return sample.value


def test_every_documented_metric_is_served_with_its_type(start_broker):
    broker = start_broker(metrics_port=0)
    families = scrape(broker.broker.metrics.port)
    for name, kind in DOCUMENTED.items():
        assert name in families, f"{name} is missing"
        assert families[name].type == kind, f"{name} is a {families[name].type}"
    assert value(families, "mbroker_info", role="standalone") == 1
    assert value(families, "mbroker_max_pending_events") == 1_000_000


def test_counters_move_as_the_stream_says(start_broker):
    broker = start_broker(metrics_port=0)
    port = broker.broker.metrics.port
    follower = connect_client(broker.client_port, 1, wait_registered=broker)
    source = connect_source(broker.event_port)
    stream = (b"1|F|1|2\r\n2|S|2\r\n3|P|5|1\r\n4|X\r\n5|U|1|2\r\n6|B\r\n"
              b"7|S|2\r\n2|B\r\nnot a line\r\n")
    source.sendall(stream)
    expected = b"2|S|2\r\n3|P|5|1\r\n6|B\r\n"
    assert receive_exactly(follower, len(expected)) == expected
    wait_until(lambda: broker.stats().counters.duplicate == 1)
    families = scrape(port)
    assert value(families, "mbroker_events_received") == 8  # 7 numbers and a resend
    for kind, count in {"follow": 1, "status": 2, "private": 1, "unfollow": 1,
                        "broadcast": 1}.items():
        assert value(families, "mbroker_events_dispatched", type=kind) == count
    assert value(families, "mbroker_notifications") == 3
    assert value(families, "mbroker_client_sent_bytes") == len(expected)
    assert value(families, "mbroker_malformed") == 1
    assert value(families, "mbroker_unsequenced") == 1
    assert value(families, "mbroker_duplicate") == 1
    assert value(families, "mbroker_next_sequence_number") == 8
    assert value(families, "mbroker_clients") == 1
    assert value(families, "mbroker_follows") == 0  # followed, then unfollowed
    # Each notification is one observation of the dispatch latency histogram.
    latency = families["mbroker_dispatch_latency_seconds"]
    count = next(s.value for s in latency.samples if s.name.endswith("_count"))
    assert count == 3
    source.close()
    wait_until(lambda: value(scrape(port), "mbroker_connections_closed",
                             reason="source_quit") == 1)
    assert value(scrape(port), "mbroker_source_connected") == 0


def test_healthz_is_200_while_serving_and_503_while_draining(start_broker, monkeypatch):
    from tests.harness import give_accepted_sockets_small_send_buffers

    give_accepted_sockets_small_send_buffers(monkeypatch)
    broker = start_broker(metrics_port=0, drain_timeout=30.0)
    port = broker.broker.metrics.port
    assert get(port, "/healthz") == (200, "ok\n")
    stalled = tiny_receiver(broker.client_port, 1)  # never reads: the drain has to wait
    wait_until(lambda: broker.stats().clients == 1)
    connect_source(broker.event_port).sendall(
        b"".join(b"%d|P|2|1\r\n" % seq for seq in range(1, 20_001)))
    wait_until(lambda: broker.stats().bytes_queued > 0)
    broker.broker.request_stop()
    wait_until(lambda: get(port, "/healthz")[0] == 503)
    assert get(port, "/healthz") == (503, "draining\n")
    stalled.close()


def test_a_scrape_of_an_unknown_path_is_404(start_broker):
    broker = start_broker(metrics_port=0)
    status, text = get(broker.broker.metrics.port, "/")
    assert status == 404 and "/metrics" in text


def test_the_log_is_in_the_metrics_of_a_primary(start_broker, tmp_path):
    pytest.importorskip("redis")
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path)
    try:
        broker = start_broker(metrics_port=0, log=server.url)
        connect_source(broker.event_port).sendall(b"1|B\r\n2|B\r\n")
        wait_until(lambda: broker.stats().log.position == 2, 15)
        families = scrape(broker.broker.metrics.port)
        for name, kind in LOG_DOCUMENTED.items():
            assert families[name].type == kind, name
        assert value(families, "mbroker_info", role="primary") == 1
        assert value(families, "mbroker_log_state", state="connected") == 1
        assert value(families, "mbroker_log_position") == 2
    finally:
        broker.stop()
        server.close()


def test_a_busy_metrics_port_is_one_line_and_exit_code_2():
    with mbroker.running() as other:
        process = BrokerProcess("--metrics-port", str(other.client_port), expect_exit=True)
        assert process.wait_exit() == 2
        (line,) = process.lines
        assert line == f"mbroker: port {other.client_port} is already in use on 127.0.0.1"


def test_without_prometheus_client_metrics_port_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(mbroker.MetricsUnavailable, match=r"pip install 'mbroker\[metrics\]'"), \
            mbroker.running(metrics_port=0):
        pass


def test_a_scraper_that_stalls_mid_request_never_stalls_the_broker_or_other_scrapes(
        start_broker):
    import socket

    broker = start_broker(metrics_port=0)
    port = broker.broker.metrics.port
    stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
    stalled.sendall(b"GET /metr")  # and never the rest
    try:
        client = connect_client(broker.client_port, 1, wait_registered=broker)
        connect_source(broker.event_port).sendall(b"1|B\r\n")
        assert receive_exactly(client, 5) == b"1|B\r\n"
        assert value(scrape(port), "mbroker_notifications") == 1
    finally:
        stalled.close()
