"""openai-python through ``proxy.client.AsyncResumableTransport`` against the real gateway,
with a ``ChaosRelay`` cutting the client's connection at any byte (DESIGN §4 "Reconnection").

Hypothesis draws the cut position and how the connection dies (RST or FIN). What the SDK's
iterator sees must be the whole answer, and the bytes the transport hands to the SDK must be
the stream's own bytes exactly (compared with the stream's full replay from the gateway's
log), for chat, completions and responses streams — resumed on the same instance, and on the
other of two instances sharing Redis.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.client import AsyncResumableTransport
from scripts.mock_upstream import expected_text
from tests.chaos import ChaosRelay
from tests.conftest import CLIENT_KEY, MockUpstream, RunningGateway, StartGateway, base_config, merge
from tests.integration.conftest import RedisServer, StartGatewayProcess

TOKENS = 24
MOCK_HEADERS = {"x-mock-tokens": str(TOKENS), "x-mock-token-delay-ms": "2"}
CUTS = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
#: Response headers and the first events of each stream are well over this many bytes; the
#: cut is drawn beyond it (a cut inside the headers leaves no stream id to resume).
HEAD_BYTES = 600
#: Each answer is longer than this on the wire (24 tokens); the cut is drawn before it.
MIN_WIRE_BYTES = 3000


@dataclass(frozen=True)
class Case:
    """One endpoint: how to ask for a stream and how to read its text from the SDK."""

    name: str
    path: str


CHAT = Case("chat", "/chat/completions")
COMPLETIONS = Case("completions", "/completions")
RESPONSES = Case("responses", "/responses")


async def stream_text(client: openai.AsyncOpenAI, case: Case) -> tuple[str, str | None]:
    """Ask for ``case``'s stream and return (the text the SDK's iterator yielded, the
    Responses id or ``None``)."""
    if case is CHAT:
        chat = await client.chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "hi"}], stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chat if c.choices]), None
    if case is COMPLETIONS:
        completion = await client.completions.create(model="mock-gpt", prompt="hi", stream=True)
        return "".join([c.choices[0].text async for c in completion if c.choices]), None
    events = [e async for e in await client.responses.create(model="mock-gpt", input="hi", stream=True)]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.completed"
    return text, events[0].response.id  # type: ignore[union-attr]


class Recorder(httpx.AsyncBaseTransport):
    """Keeps the body bytes the resumable transport hands to the SDK, and the stream id."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.body = bytearray()
        self.stream_id: str | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.stream_id = response.headers.get("x-stream-id")
        chunks = response.stream

        async def recorded() -> Any:
            async for chunk in chunks:  # type: ignore[union-attr]
                self.body += chunk
                yield chunk

        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_Stream(recorded(), response), request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chunks: Any, response: httpx.Response) -> None:
        self._chunks = chunks
        self._response = response

    async def __aiter__(self) -> Any:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


async def replay(url: str, stream_id: str) -> bytes:
    """The whole stream from the gateway's log (``GET /v1/streams/{id}``)."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as client:
        response = await client.get(f"{url}/v1/streams/{stream_id}")
        assert response.status_code == 200
        return response.content


async def cut_run(relay: ChaosRelay, case: Case, cut_after: int
                  ) -> tuple[str, Recorder, AsyncResumableTransport]:
    """One stream through the relay, the first connection cut after ``cut_after`` bytes."""
    transport = AsyncResumableTransport(base_delay_s=0.001, max_delay_s=0.01)
    recorder = Recorder(transport)
    relay.cut_after_bytes = [cut_after, None]
    async with openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key=CLIENT_KEY, max_retries=0,
                                  default_headers=MOCK_HEADERS,
                                  http_client=httpx.AsyncClient(transport=recorder)) as client:
        async with asyncio.timeout(20):
            text, _ = await stream_text(client, case)
    return text, recorder, transport


def check_whole(text: str, case: Case, recorder: Recorder, transport: AsyncResumableTransport,
                whole: bytes, cut_after: int) -> None:
    assert text == expected_text(TOKENS), (case.name, cut_after, transport)
    assert bytes(recorder.body) == whole, (case.name, cut_after)
    assert transport.stats.resumes >= 1, transport


cases = st.sampled_from([CHAT, COMPLETIONS, RESPONSES])
cut_positions = st.integers(HEAD_BYTES, MIN_WIRE_BYTES)
cut_modes = st.sampled_from(["reset", "close"])


@CUTS
@given(case=cases, cut_after=cut_positions, mode=cut_modes)
async def test_the_sdk_gets_every_stream_whole_across_a_cut(
        gateway: RunningGateway, case: Case, cut_after: int, mode: str) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    async with ChaosRelay(port, cut_mode=mode) as relay:  # type: ignore[arg-type]
        text, recorder, transport = await cut_run(relay, case, cut_after)
    assert recorder.stream_id is not None
    whole = await replay(gateway.url, recorder.stream_id)
    check_whole(text, case, recorder, transport, whole, cut_after)


async def test_an_uncut_stream_is_not_resumed(gateway: RunningGateway) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    async with ChaosRelay(port) as relay:
        text, recorder, transport = await cut_run(relay, CHAT, 10**9)
    assert text == expected_text(TOKENS)
    assert transport.stats.resumes == 0
    assert recorder.stream_id is not None
    assert bytes(recorder.body) == await replay(gateway.url, recorder.stream_id)


async def test_many_streams_cut_at_once_all_come_back_whole(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    """Several concurrent SDK streams, each cut, each resumed: one upstream call apiece."""
    gateway = await start_gateway()
    port = int(gateway.url.rsplit(":", 1)[1])
    async with ChaosRelay(port, cut_after_bytes=lambda i: 900 + 97 * i) as relay:
        transport = AsyncResumableTransport(base_delay_s=0.001, max_delay_s=0.01)
        async with openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key=CLIENT_KEY, max_retries=0,
                                      default_headers=MOCK_HEADERS,
                                      http_client=httpx.AsyncClient(transport=transport)) as client:
            texts = await asyncio.gather(*(stream_text(client, CHAT) for _ in range(8)))
    assert [text for text, _ in texts] == [expected_text(TOKENS)] * 8
    assert transport.stats.resumes >= 8
    assert (await mock_upstream.stats())["requests"] == 8


@CUTS
@given(case=cases, cut_after=cut_positions)
async def test_the_sdk_resumes_on_the_other_instance(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess, case: Case, cut_after: int) -> None:
    """The first connection goes to A and is cut; the transport's resume lands on B,
    which serves the rest of A's stream from Redis."""
    a, b = await _shared_pair(mock_upstream, redis_server, gateway_process)
    async with ChaosRelay(a.port, later_port=b.port) as relay:
        text, recorder, transport = await cut_run(relay, case, cut_after)
    assert [conn.target_port for conn in relay.history] == [a.port, b.port]
    assert recorder.stream_id is not None
    whole = await replay(b.url, recorder.stream_id)
    check_whole(text, case, recorder, transport, whole, cut_after)


_pairs: dict[tuple[int, int], Any] = {}


async def _shared_pair(mock: MockUpstream, redis: RedisServer, start: StartGatewayProcess) -> Any:
    """Two gateway processes sharing ``redis``, started once per test (Hypothesis runs its
    examples inside one test, on the same fixtures)."""
    key = (id(start), redis.port)
    if key not in _pairs:
        config = merge(base_config(mock.base_url), {
            "state": {"backend": "redis", "redis_url": redis.url, "redis_timeout": "1s"},
            "server": {"access_log": False}})
        _pairs.clear()
        _pairs[key] = await asyncio.gather(start(config), start(config))
    return _pairs[key]
