"""Exchange and EventPipeline (docs/behaviour.md §2.1, §3.2, §6.1, §6.2): the
follow graph and routing, applied in sequence order, with in-memory subscribers."""

from __future__ import annotations

import logging

import pytest

from mbroker import (
    BrokerConfig,
    EventPipeline,
    Exchange,
    RateLimitedLog,
    Subscriber,
)


def subscribed(exchange: Exchange, *user_ids: int) -> dict[int, Subscriber]:
    subscribers = {}
    for user_id in user_ids:
        subscribers[user_id] = Subscriber(user_id)
        exchange.subscribe(user_id, subscribers[user_id])
    return subscribers


def received(subscribers) -> dict:
    return {key: sub.take_bytes() for key, sub in subscribers.items()}


# -- Exchange ----------------------------------------------------------------


def test_follow_notifies_only_the_followed_user_and_records_the_follower():
    exchange = Exchange()
    subs = subscribed(exchange, 60, 50, 7)
    exchange.dispatch(b"666|F|60|50\r")
    assert received(subs) == {60: b"", 50: b"666|F|60|50\r\n", 7: b""}
    assert exchange.followers_of(50) == {60}
    assert exchange.follow_count == 1


def test_unfollow_notifies_nobody_and_removes_the_follower():
    exchange = Exchange()
    subs = subscribed(exchange, 12, 9)
    exchange.dispatch(b"1|F|12|9")
    subs[9].take_bytes()
    exchange.dispatch(b"2|U|12|9")
    assert received(subs) == {12: b"", 9: b""}
    assert exchange.followers_of(9) == set()
    assert exchange.follow_count == 0


def test_broadcast_reaches_every_registered_subscriber():
    exchange = Exchange()
    subs = subscribed(exchange, 1, 2, 3)
    exchange.dispatch(b"542532|B\r")
    assert received(subs) == dict.fromkeys((1, 2, 3), b"542532|B\r\n")
    assert exchange.notifications == 3


def test_private_message_reaches_only_its_recipient():
    exchange = Exchange()
    subs = subscribed(exchange, 32, 56, 1)
    exchange.dispatch(b"43|P|32|56")
    assert received(subs) == {32: b"", 56: b"43|P|32|56\n", 1: b""}


def test_status_update_reaches_every_current_follower_and_not_the_author():
    exchange = Exchange()
    subs = subscribed(exchange, 32, 1, 2, 3)
    exchange.dispatch(b"1|F|1|32")
    exchange.dispatch(b"2|F|2|32")
    received(subs)
    exchange.dispatch(b"634|S|32")
    assert received(subs) == {32: b"", 1: b"634|S|32\n", 2: b"634|S|32\n", 3: b""}


def test_status_update_reaches_only_followers_current_at_its_sequence_number():
    exchange = Exchange()
    subs = subscribed(exchange, 5, 1, 2)
    exchange.dispatch(b"1|F|1|5")
    exchange.dispatch(b"2|S|5")
    exchange.dispatch(b"3|F|2|5")
    exchange.dispatch(b"4|U|1|5")
    exchange.dispatch(b"5|S|5")
    got = received(subs)
    assert got[1] == b"2|S|5\n"
    assert got[2] == b"5|S|5\n"


def test_status_update_with_many_connected_users_and_few_followers_reaches_only_followers():
    # Exercises the "walk the smaller side" choice in both directions.
    exchange = Exchange()
    subs = subscribed(exchange, *range(100))
    exchange.dispatch(b"1|F|3|0")
    for follower in range(200, 400):  # many followers, few of them connected
        exchange.dispatch(b"9|F|%d|1" % follower)
    exchange.dispatch(b"9|F|4|1")
    received(subs)
    exchange.dispatch(b"2|S|0")
    exchange.dispatch(b"3|S|1")
    got = received(subs)
    assert {user for user, data in got.items() if data} == {3, 4}
    assert got[3] == b"2|S|0\n"
    assert got[4] == b"3|S|1\n"


