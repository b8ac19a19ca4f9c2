"""The pure parts of ``scripts/loadtest_websocket.py``: WebSocket framing, the answer
checks, the phase statistics and the summaries of the report."""

from __future__ import annotations

import argparse
import base64
import itertools

import orjson
import pytest

from scripts import loadtest_websocket as lw
from scripts.mock_upstream import expected_text, token

# -- framing -----------------------------------------------------------------------------


def test_accept_key_is_the_rfc_6455_example() -> None:
    # RFC 6455 §1.3: the sample nonce and its accept value
    assert lw.accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_client_frames_are_masked_and_unmask_to_the_payload(size: int) -> None:
    payload, mask = bytes(i % 251 for i in range(size)), b"\x01\x02\x03\x04"
    frame = lw.client_frame(lw.TEXT, payload, mask)
    assert frame[0] == 0x81
    assert frame[1] & 0x80  # masked
    head = 2 if size < 126 else (4 if size < 65536 else 10)
    assert frame[head : head + 4] == mask
    assert lw.mask_payload(frame[head + 4 :], mask) == payload


@pytest.mark.parametrize("size", [0, 5, 125, 126, 300, 65536])
def test_parse_frame_reads_server_frames_of_every_length_form(size: int) -> None:
    payload = b"x" * size
    raw = lw.server_frame(lw.TEXT, payload) + lw.server_frame(lw.PING, b"hi")
    opcode, fin, got, end = lw.parse_frame(raw, 0) or (0, False, b"", 0)
    assert (opcode, fin, got) == (lw.TEXT, True, payload)
    assert lw.parse_frame(raw, end)[:3] == (lw.PING, True, b"hi")  # type: ignore[index]


def test_parse_frame_waits_for_a_complete_frame_and_refuses_masked_ones() -> None:
    raw = lw.server_frame(lw.TEXT, b"y" * 300)
    for cut in (0, 1, 3, len(raw) - 1):
        assert lw.parse_frame(raw[:cut], 0) is None
    with pytest.raises(ValueError, match="masked"):
        lw.parse_frame(lw.client_frame(lw.TEXT, b"z", b"abcd"), 0)


def test_close_code() -> None:
    assert lw.close_code((1012).to_bytes(2, "big") + b"service restart") == 1012
    assert lw.close_code(b"") == 1005


