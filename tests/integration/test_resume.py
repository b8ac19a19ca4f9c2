"""Reconnection over HTTP, as a user sees it (DESIGN §4 "Reconnection").

One gateway (memory backend) in front of the mock upstream, on real loopback sockets: stream
ids and event ids, resume by re-POSTing with ``Last-Event-ID`` or by ``GET
/v1/streams/{id}``, the resume error answers (204/400/404/409), several readers on one
stream, detach and its timeout (and the tokens it charges), ``/cancel``,
``Idempotency-Key``, the Responses API's ``retrieve(stream=True, starting_after=N)``, and
the official ``openai`` SDK reading through all of it.

Raw HTTP goes through ``Api`` (aiohttp, no base URL so each test picks its gateway and key);
``LiveStream`` reads an SSE response event by event; leaving its block drops the connection.
Streams are short and token delays small, so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from multidict import CIMultiDictProxy
from openai.types.chat import ChatCompletionMessageParam

from scripts.mock_upstream import expected_text
from tests.chaos import ChaosRelay
from tests.conftest import CLIENT_KEY, OTHER_KEY, MockUpstream, RunningGateway, StartGateway
from tests.integration.test_http_wire import ERROR_FIELDS, Event, assert_openai_error, parse_events

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me a story"}]
CHAT = {"model": "mock-gpt", "messages": MESSAGES, "stream": True}
UNARY_CHAT = {"model": "mock-gpt", "messages": MESSAGES}
COMPLETION = {"model": "mock-gpt", "prompt": "tell me a story", "stream": True}
STREAM_ID_RE = re.compile(r"^gs_[0-9a-f]{24}$")
#: The limits of the module's gateway key: every response to it carries ``x-ratelimit-*``.
LIMITS = {"rpm": 6000, "tpm": 1_000_000}
DETACH_TIMEOUT_S = 0.5
IO_TIMEOUT_S = 10.0
DONE = "[DONE]"


# --------------------------------------------------------------------------- helpers


def encode(body: dict[str, Any]) -> bytes:
    """The exact request bytes sent for ``body`` (the gateway estimates prompt tokens as a
    quarter of them)."""
    return json.dumps(body).encode()


def knobs(tokens: int, delay_ms: float = 0) -> dict[str, str]:
    """Mock upstream knob headers: ``tokens`` per answer, ``delay_ms`` before each token."""
    return {"x-mock-tokens": str(tokens), "x-mock-token-delay-ms": str(delay_ms)}


def ratelimit_headers(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}


def event_json(event: Event) -> Any:
    """The JSON of an event's data, or ``None`` for ``[DONE]`` / non-JSON."""
    try:
        return json.loads(event.text)
    except json.JSONDecodeError:
        return None


def is_error(event: Event) -> bool:
    obj = event_json(event)
    return isinstance(obj, dict) and set(obj) == {"error"}


def chunks_of(events: list[Event]) -> list[Event]:
    """The generated events (chat or completion chunks): neither ``[DONE]`` nor an error."""
    return [e for e in events if e.text != DONE and not is_error(e)]


def text_of(events: list[Event]) -> str:
    """The concatenated content of chat deltas / completion texts."""
    out = []
    for event in chunks_of(events):
        choice = event_json(event)["choices"][0]
        out.append(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])
    return "".join(out)


def seqs(events: list[Event], stream_id: str) -> list[int]:
    """The seq of every event, asserting each id names ``stream_id``."""
    out = []
    for event in events:
        assert event.id is not None, event
        named, _, seq = event.id.partition(":")
        assert named == stream_id, event.id
        out.append(int(seq))
    return out


def assert_consecutive(events: list[Event], stream_id: str, first: int = 1) -> None:
    assert seqs(events, stream_id) == list(range(first, first + len(events)))