def test_follow_state_is_kept_for_users_without_a_connection():
    exchange = Exchange()
    exchange.dispatch(b"1|F|8|9")  # neither 8 nor 9 connected
    subs = subscribed(exchange, 8)
    exchange.dispatch(b"2|S|9")
    assert received(subs) == {8: b"2|S|9\n"}


def test_notification_for_unconnected_user_is_dropped_silently():
    exchange = Exchange()
    subs = subscribed(exchange, 1)
    exchange.dispatch(b"1|P|1|99")
    exchange.dispatch(b"2|F|1|99")
    exchange.dispatch(b"3|S|99")  # 1 follows 99 and is connected
    assert received(subs) == {1: b"3|S|99\n"}


def test_following_twice_is_one_follow_but_both_events_are_delivered():
    exchange = Exchange()
    subs = subscribed(exchange, 1, 2)
    exchange.dispatch(b"1|F|1|2")
    exchange.dispatch(b"2|F|1|2")
    assert received(subs) == {1: b"", 2: b"1|F|1|2\n2|F|1|2\n"}
    assert exchange.follow_count == 1
    exchange.dispatch(b"3|U|1|2")  # one unfollow undoes both
    exchange.dispatch(b"4|S|2")
    assert received(subs) == {1: b"", 2: b""}


def test_unfollow_of_a_non_follower_does_nothing():
    exchange = Exchange()
    subs = subscribed(exchange, 1, 2, 3)
    exchange.dispatch(b"1|F|1|3")
    exchange.dispatch(b"2|U|2|3")  # 2 never followed 3
    exchange.dispatch(b"3|U|2|77")  # 77 has no followers at all
    assert exchange.follow_count == 1
    received(subs)
    exchange.dispatch(b"4|S|3")
    assert received(subs) == {1: b"4|S|3\n", 2: b"", 3: b""}


def test_several_subscribers_for_one_user_each_receive_every_notification():
    exchange = Exchange()
    phone, laptop, other = Subscriber(5), Subscriber(5), Subscriber(6)
    for sub in (phone, laptop, other):
        exchange.subscribe(sub.user_id, sub)
    exchange.dispatch(b"1|F|6|5")
    exchange.dispatch(b"2|P|6|5")
    exchange.dispatch(b"3|F|5|6")
    exchange.dispatch(b"4|S|6")
    exchange.dispatch(b"5|B")
    expected = b"1|F|6|5\n2|P|6|5\n4|S|6\n5|B\n"
    assert phone.take_bytes() == expected
    assert laptop.take_bytes() == expected
    assert other.take_bytes() == b"3|F|5|6\n5|B\n"
    assert exchange.notifications == 10


def test_unsubscribed_subscriber_receives_nothing_more_and_others_keep_receiving():
    exchange = Exchange()
    phone, laptop = Subscriber(5), Subscriber(5)
    exchange.subscribe(5, phone)
    exchange.subscribe(5, laptop)
    exchange.dispatch(b"1|P|1|5")
    exchange.unsubscribe(5, phone)
    assert phone not in exchange.touched
    exchange.dispatch(b"2|P|1|5")
    exchange.dispatch(b"3|B")
    assert phone.take_bytes() == b"1|P|1|5\n"
    assert laptop.take_bytes() == b"1|P|1|5\n2|P|1|5\n3|B\n"
    exchange.unsubscribe(5, laptop)
    assert 5 not in exchange.routes
    exchange.unsubscribe(5, laptop)  # twice is harmless
    exchange.dispatch(b"4|B")
    assert laptop.take_bytes() == b""


def test_unsubscribed_user_keeps_its_follow_state():
    exchange = Exchange()
    sub = Subscriber(1)
    exchange.subscribe(1, sub)
    exchange.dispatch(b"1|F|1|2")
    exchange.unsubscribe(1, sub)
    again = Subscriber(1)
    exchange.subscribe(1, again)
    exchange.dispatch(b"2|S|2")
    assert again.take_bytes() == b"2|S|2\n"


