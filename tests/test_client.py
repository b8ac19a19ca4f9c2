"""proxy/client.py: ResumableTransport and AsyncResumableTransport on real loopback sockets.

A small SSE server in this module speaks the gateway's reconnection contract (DESIGN §4):
``X-Stream-Id``, ``id: <stream_id>:<seq>`` on every event, ``: keep-alive`` lines between
events, and resume on a re-POST with ``Last-Event-ID`` (200 / 204 / 400 / 404 / 409). A
``ChaosRelay`` (tests/chaos.py) in front of it cuts connections at chosen bytes. Sync
clients run in a worker thread (``asyncio.to_thread``) so the server keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.client import AsyncResumableTransport, ResumableTransport, _EventFramer
from tests.chaos import ChaosRelay

KEEP_ALIVE = b": keep-alive\n"
N_TOKENS = 10
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
EXPECTED_TEXT = "".join(f"tok{i} " for i in range(N_TOKENS))
CUT_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.function_scoped_fixture])
FAST = {"base_delay_s": 0.001, "max_delay_s": 0.01}


# --- the SSE server: the gateway's wire contract for a deterministic stream -----------------

def _data(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def chat_frames(model: str) -> list[bytes]:
    """Chat chunks ``tok{i} ``, then ``[DONE]`` (or an error event for model ``fail``)."""
    frames = [_data({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                     "model": "mock", "choices": [{"index": 0, "delta": {"content": f"tok{i} "},
                                                   "finish_reason": None}]})
              for i in range(N_TOKENS)]
    if model == "fail":
        return [*frames, _data({"error": {"message": "upstream exploded", "type": "server_error",
                                          "param": None, "code": "upstream_error"}})]
    return [*frames, b"data: [DONE]\n\n"]


def responses_frames(model: str) -> list[bytes]:
    """A Responses stream: ``response.created``, text deltas, ``response.completed``."""
    response = {"id": "resp_1", "object": "response", "created_at": 0, "model": "mock",
                "status": "in_progress", "output": []}
    events = [("response.created", {"response": response})]
    events += [("response.output_text.delta", {"item_id": "msg_1", "output_index": 0,
                                               "content_index": 0, "delta": f"tok{i} ",
                                               "logprobs": []}) for i in range(N_TOKENS)]
    events.append(("response.completed", {"response": {**response, "status": "completed"}}))
    return [b"event: " + kind.encode() + b"\n"
            + _data({"type": kind, "sequence_number": n, **fields})
            for n, (kind, fields) in enumerate(events)]


@dataclass
class Backend:
    """The test server's memory: streams by id and the ``Last-Event-ID`` of every request.

    Models: ``ok``; ``fail`` (ends with an error event); ``eof`` (every answer ends cleanly
    after 4 events, terminal or not); ``gone`` / ``trimmed`` (resumes answered 404 / 409);
    ``plain`` (SSE without ``X-Stream-Id`` or ``id:`` lines).
    """

    port: int = 0
    streams: dict[str, list[bytes]] = field(default_factory=dict)
    last_event_ids: list[str | None] = field(default_factory=list)
    transcripts: dict[tuple[str, str, bool], Transcript] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


BACKEND = web.AppKey("backend", Backend)


async def serve(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    body = await request.json()
    last = request.headers.get("Last-Event-ID")
    backend.last_event_ids.append(last)
    if not body.get("stream"):
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": EXPECTED_TEXT}}]})
    if last is None:
        stream_id = "gs_" + secrets.token_hex(12)
        make = chat_frames if request.path == CHAT else responses_frames
        backend.streams[stream_id] = make(body["model"])
        return await write_events(request, body["model"], stream_id, 0)
    stream_id, _, seq = last.rpartition(":")
    refusal = resume_refusal(backend, body["model"], stream_id, seq)
    if refusal is not None:
        return web.Response(status=refusal)
    return await write_events(request, body["model"], stream_id, int(seq))


def resume_refusal(backend: Backend, model: str, stream_id: str, seq: str) -> int | None:
    """The status a resume is refused with (DESIGN §4), or ``None`` to serve it."""
    if not seq.isdigit():
        return 400
    if model == "gone" or stream_id not in backend.streams:
        return 404
    if model == "trimmed":
        return 409
    total = len(backend.streams[stream_id])
    return 400 if int(seq) > total else 204 if int(seq) == total else None


async def write_events(request: web.Request, model: str, stream_id: str,
                       after: int) -> web.StreamResponse:
    frames = request.app[BACKEND].streams[stream_id]
    plain = model == "plain"
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    response = web.StreamResponse(headers=headers if plain else {**headers, "X-Stream-Id": stream_id})
    await response.prepare(request)
    try:
        for seq in range(after + 1, len(frames) + 1):
            event_id = b"" if plain else f"id: {stream_id}:{seq}\n".encode()
            await response.write(event_id + frames[seq - 1])
            if seq % 4 == 0 and seq < len(frames):
                await response.write(KEEP_ALIVE)
            if model == "eof" and seq - after == 4:
                break
        await response.write_eof()
    except ConnectionResetError:
        pass  # the relay cut the client; nothing to finish
    return response


@pytest.fixture
async def backend(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Backend:
    app = web.Application()
    state = Backend()
    app[BACKEND] = state
    app.router.add_post(CHAT, serve)
    app.router.add_post(RESPONSES, serve)
    server = await aiohttp_server(app)
    state.port = server.port
    return state


# --- helpers -----------------------------------------------------------------------------

def body_for(path: str, model: str = "ok", *, stream: bool = True) -> dict[str, Any]:
    if path == CHAT:
        return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    return {"model": model, "stream": stream, "input": "hi"}


def events_only(raw: bytes, stream_id: str) -> bytes:
    """The stream's events with the stream id made uniform and keep-alive lines removed."""
    return raw.replace(KEEP_ALIVE, b"").replace(stream_id.encode(), b"gs_<id>")


