"""proxy/websocket.py's sans-socket parts: the frames ``send_many`` writes are exactly the
frames aiohttp's own writer sends (RFC 6455 §5.2), and SSE frames decode back to events."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.writer import WebSocketWriter

from proxy.sse import encode_event
from proxy.websocket import StreamEvent, stream_batches, text_frame, usage_of


class Transport:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.write(line)

    def is_closing(self) -> bool:
        return False


class Protocol:
    _paused = False


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
async def test_text_frame_is_what_aiohttps_writer_sends(size: int) -> None:
    payload = b"x" * size
    transport = Transport()
    writer = WebSocketWriter(Protocol(), transport)  # type: ignore[arg-type]
    await writer.send_frame(payload, WSMsgType.TEXT)
    assert text_frame(payload) == bytes(transport.written)


class Reader:
    """A stream cursor handing out prepared batches (``[]``: silence)."""

    def __init__(self, batches: list[list[bytes]]) -> None:
        self.batches = batches
        self.after_seq = 0
        self.stream_id = "gs_" + "0" * 24

    async def next(self, timeout_s: float) -> list[bytes] | None:
        await asyncio.sleep(0)
        if not self.batches:
            return None
        batch = self.batches.pop(0)
        self.after_seq += len(batch)
        return batch

    def close(self) -> None:
        pass


async def test_stream_batches_number_events_and_skip_silence() -> None:
    reader = Reader([[encode_event(b'{"a":1}'), encode_event(b'{"b":2}', event=b"x")], [],
                     [encode_event(b"[DONE]")]])
    batches: list[list[StreamEvent]] = [b async for b in stream_batches(reader, 1.0)]  # type: ignore[arg-type]
    assert batches == [[StreamEvent(1, None, b'{"a":1}'), StreamEvent(2, b"x", b'{"b":2}')],
                       [StreamEvent(3, None, b"[DONE]")]]
    assert batches[1][0].done


@pytest.mark.parametrize(("data", "usage"), [
    (b'{"choices":[],"usage":{"prompt_tokens":1}}', {"prompt_tokens": 1}),
    (b'{"type":"response.completed","response":{"usage":{"input_tokens":2}}}', {"input_tokens": 2}),
    (b'{"choices":[{"delta":{"content":"usage"}}]}', None),
    (b'{"usage":null}', None),
])
def test_usage_of(data: bytes, usage: Any) -> None:
    assert usage_of(StreamEvent(1, None, data)) == usage