def test_touched_records_exactly_the_subscribers_with_new_lines():
    exchange = Exchange()
    subs = subscribed(exchange, 1, 2, 3)
    exchange.dispatch(b"1|P|1|2")
    assert exchange.touched == {subs[2]}


def test_follows_past_max_follows_are_refused_and_counted_but_still_delivered():
    exchange = Exchange(max_follows=2)
    subs = subscribed(exchange, 1, 2, 3, 9)
    exchange.dispatch(b"1|F|1|9")
    exchange.dispatch(b"2|F|2|9")
    exchange.dispatch(b"3|F|3|9")  # refused
    exchange.dispatch(b"4|F|1|9")  # already following: not a refusal
    assert exchange.follows_refused == 1
    assert exchange.follow_count == 2
    assert subs[9].take_bytes() == b"1|F|1|9\n2|F|2|9\n3|F|3|9\n4|F|1|9\n"
    received(subs)
    exchange.dispatch(b"5|S|9")
    assert received(subs) == {1: b"5|S|9\n", 2: b"5|S|9\n", 3: b"", 9: b""}
    exchange.dispatch(b"6|U|1|9")  # frees room for a new follow
    exchange.dispatch(b"7|F|3|9")
    assert exchange.follows_refused == 1
    assert exchange.followers_of(9) == {2, 3}


# -- EventPipeline -------------------------------------------------------------


class Collected:
    def __init__(self, *user_ids: int, **config):
        self.exchange = Exchange()
        self.pipeline = EventPipeline(self.exchange, BrokerConfig(**config),
                                      problems=RateLimitedLog(logging.getLogger("test")))
        self.subs = subscribed(self.exchange, *user_ids)

    def feed(self, data: bytes) -> dict[int, bytes]:
        self.pipeline.feed(data)
        return received(self.subs)


def test_pipeline_forwards_each_line_byte_for_byte_with_its_own_terminator():
    collected = Collected(1, 2)
    got = collected.feed(b"2|P|1|2\n1|B\r\n3|F|1|2\r\n")
    assert got[1] == b"1|B\r\n"
    assert got[2] == b"1|B\r\n2|P|1|2\n3|F|1|2\r\n"


def test_pipeline_reorders_events_and_applies_follows_in_sequence_order():
    collected = Collected(1, 2)
    # S (4) comes before F (3) on the wire, but F applies first.
    got = collected.feed(b"4|S|2\r\n2|U|1|2\r\n3|F|1|2\r\n1|F|1|2\r\n5|U|1|2\r\n6|S|2\r\n")
    assert got[1] == b"4|S|2\r\n"
    assert got[2] == b"1|F|1|2\r\n3|F|1|2\r\n"


def test_pipeline_compares_leading_zero_numbers_as_integers():
    collected = Collected(7, 9)
    got = collected.feed(b"0002|S|0009\r\n001|F|007|09\r\n")
    assert got[9] == b"001|F|007|09\r\n"
    assert got[7] == b"0002|S|0009\r\n"


def test_pipeline_ignores_empty_lines_without_consuming_a_sequence_number():
    collected = Collected(1)
    got = collected.feed(b"\r\n\n1|B\r\n\r\n\n2|B\n")
    assert got[1] == b"1|B\r\n2|B\n"
    assert collected.pipeline.malformed == collected.pipeline.unsequenced == 0
    assert collected.pipeline.events_in == 2