def test_handshake_request_carries_the_key_in_authorization() -> None:
    nonce = base64.b64encode(b"0123456789abcdef")
    raw = lw.handshake_request("127.0.0.1", 8080, "/v1/ws", "sk-x", nonce)
    assert raw.startswith(b"GET /v1/ws HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer sk-x\r\n" in raw
    assert b"\r\nSec-WebSocket-Key: " + nonce + b"\r\n" in raw
    assert raw.endswith(b"\r\n\r\n")


def test_dechunk_into_moves_complete_chunks_and_sees_the_end() -> None:
    raw, out = bytearray(b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r"), bytearray()
    assert lw.dechunk_into(raw, out) is None
    assert out == b"helloabc"
    raw += b"\n\r\n"
    assert lw.dechunk_into(raw, out) is True
    assert raw == b""


# -- the answer checks ---------------------------------------------------------------------


def chunk(text: str, role: bool = False) -> dict[str, object]:
    delta = {"role": "assistant", "content": text} if role else {"content": text}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


def ws_frames(tokens: int, request_id: str = "r1") -> list[dict[str, object]]:
    chunks = [chunk("", role=True)] + [chunk(token(i)) for i in range(tokens)]
    frames: list[dict[str, object]] = [
        {"type": "chunk", "id": request_id, "stream_id": "gs_a", "seq": i + 1, "data": c}
        for i, c in enumerate(chunks)]
    return [*frames, {"type": "done", "id": request_id, "stream_id": "gs_a", "usage": {}}]


def check_of(tokens: int) -> lw.StreamCheck:
    return lw.StreamCheck(tokens, started_s=10.0, started_wall=1000.0)


def test_an_intact_websocket_answer() -> None:
    check = check_of(4)
    chunks = [lw.ws_frame_into(check, "r1", f, 10.002 + i / 1000) for i, f in enumerate(ws_frames(4))]
    assert check.outcome == lw.INTACT
    assert sum(chunks) == 5
    assert check.ttfc_ms == pytest.approx(2.0)
    assert check.seq == 5


@pytest.mark.parametrize(("mangle", "outcome"), [
    (lambda fs: fs[:2] + fs[3:], "broken: seq 4 of gs_a after 2 of gs_a"),
    (lambda fs: [fs[0], {**fs[1], "stream_id": "gs_b"}, *fs[2:]], "broken: seq 2 of gs_b after 1 of gs_a"),
    (lambda fs: [*fs[:2], fs[1], *fs[2:]], "broken: seq 2 of gs_a after 2 of gs_a"),
    (lambda fs: fs[:-2] + fs[-1:], "broken: text is not expected_text(4)"),
    (lambda fs: fs[-1:], "broken: ended without a chunk"),
    (lambda fs: [*fs[:2], {"type": "error", "id": "r1", "error": {"code": "upstream_error"}}],
     "error: upstream_error"),
    (lambda fs: [*fs[:2], {"type": "pong"}], "broken: unexpected 'pong' frame for r1"),
])
def test_broken_websocket_answers(mangle: object, outcome: str) -> None:
    check = check_of(4)
    for frame in mangle(ws_frames(4)):  # type: ignore[operator]
        lw.ws_frame_into(check, "r1", frame, 11.0)
    assert check.outcome == outcome


def sse_events(tokens: int) -> list[bytes]:
    chunks = [chunk("", role=True)] + [chunk(token(i)) for i in range(tokens)]
    events = [b"id: gs_a:%d\ndata: " % (i + 1) + orjson.dumps(c) for i, c in enumerate(chunks)]
    return [*events, b": keep-alive", b"data: [DONE]"]


def test_an_intact_sse_answer_and_keep_alive_comments_are_no_chunks() -> None:
    check = check_of(3)
    chunks = [lw.sse_event_into(check, e, 10.5) for e in sse_events(3)]
    assert chunks == [True] * 4 + [False, False]
    assert check.outcome == lw.INTACT
    assert check.ttfc_ms == pytest.approx(500.0)


def test_broken_sse_answers() -> None:
    gap = check_of(3)
    events = sse_events(3)
    for event in events[:1] + events[2:]:
        lw.sse_event_into(gap, event, 11.0)
    assert gap.outcome == "broken: seq 3 of gs_a after 1 of gs_a"
    error = check_of(3)
    lw.sse_event_into(error, events[0], 11.0)
    lw.sse_event_into(error, b'data: {"error": {"code": "stream_interrupted"}}', 11.0)
    assert error.outcome == "error: stream_interrupted"
    bad = check_of(3)
    lw.sse_event_into(bad, b"id: gs_a:1\ndata: {not json", 11.0)
    assert bad.outcome == "broken: an event is not JSON"


def test_the_first_outcome_sticks() -> None:
    check = check_of(2)
    check.finish(12.0, "timeout")
    for frame in ws_frames(2):
        lw.ws_frame_into(check, "r1", frame, 13.0)
    assert (check.outcome, check.end_s) == ("timeout", 12.0)
    assert expected_text(2) == token(0) + token(1)


# -- phase statistics and summaries ------------------------------------------------------


def finished(started_wall: float, outcome: str, ttfc_ms: float = 5.0,
             took_s: float = 1.0) -> lw.StreamCheck:
    check = lw.StreamCheck(2, 0.0, started_wall, first_s=ttfc_ms / 1000)
    check.finish(took_s, outcome)
    return check


def test_phase_stats_count_the_measured_window_only() -> None:
    stats = lw.PhaseStats("ws1", lw.WS, start=100.0, end=105.0, warmup_s=1.0)
    stats.record(finished(100.5, lw.INTACT))  # started in the warm-up, ended in the window
    stats.record(finished(102.0, lw.INTACT, ttfc_ms=7.0))
    stats.record(finished(104.5, lw.INTACT, ttfc_ms=9.0))  # ends after the window
    stats.record(finished(103.0, "timeout"))
    stats.note_chunks(10, 100.9)
    stats.note_chunks(4, 101.0)
    stats.note_chunks(3, 105.0)
    assert stats.ttfc_ms == [7.0, 9.0, 5.0]
    assert stats.outcomes == {lw.INTACT: 3, "timeout": 1}
    assert stats.chunks_in_window == 4
    assert stats.completed_in_window == 2


def driver_output(ttfc: list[float], chunks: int, outcomes: dict[str, int],
                  kind: str = lw.WS) -> dict[str, object]:
    phase = {"name": "ws1" if kind == lw.WS else "sse1", "kind": kind, "start": 0.0, "end": 5.0,
             "warmup_s": 1.0, "ttfc_ms": ttfc, "outcomes": outcomes, "chunks_in_window": chunks,
             "completed_in_window": 8, "connects": 0}
    return {"phases": [phase]}


def test_merge_phases_and_kind_summary() -> None:
    outputs = [driver_output([1.0, 2.0], 400, {lw.INTACT: 10}),
               driver_output([3.0, 4.0], 800, {lw.INTACT: 9, "timeout": 1})]
    (merged,) = lw.merge_phases(outputs)
    assert merged["messages_per_s"] == pytest.approx(300.0)  # 1,200 chunks over 4 s
    assert merged["streams_per_s"] == pytest.approx(4.0)
    assert merged["ttfc_samples"] == 4
    assert merged["outcomes"] == {lw.INTACT: 19, "timeout": 1}
    summary = lw.kind_summary(outputs, lw.WS)
    assert summary["intact_pct"] == pytest.approx(95.0)
    assert summary["errors"] == {"timeout": 1}
    assert summary["ttfc_ms"]["p50"] == 2.0
    assert lw.kind_summary(outputs, lw.SSE)["answers"] == 0


def test_ttfc_ratio() -> None:
    ws, sse = {"ttfc_ms": {"p50": 2.0, "p99": 9.0}}, {"ttfc_ms": {"p50": 4.0, "p99": 6.0}}
    assert lw.ttfc_ratio(ws, sse, "p50") == pytest.approx(0.5)
    assert lw.ttfc_ratio(ws, sse, "p99") == pytest.approx(1.5)
    assert lw.ttfc_ratio(ws, {"ttfc_ms": None}, "p50") is None


def test_memory_figures() -> None:
    samples = [{"t": t, "rss_kib": 1000 + 10 * t} for t in range(10)]
    assert lw.median_in(samples, "rss_kib", [(2, 4), (7, 8)]) == 1030
    assert lw.median_in(samples, "rss_kib", [(20, 30)]) is None
    assert lw.per_unit_kib(3000, 1000, 100) == 20.0
    assert lw.per_unit_kib(None, 1000, 100) is None
    assert lw.per_unit_kib(3000, 1000, 0) is None
    assert lw.first_wave(samples, {"start": 6.0}, 3.0) == (1020, 1060)
    assert lw.cpu_per_message_us(50.0, 10_000) == pytest.approx(50.0)


def test_tcp_mem_pages() -> None:
    text = "sockets: used 220\nTCP: inuse 10 orphan 0 tw 3 alloc 12 mem 42\nUDP: inuse 1 mem 2\n"
    assert lw.tcp_mem_pages(text) == 42
    assert lw.tcp_mem_pages("UDP: inuse 1\n") is None


def plan(**changes: object) -> lw.Plan:
    args = argparse.Namespace(sessions=10_000, active_sessions=1_000, ramp_s=10.0, hold_s=3.0,
                              duration=5.0, warmup=1.0, rounds=3, tokens=16, token_delay_ms=0.0)
    for name, value in changes.items():
        setattr(args, name, value)
    return lw.Plan.of(args)


def test_plan_alternates_the_order_of_the_phases_and_spreads_the_sessions() -> None:
    p = plan()
    assert p.token_delay_ms == lw.DEFAULT_TOKEN_DELAY_MS
    phases = p.phases()
    assert [x["name"] for x in phases] == ["ws1", "sse1", "sse2", "ws2", "ws3", "sse3"]
    assert phases[0]["start"] == 13.0
    assert all(b["start"] - a["end"] == pytest.approx(p.gap_s) for a, b in itertools.pairwise(phases))
    assert p.end_s == pytest.approx(phases[-1]["end"] + p.gap_s)
    specs = lw.driver_specs(p, 8080, 1000.0, 10.0)
    assert len(specs) == 4
    assert sum(s["count"] for s in specs) == 10_000
    assert sum(s["active"] for s in specs) == 1_000
    assert len({s["source"] for s in specs}) == 4
    assert specs[0]["phases"][0]["start"] == 1013.0
    assert plan(sessions=2_501, token_delay_ms=5.0).drivers == 2


def test_gateway_config_raises_only_the_caps_the_load_needs() -> None:
    config = lw.gateway_config(plan(), 9001)
    assert set(config["server"]) == {"host", "port", "max_connections"}
    assert config["server"]["max_connections"] >= 11_000
    assert config["keys"]["load"]["max_websockets"] >= 10_000
    assert "rpm" not in config["keys"]["load"]


def doc_of(ws_intact: int, sse_intact: int, ratio: float, closed: dict[str, int]) -> dict[str, object]:
    kind = {"answers": 100, "errors": {}}
    return {
        "plan": {"active": 1000, "tokens": 16, "stream_s": 1.6},
        "sessions": {"asked": 10, "open": 10, "handshakes": {"open": 9, "handshake: HTTP 503": 1},
                     "closed_by_gateway": closed},
        "memory": {"peak_kib": 500 * 1024, "cpu_pct": {lw.WS: 50.0, lw.SSE: 95.0},
                   "wait_pct": {lw.WS: 1.0, lw.SSE: None}},
        "websocket": kind | {"intact": ws_intact, "errors": {"timeout": 100 - ws_intact}},
        "sse": kind | {"intact": sse_intact},
        "ttfc_ratio": {"p50": ratio, "p99": ratio},
        "cpu_pct": {"other_processes": 3.0},
    }


def test_verdicts_and_errors_by_kind() -> None:
    good = lw.verdicts(doc_of(100, 100, 0.9, {}))
    assert [line.split(":")[0] for line in good] == ["note", "PASS", "PASS", "PASS"]
    assert "sse phases" in good[0]
    bad = lw.verdicts(doc_of(99, 100, 1.2, {"close 1011": 2}))
    assert [line.split(":")[0] for line in bad[1:]] == ["FAIL", "FAIL", "FAIL"]
    assert lw.errors_by_kind(doc_of(99, 100, 1.0, {"close 1011": 2})) == {
        "handshake handshake: HTTP 503": 1, "socket close 1011": 2, "websocket timeout": 1}