def assert_failed_not_done(events: list[Event]) -> None:
    """A stream that was stopped: never ``[DONE]`` (SDKs would take it as a success), and it
    ends with an ``{"error": {...}}`` event (DESIGN §4 Wire rules: never end silently)."""
    assert all(e.text != DONE for e in events), "a stopped stream sent [DONE]"
    assert events, "no event at all"
    assert is_error(events[-1]), f"the stream ended without an error event: {events[-1]}"
    assert set(event_json(events[-1])["error"]) >= ERROR_FIELDS


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    """Poll ``check`` every 10 ms; return the seconds it took to become true."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return time.monotonic() - started
            await asyncio.sleep(0.01)


async def wait_stats(mock: MockUpstream, timeout_s: float = 2.0, **expected: int) -> float:
    """Wait until the mock's ``/mock/stats`` counters equal ``expected``."""

    async def matches() -> bool:
        stats = await mock.stats()
        return all(stats[name] == value for name, value in expected.items())

    return await until(matches, timeout_s)


@dataclass
class Reply:
    """A whole response."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def events(self) -> list[Event]:
        return parse_events(self.body)

    @property
    def stream_id(self) -> str:
        return self.headers["X-Stream-Id"]

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self, status: int) -> dict[str, Any]:
        """The OpenAI error object, asserting the status and the exact shape."""
        return assert_openai_error(self.status, self.headers, self.body, status)


class LiveStream:
    """An SSE response read event by event; leaving its ``Api.live`` block closes the
    connection (the client went away), which the gateway notices at once."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[Event] = []
        self.ended = False
        self._block = bytearray()

    @property
    def stream_id(self) -> str:
        return self.response.headers["X-Stream-Id"]

    @property
    def last_event_id(self) -> str:
        assert self.events[-1].id is not None
        return self.events[-1].id

    async def read(self, count: int | None = None, pause_s: float = 0.0) -> list[Event]:
        """Read until ``count`` events in all arrived (``None``: to the end of the body),
        sleeping ``pause_s`` after each event (a slow reader); returns every event so far."""
        async with asyncio.timeout(IO_TIMEOUT_S):
            while not self.ended and (count is None or len(self.events) < count):
                line = await self.response.content.readline()
                if not line:
                    self.ended = True
                elif line != b"\n":
                    self._block += line
                else:
                    self.events += parse_events(bytes(self._block))
                    self._block.clear()
                    if pause_s:
                        await asyncio.sleep(pause_s)
        return self.events