@pytest.mark.parametrize("bad", [b"2|X|1|2", b"2|F|1", b"2|P|one|1", b"2|B|1", b"2|S|-3"])
def test_malformed_line_with_valid_seq_is_consumed_as_a_no_op_so_the_stream_continues(bad):
    collected = Collected(1)
    got = collected.feed(b"3|P|5|1\r\n" + bad + b"\r\n1|B\r\n")
    assert got[1] == b"1|B\r\n3|P|5|1\r\n"
    assert collected.pipeline.malformed == 1
    assert collected.pipeline.reorder.next_seq == 4
    # The consumed number is now a duplicate: a correct resend is dropped.
    assert collected.feed(b"2|B\r\n") == {1: b""}
    assert collected.pipeline.reorder.duplicates == 1


@pytest.mark.parametrize("bad", [
    b"2|P|1| 3", b"2|P|1|3 ", b"2|P| 1|3", b"2|P|+1|3", b"2|P|1_0|3", b"2|P|1\r|3",
    b"2|S|\r", b"2|S|3\t", b"2|P|1|\xd9\xa3",
])
def test_numbers_in_a_chunk_of_otherwise_well_formed_events_are_held_to_ascii_digits(bad):
    # Python's int() accepts spaces, signs, underscores and a trailing "\r";
    # the spec does not, however fast the path a clean-looking chunk takes.
    collected = Collected(3)
    got = collected.feed(b"1|P|1|3\r\n" + bad + b"\r\n3|P|1|3\r\n")
    assert got[3] == b"1|P|1|3\r\n3|P|1|3\r\n"
    assert collected.pipeline.malformed == 1
    assert collected.pipeline.reorder.next_seq == 4


def test_sequence_number_with_a_leading_space_in_a_clean_chunk_is_not_a_sequence_number():
    collected = Collected(3)
    assert collected.feed(b"1|B\r\n 2|B\r\n") == {3: b"1|B\r\n"}
    assert collected.pipeline.unsequenced == 1
    assert collected.pipeline.reorder.next_seq == 2


def test_line_without_a_valid_seq_is_dropped_and_does_not_consume_a_number():
    collected = Collected(1)
    got = collected.feed(b"1|B\r\n+2|B\r\nx|P|1|1\r\n 2|B\r\n")
    assert got[1] == b"1|B\r\n"
    assert collected.pipeline.unsequenced == 3
    assert collected.pipeline.reorder.next_seq == 2
    assert collected.feed(b"2|B\r\n") == {1: b"2|B\r\n"}


def test_overlong_line_is_counted_and_its_seq_not_consumed():
    collected = Collected(1, max_line=20)
    got = collected.feed(b"1|B\r\n2|P|" + b"9" * 40 + b"|1\r\n3|B\r\n")
    assert got[1] == b"1|B\r\n"
    assert collected.pipeline.overlong == 1
    assert collected.pipeline.reorder.next_seq == 2
    assert collected.feed(b"2|P|9|1\r\n") == {1: b"2|P|9|1\r\n3|B\r\n"}


def test_end_of_stream_discards_a_partial_line():
    collected = Collected(1, 5)
    assert collected.feed(b"1|B\r\n2|P|5") == {1: b"1|B\r\n", 5: b"1|B\r\n"}
    collected.pipeline.end_of_stream()
    # Joined, this would have read "2|P|5|1": a private message to 1.
    got = collected.feed(b"|1\r\n2|B\r\n")
    assert got == {1: b"2|B\r\n", 5: b"2|B\r\n"}
    assert collected.pipeline.unsequenced == 1


def test_end_of_stream_keeps_the_reorder_buffer_and_follow_graph():
    collected = Collected(1, 2)
    assert collected.feed(b"1|F|1|2\r\n3|S|2\r\n") == {1: b"", 2: b"1|F|1|2\r\n"}
    collected.pipeline.end_of_stream()
    got = collected.feed(b"2|B\r\n")
    assert got == {1: b"2|B\r\n3|S|2\r\n", 2: b"2|B\r\n"}


