"""``/v1/ws/stream`` driven by Node.js's ``ws`` package (``tests/node/relay_client.mjs``),
the library existing relay clients are built on: a session of two turns and a one-shot
request, as such a client sends them. Skipped only where ``node`` or the installed ``ws``
package is missing, and never under ``CI=true`` (``.ci/run`` installs both)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from scripts.mock_upstream import expected_text
from tests.conftest import CLIENT_KEY, RunningGateway

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "ws").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("node and tests/node/node_modules/ws are required under CI=true "
                        "(.ci/run installs them)")
        pytest.skip("node or the ws package is not installed (npm ci --prefix tests/node)")
    return node


async def test_node_ws_relay_client_session_and_one_shot(gateway: RunningGateway) -> None:
    node = node_or_skip()
    url = gateway.url.replace("http://", "ws://") + "/v1/ws/stream"
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_DIR / "relay_client.mjs"), url, CLIENT_KEY, "mock-gpt",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["close_code"] == 1000
    assert [a["text"] for a in result["answers"]] == [expected_text(4), expected_text(4),
                                                       expected_text(3)]
    assert all(a["started"] and a["error"] is None for a in result["answers"])
    assert [a["usage"]["completion_tokens"] for a in result["answers"]] == [4, 4, 3]
