"""The browser playground and status page (``/ui/``) in a real headless Chromium.

Debian's ``chromium`` (``/usr/bin/chromium``, or ``$SHEPHERD_CHROMIUM``) is driven by
Playwright for Python with ``executable_path`` (Playwright's own browser download is not
used). Without the browser or Playwright the tests are skipped, or fail when ``CI=true``.

The gateway and the mock run on the test's event loop (``tests/conftest.py``); the mock
answers deterministically (``expected_text``) at 25 ms per token, so an answer of 64 tokens
lasts long enough to cut its connection mid-way. Every page is checked for console errors
and Content Security Policy violations. Screenshots go to ``tests/artifacts/`` (or
``$SHEPHERD_UI_ARTIFACTS``); with ``SHEPHERD_UPDATE_SCREENSHOTS=1`` the README's copies in
``tests/screenshots/`` are rewritten too.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.ui_api import CONTENT_SECURITY_POLICY
from scripts.mock_upstream import MockConfig, expected_text
from tests.conftest import (
    CLIENT_KEY,
    MockUpstream,
    RunningGateway,
    StartGateway,
    base_config,
    in_process_mock,
    merge,
)
from tests.integration.conftest import free_port

try:
    from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the dev extra installs it
    async_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.timeout(90)

TESTS_DIR = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SHEPHERD_UI_ARTIFACTS", TESTS_DIR / "artifacts"))
SCREENSHOTS = TESTS_DIR / "screenshots"
CHROMIUM = os.environ.get("SHEPHERD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1440, "height": 900}
WAIT_MS = 15_000
CUT_TOKENS = 64
ADMIN_KEY = "sk-test-admin-key-9876543210"

#: Records CSP violations in the page (Chromium also logs them as console errors).
CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


def _missing_browser() -> str | None:
    if async_playwright is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    reason = _missing_browser()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (required in CI)")
        pytest.skip(reason)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def slow_mock(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> MockUpstream:
    """A mock answering at 25 ms per token, 64 tokens unless ``max_tokens`` says fewer."""
    return await in_process_mock(aiohttp_server, MockConfig(tokens=CUT_TOKENS, token_delay_ms=25.0))


@pytest.fixture
async def ui_gateway(start_gateway: StartGateway, slow_mock: MockUpstream) -> RunningGateway:
    return await start_gateway(base_config(slow_mock.base_url))


@dataclass
class UIPage:
    """A page with its console errors, uncaught exceptions and CSP violations collected."""

    page: Page
    errors: list[str] = field(default_factory=list)

    async def assert_clean(self, refused_ok: str | None = None) -> None:
        """No CSP violation and no console error; ``refused_ok``: a path prefix whose
        refusals are expected (Chromium logs every non-2xx fetch as a console error)."""
        violations = await self.page.evaluate("window.__cspViolations")
        assert violations == [], violations
        unexpected = [e for e in self.errors if not (
            refused_ok and e.startswith("console: Failed to load resource") and refused_ok in e)]
        assert unexpected == [], unexpected

    async def screenshot(self, name: str, readme_name: str | None = None) -> Path:
        path = ARTIFACTS / f"ui-{name}.png"
        await asyncio.to_thread(ARTIFACTS.mkdir, parents=True, exist_ok=True)
        await self.page.screenshot(path=str(path), full_page=True)
        if readme_name is not None and os.environ.get("SHEPHERD_UPDATE_SCREENSHOTS") == "1":
            await asyncio.to_thread(SCREENSHOTS.mkdir, exist_ok=True)
            await asyncio.to_thread(shutil.copyfile, path, SCREENSHOTS / readme_name)
        return path


async def open_page(browser: Browser, url: str) -> UIPage:
    context = await browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    await context.add_init_script(CSP_LISTENER)
    page = await context.new_page()
    ui = UIPage(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            ui.errors.append(f"console: {message.text} ({message.location.get('url')})")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: ui.errors.append(f"pageerror: {exc}"))
    response = await page.goto(url)
    assert response is not None
    assert response.status == 200
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    return ui


async def enter_key(ui: UIPage, key: str = CLIENT_KEY) -> None:
    await ui.page.fill("#key-input", key)
    await ui.page.click("#key-save")
    await expect(ui.page.locator("#key-state")).to_have_text(f"key {key[:3]}…{key[-4:]}")


async def start_playground(browser: Browser, gateway: RunningGateway, transport: str,
                           max_tokens: int) -> UIPage:
    ui = await open_page(browser, gateway.url + "/ui/")
    page = ui.page
    await enter_key(ui)
    await expect(page.locator("#model option[value='mock-gpt']")).to_have_count(1, timeout=WAIT_MS)
    await page.select_option("#model", "mock-gpt")
    await page.check(f"#transport-{transport}", force=True)  # the radio is visually hidden
    await page.fill("#max-tokens", str(max_tokens))
    await page.fill("#prompt", "Say something deterministic.")
    await page.keyboard.press("Enter")
    return ui


async def last_answer(page: Page) -> str:
    text = await page.locator(".msg.assistant .body").last.text_content()
    assert text is not None
    return text


async def wait_done(page: Page) -> None:
    await expect(page.locator("#answer-state")).to_have_attribute("data-state", "done", timeout=WAIT_MS)


async def wait_for_seq(page: Page, seq: int) -> None:
    """Until the page has received event ``seq`` (polled from here: the page's CSP forbids
    the ``eval`` that ``page.wait_for_function`` would need)."""
    async with asyncio.timeout(WAIT_MS / 1000):
        while True:
            shown = await page.text_content("#stat-seq") or ""
            if shown.isdigit() and int(shown) >= seq:
                return
            await asyncio.sleep(0.02)


async def chat_requests(mock: MockUpstream) -> int:
    stats = await mock.stats()
    return int(stats["by_path"].get("/v1/chat/completions", 0))


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_playground_streams_the_answer(browser: Browser, ui_gateway: RunningGateway,
                                             transport: str) -> None:
    ui = await start_playground(browser, ui_gateway, transport, max_tokens=12)
    page = ui.page
    await wait_done(page)
    assert await last_answer(page) == expected_text(12)
    await expect(page.locator("#stat-tokens")).to_have_text("12")
    await expect(page.locator("#stat-transport")).to_have_text("WebSocket" if transport == "ws" else "SSE")
    assert (await page.text_content("#stat-stream") or "").startswith("gs_")
    assert (await page.text_content("#stat-ttft") or "").endswith("ms")
    assert float(await page.text_content("#stat-rate") or "nan") > 0
    await expect(page.locator("#continuity")).to_have_attribute("data-state", "ok")
    # a second turn sends the conversation so far
    await page.fill("#prompt", "And again.")
    await page.keyboard.press("Enter")
    await expect(page.locator(".msg.assistant")).to_have_count(2)
    await wait_done(page)
    assert await last_answer(page) == expected_text(12)
    await ui.screenshot(f"playground-{transport}")
    await ui.assert_clean()


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_cut_and_resume_loses_and_repeats_nothing(
        browser: Browser, ui_gateway: RunningGateway, slow_mock: MockUpstream, transport: str) -> None:
    ui = await start_playground(browser, ui_gateway, transport, max_tokens=CUT_TOKENS)
    page = ui.page
    await wait_for_seq(page, 5)
    await expect(page.locator("#cut")).to_be_enabled()
    await page.click("#cut")
    await expect(page.locator("#continuity")).to_contain_text("Connection cut after seq")
    await wait_done(page)
    assert await last_answer(page) == expected_text(CUT_TOKENS)
    continuity = page.locator("#continuity")
    await expect(continuity).to_have_attribute("data-state", "ok")
    text = await continuity.text_content() or ""
    assert "no gaps, no duplicates" in text, text
    assert "resumed after seq" in text, text
    await expect(page.locator("#stat-tokens")).to_have_text(str(CUT_TOKENS))
    assert await chat_requests(slow_mock) == 1  # the same generation, not a second call
    await ui.screenshot(f"playground-cut-{transport}", "playground.png" if transport == "sse" else None)
    await ui.assert_clean()


def status_config(mock_url: str) -> dict[str, Any]:
    """Two upstreams: the mock, and one on a closed port that the probes mark unhealthy."""
    down = {
        "base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": "sk-down", "models": ["down-model"],
        "timeouts": {"connect": "1s", "first_byte": "2s", "read_gap": "2s"},
        "health_check": {"enabled": True, "interval": "100ms", "timeout": "500ms", "unhealthy_threshold": 1},
    }
    return merge(base_config(mock_url), {"upstreams": {"down": down}})


async def traffic(gateway: RunningGateway, seconds: float) -> None:
    """Chat requests, a few at a time, for ``seconds``: something for the charts to show."""
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    async with aiohttp.ClientSession(base_url=gateway.url,
                                     headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as session:

        async def one(stream: bool) -> None:
            async with session.post("/v1/chat/completions", json={**body, "stream": stream}) as response:
                assert response.status == 200
                await response.read()

        wave = 0
        while loop.time() < deadline:  # 2 to 6 at a time: a load that varies
            wave += 1
            await asyncio.gather(*(one(i % 2 == 0) for i in range(2 + wave % 5)))
            await asyncio.sleep(0.05)


#: The status page's upstream table as {upstream: {field: text}} (evaluated through CDP,
#: which the page's CSP does not govern).
UPSTREAM_CELLS = """() => Object.fromEntries(
  [...document.querySelectorAll('#upstreams tr[data-upstream]')].map((row) => [
    row.dataset.upstream,
    Object.fromEntries([...row.querySelectorAll('td[data-field]')]
      .map((cell) => [cell.dataset.field, cell.textContent]))]))"""


async def page_matches_readyz(page: Page, gateway: RunningGateway) -> tuple[bool, Any, Any]:
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/readyz") as response:
        readyz = await response.json()
    shown = await page.evaluate(UPSTREAM_CELLS)
    expected = {
        name: {"state": u["state"], "in_flight": str(u["in_flight"]), "queued": str(u["queued"]),
               "pool_in_use": str(u["pool"]["in_use"]), "pool_idle": str(u["pool"]["idle"])}
        for name, u in readyz["upstreams"].items()
    }
    subset = {name: {k: v for k, v in cells.items() if k in expected.get(name, {})}
              for name, cells in shown.items()}
    status = await page.text_content("#tile-status")
    return subset == expected and status == readyz["status"], readyz, shown


async def test_status_page_shows_what_readyz_reports(
        browser: Browser, start_gateway: StartGateway, slow_mock: MockUpstream) -> None:
    gateway = await start_gateway(status_config(slow_mock.base_url))
    ui = await open_page(browser, gateway.url + "/ui/status.html")
    page = ui.page
    await traffic(gateway, 4.0)
    await expect(page.locator("#upstreams tr[data-upstream='down'] [data-field='state']")).to_have_text(
        "unhealthy", timeout=WAIT_MS)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (result := await page_matches_readyz(page, gateway))[0]:
        assert loop.time() < deadline, f"page {result[2]} vs /readyz {result[1]}"
        await asyncio.sleep(0.2)
    readyz = result[1]
    assert readyz["upstreams"]["mock"]["pool"]["idle"] >= 1  # the traffic left pooled connections
    await expect(page.locator("#tile-upstreams")).to_have_text("1 / 2")
    await expect(page.locator("#tile-rps")).not_to_have_text("—")
    await expect(page.locator("#tile-p50")).to_contain_text("ms")
    assert await page.locator("#chart-rps canvas").count() == 1
    assert await page.locator("#chart-latency canvas").count() == 1
    # no key: every admin panel says it needs one
    for panel in ("admin-streams", "admin-keys", "admin-usage-key", "admin-usage-model"):
        await expect(page.locator(f"#{panel}")).to_have_attribute("data-state", "needs-key")
    # a virtual key never opens the admin API: refused, or not served by this gateway
    await enter_key(ui)
    for panel in ("admin-streams", "admin-keys", "admin-usage-key", "admin-usage-model"):
        await expect(page.locator(f"#{panel}")).to_have_attribute(
            "data-state", re.compile("needs-key|unavailable"))
        await expect(page.locator(f"#{panel} .notice")).to_contain_text(
            re.compile("Needs an admin key|Not available"))
    await ui.screenshot("status-no-admin")
    await ui.assert_clean(refused_ok="/admin/")


async def test_status_page_shows_admin_data_with_an_admin_key(
        browser: Browser, start_gateway: StartGateway, slow_mock: MockUpstream, tmp_path: Path) -> None:
    config = merge(status_config(slow_mock.base_url), {
        "admin": {"keys": [{"name": "ops", "key": ADMIN_KEY}]},
        "ledger": {"enabled": True, "url": f"sqlite:///{tmp_path / 'usage.db'}", "flush_interval": "100ms"},
    })
    gateway = await start_gateway(config)
    await traffic(gateway, 3.0)
    ui = await open_page(browser, gateway.url + "/ui/status.html")
    page = ui.page
    await enter_key(ui, ADMIN_KEY)
    await traffic(gateway, 10.0)
    for panel, name in (("admin-usage-key", "tester"), ("admin-usage-model", "mock-gpt")):
        await expect(page.locator(f"#{panel}")).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
        await expect(page.locator(f"#{panel} table")).to_contain_text(name, timeout=WAIT_MS)
    for panel in ("admin-streams", "admin-keys"):  # "unavailable" until the gateway serves them
        await expect(page.locator(f"#{panel}")).to_have_attribute("data-state", re.compile("ok|unavailable"))
    await expect(page.locator("#upstreams tr[data-upstream='down'] [data-field='state']")).to_have_text(
        "unhealthy", timeout=WAIT_MS)
    await expect(page.locator("#tile-p50")).to_contain_text("ms")
    await ui.screenshot("status", "status.png")
    await ui.assert_clean(refused_ok="/admin/")


async def test_ui_files_need_no_key_and_carry_the_csp(ui_gateway: RunningGateway) -> None:
    files = {
        "/ui/": "text/html", "/ui/playground.html": "text/html", "/ui/status.html": "text/html",
        "/ui/app.css": "text/css", "/ui/playground.js": "text/javascript", "/ui/status.js": "text/javascript",
        "/ui/vendor/uPlot.esm.js": "text/javascript", "/ui/vendor/uPlot.min.css": "text/css",
        "/ui/favicon.svg": "image/svg+xml",
    }
    async with aiohttp.ClientSession(base_url=ui_gateway.url) as session:
        async with session.get("/ui", allow_redirects=False) as response:
            assert response.status == 308
            assert response.headers["Location"] == "/ui/"
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        for path, content_type in files.items():
            async with session.get(path) as response:
                assert response.status == 200, path
                assert response.content_type == content_type, path
                assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert response.headers["Cache-Control"] == "no-cache"
        for path in ("/ui/missing.js", "/ui/..%2Fui_api.py", "/ui/vendor/uPlot.LICENSE", "/ui/.hidden"):
            async with session.get(URL(ui_gateway.url + path, encoded=True)) as response:
                assert response.status == 404, path
                assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


#: Feeds the page's SSE parser an event stream cut at every awkward place (CR|LF split across
#: reads, comments, multi-line data) and parses a Prometheus text with escaped labels.
MODULE_CHECKS = """async () => {
  const { SSEParser, seqOf, streamIdOf } = await import('/ui/sse.js');
  const { parsePrometheus, histogram, quantile, sum } = await import('/ui/metrics.js');
  const parser = new SSEParser();
  const events = [];
  for (const piece of [': keep-alive\\r', '\\nid: gs_ab:1\\r', '\\ndata: {"a":', '1}\\r\\n\\r', '\\n',
                       'id: gs_ab:2\\ndata: x\\ndata: y\\n\\n', 'data: [DONE]\\n', '\\n']) {
    events.push(...parser.feed(piece));
  }
  const text = [
    '# HELP shepherd_requests_total Requests', '# TYPE shepherd_requests_total counter',
    'shepherd_requests_total{endpoint="/v1/chat/completions",key="a \\\\"q\\\\"",status="200"} 3',
    'shepherd_requests_total{endpoint="/readyz",key="-",status="200"} 40',
    'lat_bucket{le="0.1"} 2', 'lat_bucket{le="0.5"} 4', 'lat_bucket{le="+Inf"} 4',
    'lat_sum 0.8', 'lat_count 4',
  ].join('\\n');
  const samples = parsePrometheus(text);
  return {
    events, seqs: events.map((e) => seqOf(e.id)), stream: streamIdOf(events[0].id),
    key: samples.get('shepherd_requests_total')[0].labels.key,
    api: sum(samples, 'shepherd_requests_total', (l) => l.endpoint.startsWith('/v1')),
    p50: quantile(histogram(samples, 'lat'), 0.5), p75: quantile(histogram(samples, 'lat'), 0.75),
  };
}"""


async def test_sse_and_prometheus_parsers(browser: Browser, ui_gateway: RunningGateway) -> None:
    ui = await open_page(browser, ui_gateway.url + "/ui/")
    result = await ui.page.evaluate(MODULE_CHECKS)
    assert result["events"] == [
        {"id": "gs_ab:1", "event": "message", "data": '{"a":1}'},
        {"id": "gs_ab:2", "event": "message", "data": "x\ny"},
        {"id": "gs_ab:2", "event": "message", "data": "[DONE]"},  # the last id is kept (WHATWG)
    ]
    assert result["seqs"] == [1, 2, 2]
    assert result["stream"] == "gs_ab"
    assert result["key"] == 'a "q"'
    assert result["api"] == 3
    assert result["p50"] == pytest.approx(0.1)
    assert result["p75"] == pytest.approx(0.3)
    await ui.assert_clean()