def test_dispatch_hands_output_over_every_flush_lines_and_stops_when_told():
    collected = Collected(1, dispatch_slice=2, flush_lines=4)
    collected.pipeline.receive(b"".join(b"%d|B\r\n" % seq for seq in range(1, 11)))
    assert collected.pipeline.backlog == 10
    handed: list[bytes] = []

    def deliver_once(output) -> bool:
        handed.extend(data for _subscriber, data, _count in output)
        return False  # over a limit: stop here

    assert collected.pipeline.dispatch(deliver_once) is False
    assert handed == [b"1|B\r\n2|B\r\n3|B\r\n4|B\r\n"]
    assert collected.pipeline.backlog == 6
    collected.pipeline.receive(b"11|B\r\n")
    handed.clear()
    assert collected.pipeline.dispatch(lambda output: handed.extend(
        data for _subscriber, data, _count in output) or True) is True
    assert handed == [b"5|B\r\n6|B\r\n7|B\r\n8|B\r\n", b"9|B\r\n10|B\r\n11|B\r\n"]
    assert collected.pipeline.backlog == 0
    assert collected.exchange.dispatched == 11


def test_dispatch_holds_back_events_past_the_fanout_budget_until_the_next_call():
    # --max-buffered=1 leaves the fan-out budget at its 64 KiB floor: with 8
    # subscribers, about 1,400 broadcasts pass it, well within one flush_lines.
    collected = Collected(*range(1, 9), max_buffered=1, dispatch_slice=500, flush_lines=10_000)
    stream = b"".join(b"%d|B\r\n" % seq for seq in range(1, 3001))
    collected.pipeline.receive(stream)
    handed: list[list] = []

    def deliver(output, answer: bool) -> bool:
        handed.append(output)
        for subscriber, data, count in output:
            subscriber.write(data, count)
        return answer

    assert collected.pipeline.dispatch(lambda output: deliver(output, False)) is False
    assert len(handed) == 1  # stopped at the first hand-over: the budget was spent
    first_part = collected.exchange.dispatched
    assert 1000 < first_part < 3000
    budget = collected.pipeline.fanout_budget
    # Past the budget by at most the last event's fan-out: 8 lines of 8 bytes.
    assert budget < sum(len(data) for _subscriber, data, _count in handed[0]) <= budget + 8 * 8
    expected = [b"%d|B\r\n" % seq for seq in range(1, 3001)]
    assert received(collected.subs) == dict.fromkeys(range(1, 9), b"".join(expected[:first_part]))
    assert collected.pipeline.dispatch(lambda output: deliver(output, True)) is True
    assert received(collected.subs) == dict.fromkeys(range(1, 9), b"".join(expected[first_part:]))
    assert collected.exchange.dispatched == 3000


def test_duplicates_are_counted_whether_delivered_or_waiting():
    collected = Collected(1)
    collected.feed(b"1|B\r\n3|B\r\n")
    got = collected.feed(b"1|B\r\n3|B\r\n")
    assert got == {1: b""}
    assert collected.pipeline.reorder.duplicates == 2


def test_fanout_budget_counts_what_was_queued_since_the_last_take_output():
    # The reactor runs several slices between flushes, so the budget must
    # span them: the second call holds back once the two together pass it.
    exchange = Exchange()
    subs = subscribed(exchange, 1, 2)
    line_bytes = len(b"1|B\n")
    held = exchange.apply([b"1|B".split(b"|"), b"2|B".split(b"|")], budget=5 * line_bytes)
    assert held == []  # 4 lines queued so far
    held = exchange.apply([b"3|B".split(b"|"), b"4|B".split(b"|")], budget=5 * line_bytes)
    assert [b"|".join(event) for event in held] == [b"4|B"]  # 6 lines: past the budget
    assert received(subs) == {1: b"1|B\n2|B\n3|B\n", 2: b"1|B\n2|B\n3|B\n"}
    exchange.take_output()  # a flush starts the count again
    assert exchange.apply(held, budget=5 * line_bytes) == []
