"""Smoke test of the fixtures: the SDK streams a chat answer through the gateway."""

import openai

from scripts.mock_upstream import expected_text


async def test_chat_stream_reaches_sdk(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == expected_text(8)
