"""--max-line (docs/behaviour.md §4.3, §3.6): an event line longer than the limit
before its newline is discarded up to that newline without ever being buffered
whole, counted as `overlong` and logged; its SEQ is not consumed, and later
events still flow."""

from __future__ import annotations

import time

from tests.harness import (
    assert_nothing_more,
    connect_client,
    connect_source,
    receive_exactly,
    rss_kib,
    wait_until,
)


def test_overlong_line_is_discarded_and_its_seq_is_not_consumed(start_broker, caplog):
    caplog.set_level("WARNING", logger="mbroker")
    running = start_broker(max_line=100)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    overlong = b"1|P|" + b"7" * 200 + b"|5\r\n"
    source.sendall(overlong)
    wait_until(lambda: running.stats().counters.overlong == 1)
    assert running.stats().next_seq == 1, "the overlong line's SEQ was consumed"
    # SEQ 1 is still expected: a resend of it, short this time, is delivered.
    source.sendall(b"1|P|7|5\r\n2|B\r\n")
    expected = b"1|P|7|5\r\n2|B\r\n"
    assert receive_exactly(user5, len(expected)) == expected
    assert_nothing_more(user5)
    counters = running.stats().counters
    assert counters.overlong == 1
    assert counters.malformed == counters.unsequenced == counters.duplicate == 0
    assert any("--max-line" in record.getMessage() for record in caplog.records)


def test_line_of_exactly_max_line_bytes_is_kept_and_one_byte_more_is_discarded(start_broker):
    running = start_broker(max_line=20)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    exact = b"1|P|7|" + b"0" * 13 + b"5"  # 20 bytes before the newline
    too_long = b"2|P|7|" + b"0" * 14 + b"5"  # 21 bytes
    assert len(exact) == 20 and len(too_long) == 21
    source.sendall(exact + b"\n" + too_long + b"\n2|B\n")
    expected = exact + b"\n2|B\n"
    assert receive_exactly(user5, len(expected)) == expected
    assert_nothing_more(user5)
    assert running.stats().counters.overlong == 1


def test_several_overlong_lines_in_one_read_are_each_dropped_and_the_rest_delivered(
        start_broker):
    running = start_broker(max_line=64)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    pad = b"9" * 100
    chunk = (b"1|P|7|5\r\n" + b"2|P|" + pad + b"|5\r\n" + b"2|B\r\n"
             + b"3|B|" + pad + b"\r\n" + b"3|P|8|5\r\n" + b"x" * 500 + b"\r\n4|B\r\n")
    source.sendall(chunk)
    expected = b"1|P|7|5\r\n2|B\r\n3|P|8|5\r\n4|B\r\n"
    assert receive_exactly(user5, len(expected)) == expected
    assert_nothing_more(user5)
    counters = running.stats().counters
    assert counters.overlong == 3
    assert counters.unsequenced == counters.malformed == 0


def test_overlong_line_sent_in_small_pieces_is_skipped_to_its_newline(start_broker):
    running = start_broker(max_line=100)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    source.sendall(b"1|B\r\n")
    assert receive_exactly(user5, 5) == b"1|B\r\n"
    # 2|P|<5,000 digits>|5 in 50-byte pieces; the newline arrives in the same
    # piece as the next event. Nothing of the long line may leak into a line.
    line = b"2|P|" + b"1" * 5000 + b"|5\r\n3|B\r\n"
    for offset in range(0, len(line), 50):
        source.sendall(line[offset:offset + 50])
        if offset % 1000 == 0:
            time.sleep(0.005)  # let the broker see the pieces separately
    source.sendall(b"2|P|7|5\r\n")
    expected = b"2|P|7|5\r\n3|B\r\n"
    assert receive_exactly(user5, len(expected)) == expected
    assert_nothing_more(user5)
    assert running.stats().counters.overlong == 1


def test_unterminated_overlong_line_does_not_swallow_the_next_source_connection(start_broker):
    running = start_broker(max_line=100)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    first = connect_source(running.event_port)
    first.sendall(b"1|P|" + b"7" * 1000)  # overlong, never terminated
    wait_until(lambda: running.stats().counters.overlong == 1)
    first.close()
    wait_until(lambda: not running.stats().source.connected)
    second = connect_source(running.event_port)
    second.sendall(b"1|P|7|5\r\n")
    assert receive_exactly(user5, 9) == b"1|P|7|5\r\n"
    assert_nothing_more(user5)


def test_ten_megabyte_line_is_never_buffered_whole_and_later_events_flow(
        start_broker_process):
    process = start_broker_process("--max-line", "4096")
    user5 = connect_client(process.client_port, 5)
    source = connect_source(process.event_port)
    source.sendall(b"1|P|7|5\r\n")  # also proves user 5 is registered
    assert receive_exactly(user5, 9) == b"1|P|7|5\r\n"
    before = rss_kib(process.pid, peak=True)
    size = 10 * 1024 * 1024
    piece = b"3" * (64 * 1024)
    source.sendall(b"2|P|7|")
    for _ in range(size // len(piece)):
        source.sendall(piece)
    source.sendall(b"|5\r\n2|P|8|5\r\n3|B\r\n")
    expected = b"2|P|8|5\r\n3|B\r\n"
    assert receive_exactly(user5, len(expected)) == expected
    assert_nothing_more(user5)
    growth_kib = rss_kib(process.pid, peak=True) - before
    # Holding the line whole would cost at least 10 MiB; reads are 256 KiB.
    assert growth_kib < 4 * 1024, f"peak RSS grew by {growth_kib} KiB for a 10 MiB line"
    process.wait_for_log(r"longer than --max-line=4096")
    assert process.stop() == 0