@dataclass(frozen=True)
class Read:
    """One streamed answer as a client saw it."""

    stream_id: str
    raw: bytes

    @property
    def events(self) -> bytes:
        return events_only(self.raw, self.stream_id)


def read_sync(url: str, path: str, body: dict[str, Any],
              transport: httpx.BaseTransport | None = None) -> Read:
    with httpx.Client(transport=transport) as client, client.stream(
            "POST", url + path, json=body) as response:
        raw = b"".join(response.iter_raw())
        return Read(response.headers.get("x-stream-id", ""), raw)


async def read_async(url: str, path: str, body: dict[str, Any],
                     transport: httpx.AsyncBaseTransport | None = None) -> Read:
    async with httpx.AsyncClient(transport=transport) as client, client.stream(
            "POST", url + path, json=body) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
        return Read(response.headers.get("x-stream-id", ""), raw)


@dataclass(frozen=True)
class Transcript:
    """The bytes of one uncut answer on the wire (status line, headers, chunked body)."""

    wire: bytes

    @property
    def header_bytes(self) -> int:
        return self.wire.index(b"\r\n\r\n") + 4

    def events_before(self, cut_after_bytes: int) -> int:
        """How many complete events the first ``cut_after_bytes`` bytes hold."""
        ends = [m.end() for m in re.finditer(rb"\n\n", self.wire)]
        return sum(end <= cut_after_bytes for end in ends)


async def transcript(backend: Backend, path: str, model: str = "ok", *,
                     stream: bool = True) -> Transcript:
    """The wire bytes of an uncut answer, recorded once per backend (examples reuse it)."""
    key = (path, model, stream)
    if key not in backend.transcripts:
        async with ChaosRelay(backend.port, head_bytes=1 << 20) as relay:
            await read_async(relay.url, path, body_for(path, model, stream=stream))
        backend.transcripts[key] = Transcript(bytes(relay.history[0].head))
    return backend.transcripts[key]


async def uncut(backend: Backend, path: str, model: str = "ok") -> Read:
    return await read_async(backend.url, path, body_for(path, model))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


cut_modes = st.sampled_from(["reset", "close"])


def assert_resumed_from(backend: Backend, read: Read, complete_events: int, total: int) -> None:
    """The server saw one resume per cut, from the last complete event before the cut."""
    if complete_events == total:
        assert backend.last_event_ids == [None]
    else:
        assert backend.last_event_ids == [None, f"{read.stream_id}:{complete_events}"]


# --- uncut and pass-through --------------------------------------------------------------

async def test_uncut_stream_is_passed_on_byte_for_byte(backend: Backend) -> None:
    direct = await uncut(backend, CHAT)
    sync_transport = ResumableTransport()
    via_sync = await asyncio.to_thread(read_sync, backend.url, CHAT, body_for(CHAT), sync_transport)
    async_transport = AsyncResumableTransport()
    via_async = await read_async(backend.url, CHAT, body_for(CHAT), async_transport)
    assert direct.raw.endswith(b"data: [DONE]\n\n")
    assert via_sync.raw.replace(via_sync.stream_id.encode(), direct.stream_id.encode()) == direct.raw
    assert via_async.raw.replace(via_async.stream_id.encode(), direct.stream_id.encode()) == direct.raw
    for transport in (sync_transport, async_transport):
        assert transport.stats.streams == 1
        assert transport.stats.breaks == transport.stats.resumes == 0


