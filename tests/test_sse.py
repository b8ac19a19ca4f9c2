"""proxy/sse.py: the incremental SSE parser and the encoder, checked against WHATWG rules
and against the event decoder of the official openai SDK."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from proxy.sse import DONE, KEEP_ALIVE, SSEError, SSEEvent, SSEParser, encode_event

MiB = 1024 * 1024


def feed_all(parser: SSEParser, chunks: list[bytes]) -> list[SSEEvent]:
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events


def parse(stream: bytes) -> list[SSEEvent]:
    return SSEParser().feed(stream)


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def normalize(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


# --- property: chunking never changes the events -------------------------------------------

_no_newline = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_data = st.lists(
    st.sampled_from([b"a", b"\n", b"\r", b"\r\n", b" ", b":", b"data: x", b"\x00", b"{\"k\": 1}"])
    | st.binary(max_size=6),
    max_size=8,
).map(b"".join)
_event = st.tuples(_data, st.none() | _no_newline, st.none() | _no_newline)
_padding = st.lists(
    st.sampled_from([b"\n", KEEP_ALIVE, b": ping\n", b":\n"])
    | _no_newline.map(lambda text: b":" + text + b"\n"),
    max_size=3,
).map(b"".join)


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    """An encoded stream with padding between events, in one line-ending style, and the
    events a WHATWG parser must produce from it."""
    events = draw(st.lists(_event, max_size=6))
    parts = [draw(_padding)]
    expected = []
    for data, name, event_id in events:
        parts.append(encode_event(data, event=name, event_id=event_id))
        parts.append(draw(_padding))
        kept_id = None if event_id is None or b"\x00" in event_id else event_id
        expected.append(SSEEvent(normalize(data), name, kept_id, None))
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    return b"".join(parts).replace(b"\n", ending), expected


@settings(max_examples=300, deadline=None, database=None)
@given(sample=sse_streams(), data=st.data())
def test_any_chunking_yields_the_events_of_the_whole_stream(
    sample: tuple[bytes, list[SSEEvent]], data: st.DataObject
) -> None:
    stream, expected = sample
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")

    whole = parse(stream)
    chunked = feed_all(SSEParser(), split_at(stream, cuts))

    assert whole == expected
    assert chunked == expected


@settings(max_examples=100, deadline=None, database=None)
@given(sample=sse_streams())
def test_byte_at_a_time_yields_the_events_of_the_whole_stream(
    sample: tuple[bytes, list[SSEEvent]],
) -> None:
    stream, expected = sample
    assert feed_all(SSEParser(), [stream[i : i + 1] for i in range(len(stream))]) == expected


# --- line endings ---------------------------------------------------------------------------


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [SSEEvent(b"a\nb")]
    assert parser.feed(b"\ndata: c\r\n\r\n") == [SSEEvent(b"c")]


def test_empty_chunk_between_cr_and_lf_does_not_end_the_event() -> None:
    # An empty read (possible from any transport) must not make the LF of a split CRLF count
    # as a second, blank line: that would dispatch the event before its second data line.
    parser = SSEParser()
    events = feed_all(parser, [b"data: a\r", b"", b"\ndata: b\r\n\r\n"])
    assert events == [SSEEvent(b"a\nb")]


def test_cr_only_line_endings() -> None:
    assert parse(b"id: 1\rdata: a\rdata: b\r\rdata: c\r\r") == [SSEEvent(b"a\nb", None, b"1"), SSEEvent(b"c")]


# --- WHATWG field rules ---------------------------------------------------------------------


def test_comments_are_ignored() -> None:
    stream = b": hello\ndata: a\n: inside an event\ndata: b\n\n:\n\n"
    assert parse(stream) == [SSEEvent(b"a\nb")]


def test_data_without_space_after_colon() -> None:
    assert parse(b"data:x\n\n") == [SSEEvent(b"x")]


def test_only_one_leading_space_is_stripped() -> None:
    assert parse(b"data:  two spaces\n\n") == [SSEEvent(b" two spaces")]


def test_multi_line_data_joined_with_lf() -> None:
    assert parse(b"data: first\ndata: second\ndata:\ndata: fourth\n\n") == [
        SSEEvent(b"first\nsecond\n\nfourth")
    ]


def test_empty_data_field_is_still_an_event() -> None:
    assert parse(b"data:\n\n") == [SSEEvent(b"")]


def test_event_without_data_is_not_dispatched_and_leaks_nothing() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: ping\n\n") == []
    assert parser.feed(b"id: 7\nretry: 10\n\n") == []
    assert parser.feed(b"data: x\n\n") == [SSEEvent(b"x", None, None, None)]


def test_event_name_and_id() -> None:
    assert parse(b"event: delta\nid: gs_1:3\ndata: x\n\n") == [SSEEvent(b"x", b"delta", b"gs_1:3")]


def test_id_with_nul_is_ignored() -> None:
    assert parse(b"id: a\x00b\ndata: x\n\n") == [SSEEvent(b"x", None, None)]
    assert parse(b"id: good\nid: ba\x00d\ndata: x\n\n") == [SSEEvent(b"x", None, b"good")]


def test_retry_parsed_as_milliseconds() -> None:
    assert parse(b"retry: 3000\ndata: x\n\n") == [SSEEvent(b"x", retry_ms=3000)]


def test_retry_that_is_not_digits_is_ignored() -> None:
    assert parse(b"retry: 3s\ndata: x\n\nretry: -1\ndata: y\n\n") == [SSEEvent(b"x"), SSEEvent(b"y")]


def test_unknown_fields_are_ignored() -> None:
    assert parse(b"foo: bar\nDATA: shout\ndata: x\n\n") == [SSEEvent(b"x")]


def test_trailing_incomplete_event_is_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: done\n\ndata: half") == [SSEEvent(b"done")]
    assert parser.feed(b"\n") == []
    assert SSEParser().feed(b"data: no blank line\n") == []


def test_keep_alive_between_events_dispatches_nothing_extra() -> None:
    stream = encode_event(b"1") + KEEP_ALIVE + KEEP_ALIVE + encode_event(b"2") + KEEP_ALIVE
    assert parse(stream) == [SSEEvent(b"1"), SSEEvent(b"2")]


# --- sizes ----------------------------------------------------------------------------------


def test_lines_longer_than_one_mib_parse_whole_and_chunked() -> None:
    payload = bytes(range(33, 127)) * (3 * MiB // 94)
    stream = encode_event(payload) + encode_event(b"after")
    assert len(payload) > 2 * MiB
    expected = [SSEEvent(payload), SSEEvent(b"after")]

    assert parse(stream) == expected
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    assert feed_all(SSEParser(), chunks) == expected


def test_event_below_max_event_bytes_is_fine() -> None:
    parser = SSEParser(max_event_bytes=1000)
    assert parser.feed(b"data: " + b"x" * 500 + b"\n\n") == [SSEEvent(b"x" * 500)]


def test_line_beyond_max_event_bytes_raises() -> None:
    parser = SSEParser(max_event_bytes=1000)
    parser.feed(b"data: " + b"x" * 900)
    with pytest.raises(SSEError):
        parser.feed(b"x" * 200)


def test_event_of_many_lines_beyond_max_event_bytes_raises() -> None:
    parser = SSEParser(max_event_bytes=1000)
    line = b"data: " + b"x" * 99 + b"\n"
    for _ in range(10):
        assert parser.feed(line) == []
    with pytest.raises(SSEError):
        parser.feed(line)


def test_oversized_event_in_one_chunk_raises_too() -> None:
    # The limit is on the event, not on how the transport happened to chunk it.
    parser = SSEParser(max_event_bytes=1000)
    with pytest.raises(SSEError):
        parser.feed(b"data: " + b"x" * 5000 + b"\n\n")


# --- encoder --------------------------------------------------------------------------------


def test_encode_event_wire_format() -> None:
    assert encode_event(b"a\r\nb\rc", event=b"e", event_id=b"gs_x:1") == (
        b"id: gs_x:1\nevent: e\ndata: a\ndata: b\ndata: c\n\n"
    )
    assert encode_event(DONE) == b"data: [DONE]\n\n"
    assert KEEP_ALIVE == b": keep-alive\n"


# --- the official openai SDK decoder ----------------------------------------------------------


def gateway_stream(frames: int, keep_alive: bytes) -> list[bytes]:
    """What the gateway writes: ``id:`` + ``data:`` events with keep-alives in between,
    cut into awkward chunks."""
    body = keep_alive
    for seq in range(1, frames + 1):
        chunk = json.dumps({"choices": [{"index": 0, "delta": {"content": f"t{seq}"}}]}).encode()
        body += encode_event(chunk, event_id=f"gs_abc:{seq}".encode()) + keep_alive + keep_alive
    body += encode_event(DONE, event_id=f"gs_abc:{frames + 1}".encode())
    return [body[i : i + 7] for i in range(0, len(body), 7)]


def test_openai_sdk_sees_no_empty_event_with_keep_alives() -> None:
    chunks = gateway_stream(5, KEEP_ALIVE)

    sdk_events = list(SSEDecoder().iter_bytes(iter(chunks)))

    assert [e.data for e in sdk_events[:-1]] == [
        json.dumps({"choices": [{"index": 0, "delta": {"content": f"t{n}"}}]}) for n in range(1, 6)
    ]
    assert sdk_events[-1].data == "[DONE]"
    assert [e.id for e in sdk_events] == [f"gs_abc:{n}" for n in range(1, 7)]
    for event in sdk_events[:-1]:
        event.json()  # what openai.Stream does with every event before [DONE]
    assert [e.data for e in feed_all(SSEParser(), chunks)] == [e.data.encode() for e in sdk_events]


def test_openai_sdk_check_detects_a_bad_keep_alive() -> None:
    # The guard above is meaningful: a comment followed by a blank line, once an id was
    # sent, becomes an empty event in the SDK, which then fails to decode it as JSON.
    sdk_events = list(SSEDecoder().iter_bytes(iter(gateway_stream(2, b": ping\n\n"))))
    assert any(e.data == "" for e in sdk_events)
