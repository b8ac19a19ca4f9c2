"""Tests for scripts/loadtest.py: the choice of load generator and mock, the processes'
``--nofile`` limit, the wrk runner (against the fast mock engine, on loopback), and the
checks and figures of ``--scenario resume`` (scripts/loadtest_resume.py; no network) and
``--scenario connections``."""

from __future__ import annotations

import os
import resource
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from scripts import loadtest, loadtest_connections, loadtest_resume, mock_upstream


@pytest.mark.parametrize("text", ['{"a": "b"}', "x]]", "x]=", "]==]y", ""])
def test_lua_string_closes_only_at_its_end(text: str) -> None:
    literal = loadtest.lua_string(text)
    level = literal.index("[", 1) - 1
    closer = "]" + "=" * level + "]"
    assert literal == "[" + "=" * level + "[" + text + closer
    assert closer not in text + closer[:-1]


def test_compare_defaults_to_wrk_and_the_fast_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    args = loadtest.parse_args(["--compare"])
    assert (args.generator, args.mock_engine, args.wrk_note) == ("wrk", "fast", None)
    assert args.mock_script.endswith("mock_fast.py")
    other = loadtest.parse_args([])
    assert (other.generator, other.mock_engine) == ("python", "aiohttp")
    assert other.mock_script.endswith("mock_upstream.py")


def test_compare_without_wrk_falls_back_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    args = loadtest.parse_args(["--compare"])
    assert (args.generator, args.wrk_note) == ("python", loadtest.WRK_MISSING)


@pytest.mark.parametrize("argv", [["--generator", "wrk"],
                                  ["--scenario", "overload", "--generator", "wrk"]])
def test_wrk_outside_compare_is_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        loadtest.parse_args(argv)