@pytest.mark.parametrize("path", [CHAT, RESPONSES])
async def test_non_shepherd_sse_and_json_pass_through_untouched(backend: Backend, path: str) -> None:
    transport = AsyncResumableTransport()
    plain = await read_async(backend.url, path, body_for(path, "plain"), transport)
    assert plain.raw == (await uncut(backend, path, "plain")).raw
    assert b"id:" not in plain.raw
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post(backend.url + path, json=body_for(path, stream=False))
    assert response.json()["choices"][0]["message"]["content"] == EXPECTED_TEXT
    assert transport.stats.streams == 0


@pytest.mark.parametrize(("model", "stream"), [("plain", True), ("ok", False)])
async def test_a_cut_outside_shepherd_streams_reaches_the_caller(
        backend: Backend, model: str, stream: bool) -> None:
    wire = await transcript(backend, CHAT, model, stream=stream)
    cut = (wire.header_bytes + len(wire.wire)) // 2
    async with ChaosRelay(backend.port, cut_after_bytes=cut) as relay:
        transport = AsyncResumableTransport(**FAST)
        with pytest.raises(httpx.TransportError):
            await read_async(relay.url, CHAT, body_for(CHAT, model, stream=stream), transport)
    assert relay.cuts == 1
    assert backend.last_event_ids[-1:] == [None]
    assert relay.connections == 1  # no resume request


async def test_a_request_body_that_cannot_be_replayed_is_not_resumed(backend: Backend) -> None:
    wire = await transcript(backend, CHAT)
    payload = json.dumps(body_for(CHAT)).encode()

    def stream_from_generator(url: str) -> None:
        with httpx.Client(transport=ResumableTransport(**FAST)) as client, client.stream(
                "POST", url + CHAT, content=iter([payload]),
                headers={"content-type": "application/json"}) as response:
            response.read()

    async with ChaosRelay(backend.port, cut_after_bytes=wire.header_bytes + 200) as relay:
        with pytest.raises(httpx.TransportError):
            await asyncio.to_thread(stream_from_generator, relay.url)
    assert relay.connections == 1


# --- cuts at any byte: the reader sees the uncut stream ------------------------------------

@CUT_SETTINGS
@given(data=st.data())
async def test_sync_transport_splices_a_cut_at_any_byte(backend: Backend, data: st.DataObject) -> None:
    wire = await transcript(backend, CHAT)
    cut = data.draw(st.integers(wire.header_bytes, len(wire.wire)), label="cut_after_bytes")
    backend.last_event_ids.clear()
    async with ChaosRelay(backend.port, cut_after_bytes=[cut, None],
                          cut_mode=data.draw(cut_modes, label="cut_mode")) as relay:
        got = await asyncio.to_thread(read_sync, relay.url, CHAT, body_for(CHAT),
                                      ResumableTransport(**FAST))
    assert_resumed_from(backend, got, wire.events_before(cut), N_TOKENS + 1)
    assert got.events == (await uncut(backend, CHAT)).events


@CUT_SETTINGS
@given(data=st.data())
async def test_async_transport_splices_a_cut_at_any_byte(backend: Backend, data: st.DataObject) -> None:
    wire = await transcript(backend, RESPONSES)
    cut = data.draw(st.integers(wire.header_bytes, len(wire.wire)), label="cut_after_bytes")
    backend.last_event_ids.clear()
    async with ChaosRelay(backend.port, cut_after_bytes=[cut, None],
                          cut_mode=data.draw(cut_modes, label="cut_mode")) as relay:
        got = await read_async(relay.url, RESPONSES, body_for(RESPONSES),
                               AsyncResumableTransport(**FAST))
    assert_resumed_from(backend, got, wire.events_before(cut), N_TOKENS + 2)
    assert got.events == (await uncut(backend, RESPONSES)).events


def sdk_chat(base_url: str, transport: httpx.BaseTransport) -> str:
    with openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0,
                       http_client=httpx.Client(transport=transport)) as client:
        stream = client.chat.completions.create(
            model="ok", messages=[{"role": "user", "content": "hi"}], stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream)


async def sdk_responses(base_url: str, transport: httpx.AsyncBaseTransport) -> tuple[str, list[str]]:
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0,
                                  http_client=httpx.AsyncClient(transport=transport)) as client:
        stream = await client.responses.create(model="ok", input="hi", stream=True)
        events = [event async for event in stream]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return text, [e.type for e in events]


