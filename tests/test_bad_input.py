"""Malformed event lines (docs/behaviour.md §4.1, §4.2, §6.7, §6.8): a line with a
valid SEQ that does not parse is consumed as a no-op at that SEQ (the stream goes
on past it); a line without a valid SEQ, SEQ 0 included, is dropped; both are
counted and logged, and the log is rate-limited (§4, conventions). A malformed
resend of a delivered SEQ is a duplicate (§4.4)."""

from __future__ import annotations

import re
import time

import pytest

from tests.harness import (
    assert_nothing_more,
    connect_client,
    connect_source,
    receive_exactly,
    wait_until,
)

MALFORMED_WITH_SEQ = {
    "unknown type": b"1|X|2|5",
    "lower-case type": b"1|p|2|5",
    "empty type": b"1||2|5",
    "no type at all": b"1",
    "private with 3 fields": b"1|P|2",
    "private with 5 fields": b"1|P|2|5|9",
    "follow with 3 fields": b"1|F|2",
    "unfollow with 2 fields": b"1|U",
    "status with 4 fields": b"1|S|2|5",
    "broadcast with 3 fields": b"1|B|2",
    "letters for FROM": b"1|P|abc|5",
    "negative TO": b"1|P|2|-5",
    "plus sign in TO": b"1|P|2|+5",
    "underscore in FROM": b"1|P|1_0|5",
    "empty TO": b"1|P|2|",
    "space inside TO": b"1|P|2| 5",
    "arabic-indic digit in TO": "1|P|2|\u0665".encode(),
    "fullwidth digit in FROM": "1|P|\uff12|5".encode(),
    "non-UTF-8 FROM": b"1|P|\xff\xfe|5",
    "non-UTF-8 type": b"1|\xc3\x28|2|5",
}

UNSEQUENCED = {
    "letters": b"abc|B",
    "empty SEQ": b"|B",
    "negative SEQ": b"-1|B",
    "plus sign": b"+1|B",
    "trailing letter": b"1a|B",
    "space before SEQ": b" 1|B",
    "underscore": b"1_0|B",
    "arabic-indic digit": "\u0661|B".encode(),
    "non-UTF-8 bytes": b"\xff\xfe\xfd|B",
    "lone separator": b"|",
    "NUL bytes": b"\x00\x00\x00",
    "sequence number zero": b"0|B",
    "zeros only": b"000|P|1|5",
}


def test_malformed_line_with_valid_seq_is_consumed_as_a_noop_and_the_stream_goes_on(
        start_broker):
    running = start_broker()
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    # Odd SEQs are malformed, one kind each; the even SEQ after each can only be
    # delivered if the malformed one before it was consumed.
    kinds = list(MALFORMED_WITH_SEQ)
    stream, expected = [], []
    for index, kind in enumerate(kinds):
        bad_seq, good_seq = 2 * index + 1, 2 * index + 2
        stream.append(b"%d" % bad_seq + MALFORMED_WITH_SEQ[kind][1:] + b"\r\n")
        stream.append(b"%d|P|7|5\r\n" % good_seq)
        expected.append(b"%d|P|7|5\r\n" % good_seq)
    source.sendall(b"".join(stream))
    expected_bytes = b"".join(expected)
    received = receive_exactly(user5, len(expected_bytes))
    if received != expected_bytes:
        stalled_at = running.stats().next_seq
        pytest.fail(f"stream stalled at SEQ {stalled_at}: the malformed line "
                    f"{kinds[(stalled_at - 1) // 2]!r} was not consumed; got {received!r}")
    assert_nothing_more(user5)
    stats = running.stats()
    assert stats.counters.malformed == len(kinds)
    assert stats.counters.unsequenced == 0
    assert stats.next_seq == 2 * len(kinds) + 1
    assert stats.reorder_depth == 0


def test_a_type_letter_in_a_number_is_malformed_even_where_every_byte_could_be_valid(
        start_broker):
    # Made only of bytes a well-formed stream has too (digits, "|", type
    # letters, "\r\n"), so these lines reach the broker's fast path together.
    running = start_broker()
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    bad = [b"1|F|F|5", b"3|P|2|5F", b"5|S|B", b"7|P|S|5", b"9|U|5|P"]
    good = [b"%d|P|7|5" % (seq + 1) for seq in (1, 3, 5, 7, 9)]
    source.sendall(b"".join(line + b"\r\n" for pair in zip(bad, good, strict=True)
                            for line in pair))
    expected = b"".join(line + b"\r\n" for line in good)
    assert receive_exactly(user5, len(expected)) == expected
    assert_nothing_more(user5)
    assert running.stats().counters.malformed == len(bad)


def test_malformed_line_arriving_out_of_order_fills_its_gap(start_broker):
    running = start_broker()
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    source.sendall(b"3|P|7|5\r\n2|NOPE\r\n")
    wait_until(lambda: running.stats().reorder_depth == 2)
    source.sendall(b"1|P|7|5\r\n")
    expected = b"1|P|7|5\r\n3|P|7|5\r\n"
    assert receive_exactly(user5, len(expected)) == expected
    assert_nothing_more(user5)
    assert running.stats().counters.malformed == 1


def test_malformed_line_is_never_forwarded_to_anyone(start_broker):
    running = start_broker()
    clients = {uid: connect_client(running.client_port, uid, wait_registered=running)
               for uid in (2, 5)}
    source = connect_source(running.event_port)
    # 2 follows 5, then lines that look almost like events for 2 and 5.
    source.sendall(b"1|F|2|5\r\n2|B|x\r\n3|S|5|2\r\n4|P|2|5|\r\n5|F|2\r\n6|B\r\n")
    assert receive_exactly(clients[5], len(b"1|F|2|5\r\n6|B\r\n")) == b"1|F|2|5\r\n6|B\r\n"
    assert receive_exactly(clients[2], len(b"6|B\r\n")) == b"6|B\r\n"
    for sock in clients.values():
        assert_nothing_more(sock)
    assert running.stats().counters.malformed == 4


