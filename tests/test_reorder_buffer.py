"""ReorderBuffer (docs/behaviour.md §2.1.7, §3.2, §4.4, §4.6, §4.7): strict
sequence order, each SEQ at most once, memory bounded by max_pending."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mbroker
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
    assert buffer.take_skipped_ranges() == [(1, 4)]
    assert buffer.take_skipped_ranges() == []  # each range is told once
    assert push_all(buffer, [6, 7, 8]) == items(6, 7, 8, 9, 10, 11)
    assert buffer.skipped == 4


def test_overflow_jumps_a_gap_of_ten_to_the_thirty_in_one_step():
    buffer = ReorderBuffer(max_pending=2)
    base = 10 ** 30
    released = push_all(buffer, [base + 1, base + 2, base + 3])  # a loop per number would never end
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


def test_every_other_number_missing_with_a_small_buffer_stays_exact_without_rebuilding_per_push(
        monkeypatch):
    # Adversarial: each push overflows the buffer and skips a gap of one. The
    # lowest waiting number comes from a heap, which must not be rebuilt
    # (a pass over every waiting number) on every push.
    heapify_calls = []
    original_heapify = mbroker.heapq.heapify
    monkeypatch.setattr(mbroker.heapq, "heapify",
                        lambda heap: heapify_calls.append(len(heap)) or original_heapify(heap))
    count = 100_000
    buffer = ReorderBuffer(max_pending=1000)
    released = push_all(buffer, range(2, 2 * count + 1, 2))
    assert released == items(*range(2, 2 * (count - 1000) + 1, 2))
    assert len(buffer) == 1000
    assert buffer.skipped == count - 1000
    assert len(heapify_calls) <= count // mbroker.HEAP_SLACK + 2


def test_every_other_number_missing_then_filled_in_is_released_exactly():
    count = 100_000
    buffer = ReorderBuffer()
    assert push_all(buffer, range(2, 2 * count + 1, 2)) == []
    released = push_all(buffer, range(1, 2 * count, 2))
    assert released == items(*range(1, 2 * count + 1))
    assert buffer.largest_depth == count
    assert len(buffer) == 0


def events(*seqs: int) -> list[list[bytes]]:
    """Split event lines, as push_slice takes them."""
    return [[b"%d" % seq, b"B"] for seq in seqs]


def test_push_slice_releases_a_shuffled_run_in_order():
    buffer = ReorderBuffer()
    assert buffer.push_slice(events(3, 1, 2, 5)) == events(1, 2, 3)
    assert buffer.next_seq == 4 and len(buffer) == 1 and buffer.highest_seq == 5
    assert buffer.push_slice(events(4, 4, 1)) == events(4, 5)
    assert buffer.duplicates == 2


def test_push_slice_sets_an_event_numbered_zero_aside():
    buffer = ReorderBuffer()
    assert buffer.push_slice(events(2, 0, 1)) == events(1, 2)
    assert buffer.take_unnumbered() == events(0)
    assert buffer.take_unnumbered() == []
    assert buffer.duplicates == 0


def test_advance_to_goes_on_past_numbers_handled_elsewhere():
    buffer = ReorderBuffer()
    assert push_all(buffer, [3, 9]) == []
    buffer.advance_to(5)
    assert buffer.next_seq == 5 and len(buffer) == 1  # 3 dropped, 9 still waits
    assert push_all(buffer, [4, 5]) == items(5)
    assert buffer.duplicates == 1


@settings(max_examples=300, deadline=None)
@given(seqs=st.lists(st.integers(min_value=1, max_value=60), max_size=120),
       slice_sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=10),
       max_pending=st.integers(min_value=1, max_value=50),
       slot_margin=st.integers(min_value=0, max_value=8))
def test_push_slice_is_push_one_by_one(seqs, slice_sizes, max_pending, slot_margin):
    # The bulk path (slots, one index() and slice) and the event-by-event path
    # (dict, heap, overflow) must agree on everything: releases and counters.
    one_by_one = ReorderBuffer(max_pending=max_pending, slot_margin=slot_margin)
    expected = push_all(one_by_one, seqs)
    in_slices = ReorderBuffer(max_pending=max_pending, slot_margin=slot_margin)
    released, position, turn = [], 0, 0
    while position < len(seqs):
        size = slice_sizes[turn % len(slice_sizes)]
        part = seqs[position:position + size]
        released += [f"item{int(event[0])}" for event in in_slices.push_slice(events(*part))]
        position += size
        turn += 1
    # The bulk path runs only while the buffer is far from full, so no
    # overflow can happen inside it: the two agree even when numbers are lost.
    assert released == expected
    assert (in_slices.next_seq, in_slices.highest_seq, len(in_slices), in_slices.duplicates,
            in_slices.late, in_slices.skipped) == \
        (one_by_one.next_seq, one_by_one.highest_seq, len(one_by_one), one_by_one.duplicates,
         one_by_one.late, one_by_one.skipped)
