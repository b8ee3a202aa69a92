"""ReorderBuffer (SPEC §2.1, §3): strict sequence order, each SEQ at most once,
memory bounded by max_pending."""

from __future__ import annotations

import random
import time

import pytest

from mbroker import ReorderBuffer


def push_all(buffer: ReorderBuffer, seqs) -> list:
    released = []
    for seq in seqs:
        released.extend(buffer.push(seq, f"item{seq}"))
    return released


def items(*seqs) -> list[str]:
    return [f"item{seq}" for seq in seqs]


def test_in_order_items_are_released_at_once():
    buffer = ReorderBuffer()
    for seq in range(1, 6):
        assert buffer.push(seq, f"item{seq}") == [f"item{seq}"]
    assert buffer.next_seq == 6
    assert len(buffer) == 0
    assert buffer.largest_depth == 0


def test_out_of_order_items_wait_for_the_missing_number_then_release_in_order():
    buffer = ReorderBuffer()
    assert buffer.push(3, "item3") == []
    assert buffer.push(2, "item2") == []
    assert buffer.push(5, "item5") == []
    assert len(buffer) == 3
    assert buffer.push(1, "item1") == items(1, 2, 3)
    assert buffer.next_seq == 4
    assert buffer.push(4, "item4") == items(4, 5)
    assert len(buffer) == 0
    assert buffer.highest_seq == 5
    assert buffer.largest_depth == 3


def test_first_seq_may_be_chosen():
    buffer = ReorderBuffer(first_seq=100)
    assert buffer.push(101, "b") == []
    assert buffer.push(100, "a") == ["a", "b"]


def test_shuffled_stream_is_released_in_sequence_order():
    rng = random.Random(7)
    seqs = list(range(1, 2001))
    rng.shuffle(seqs)
    buffer = ReorderBuffer()
    assert push_all(buffer, seqs) == items(*range(1, 2001))
    assert buffer.duplicates == buffer.late == buffer.skipped == 0


def test_already_delivered_seq_is_dropped_and_counted_as_duplicate():
    buffer = ReorderBuffer()
    push_all(buffer, [1, 2, 3])
    assert buffer.push(2, "again") == []
    assert buffer.push(1, "again") == []
    assert buffer.duplicates == 2
    assert buffer.late == 0
    assert buffer.push(4, "item4") == ["item4"]


def test_seq_already_waiting_is_dropped_and_the_first_copy_kept():
    buffer = ReorderBuffer()
    assert buffer.push(3, "first") == []
    assert buffer.push(3, "second") == []
    assert buffer.duplicates == 1
    assert len(buffer) == 1
    assert push_all(buffer, [2, 1]) == ["item1", "item2", "first"]


def test_overflow_skips_the_lowest_gap_and_resumes_delivery():
    buffer = ReorderBuffer(max_pending=3)
    assert push_all(buffer, [3, 4, 5]) == []  # 1 and 2 missing; depth 3 is allowed
    assert buffer.skipped == 0
    assert buffer.push(7, "item7") == items(3, 4, 5)  # depth 4 > 3: 1..2 lost
    assert buffer.skipped == 2
    assert buffer.next_seq == 6
    assert len(buffer) == 1
    assert buffer.push(6, "item6") == items(6, 7)


def test_overflow_skips_only_the_lowest_gap():
    buffer = ReorderBuffer(max_pending=3)
    assert push_all(buffer, [5, 9, 10]) == []
    assert buffer.push(11, "item11") == items(5)  # 1..4 lost; 6..8 still awaited
    assert buffer.skipped == 4
    assert buffer.next_seq == 6
    assert list(buffer.skipped_ranges) == [(1, 4)]
    assert push_all(buffer, [6, 7, 8]) == items(6, 7, 8, 9, 10, 11)
    assert buffer.skipped == 4


def test_overflow_jumps_a_gap_of_ten_to_the_thirty_in_one_step():
    buffer = ReorderBuffer(max_pending=2)
    base = 10 ** 30
    started = time.perf_counter()
    released = push_all(buffer, [base + 1, base + 2, base + 3])
    assert time.perf_counter() - started < 0.5
    assert released == items(base + 1, base + 2, base + 3)
    assert buffer.skipped == base  # numbers 1..10**30
    assert buffer.next_seq == base + 4


def test_late_arrival_of_a_lost_seq_is_counted_late_and_dropped():
    buffer = ReorderBuffer(max_pending=1)
    assert push_all(buffer, [3, 4]) == items(3, 4)  # 1..2 lost
    assert buffer.push(1, "late") == []
    assert buffer.push(2, "late") == []
    assert buffer.late == 2
    assert buffer.duplicates == 0
    assert buffer.push(3, "dup") == []
    assert buffer.duplicates == 1
    assert buffer.late == 2


def test_largest_depth_records_the_peak_not_the_current_depth():
    buffer = ReorderBuffer()
    push_all(buffer, [5, 4, 3, 2])
    assert buffer.largest_depth == 4
    push_all(buffer, [1])
    assert len(buffer) == 0
    assert buffer.largest_depth == 4
    push_all(buffer, [7])
    assert buffer.largest_depth == 4


def test_max_pending_must_be_positive():
    with pytest.raises(ValueError):
        ReorderBuffer(max_pending=0)


def test_every_other_number_missing_with_a_small_buffer_stays_fast_and_exact():
    # Adversarial: each push overflows the buffer and skips a gap of one.
    count = 100_000
    buffer = ReorderBuffer(max_pending=1000)
    started = time.perf_counter()
    released = push_all(buffer, range(2, 2 * count + 1, 2))
    elapsed = time.perf_counter() - started
    assert released == items(*range(2, 2 * (count - 1000) + 1, 2))
    assert len(buffer) == 1000
    assert buffer.skipped == count - 1000
    assert elapsed < 5.0, f"{count} pushes took {elapsed:.1f} s"


def test_every_other_number_missing_then_filled_in_stays_fast_and_exact():
    count = 100_000
    buffer = ReorderBuffer()
    started = time.perf_counter()
    assert push_all(buffer, range(2, 2 * count + 1, 2)) == []
    released = push_all(buffer, range(1, 2 * count, 2))
    elapsed = time.perf_counter() - started
    assert released == items(*range(1, 2 * count + 1))
    assert buffer.largest_depth == count
    assert elapsed < 5.0, f"{2 * count} pushes took {elapsed:.1f} s"
