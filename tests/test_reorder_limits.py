"""--max-pending (docs/behaviour.md §4.4, §4.6, §4.7): a SEQ that never arrives is
waited for until the reorder buffer would pass the limit; then the lowest missing
numbers are declared lost (one log line per range, counted as `skipped`),
delivery resumes, and a lost SEQ that turns up later is dropped (`late`).
Resent numbers are `duplicate`."""

from __future__ import annotations

import re

from tests.harness import (
    assert_nothing_more,
    connect_client,
    connect_source,
    receive_exactly,
    wait_housekeeping_ticks,
    wait_until,
)


def broadcasts(*seqs: int) -> bytes:
    return b"".join(b"%d|B\r\n" % seq for seq in seqs)


def skip_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "declared lost" in r.getMessage()]


def test_full_reorder_buffer_declares_the_lowest_missing_seq_lost_and_delivery_resumes(
        start_broker, caplog):
    caplog.set_level("WARNING", logger="mbroker")
    running = start_broker(max_pending=5)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    source.sendall(broadcasts(2, 3, 4, 5, 6))  # exactly max_pending waiting: keep waiting
    wait_until(lambda: running.stats().reorder_depth == 5)
    assert_nothing_more(user5)
    assert running.stats().counters.skipped == 0
    source.sendall(broadcasts(7))  # one more would pass the limit: 1 is lost
    expected = broadcasts(2, 3, 4, 5, 6, 7)
    assert receive_exactly(user5, len(expected)) == expected
    assert_nothing_more(user5)
    stats = running.stats()
    assert stats.counters.skipped == 1
    assert stats.next_seq == 8 and stats.reorder_depth == 0
    messages = skip_messages(caplog)
    assert len(messages) == 1 and re.search(r"\b1\.\.1\b", messages[0]), messages
    # the stream goes on normally after the skip
    source.sendall(broadcasts(8))
    assert receive_exactly(user5, 5) == b"8|B\r\n"
    assert_nothing_more(user5)


def test_a_skip_jumps_a_wide_gap_at_once_with_one_log_line(start_broker, caplog):
    caplog.set_level("WARNING", logger="mbroker")
    running = start_broker(max_pending=3)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    gap_end = 10**12  # far too wide to walk number by number
    source.sendall(broadcasts(1, gap_end + 1, gap_end + 2, gap_end + 3, gap_end + 4))
    expected = broadcasts(1, gap_end + 1, gap_end + 2, gap_end + 3, gap_end + 4)
    assert receive_exactly(user5, len(expected), timeout=2.0) == expected
    stats = running.stats()
    assert stats.counters.skipped == gap_end - 1
    assert stats.next_seq == gap_end + 5
    messages = skip_messages(caplog)
    assert len(messages) == 1, messages
    assert f"2..{gap_end}" in messages[0], messages


def test_only_the_lowest_gap_is_declared_lost(start_broker, caplog):
    caplog.set_level("WARNING", logger="mbroker")
    running = start_broker(max_pending=4)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    source.sendall(broadcasts(3, 5, 6, 7, 8))  # 1-2 and 4 missing; 5 waiting > 4
    assert receive_exactly(user5, 5) == b"3|B\r\n"
    assert_nothing_more(user5)  # 4 is still awaited, 5..8 still waiting
    stats = running.stats()
    assert stats.counters.skipped == 2
    assert stats.next_seq == 4 and stats.reorder_depth == 4
    source.sendall(broadcasts(4))
    expected = broadcasts(4, 5, 6, 7, 8)
    assert receive_exactly(user5, len(expected)) == expected
    # a second gap later is a second range, logged on its own line
    source.sendall(broadcasts(11, 12, 13, 14, 15))
    expected = broadcasts(11, 12, 13, 14, 15)
    assert receive_exactly(user5, len(expected)) == expected
    assert running.stats().counters.skipped == 4
    messages = skip_messages(caplog)
    assert len(messages) == 2, messages
    assert "1..2" in messages[0] and "9..10" in messages[1], messages


def test_lost_seq_arriving_late_is_dropped_and_counted_late(start_broker):
    running = start_broker(max_pending=2)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    source.sendall(broadcasts(2, 3, 4))  # 1 lost
    assert receive_exactly(user5, 15) == broadcasts(2, 3, 4)
    source.sendall(b"1|P|7|5\r\n")  # the lost number finally arrives
    wait_until(lambda: running.stats().counters.late == 1)
    assert_nothing_more(user5)
    counters = running.stats().counters
    assert counters.duplicate == 0
    source.sendall(broadcasts(5))
    assert receive_exactly(user5, 5) == b"5|B\r\n"
    assert_nothing_more(user5)


def test_reverse_ordered_stream_stays_within_max_pending_and_delivers_the_tail(start_broker):
    running = start_broker(max_pending=10)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    source.sendall(broadcasts(*range(100, 0, -1)))
    expected = broadcasts(*range(90, 101))  # 100..90 fill the buffer; 1..89 lost
    assert receive_exactly(user5, len(expected)) == expected
    wait_until(lambda: running.stats().counters.late == 89)
    assert_nothing_more(user5)
    stats = running.stats()
    assert stats.counters.skipped == 89
    assert stats.reorder_depth == 0


def test_resent_seq_is_dropped_whether_delivered_or_still_waiting(start_broker):
    running = start_broker(max_pending=100)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    source.sendall(broadcasts(1, 1, 3, 3))  # 1 delivered twice? 3 waiting twice?
    assert receive_exactly(user5, 5) == b"1|B\r\n"
    wait_until(lambda: running.stats().counters.duplicate == 2)
    source.sendall(b"3|P|7|5\r\n" + broadcasts(2))  # a changed resend is still a duplicate
    expected = broadcasts(2, 3)
    assert receive_exactly(user5, len(expected)) == expected
    assert_nothing_more(user5)
    counters = running.stats().counters
    assert counters.duplicate == 3 and counters.late == 0 and counters.skipped == 0


def test_waiting_for_a_missing_seq_below_the_limit_does_not_skip_it(start_broker):
    running = start_broker(max_pending=1000)
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    source.sendall(broadcasts(*range(2, 1001)))  # 999 waiting, below the limit
    wait_until(lambda: running.stats().reorder_depth == 999)
    wait_housekeeping_ticks(running)  # no timer declares a number lost either
    assert running.stats().counters.skipped == 0
    assert_nothing_more(user5, wait=0.05)
    source.sendall(broadcasts(1))
    expected = broadcasts(*range(1, 1001))
    assert receive_exactly(user5, len(expected)) == expected


def test_every_lost_number_is_logged_even_when_many_ranges_are_lost_at_once(start_broker, caplog):
    # max_pending=1 with only even numbers sent: each even declares the odd
    # below it lost — 150 separate ranges inside a single read of the source.
    caplog.set_level("WARNING", logger="mbroker")
    running = start_broker(max_pending=1)
    source = connect_source(running.event_port)
    source.sendall(broadcasts(*range(2, 302, 2)))
    wait_until(lambda: running.stats().counters.skipped == 149)
    logged = set()
    for message in skip_messages(caplog):
        for first, last in re.findall(r"(\d+)\.\.(\d+)", message):
            logged.update(range(int(first), int(last) + 1))
    lost = set(range(1, 299, 2))
    assert lost <= logged, f"{len(lost - logged)} lost numbers never logged, e.g. " \
                           f"{sorted(lost - logged)[:5]}"