@CUT_SETTINGS
@given(data=st.data())
async def test_openai_sync_chat_stream_survives_a_cut(backend: Backend, data: st.DataObject) -> None:
    wire = await transcript(backend, CHAT)
    cut = data.draw(st.integers(wire.header_bytes, len(wire.wire)), label="cut_after_bytes")
    async with ChaosRelay(backend.port, cut_after_bytes=[cut, None],
                          cut_mode=data.draw(cut_modes, label="cut_mode")) as relay:
        text = await asyncio.to_thread(sdk_chat, relay.url, ResumableTransport(**FAST))
    assert text == EXPECTED_TEXT


@CUT_SETTINGS
@given(data=st.data())
async def test_openai_async_responses_stream_survives_a_cut(backend: Backend,
                                                            data: st.DataObject) -> None:
    wire = await transcript(backend, RESPONSES)
    cut = data.draw(st.integers(wire.header_bytes, len(wire.wire)), label="cut_after_bytes")
    async with ChaosRelay(backend.port, cut_after_bytes=[cut, None],
                          cut_mode=data.draw(cut_modes, label="cut_mode")) as relay:
        text, types = await sdk_responses(relay.url, AsyncResumableTransport(**FAST))
    assert text == EXPECTED_TEXT
    assert types == ["response.created", *["response.output_text.delta"] * N_TOKENS,
                     "response.completed"]


# --- resumes: clean EOF, repeated cuts, Last-Event-ID -------------------------------------

async def test_a_clean_end_without_terminal_event_is_resumed(backend: Backend) -> None:
    transport = AsyncResumableTransport(**FAST)
    got = await read_async(backend.url, CHAT, body_for(CHAT, "eof"), transport)
    assert got.events == (await uncut(backend, CHAT)).events
    sid = got.stream_id
    assert backend.last_event_ids[:3] == [None, f"{sid}:4", f"{sid}:8"]
    assert transport.stats.resumes == 2
    assert "resumes: 2" in repr(transport)


async def test_two_cuts_make_two_resumes(backend: Backend) -> None:
    wire = await transcript(backend, CHAT)
    first, second = wire.header_bytes + 700, wire.header_bytes + 500
    transport = ResumableTransport(**FAST)
    backend.last_event_ids.clear()
    async with ChaosRelay(backend.port, cut_after_bytes=[first, second, None]) as relay:
        got = await asyncio.to_thread(read_sync, relay.url, CHAT, body_for(CHAT), transport)
    assert got.events == (await uncut(backend, CHAT)).events
    assert relay.cuts == 2
    seen = backend.last_event_ids[:3]
    assert seen[0] is None
    assert seen[1] == f"{got.stream_id}:{wire.events_before(first)}"
    assert int(seen[2].rpartition(":")[2]) > wire.events_before(first)  # type: ignore[union-attr]
    assert (transport.stats.breaks, transport.stats.resumes, transport.stats.gave_up) == (2, 2, 0)
    assert repr(transport).startswith("<ResumableTransport [streams: 1, breaks: 2, resumes: 2,")


@pytest.mark.parametrize("where", ["before the first event", "inside event 6", "after event 5"])
async def test_last_event_id_names_the_last_complete_event(backend: Backend, where: str) -> None:
    wire = await transcript(backend, CHAT)
    starts = [m.start() for m in re.finditer(rb"id: gs_", wire.wire)]
    ends = [m.end() for m in re.finditer(rb"\n\n", wire.wire)]
    cut, expected = {"before the first event": (starts[0] + 3, 0),
                     "inside event 6": (starts[5] + 30, 5),
                     "after event 5": (ends[4], 5)}[where]
    backend.last_event_ids.clear()
    async with ChaosRelay(backend.port, cut_after_bytes=[cut, None]) as relay:
        got = await read_async(relay.url, CHAT, body_for(CHAT), AsyncResumableTransport(**FAST))
    assert backend.last_event_ids[:2] == [None, f"{got.stream_id}:{expected}"]
    assert got.events == (await uncut(backend, CHAT)).events


# --- terminal events, refusals, giving up -------------------------------------------------