def test_wrk_run_against_the_fast_mock(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("wrk is required under CI=true (.ci/run installs it)")
        pytest.skip("wrk is not installed (make load-tools)")
    args = loadtest.parse_args(["--compare", "--duration", "2", "--warmup", "1",
                                "--concurrency", "4", "--no-pin"])
    fleet = loadtest.Fleet(tmp_path)
    try:
        mock, port = loadtest.start_mock(args, fleet)
        loadtest.wait_ready("mock", mock, port, "/v1/models", tmp_path)
        target = loadtest.Target("direct", "direct", port, loadtest.MOCK_KEY, None)
        run = loadtest.PhaseRun(target, loadtest.PHASES[0], "direct non-stream",
                                loadtest.ALL_CPUS, {"under_test": mock.pid, "mock": mock.pid})
        load = loadtest.run_wrk(run, args, fleet, loadtest.Progress(1, tty=False))
    finally:
        fleet.stop_all()
    merged = load.merged
    assert merged["errors"] == {}
    assert merged["ok"] == merged["issued"] > 0
    assert merged["rps"] > 0
    assert 0 < merged["latency_ms"]["p50"] <= merged["latency_ms"]["p99"] <= merged["latency_ms"]["max"]
    assert load.cpu_s > 0
    assert load.after.at_s > load.before.at_s


# -- --scenario resume: the pure parts of scripts/loadtest_resume.py and its summaries ------

STREAM_ID = "gs_" + "ab" * 12


def chunk(delta: dict[str, str], serial: int = 1, created: int = 1_796_000_000,
          finish: str | None = None) -> bytes:
    return orjson.dumps({"id": f"chatcmpl-mock-{serial}", "object": "chat.completion.chunk",
                         "created": created, "model": "m",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def gateway_stream(tokens: int, stream_id: str = STREAM_ID, serial: int = 1,
                   created: int = 1_796_000_000) -> bytes:
    """A chat stream as the gateway writes it: ``id: <stream_id>:<seq>`` and ``data:`` per
    event, the role chunk, one chunk per mock token, then ``[DONE]``."""
    datas = [chunk({"role": "assistant", "content": ""}, serial, created)]
    datas += [chunk({"content": mock_upstream.token(i)}, serial, created,
                    "stop" if i == tokens - 1 else None) for i in range(tokens)]
    datas.append(b"[DONE]")
    return b"".join(b"id: %s:%d\ndata: %s\n\n" % (stream_id.encode(), seq, data)
                    for seq, data in enumerate(datas, 1))


def tail_after(body: bytes, last_event_id: str | None) -> bytes:
    """What a correct resume after ``last_event_id`` answers: the events after it."""
    events, _ = loadtest_resume.split_events(body)
    start = 0 if last_event_id is None else next(
        i + 1 for i, e in enumerate(events) if e.event_id == last_event_id)
    return b"".join(e.raw for e in events[start:])


def test_split_events_keeps_whole_events_and_skips_keep_alives() -> None:
    body = b"id: s:1\ndata: a\n\n: keep-alive\n: keep-alive\nid: s:2\ndata: b\ndata: c\n\nid: s:3\nda"
    events, rest = loadtest_resume.split_events(body)
    assert [(e.event_id, e.data) for e in events] == [("s:1", b"a"), ("s:2", b"b\nc")]
    assert events[1].raw == b"id: s:2\ndata: b\ndata: c\n\n"
    assert rest == b"id: s:3\nda"
    assert loadtest_resume.split_events(b"id: s:1\ndata: a\n\n: keep-alive\n") == (events[:1], b"")


@pytest.mark.parametrize(("received", "cut_at", "ended", "held"), [
    (b"0123456789", 4, False, b"0123"),
    (b"0123456789", 10, True, b"012345678"),  # the body ended at the cut: last byte lost
    (b"01234", 9, True, b"0123"),  # ... or before it
])
def test_cut_body(received: bytes, cut_at: int, ended: bool, held: bytes) -> None:
    assert loadtest_resume.cut_body(received, cut_at, ended) == held


def test_every_cut_of_a_stream_reassembles_intact() -> None:
    tokens = 5
    body = gateway_stream(tokens)
    reference = loadtest_resume.normalized(loadtest_resume.split_events(
        gateway_stream(tokens, "gs_" + "cd" * 12, serial=7, created=1))[0])
    for cut_at in range(1, len(body)):
        held = loadtest_resume.cut_body(body, cut_at, ended=False)
        last = loadtest_resume.cursor(loadtest_resume.split_events(held)[0])
        resumed = tail_after(body, last)
        assert loadtest_resume.verify_stream(STREAM_ID, held, resumed, body, tokens,
                                             reference) == [], cut_at


def test_a_resume_that_repeats_or_skips_an_event_is_caught() -> None:
    body = gateway_stream(4)
    held = body[:body.index(b"id: %s:3" % STREAM_ID.encode()) + 5]  # events 1-2, part of 3
    right = tail_after(body, f"{STREAM_ID}:2")
    events, _ = loadtest_resume.split_events(right)
    repeated = events[0].raw + right
    skipped = b"".join(e.raw for e in events[1:])

    def problems(resumed: bytes) -> list[str]:
        return loadtest_resume.verify_stream(STREAM_ID, held, resumed, body, 4, None)

    assert problems(right) == []
    assert problems(repeated)[0] == "event 4 repeats seq 3"
    assert problems(skipped)[0] == "seqs 3..3 missing (event 3 has seq 4)"
    assert any(p.startswith("differs from the full replay from byte") for p in problems(skipped))
    assert "text is not expected_text(4)" in problems(skipped)


def test_a_resume_that_changes_a_byte_or_stops_early_is_caught() -> None:
    body = gateway_stream(3)
    held = body[:40]
    right = tail_after(body, None)
    altered = right.replace(b"bravo", b"brave")
    truncated = right[:-5]
    foreign = right.replace(STREAM_ID.encode() + b":4", b"gs_other:4")
    check = loadtest_resume.verify_stream
    assert check(STREAM_ID, held, right, body, 3, None) == []
    assert "text is not expected_text(3)" in check(STREAM_ID, held, altered, body, 3, None)
    assert any(p.startswith("differs from the full replay from byte")
               for p in check(STREAM_ID, held, altered, body, 3, None))
    incomplete, no_done = check(STREAM_ID, held, truncated, body, 3, None)[:2]
    assert incomplete.startswith("the resumed body ends in an incomplete event (")
    assert no_done == "the reassembled stream does not end with data: [DONE]"
    assert check(STREAM_ID, held, foreign, body, 3, None)[0].startswith("event 4 has id 'gs_other:4'")


def test_payloads_are_compared_without_ids_and_timestamps() -> None:
    one, two = gateway_stream(3), gateway_stream(3, serial=9, created=5)
    assert one != two
    norm = loadtest_resume.normalized
    events = loadtest_resume.split_events
    assert norm(events(one)[0]) == norm(events(two)[0])
    other = norm(events(gateway_stream(4))[0])
    assert loadtest_resume.verify_stream(STREAM_ID, b"", one, one, 3, other) == [
        "payloads differ from an uncut stream's"]


def test_cuts_are_seeded_and_routes_split_in_halves() -> None:
    cuts = loadtest_resume.plan_cuts(200, 7, 1000)
    assert cuts == loadtest_resume.plan_cuts(200, 7, 1000) != loadtest_resume.plan_cuts(200, 8, 1000)
    assert all(1 <= c <= 999 for c in cuts)
    routes = [loadtest_resume.route(i, [1, 2]) for i in range(8)]
    assert routes[:4] == [(1, 1, "same"), (2, 2, "same"), (1, 2, "other"), (2, 1, "other")]
    assert Counter(where for *_, where in routes) == {"same": 4, "other": 4}
    assert {loadtest_resume.route(i, [5, 5]) for i in range(4)} == {(5, 5, "same")}


def test_commandstats_and_redis_cost_per_token() -> None:
    text = ("# Commandstats\r\ncmdstat_evalsha:calls=10,usec=5,usec_per_call=0.5,rejected_calls=0\r\n"
            "cmdstat_xadd:calls=30,usec=9\r\ncmdstat_info:calls=4,usec=1\r\n")
    after = loadtest.parse_commandstats(text)
    assert after == {"evalsha": 10, "xadd": 30}
    cost = loadtest.redis_commands({"evalsha": 2, "xadd": 30}, after, tokens=4, events=8)
    assert cost is not None
    assert (cost["commands"], cost["per_token"], cost["per_event"], cost["evalsha_per_token"]) == (
        8, 2.0, 1.0, 2.0)
    assert cost["by_command"] == {"evalsha": 8}
    assert loadtest.redis_commands({}, {}, 4, 8) is None


def test_cut_summary_by_where() -> None:
    def record(where: str, latency: float | None, problems: list[str], held: int = 3) -> dict[str, Any]:
        return {"where": where, "resume_latency_ms": latency, "problems": problems,
                "held_events": held}

    records = [record("same", 1.0, []), record("same", 3.0, [], held=0),
               record("other", 2.0, ["x"]), record("other", None, ["resume: HTTP 404"])]
    summary = loadtest.cut_summary(records)
    assert summary["same"] | {"latency_ms": None} == {
        "streams": 2, "intact": 2, "intact_pct": 100.0, "from_start": 1, "latency_ms": None}
    assert summary["same"]["latency_ms"]["p50"] == 1.0
    assert summary["same"]["latency_ms"]["p99"] == 3.0
    assert (summary["other"]["intact"], summary["all"]["intact_pct"]) == (0, 50.0)
    assert summary["other"]["latency_ms"]["max"] == 2.0


def test_resume_defaults_to_redis_and_validates() -> None:
    args = loadtest.parse_args(["--scenario", "resume"])
    assert (args.state, args.streams, args.concurrency, args.mock_engine) == (
        "redis", 200, 32, "aiohttp")
    assert loadtest.parse_args(["--scenario", "resume", "--state", "memory"]).state == "memory"
    assert loadtest.parse_args([]).state == "memory"
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--scenario", "resume", "--streams", "0"])


# -- --scenario connections (scripts/loadtest_connections.py; no network)


def sse_body(tokens: int, done: bool = True) -> bytes:
    """A chat completion stream of ``tokens`` tokens as the gateway frames it."""
    events = [{"choices": [{"delta": {"content": mock_upstream.token(i)}}]} for i in range(tokens)]
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


@pytest.mark.parametrize(("got", "kind"), [
    (loadtest_connections.Attempt(200, 5.0, body=sse_body(4), ended=True), "intact"),
    (loadtest_connections.Attempt(503, 1.0, True, "overloaded"), "refused"),
    (loadtest_connections.Attempt(None, error="connect: ConnectionRefusedError"), "failed: connect"),
    (loadtest_connections.Attempt(None, error="head: IncompleteReadError"), "failed: no head"),
    (loadtest_connections.Attempt(500, 2.0, code="internal_error"), "failed: HTTP 500"),
    (loadtest_connections.Attempt(200, 5.0, body=sse_body(4, done=False), ended=True),
     "failed: broken after 200"),
    (loadtest_connections.Attempt(200, 5.0, body=sse_body(4), ended=False), "failed: broken after 200"),
    (loadtest_connections.Attempt(200, 5.0, body=sse_body(3), ended=True), "failed: broken after 200"),
    (loadtest_connections.Attempt(200, 5.0, body=sse_body(4), ended=True,
                                  error="body: TimeoutError"), "failed: broken after 200"),
])
def test_stream_outcomes_are_classified(got: Any, kind: str) -> None:
    assert loadtest_connections.classify(got, tokens=4)[0] == kind


def test_after_admission_is_a_broken_200_or_a_status_other_than_503() -> None:
    after = loadtest_connections.after_admission
    assert after("failed: broken after 200")
    assert after("failed: HTTP 500")
    assert not any(after(k) for k in ("intact", "refused", "failed: connect", "failed: no head"))


def test_a_non_stream_answer_is_ok_once_it_ended() -> None:
    classify, attempt = loadtest_connections.classify, loadtest_connections.Attempt
    assert classify(attempt(200, 1.0, body=b"{}", ended=True))[0] == "ok"
    assert classify(attempt(200, 1.0, body=b"{", ended=False))[0] == "failed: broken after 200"


def stream_record(kind: str, head_ms: float | None = 1.0, retry_after: bool = False,
                  detail: str | None = None) -> dict[str, Any]:
    return {"kind": kind, "head_ms": head_ms, "retry_after": retry_after, "detail": detail}


def test_outcome_summary_counts_admitted_and_refusals() -> None:
    records = ([stream_record("intact")] * 6
               + [stream_record("refused", 2.0, True, "overloaded")] * 3
               + [stream_record("refused", 4.0, False, "overloaded")]
               + [stream_record("failed: broken after 200", detail="body: X")]
               + [stream_record("failed: connect", None, detail="connect: E")])
    out = loadtest_connections.outcome_summary(records, "intact")
    assert (out["attempted"], out["good"], out["admitted"], out["failed_after_admission"]) == (12, 6, 7, 1)
    assert out["good_pct"] == pytest.approx(50.0)
    assert out["good_pct_of_admitted"] == pytest.approx(600 / 7)
    assert (out["refused"], out["refused_with_retry_after"]) == (4, 3)
    assert out["refusal_codes"] == {"overloaded": 4}
    assert out["refusal_ms"]["max"] == 4.0
    assert out["failures"] == {"failed: broken after 200: body: X": 1, "failed: connect: connect: E": 1}
    empty = loadtest_connections.outcome_summary([], "intact")
    assert (empty["good_pct"], empty["good_pct_of_admitted"], empty["refusal_ms"]) == (None, None, None)


def test_idle_summary_tells_keepalive_closes_from_early_ones() -> None:
    ok = [stream_record("ok") | {"closed_after_s": s} for s in (15.0, 15.2, 3.0, None)]
    out = loadtest_connections.idle_summary([*ok, stream_record("refused", 1.0, True)], 15.0)
    counts = (out["accepted"], out["closed_by_gateway"], out["closed_early"], out["open_at_end"])
    assert counts == (4, 3, 1, 1)
    assert out["closed_after_s"] == {"min": 3.0, "p50": 15.0, "max": 15.2}
    assert out["refused"] == 1


def test_phases_and_peaks_by_phase() -> None:
    phase_of = loadtest_connections.phase_of
    assert [phase_of(t, 10, 3) for t in (-0.5, 0, 9.9, 10, 19.9, 20, 22.9, 23)] == [
        "before", "stream ramp", "stream ramp", "idle ramp", "idle ramp", "hold", "hold", "drain"]
    samples = [{"t": 1, "fds": 10}, {"t": 5, "fds": 30}, {"t": 12, "fds": 20}, {"t": 21, "fds": None}]
    peaks = loadtest_connections.phase_peaks(samples, ["fds"], 10, 3)
    assert peaks["stream ramp"] == {"fds": 30}
    assert peaks["idle ramp"] == {"fds": 20}
    assert peaks["hold"] == {"fds": None}
    assert peaks["before"] == {"fds": None}


def test_probe_summary_by_phase_and_failures() -> None:
    samples = [{"t": 0.5, "kind": "ok", "ms": 2.0, "detail": None},
               {"t": 12, "kind": "ok", "ms": 8.0, "detail": None},
               {"t": 12.25, "kind": "refused", "ms": 1.0, "detail": "overloaded"}]
    out = loadtest_connections.probe_summary(samples, 10, 3)
    assert (out["sent"], out["ok"]) == (3, 2)
    assert out["latency_ms"]["max"] == 8.0
    assert out["by_phase"]["stream ramp"]["p50"] == 2.0
    assert out["by_phase"]["hold"] is None
    assert out["not_ok"] == {"refused: overloaded": 1}


def test_streams_outlive_both_ramps_and_the_hold() -> None:
    args = loadtest.parse_args(["--scenario", "connections"])
    plan = loadtest_connections.Plan.of(args)
    assert (plan.streams, plan.idle, plan.tokens) == (10_000, 20_000, 16)
    assert plan.stream_s >= 2 * plan.ramp_s + plan.hold_s
    specs = loadtest_connections.driver_specs(plan, 8080, 0.0, 10.0)
    assert [s["mode"] for s in specs] == ["probe", "streams", "idle", "idle"]
    idle = specs[2:]
    assert sum(s["count"] for s in idle) == 20_000
    assert len({s["source"] for s in idle}) == 2
    assert idle[0]["offset_s"] == plan.ramp_s
    assert idle[1]["offset_s"] == pytest.approx(1.5 * plan.ramp_s)
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--scenario", "connections", "--ramp-s", "0"])


def test_parse_head_and_error_code() -> None:
    status, fields = loadtest_connections.parse_head(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 2\r\n\r\n")
    assert (status, fields["retry-after"], fields["content-length"]) == (503, "1", "2")
    assert loadtest_connections.error_code(b'{"error": {"code": "overloaded"}}') == "overloaded"
    assert loadtest_connections.error_code(b"nope") is None
    assert loadtest_connections.refusals(
        {'shepherd_connections_refused_total{reason="max_connections"}': 3.0,
         "shepherd_connections_open": 1.0}) == {"max_connections": 3.0}


def test_listen_queue_counters_are_read_by_name() -> None:
    text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 7 9\nIpExt: A\nIpExt: 2\n"
    assert loadtest_connections.tcp_ext(text) == {"ListenOverflows": 7, "ListenDrops": 9}
    assert loadtest_connections.tcp_ext("") == {}


def test_children_start_with_nofile_as_soft_and_hard_limit(tmp_path: Path) -> None:
    """Lowering the limit is always permitted, so this runs as any user."""
    fleet = loadtest.Fleet(tmp_path, nofile=1000)
    out = tmp_path / "out.txt"
    proc = fleet.spawn("child", [loadtest.PYTHON, "-c", "import resource; print("
                       "resource.getrlimit(resource.RLIMIT_NOFILE))"], None, out)
    assert proc.wait(30) == 0
    assert out.read_text().strip() == "(1000, 1000)"
    assert fleet.nofile_got == {"child": (1000, 1000)}
    assert loadtest.nofile_of(proc.pid) is None  # reaped: nothing left to read


def test_nofile_of_reads_this_process() -> None:
    assert loadtest.nofile_of(os.getpid()) == resource.getrlimit(resource.RLIMIT_NOFILE)


def test_a_refused_nofile_is_noted_once_and_reported(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    fleet = loadtest.Fleet(tmp_path, nofile=65536)
    fleet.note_nofile("mock", (20000, 20000))
    fleet.note_nofile("gateway", (20000, 20000))
    fleet.note_nofile("loadgen", (65536, 65536))
    assert capsys.readouterr().err.count("could not set RLIMIT_NOFILE to 65536") == 1
    text = loadtest_connections.nofile_text({"asked": 65536, "started_with": fleet.nofile_got})
    assert text == "--nofile 65536 not permitted: mock, gateway kept 20000/20000"
    assert loadtest_connections.nofile_text({"asked": 65536, "started_with": {
        "gateway": [65536, 65536]}}) == "--nofile 65536"
    assert loadtest_connections.nofile_text({"asked": None, "started_with": {}}) == "inherited"


def test_nofile_option_defaults_and_bounds() -> None:
    assert loadtest.parse_args([]).nofile == 65536
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--nofile", "10"])