def test_malformed_follow_does_not_change_the_follow_graph(start_broker):
    running = start_broker()
    user2 = connect_client(running.client_port, 2, wait_registered=running)
    source = connect_source(running.event_port)
    # 2 would follow 5 if the 5-field follow were applied; the status update of 5
    # must then reach nobody, and the stream must go on to 3.
    source.sendall(b"1|F|2|5|9\r\n2|S|5\r\n3|P|1|2\r\n")
    assert receive_exactly(user2, len(b"3|P|1|2\r\n")) == b"3|P|1|2\r\n"
    assert_nothing_more(user2)


def test_line_without_a_valid_seq_is_dropped_without_consuming_any_number(start_broker):
    running = start_broker()
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    for count, (kind, line) in enumerate(UNSEQUENCED.items(), start=1):
        source.sendall(line + b"\r\n")
        wait_until(lambda count=count: running.stats().counters.unsequenced == count)
        assert running.stats().next_seq == 1, f"{kind}: an unsequenced line consumed a SEQ"
    assert running.stats().counters.malformed == 0
    source.sendall(b"1|P|7|5\r\n2|B\r\n")
    expected = b"1|P|7|5\r\n2|B\r\n"
    assert receive_exactly(user5, len(expected)) == expected
    assert_nothing_more(user5)


def test_bad_lines_are_logged_with_their_kind(start_broker, caplog):
    caplog.set_level("WARNING", logger="mbroker")
    running = start_broker()
    source = connect_source(running.event_port)
    source.sendall(b"1|X\r\nnope|B\r\n")
    wait_until(lambda: running.stats().counters.unsequenced == 1)
    messages = [record.getMessage() for record in caplog.records]
    assert any("1" in m and "no-op" in m and "X" in m for m in messages), messages
    assert any("nope" in m and "dropped" in m for m in messages), messages


def test_a_flood_of_bad_lines_is_counted_but_does_not_flood_the_log(start_broker_process):
    flood = 5000
    process = start_broker_process("--log-level", "DEBUG")  # DEBUG logs registrations
    source = connect_source(process.event_port)
    # SEQ 1..flood are malformed (consumed), then as many unsequenced lines,
    # then one good event: its delivery proves the flood was processed.
    malformed = b"".join(b"%d|Q|1|2\r\n" % seq for seq in range(1, flood + 1))
    unsequenced = b"x|B\r\n" * flood
    user5 = connect_client(process.client_port, 5)
    process.wait_for_registration(5)
    baseline = len(process.lines)
    started = time.monotonic()
    source.sendall(malformed + unsequenced + b"%d|P|1|5\r\n" % (flood + 1))
    expected = b"%d|P|1|5\r\n" % (flood + 1)
    assert receive_exactly(user5, len(expected)) == expected
    elapsed = time.monotonic() - started
    process.wait_for_log(r"no-op")
    process.wait_for_log(r"dropped")
    # A client refused now logs a line after every line the flood caused:
    # once it is in, everything the flood logged is in too.
    with connect_client(process.client_port, b"barrier\n"):
        barrier = process.wait_for_log(r"invalid_id", start=baseline)
    logged = process.lines[baseline:process.lines.index(barrier)]
    problem_lines = [line for line in logged if "no-op" in line or "dropped" in line]
    # Each kind is logged, but 10,000 bad lines must not make 10,000 log lines.
    assert 2 <= len(problem_lines) <= 50, "\n".join(logged[:80])
    assert len(logged) <= 60
    assert elapsed < 5.0
    assert process.stop() == 0


def test_suppressed_bad_lines_are_summarised_once_the_window_reopens(start_broker, caplog,
                                                                     monkeypatch):
    import mbroker

    caplog.set_level("WARNING", logger="mbroker")
    clock = [1000.0]
    running = start_broker()
    monkeypatch.setattr(running.broker.problems, "clock", lambda: clock[0])
    source = connect_source(running.event_port)
    source.sendall(b"".join(b"%d|Q\r\n" % seq for seq in range(1, 101)))
    wait_until(lambda: running.stats().counters.malformed == 100)
    clock[0] += 60.0
    source.sendall(b"101|Q\r\n")
    wait_until(lambda: running.stats().counters.malformed == 101)
    messages = [r.getMessage() for r in caplog.records if "no-op" in r.getMessage()]
    assert len(messages) <= 12
    summary = [m for m in messages if re.search(r"\(\d+ similar lines suppressed\)", m)]
    assert summary, messages
    suppressed = int(re.search(r"\((\d+) similar", summary[-1]).group(1))
    assert suppressed == 100 - (len(messages) - 1)
    assert isinstance(running.broker.problems, mbroker.RateLimitedLog)


def test_malformed_resend_of_a_delivered_seq_is_a_duplicate_not_a_noop(start_broker, caplog):
    running = start_broker()
    user5 = connect_client(running.client_port, 5, wait_registered=running)
    source = connect_source(running.event_port)
    source.sendall(b"1|P|7|5\r\n")
    assert receive_exactly(user5, 9) == b"1|P|7|5\r\n"
    caplog.clear()
    source.sendall(b"1|X|7|5\r\n2|B\r\n")
    assert receive_exactly(user5, 5) == b"2|B\r\n"
    counters = running.stats().counters
    assert counters.duplicate == 1
    assert counters.malformed == 0, "nothing was consumed: SEQ 1 had been delivered"
    assert "consumed as a no-op" not in caplog.text
