"""Protocol layer (docs/behaviour.md §2): LineSplitter, is_plain_event_text,
parse_event and parse_hello.

Pure functions on bytes; no sockets, no clocks.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mbroker
from mbroker import LineSplitter, MalformedLine, is_plain_event_text, parse_event, parse_hello

# -- LineSplitter --------------------------------------------------------------


def split_all(splitter: LineSplitter, chunks) -> list[bytes]:
    lines: list[bytes] = []
    for chunk in chunks:
        lines.extend(splitter.split(chunk)[0])
    return lines


def test_splitter_returns_complete_lines_without_their_newline():
    splitter = LineSplitter()
    assert splitter.split(b"1|B\n2|S|3\n")[0] == [b"1|B", b"2|S|3"]


def test_splitter_keeps_carriage_return_on_the_line():
    splitter = LineSplitter()
    assert splitter.split(b"1|B\r\n2|P|1|2\r\n")[0] == [b"1|B\r", b"2|P|1|2\r"]


def test_splitter_holds_an_unterminated_line_until_its_newline_arrives():
    splitter = LineSplitter()
    assert splitter.split(b"1|F|6")[0] == []
    assert splitter.split(b"0|5")[0] == []
    assert splitter.split(b"0\r")[0] == []
    assert splitter.split(b"\n2|B")[0] == [b"1|F|60|50\r"]
    assert splitter.split(b"\n")[0] == [b"2|B"]


def test_splitter_joins_a_line_split_one_byte_at_a_time():
    stream = b"10|B\r\n11|F|1|2\n\r\n12|S|007\r\n"
    splitter = LineSplitter()
    lines = split_all(splitter, (stream[i:i + 1] for i in range(len(stream))))
    assert lines == [b"10|B\r", b"11|F|1|2", b"\r", b"12|S|007\r"]


def test_splitter_carriage_return_and_newline_in_separate_reads_stay_one_terminator():
    splitter = LineSplitter()
    assert split_all(splitter, [b"1|B\r", b"\n", b"2|B\r", b"\n"]) == [b"1|B\r", b"2|B\r"]


def test_splitter_reports_empty_lines_for_consecutive_newlines():
    # The pipeline, not the splitter, ignores empty lines; the splitter must not
    # swallow them silently or merge their neighbours.
    splitter = LineSplitter()
    assert splitter.split(b"1|B\n\n2|B\n")[0] == [b"1|B", b"", b"2|B"]


def test_splitter_drops_an_overlong_line_within_one_read_and_keeps_its_neighbours():
    splitter = LineSplitter(max_line=10)
    data = b"1|B\n" + b"2|P|" + b"9" * 20 + b"|1\n3|B\n"
    assert splitter.split(data)[0] == [b"1|B", b"3|B"]
    assert splitter.overlong == 1


def test_splitter_line_of_exactly_max_line_bytes_is_kept():
    splitter = LineSplitter(max_line=8)
    assert splitter.split(b"12345678\n123456789\nok\n")[0] == [b"12345678", b"ok"]
    assert splitter.overlong == 1


def test_splitter_discards_an_overlong_line_spread_over_many_reads_without_buffering_it():
    splitter = LineSplitter(max_line=100)
    assert splitter.split(b"1|B\n2|P|")[0] == [b"1|B"]
    for _ in range(10_000):  # 10 MB with no newline
        assert splitter.split(b"7" * 1000)[0] == []
        assert len(splitter.partial) <= 100
    assert splitter.split(b"|8\r\n3|B\r\n")[0] == [b"3|B\r"]
    assert splitter.overlong == 1


def test_splitter_overlong_line_ending_exactly_at_a_read_boundary_is_discarded():
    splitter = LineSplitter(max_line=5)
    assert splitter.split(b"abcdefgh")[0] == []
    assert splitter.split(b"\n")[0] == []
    assert splitter.split(b"ok\n")[0] == [b"ok"]
    assert splitter.overlong == 1


def test_splitter_partial_line_growing_past_max_line_over_reads_is_discarded():
    splitter = LineSplitter(max_line=6)
    assert splitter.split(b"1234")[0] == []
    assert splitter.split(b"567")[0] == []  # now 7 bytes pending: overlong
    assert len(splitter.partial) <= 6
    assert splitter.split(b"8\nfine\n")[0] == [b"fine"]
    assert splitter.overlong == 1


def test_splitter_reset_drops_the_partial_line():
    splitter = LineSplitter()
    assert splitter.split(b"1|B\r\n2|P|5")[0] == [b"1|B\r"]
    splitter.reset()
    assert splitter.split(b"|6\r\n3|B\r\n")[0] == [b"|6\r", b"3|B\r"]


def test_splitter_reset_ends_discarding_of_an_overlong_line():
    splitter = LineSplitter(max_line=4)
    assert splitter.split(b"123456789")[0] == []
    splitter.reset()
    # Without the reset these bytes would belong to the overlong line.
    assert splitter.split(b"1|B\n")[0] == [b"1|B"]


def reference_split(stream: bytes, max_line: int) -> tuple[list[bytes], int]:
    *complete, tail = stream.split(b"\n")
    kept = [line for line in complete if len(line) <= max_line]
    overlong = len(complete) - len(kept) + (len(tail) > max_line)
    return kept, overlong


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r", b"1", b"|", b"B", b"23456789"]),
                    max_size=80),
    max_line=st.integers(min_value=1, max_value=12),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=12),
)
def test_splitter_output_does_not_depend_on_read_boundaries(pieces, max_line, cuts):
    stream = b"".join(pieces)
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:], strict=False)]
    splitter = LineSplitter(max_line)
    lines = split_all(splitter, chunks)
    expected_lines, expected_overlong = reference_split(stream, max_line)
    assert lines == expected_lines
    assert splitter.overlong == expected_overlong
    assert len(splitter.partial) <= max_line


# -- is_plain_event_text ------------------------------------------------------


@pytest.mark.parametrize("text", [
    b"1|F|60|50\r\n2|B\r\n3|S|7\n",
    b"0007|P|1|2\n",
    b"",
])
def test_plain_event_text_is_recognised(text):
    assert is_plain_event_text(text)


@pytest.mark.parametrize("text", [
    b"1|F|6 0|50\n",  # a space
    b"1|F|-6|50\n",  # a sign
    b"1|F|6_0|50\n",  # an underscore
    b"1|F|60\r|50\n",  # a b"\r" inside the line
    b"1|B\r\r\n",  # two of them
    b"1|F||50\n",  # an empty field
    b"1|B|\n",  # an empty last field
    b"|1|B\n",  # an empty first field
    b"2|B\n|1|B\n",  # ... on a later line
    b"1|B\n\n2|B\n",  # an empty line: the strict parser skips it
    b"1|B\r\n\r\n",  # ... ended by b"\r\n"
    b"1|S|5F\n",  # a second type letter in a number
    b"1|S|F\n",  # ... as a whole field
    b"1|b\n",  # a type letter in lower case
    "1|S|\u0664".encode(),  # a non-ASCII digit
])
def test_text_the_fast_path_must_not_trust_is_not_plain(text):
    assert not is_plain_event_text(text)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.lists(st.sampled_from([b"1", b"07", b"9", b"|", b"F", b"U", b"B", b"P",
                                          b"S", b"\r"]), max_size=9).map(b"".join),
                max_size=8))
def test_a_line_of_plain_text_the_fast_path_takes_parses_the_same_strictly(lines):
    # The argument in is_plain_event_text's docstring, checked: where the
    # fast path would take a line (type letter second, right field count),
    # int() on its fields agrees with the strict parser, which never refuses it.
    text = b"".join(line + b"\n" for line in lines)
    if not is_plain_event_text(text):
        return
    for line in lines:
        fields = line.split(b"|")
        if len(fields) < 2 or mbroker.WIRE_FIELD_COUNTS.get(fields[1]) != len(fields):
            continue
        seq, _kind, from_user, to_user = parse_event(line)
        numbers = [int(value) for index, value in enumerate(fields) if index != 1]
        assert numbers == [n for n in (seq, from_user, to_user) if n is not None]


# -- parse_event -----------------------------------------------------------------


@pytest.mark.parametrize(("line", "parsed"), [
    (b"666|F|60|50", (666, b"F", 60, 50)),
    (b"1|U|12|9", (1, b"U", 12, 9)),
    (b"542532|B", (542532, b"B", None, None)),
    (b"43|P|32|56", (43, b"P", 32, 56)),
    (b"634|S|32", (634, b"S", 32, None)),
])
def test_parse_event_reads_each_of_the_five_event_types(line, parsed):
    assert parse_event(line) == parsed
    assert parse_event(line + b"\r") == parsed


def test_parse_event_compares_ids_and_seq_as_integers():
    assert parse_event(b"0009|F|007|0050\r") == (9, b"F", 7, 50)
    assert parse_event(b"1|S|0") == (1, b"S", 0, None)


def test_parse_event_rejects_sequence_number_zero_as_no_valid_seq():
    # Numbers start at 1: 0 can never be consumed, so it is not a valid SEQ.
    with pytest.raises(MalformedLine) as caught:
        parse_event(b"000|B")
    assert caught.value.seq is None


def test_parse_event_accepts_sequence_numbers_and_ids_of_any_size_a_line_can_hold():
    huge = 10 ** 1300 + 17  # three of them fit in the longest --max-line
    seq, kind, from_user, to_user = parse_event(f"{huge}|P|{huge * 3}|{huge}".encode())
    assert (seq, kind, from_user, to_user) == (huge, b"P", huge * 3, huge)


def test_a_number_longer_than_this_python_parses_is_malformed_not_a_crash():
    too_long = b"9" * 5000  # past CPython's default integer digit limit (4300)
    with pytest.raises(MalformedLine) as caught:
        parse_event(b"5|P|" + too_long + b"|1")
    assert caught.value.seq == 5
    with pytest.raises(MalformedLine) as caught:
        parse_event(too_long + b"|B")
    assert caught.value.seq is None


def test_max_line_may_not_pass_the_longest_number_this_python_parses():
    assert mbroker.BrokerConfig(max_line=4300).problem() is None
    assert "at most 4300" in mbroker.BrokerConfig(max_line=4301).problem()


@pytest.mark.parametrize(("line", "seq"), [
    (b"5|F|1", 5),  # F takes 4 fields
    (b"5|F|1|2|3", 5),
    (b"5|U|1", 5),
    (b"5|P|1", 5),
    (b"5|P|1|2|", 5),
    (b"5|S", 5),  # S takes 3 fields
    (b"5|S|1|2", 5),
    (b"5|B|1", 5),  # B takes 2 fields
    (b"5|B|", 5),
    (b"5", 5),  # no type at all
    (b"5|", 5),
    (b"5|X|1|2", 5),  # unknown type
    (b"5|f|1|2", 5),  # types are case sensitive
    (b"5|BB", 5),
    (b"5|F|a|2", 5),  # non-numeric ids
    (b"5|F|1|", 5),
    (b"5|F||2", 5),
    (b"5|F|-1|2", 5),
    (b"5|F|+1|2", 5),
    (b"5|F|1_0|2", 5),
    (b"5|S| 3", 5),
    (b"5|S|3 ", 5),
    (b"5|P|1|\xd9\xa3", 5),  # ARABIC-INDIC DIGIT THREE
    (b"5|B\r\r", 5),  # only one \r belongs to the terminator
])
def test_parse_event_rejects_bad_lines_but_keeps_a_valid_seq(line, seq):
    with pytest.raises(MalformedLine) as caught:
        parse_event(line)
    assert caught.value.seq == seq
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("line", [
    b"",
    b"\r",
    b"|B",
    b"+5|B",
    b"-5|B",
    b"1_000|B",
    b" 5|B",
    b"5 |B",
    b"\xd9\xa5|B",  # ARABIC-INDIC DIGIT FIVE
    b"\xef\xbc\x95|B",  # FULLWIDTH DIGIT FIVE
    b"0x5|B",
    b"5.0|B",
    b"five|B",
    b"B",
])
def test_parse_event_without_a_valid_seq_reports_seq_none(line):
    with pytest.raises(MalformedLine) as caught:
        parse_event(line)
    assert caught.value.seq is None


def test_malformed_line_carries_a_reason():
    with pytest.raises(MalformedLine) as caught:
        parse_event(b"12|Q|1|2")
    assert caught.value.reason
    assert caught.value.seq == 12


# -- parse_hello ----------------------------------------------------------------


@pytest.mark.parametrize(("line", "user_id"), [
    (b"42", 42),
    (b"42\r", 42),
    (b"  42  ", 42),
    (b" 42 \r", 42),
    (b"007", 7),
    (b"0", 0),
    (b"9" * mbroker.MAX_USER_ID_DIGITS, int("9" * mbroker.MAX_USER_ID_DIGITS)),
    (b" " * 62 + b"42", 42),  # exactly 64 bytes
])
def test_parse_hello_accepts_digits_with_spaces_around(line, user_id):
    assert parse_hello(line + b"\n") == user_id


@pytest.mark.parametrize("line", [
    b"",
    b"   ",
    b"\r",
    b"abc",
    b"4 2",
    b"-1",
    b"+1",
    b"1_0",
    b"0x10",
    b"\xd9\xa4\xd9\xa2",  # ARABIC-INDIC 42
    b"42|B",
    b"1" * (mbroker.MAX_USER_ID_DIGITS + 1),  # more than 32 digits
    b" " * 63 + b"42",  # 65 bytes
])
def test_parse_hello_rejects_invalid_ids(line):
    with pytest.raises(ValueError):
        parse_hello(line + b"\n")


def test_parse_hello_waits_for_the_end_of_the_line():
    assert parse_hello(b"") is None
    assert parse_hello(b"  42") is None
    assert parse_hello(b" " * 62 + b"42") is None  # 64 bytes: may still end well
    assert parse_hello(b"  42\r\n17|B") == 42  # what follows the line is not its business


def test_parse_hello_refuses_an_unfinished_line_once_it_is_too_long():
    with pytest.raises(ValueError, match="over 64 bytes"):
        parse_hello(b" " * 65)


def test_user_id_limits_are_those_of_the_spec():
    assert mbroker.MAX_USER_ID_DIGITS == 32
    assert mbroker.MAX_HELLO_LINE == 64