class Api:
    """Raw HTTP against the gateway at ``base_url`` with the API key ``key``."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, key: str = CLIENT_KEY) -> None:
        self.session = session
        self.base_url = base_url
        self.key = key

    def as_key(self, key: str) -> Api:
        return Api(self.session, self.base_url, key)

    def _args(self, body: dict[str, Any] | None, headers: dict[str, str] | None) -> dict[str, Any]:
        all_headers = {"Authorization": f"Bearer {self.key}", **(headers or {})}
        if body is None:
            return {"headers": all_headers}
        return {"headers": {"Content-Type": "application/json", **all_headers}, "data": encode(body)}

    async def request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None) -> Reply:
        async with asyncio.timeout(IO_TIMEOUT_S), self.session.request(
            method, self.base_url + path, **self._args(body, headers)
        ) as response:
            return Reply(response.status, response.headers, await response.read())

    async def stream(self, body: dict[str, Any] = CHAT, headers: dict[str, str] | None = None,
                     path: str = CHAT_PATH) -> Reply:
        """POST a streamed request and read it to the end."""
        return await self.request("POST", path, body=body, headers=headers)

    async def resume(self, stream_id: str, *, query: str = "",
                     headers: dict[str, str] | None = None) -> Reply:
        """``GET /v1/streams/{stream_id}[?query]`` read to the end."""
        return await self.request("GET", f"/v1/streams/{stream_id}{query}", headers=headers)

    async def cancel(self, stream_id: str) -> Reply:
        return await self.request("POST", f"/v1/streams/{stream_id}/cancel")

    @asynccontextmanager
    async def live(self, method: str = "POST", path: str = CHAT_PATH, *,
                   body: dict[str, Any] | None = CHAT,
                   headers: dict[str, str] | None = None) -> AsyncIterator[LiveStream]:
        """A streamed response to read step by step; the connection is closed on exit."""
        async with asyncio.timeout(IO_TIMEOUT_S):
            response = await self.session.request(method, self.base_url + path,
                                                  **self._args(body, headers))
        try:
            assert response.status == 200, await response.read()
            yield LiveStream(response)
        finally:
            response.close()


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> RunningGateway:
    """This module's gateway: the client key has rpm/tpm limits (so responses carry
    ``x-ratelimit-*``) and streams detach after ``DETACH_TIMEOUT_S``."""
    return await start_gateway(keys={"tester": LIMITS},
                               streams={"detach_timeout": f"{DETACH_TIMEOUT_S}s"})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def api(session: aiohttp.ClientSession, gateway: RunningGateway) -> Api:
    return Api(session, gateway.url)


async def finished_stream(api: Api, tokens: int = 5, extra: dict[str, str] | None = None) -> Reply:
    """A stream of ``tokens`` tokens read to its end; ``extra`` knob headers."""
    reply = await api.stream(headers={**knobs(tokens), **(extra or {})})
    assert reply.status == 200, reply.body
    assert reply.events
    return reply


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize(("path", "body"), [(CHAT_PATH, CHAT), (COMPLETIONS_PATH, COMPLETION)],
                         ids=["chat", "completions"])
async def test_stream_id_and_consecutive_event_ids(api: Api, path: str, body: dict[str, Any]) -> None:
    reply = await api.stream(body, knobs(6), path)
    assert reply.status == 200
    assert STREAM_ID_RE.match(reply.stream_id), reply.stream_id
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert_consecutive(reply.events, reply.stream_id)
    assert reply.events[-1].text == DONE
    assert text_of(reply.events) == expected_text(6)
    other = await api.stream(body, knobs(1), path)
    assert other.stream_id != reply.stream_id


# --------------------------------------------------------------------------- resume a finished stream


@pytest.mark.parametrize("ending", ["done", "error"])
async def test_post_with_last_event_id_replays_the_rest_and_ends_the_same(api: Api, ending: str) -> None:
    extra = {"x-mock-vllm-error-after": "4"} if ending == "error" else {}
    original = await finished_stream(api, 6, extra)
    events = original.events
    assert (is_error(events[-1]) if ending == "error" else events[-1].text == DONE), events[-1]
    limits = ratelimit_headers(original.headers)
    assert {"x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"} <= set(limits)
    for after in (0, 2, len(events) - 1):
        resumed = await api.stream(headers={"Last-Event-ID": f"{original.stream_id}:{after}"})
        assert resumed.status == 200, resumed.body
        assert resumed.stream_id == original.stream_id
        assert resumed.events == events[after:]
        assert ratelimit_headers(resumed.headers) == limits
    at_end = await api.stream(headers={"Last-Event-ID": f"{original.stream_id}:{len(events)}"})
    assert at_end.status == 204
    assert at_end.body == b""


@pytest.mark.parametrize(
    ("query", "last_event_seq", "after"),
    [("", None, 0), ("?starting_after=3", None, 3), ("", 3, 3), ("?starting_after=1", 3, 3)],
    ids=["from-the-start", "starting_after", "last_event_id", "last_event_id-wins"],
)
async def test_get_stream_replays_after_the_cursor(api: Api, query: str, last_event_seq: int | None,
                                                   after: int) -> None:
    original = await finished_stream(api)
    stream_id = original.stream_id
    headers = {"Last-Event-ID": f"{stream_id}:{last_event_seq}"} if last_event_seq is not None else {}
    resumed = await api.resume(stream_id, query=query, headers=headers)
    assert resumed.status == 200, resumed.body
    assert resumed.headers["Content-Type"].startswith("text/event-stream")
    assert resumed.stream_id == stream_id
    assert resumed.events == original.events[after:]
    assert resumed.events[-1].text == DONE
    assert ratelimit_headers(resumed.headers) == ratelimit_headers(original.headers)


@pytest.mark.parametrize("how", ["starting_after", "last_event_id"])
async def test_get_stream_at_its_end_is_204(api: Api, how: str) -> None:
    original = await finished_stream(api)
    last = len(original.events)
    if how == "starting_after":
        reply = await api.resume(original.stream_id, query=f"?starting_after={last}")
    else:
        cursor = {"Last-Event-ID": f"{original.stream_id}:{last}"}
        reply = await api.resume(original.stream_id, headers=cursor)
    assert reply.status == 204
    assert reply.body == b""


# --------------------------------------------------------------------------- resume errors

UNKNOWN_ID = "gs_" + "0" * 24


async def not_found_error(api: Api) -> dict[str, Any]:
    """The 404 error object for a stream id nobody ever had: every other 404 must equal it."""
    return (await api.resume(UNKNOWN_ID)).error(404)


@pytest.mark.parametrize(
    ("method", "target", "header"),
    [
        ("GET", "/v1/streams/gs_xyz", None),
        ("GET", "/v1/streams/abc", None),
        ("GET", "/v1/streams/{id}?starting_after=-1", None),
        ("GET", "/v1/streams/{id}?starting_after=x", None),
        ("GET", "/v1/streams/{id}", "{id}:-1"),
        ("GET", "/v1/streams/{id}", "x"),
        ("GET", "/v1/streams/{id}", "abc:1"),
        ("GET", "/v1/streams/{id}", f"{UNKNOWN_ID}:1"),  # names another stream
        ("POST", CHAT_PATH, "abc"),
        ("POST", CHAT_PATH, "gs_xyz:1"),
        ("POST", CHAT_PATH, "{id}:x"),
        ("POST", CHAT_PATH, "{id}:-1"),
        ("POST", "/v1/streams/abc/cancel", None),
    ],
)
async def test_malformed_ids_and_cursors_are_400(api: Api, method: str, target: str,
                                                 header: str | None) -> None:
    stream_id = (await finished_stream(api)).stream_id
    headers = {"Last-Event-ID": header.format(id=stream_id)} if header is not None else None
    reply = await api.request(method, target.format(id=stream_id), body=CHAT if method == "POST" else None,
                              headers=headers)
    error = reply.error(400)
    assert error["type"] == "invalid_request_error"
    assert "X-Stream-Id" not in reply.headers


@pytest.mark.parametrize("how", ["starting_after", "last_event_id", "post"])
async def test_cursor_beyond_a_finished_stream_is_400(api: Api, how: str) -> None:
    original = await finished_stream(api)
    beyond = len(original.events) + 1
    cursor = {"Last-Event-ID": f"{original.stream_id}:{beyond}"}
    if how == "starting_after":
        reply = await api.resume(original.stream_id, query=f"?starting_after={beyond}")
    elif how == "last_event_id":
        reply = await api.resume(original.stream_id, headers=cursor)
    else:
        reply = await api.stream(headers=cursor)
    assert reply.error(400)["code"] == "cursor_beyond_stream"


async def test_unknown_and_other_keys_streams_are_the_same_404(api: Api) -> None:
    stream_id = (await finished_stream(api)).stream_id
    unknown = await not_found_error(api)
    assert unknown["code"] == "stream_not_found"
    other = api.as_key(OTHER_KEY)
    answers = [
        await other.resume(stream_id),
        await other.resume(stream_id, query="?starting_after=1"),
        await other.stream(headers={"Last-Event-ID": f"{stream_id}:1"}),
        await other.cancel(stream_id),
        await api.stream(headers={"Last-Event-ID": f"{UNKNOWN_ID}:0"}),
        await api.cancel(UNKNOWN_ID),
    ]
    for reply in answers:
        assert reply.error(404) == unknown
    assert (await api.resume(stream_id)).status == 200  # still there for its owner


async def test_expired_stream_is_the_same_404(start_gateway: StartGateway,
                                              session: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(streams={"retention": "0.3s"})
    api = Api(session, gateway.url)
    stream_id = (await finished_stream(api)).stream_id
    assert (await api.resume(stream_id)).status == 200
    await asyncio.sleep(0.4)
    assert (await api.resume(stream_id)).error(404) == await not_found_error(api)
    assert (await api.stream(headers={"Last-Event-ID": f"{stream_id}:1"})).error(404) == \
        await not_found_error(api)


async def test_resume_older_than_retained_is_409_with_earliest_seq(
    start_gateway: StartGateway, session: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(streams={"retain": "1KiB", "buffer": "1KiB"})
    api = Api(session, gateway.url)
    original = await finished_stream(api, 120)
    events = original.events
    assert_consecutive(events, original.stream_id)
    reply = await api.resume(original.stream_id, query="?starting_after=1")
    assert reply.status == 409, reply.body
    error = reply.json()["error"]
    assert ERROR_FIELDS | {"earliest_seq"} == set(error)
    assert error["type"] == "invalid_request_error"
    earliest = error["earliest_seq"]
    assert 2 < earliest <= len(events)
    posted = await api.stream(headers={"Last-Event-ID": f"{original.stream_id}:1"})
    assert posted.status == 409
    assert posted.json()["error"]["earliest_seq"] == earliest
    kept = await api.resume(original.stream_id, query=f"?starting_after={earliest - 1}")
    assert kept.status == 200, kept.body
    assert kept.events == events[earliest - 1:]


# --------------------------------------------------------------------------- resume a running stream


@pytest.mark.parametrize("how", ["post", "get"])
async def test_resume_mid_stream_loses_and_repeats_nothing(api: Api, mock_upstream: MockUpstream,
                                                           how: str) -> None:
    async with api.live(headers=knobs(30, delay_ms=10)) as first:
        await first.read(4)
    stream_id, last_id = first.stream_id, first.last_event_id
    if how == "post":
        rest = await api.stream(headers={"Last-Event-ID": last_id})
    else:
        rest = await api.resume(stream_id, headers={"Last-Event-ID": last_id})
    assert rest.status == 200, rest.body
    events = first.events + rest.events
    assert_consecutive(events, stream_id)
    assert events[-1].text == DONE
    assert text_of(events) == expected_text(30)
    await wait_stats(mock_upstream, requests=1, streams_completed=1, streams_cancelled=0)


async def read_deltas_until_cut(stream: Any) -> tuple[list[str], Exception | None]:
    """The chat deltas an SDK stream yields, and the error that ended it (``None``: none)."""
    deltas: list[str] = []
    try:
        async with asyncio.timeout(IO_TIMEOUT_S):
            async for chunk in stream:
                # One by one, so the deltas read before the error are kept.
                deltas.append(chunk.choices[0].delta.content or "")  # noqa: PERF401
    except (httpx.HTTPError, openai.APIError) as exc:
        return deltas, exc
    return deltas, None


async def test_openai_sdk_cut_mid_stream_resumes_with_last_event_id(
    gateway: RunningGateway, mock_upstream: MockUpstream
) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    async with ChaosRelay(port, cut_after_bytes=[1500, None]) as relay:
        client = openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        async with client:
            raw = await client.chat.completions.with_raw_response.create(
                model="mock-gpt", messages=MESSAGES, stream=True, extra_headers=knobs(40, delay_ms=5))
            stream_id = raw.headers["x-stream-id"]
            before, error = await read_deltas_until_cut(raw.parse())
            assert isinstance(error, (httpx.HTTPError, openai.APIError)), error
            assert relay.cuts == 1
            assert 0 < len(before) < 41
            rest = await client.chat.completions.create(
                model="mock-gpt", messages=MESSAGES, stream=True,
                extra_headers={"Last-Event-ID": f"{stream_id}:{len(before)}"})
            after = [chunk.choices[0].delta.content or "" async for chunk in rest]
    assert "".join(before + after) == expected_text(40)
    assert len(before) + len(after) == 41  # the role chunk and 40 tokens, each once
    assert (await mock_upstream.stats())["requests"] == 1


# --------------------------------------------------------------------------- several readers


async def test_original_and_a_get_from_the_start_both_get_everything(api: Api) -> None:
    async with api.live(headers=knobs(20, delay_ms=10)) as original:
        await original.read(2)
        second, _ = await asyncio.gather(api.resume(original.stream_id), original.read())
    assert second.status == 200
    assert second.events == original.events
    assert_consecutive(second.events, original.stream_id)
    assert text_of(second.events) == expected_text(20)
    assert second.events[-1].text == DONE


async def test_two_concurrent_get_resumes_and_the_original_all_get_everything(api: Api) -> None:
    async with api.live(headers=knobs(20, delay_ms=10)) as original:
        await original.read(1)
        first, second, _ = await asyncio.gather(
            api.resume(original.stream_id), api.resume(original.stream_id, query="?starting_after=0"),
            original.read())
    assert first.events == second.events == original.events
    assert text_of(first.events) == expected_text(20)
    assert first.events[-1].text == DONE


async def test_slow_and_fast_readers_of_one_stream_both_get_everything(
    api: Api, mock_upstream: MockUpstream
) -> None:
    async with api.live(headers=knobs(25, delay_ms=4)) as slow:
        await slow.read(1)
        fast, _ = await asyncio.gather(api.resume(slow.stream_id), slow.read(pause_s=0.02))
    assert fast.events == slow.events
    assert_consecutive(slow.events, slow.stream_id)
    assert text_of(slow.events) == expected_text(25)
    assert slow.events[-1].text == DONE
    await wait_stats(mock_upstream, requests=1, streams_completed=1)


# --------------------------------------------------------------------------- detach


async def test_detached_stream_is_cancelled_at_the_timeout_and_its_tokens_charged(
    start_gateway: StartGateway, mock_upstream: MockUpstream, session: aiohttp.ClientSession
) -> None:
    tpm = 600  # refills 10 tokens/s: small against what the stream generates
    gateway = await start_gateway(keys={"tester": {"tpm": tpm}},
                                  streams={"detach_timeout": f"{DETACH_TIMEOUT_S}s"})
    api = Api(session, gateway.url)
    body = {**CHAT, "max_tokens": 500}
    started = time.monotonic()
    async with api.live(body=body, headers=knobs(500, delay_ms=5)) as client:
        await client.read(3)
    left = time.monotonic()
    await asyncio.sleep(DETACH_TIMEOUT_S - 0.2)
    stats = await mock_upstream.stats()
    assert (stats["open_streams"], stats["streams_cancelled"]) == (1, 0), "cancelled before the timeout"
    await wait_stats(mock_upstream, streams_cancelled=1)
    assert DETACH_TIMEOUT_S - 0.05 <= time.monotonic() - left < DETACH_TIMEOUT_S + 0.5
    # What was generated while nobody read stays in the log: fetch it to count it.
    replay = await api.resume(client.stream_id)
    assert replay.status == 200
    assert replay.events[:3] == client.events
    generated = len(chunks_of(replay.events))
    assert 20 < generated < 500
    assert all(e.text != DONE for e in replay.events)
    later_body = {**UNARY_CHAT, "max_tokens": 1}
    later = await api.request("POST", CHAT_PATH, body=later_body, headers=knobs(1))
    assert later.status == 200
    refilled = tpm / 60 * (time.monotonic() - started)
    dropped = tpm - int(later.headers["x-ratelimit-remaining-tokens"]) - (len(encode(later_body)) // 4 + 1)
    charged = len(encode(body)) // 4 + generated  # prompt estimate + one token per event
    assert charged - refilled - 1 <= dropped <= charged + 1, (dropped, charged, refilled)
    # A resumer of the cancelled stream must be told why it ended. Fails today: on
    # cancellation relay.produce_stream closes the log without an error event.
    assert_failed_not_done(replay.events)


async def test_client_back_within_the_detach_timeout_keeps_the_stream(
    api: Api, mock_upstream: MockUpstream
) -> None:
    async with api.live(headers=knobs(100, delay_ms=10)) as client:
        await client.read(3)
    await asyncio.sleep(DETACH_TIMEOUT_S / 2)
    rest = await api.resume(client.stream_id, headers={"Last-Event-ID": client.last_event_id})
    assert rest.status == 200
    events = client.events + rest.events
    assert_consecutive(events, client.stream_id)
    assert events[-1].text == DONE
    assert text_of(events) == expected_text(100)
    await wait_stats(mock_upstream, streams_completed=1, streams_cancelled=0)


# --------------------------------------------------------------------------- cancel


async def test_cancel_stops_generation_and_readers_get_an_error_not_done(
    api: Api, mock_upstream: MockUpstream
) -> None:
    async with api.live(headers=knobs(200, delay_ms=10)) as original:
        await original.read(3)
        async with api.live("GET", f"/v1/streams/{original.stream_id}", body=None) as other:
            await other.read(3)
            reply = await api.cancel(original.stream_id)
            assert reply.status == 200
            assert reply.json() == {"id": original.stream_id, "object": "stream", "cancelled": True}
            await asyncio.gather(original.read(), other.read())
    assert await wait_stats(mock_upstream, 0.5, streams_cancelled=1) < 0.5
    assert len(chunks_of(original.events)) < 100
    assert_failed_not_done(original.events)
    assert_failed_not_done(other.events)
    assert other.events == original.events
    again = await api.cancel(original.stream_id)
    assert again.status == 200
    assert again.json() == reply.json()
    replay = await api.resume(original.stream_id)
    assert replay.status == 200
    assert replay.events == original.events


async def test_cancel_of_a_finished_stream_is_200_and_it_still_replays(api: Api) -> None:
    original = await finished_stream(api)
    for _ in range(2):
        reply = await api.cancel(original.stream_id)
        assert reply.status == 200
        assert reply.json() == {"id": original.stream_id, "object": "stream", "cancelled": True}
    replay = await api.resume(original.stream_id)
    assert replay.events == original.events
    assert replay.events[-1].text == DONE


# --------------------------------------------------------------------------- Idempotency-Key


async def upstream_calls(mock: MockUpstream) -> int:
    return int((await mock.stats())["requests"])


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_idempotency_key_repeats_get_one_upstream_call(
    api: Api, mock_upstream: MockUpstream, streamed: bool
) -> None:
    body = CHAT if streamed else UNARY_CHAT
    slow = knobs(5, delay_ms=20)

    async def post(key: str, request_body: dict[str, Any] = body) -> Reply:
        return await api.request("POST", CHAT_PATH, body=request_body,
                                 headers={**slow, "Idempotency-Key": key})

    def same(a: Reply, b: Reply) -> bool:
        assert a.status == b.status == 200, (a.body, b.body)
        return a.events == b.events if streamed else a.body == b.body

    first = await post("key-1")
    assert same(first, await post("key-1"))
    assert await upstream_calls(mock_upstream) == 1
    concurrent = await asyncio.gather(post("key-2"), post("key-2"), post("key-2"))
    assert same(concurrent[0], concurrent[1])
    assert same(concurrent[0], concurrent[2])
    assert await upstream_calls(mock_upstream) == 2
    other_body = {**body, "messages": [{"role": "user", "content": "something else"}]}
    assert (await post("key-1", other_body)).error(422)["code"] == "idempotency_key_reused"
    assert (await post("key-3")).status == 200
    assert await upstream_calls(mock_upstream) == 3
    if streamed:
        assert first.events[-1].text == DONE
        assert text_of(first.events) == expected_text(5)
        assert first.stream_id != concurrent[0].stream_id


# --------------------------------------------------------------------------- Responses API


async def test_responses_retrieve_streams_after_a_sequence_number(
    openai_client: openai.AsyncOpenAI
) -> None:
    stream = await openai_client.responses.create(
        model="mock-gpt", input="tell me a story", stream=True, extra_headers=knobs(8, delay_ms=10))
    seen: list[Any] = []
    async with asyncio.timeout(IO_TIMEOUT_S):
        async for event in stream:
            seen.append(event)
            if event.sequence_number == 5:
                break
    await stream.close()
    assert seen[0].type == "response.created"
    response_id = seen[0].response.id
    resumed = await openai_client.responses.retrieve(response_id, stream=True, starting_after=5)
    async with asyncio.timeout(IO_TIMEOUT_S):
        rest = [event async for event in resumed]
    assert [e.sequence_number for e in rest] == list(range(6, 6 + len(rest)))
    assert rest[-1].type == "response.completed"
    assert rest[-1].response.id == response_id
    deltas = [e.delta for e in seen + rest if e.type == "response.output_text.delta"]
    assert "".join(deltas) == expected_text(8)
    again = await openai_client.responses.retrieve(response_id, stream=True, starting_after=0)
    async with asyncio.timeout(IO_TIMEOUT_S):
        assert [e.sequence_number async for e in again] == list(range(1, 6 + len(rest)))


async def test_responses_retrieve_of_an_id_the_gateway_lacks_passes_through(
    api: Api, mock_upstream: MockUpstream
) -> None:
    for query in ("?stream=true&starting_after=2", ""):
        reply = await api.request("GET", f"/v1/responses/resp_elsewhere{query}")
        assert reply.status == 200, reply.body
        echo = reply.json()
        assert (echo["method"], echo["path"]) == ("GET", "/v1/responses/resp_elsewhere")
        assert echo["query_string"] == query.removeprefix("?")
    assert (await mock_upstream.stats())["by_path"] == {"/v1/responses/resp_elsewhere": 2}


# --------------------------------------------------------------------------- errors before the first event


async def test_upstream_error_before_the_first_event_is_an_http_status(
    api: Api, mock_upstream: MockUpstream
) -> None:
    reply = await api.stream(headers={**knobs(5), "x-mock-status": "500"})
    assert reply.error(500)["type"] == "server_error"
    assert await upstream_calls(mock_upstream) >= 2, "not retried"
    assert reply.headers["x-should-retry"] == "false"  # the gateway already retried
    assert ratelimit_headers(reply.headers)
    stream_id = reply.headers.get("X-Stream-Id")
    if stream_id is not None:  # an id was given: resuming it answers the same failure
        resumed = await api.resume(stream_id)
        assert resumed.status == reply.status
        assert resumed.json() == reply.json()


# --------------------------------------------------------------------------- the SDK, unchanged


async def test_openai_sdk_streams_chat_and_completions_through_the_gateway(
    openai_client: openai.AsyncOpenAI
) -> None:
    chat = await openai_client.chat.completions.create(
        model="mock-gpt", messages=MESSAGES, stream=True, extra_headers=knobs(7))
    chat_text = "".join([c.choices[0].delta.content or "" async for c in chat])
    completion = await openai_client.completions.create(
        model="mock-gpt", prompt="tell me a story", stream=True, extra_headers=knobs(7))
    completion_text = "".join([c.choices[0].text async for c in completion])
    assert chat_text == completion_text == expected_text(7)