async def test_an_error_event_ends_the_stream_and_the_sdk_raises(backend: Backend) -> None:
    wire = await transcript(backend, CHAT, "fail")
    transport = AsyncResumableTransport(**FAST)
    async with ChaosRelay(backend.port, cut_after_bytes=len(wire.wire) - 3) as relay, \
            openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key="sk-test", max_retries=0,
                               http_client=httpx.AsyncClient(transport=transport)) as client:
        stream = await client.chat.completions.create(
            model="fail", messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(openai.APIError, match="upstream exploded"):
            async for _chunk in stream:
                pass
    assert relay.cuts == 1  # cut after the error event, before the body's end: no break
    assert (transport.stats.breaks, transport.stats.resumes) == (0, 0)
    assert relay.connections == 1


@pytest.mark.parametrize(("model", "status"), [("gone", 404), ("trimmed", 409)])
async def test_a_refused_resume_raises_read_error_naming_the_status(
        backend: Backend, model: str, status: int) -> None:
    wire = await transcript(backend, CHAT)
    transport = ResumableTransport(**FAST)
    async with ChaosRelay(backend.port, cut_after_bytes=[wire.header_bytes + 600, None]) as relay:
        with pytest.raises(httpx.ReadError, match=f"answered {status} ") as caught:
            await asyncio.to_thread(read_sync, relay.url, CHAT, body_for(CHAT, model), transport)
    assert "could not be resumed" in str(caught.value)
    assert relay.connections == 2  # one resume, no retry
    assert transport.stats.gave_up == 1


async def test_gives_up_after_max_attempts_when_the_server_is_down(backend: Backend) -> None:
    wire = await transcript(backend, CHAT)
    transport = AsyncResumableTransport(max_attempts=3, **FAST)
    async with ChaosRelay(backend.port, cut_after_bytes=[wire.header_bytes + 600]) as relay, \
            httpx.AsyncClient(transport=transport) as client, \
            client.stream("POST", relay.url + CHAT, json=body_for(CHAT)) as response:
        relay.target_port = closed_port()  # every resume finds the server gone
        started_s = time.monotonic()
        with pytest.raises(httpx.ReadError, match="all 3 resume attempts failed") as caught:
            async for _chunk in response.aiter_raw():
                pass
    assert time.monotonic() - started_s < 2.0
    assert f"broke after {response.headers['x-stream-id']}:" in str(caught.value)
    assert relay.connections == 4
    assert transport.stats.gave_up == 1


async def test_gives_up_when_max_total_s_is_spent(backend: Backend) -> None:
    wire = await transcript(backend, CHAT)
    transport = AsyncResumableTransport(max_attempts=1000, max_total_s=0.3, base_delay_s=0.05,
                                        max_delay_s=0.05)
    first_cut = wire.header_bytes + 600
    async with ChaosRelay(backend.port, cut_after_bytes=lambda i: 0 if i else first_cut) as relay:
        started_s = time.monotonic()  # every resume is cut before its first byte
        with pytest.raises(httpx.ReadError, match=r"no event for \d\.\d s"):
            await read_async(relay.url, CHAT, body_for(CHAT), transport)
    assert 0.3 <= time.monotonic() - started_s < 2.0
    assert relay.cuts == relay.connections > 2


async def test_closing_the_response_early_stops_without_leaks(backend: Backend) -> None:
    transport = AsyncResumableTransport(**FAST)
    async with httpx.AsyncClient(transport=transport) as client, client.stream(
            "POST", backend.url + CHAT, json=body_for(CHAT)) as response:
        first = await anext(response.aiter_raw())
    assert first.startswith(b"id: gs_")
    assert transport.stats.breaks == 0


def test_negative_limits_are_refused_together() -> None:
    with pytest.raises(ValueError, match=r"max_attempts must be >= 0.*max_delay_s must be >= 0"):
        ResumableTransport(max_attempts=-1, max_delay_s=-1.0)


# --- the framer alone (sans I/O): WHATWG line endings, split anywhere ---------------------

_endings = st.sampled_from([b"\n", b"\r\n", b"\r"])


@settings(max_examples=200, derandomize=True)
@given(eol=_endings, splits=st.lists(st.integers(1, 200), max_size=8))
def test_framer_passes_whole_events_whatever_the_line_endings_and_splits(
        eol: bytes, splits: list[int]) -> None:
    lines = [b"id: s:1", b"data: a", b"", b": keep-alive", b"id: s:2", b"event: response.completed",
             b"data: {}", b""]
    stream = b"".join(line + eol for line in lines)
    framer = _EventFramer()
    bounds = sorted({0, len(stream), *(s % len(stream) for s in splits)})
    frames = [f for a, b in itertools.pairwise(bounds) for f in framer.feed(stream[a:b])]
    assert b"".join(f.raw for f in frames) == stream
    assert [(f.event_id, f.terminal) for f in frames if f.is_event] == [("s:1", False), ("s:2", True)]
