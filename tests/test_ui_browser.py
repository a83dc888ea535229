"""The web UI in a real browser: Debian's Chromium, driven by Playwright, in front of a real swapper
on the shipped config (real llama-server children from ``python -m swapper.demo setup``).

Chromium comes from Debian (``apt-get install chromium``; ``.ci/run`` installs it), never from a
browser download: Playwright is given its ``executable_path``. Without it (or the demo models)
the module is skipped, except under CI (``CI`` set), where that is a failure. It runs once: CI's
second pass on asyncio's own loop (``SWAPPER_TEST_LOOP=asyncio``) skips it.

Every page is saved as a screenshot, at 1280x800 and at phone width (390x844), under
``SWAPPER_UI_SCREENSHOTS`` when set, else a pytest temporary directory (printed with ``-s``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.realstack import WAV, SwapperProcess, demo_missing, derived_config, running_swapper, wait_for

CHROMIUM = os.environ.get("SWAPPER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PAGES = ("models", "logs", "activity", "playground", "status")
MODELS = ("chat-a", "chat-b", "embed", "whisper")
WAIT_MS = 30_000  # a guard against a page that never updates, not a timing assertion
UNLOAD_TIMEOUT = 2.0


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return demo_missing()


MISSING = _missing()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if os.environ.get("SWAPPER_TEST_LOOP") == "asyncio":
        # CI's second run, for the in-process tests: these drive a swapper process (on the
        # CLI's own loop either way), so a second run would test nothing new.
        pytest.skip("the browser tests run once, with the default test loop")
    if MISSING is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests cannot run in CI: {MISSING}")
        pytest.skip(MISSING)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # launch() gives every run a fresh profile of its own.
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("SWAPPER_UI_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("ui-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def swapper_proc(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwapperProcess]:
    workdir = tmp_path_factory.mktemp("ui")
    config = derived_config(workdir / "models.yaml", unloadTimeout=UNLOAD_TIMEOUT)
    with running_swapper(config, workdir / "swapper.log") as stack:
        yield stack


@pytest.fixture
def stack(swapper_proc: SwapperProcess) -> Iterator[SwapperProcess]:
    """The module's swapper, left with nothing loaded after the test."""
    yield swapper_proc
    swapper_proc.unload()
    assert swapper_proc.server_children() == [], swapper_proc.log_tail()


def open_page(browser: Any, viewport: dict[str, int]) -> tuple[Any, Any, list[str]]:
    """A fresh context (its own storage) and page; JavaScript errors are collected in the list."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return context, page, errors


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context, page, errors = open_page(browser, WIDE)
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def card(page: Any, model: str) -> Any:
    return page.locator(f'article.card[data-model="{model}"]')


def goto(page: Any, url: str, name: str) -> None:
    page.goto(f"{url}/ui/#/{name}")
    page.locator(f'main[data-page="{name}"]').wait_for()
    page.locator("#conn.live").wait_for()  # /api/events is streaming


# ---- the pages ----


def test_models_page_shows_every_model_and_its_state(stack: SwapperProcess, page: Any, shots: Path) -> None:
    from playwright.sync_api import expect

    page.goto(stack.url + "/")  # a browser's GET / lands on the UI
    assert page.url == stack.url + "/ui/"
    for model in MODELS:
        expect(card(page, model).locator('[data-role="state"]')).to_have_text("stopped")
    expect(card(page, "chat-a")).to_contain_text("Tiny chat A")
    expect(card(page, "chat-a")).to_contain_text("gpt-4o-mini")  # its alias
    expect(card(page, "embed")).to_contain_text("text-embedding-3-small")
    page.screenshot(path=shots / "models.png", full_page=True)


def test_load_turns_ready_live_and_unload_stops_it(stack: SwapperProcess, page: Any, shots: Path) -> None:
    from playwright.sync_api import expect

    goto(page, stack.url, "models")
    page.evaluate("window.notReloaded = true")
    chat_b = card(page, "chat-b")
    chat_b.locator("button.load").click()
    expect(chat_b.locator('[data-role="state"]')).to_have_text("ready")
    assert stack.states() == {"chat-b": "ready"}  # a real child started
    [entry] = stack.running()
    expect(chat_b.locator('[data-role="pid"]')).to_have_text(str(entry["pid"]))
    page.screenshot(path=shots / "models-loaded.png", full_page=True)
    chat_b.locator("button.unload").click()
    expect(chat_b.locator('[data-role="state"]')).to_have_text("stopped")
    wait_for(lambda: stack.server_children() == [], 10, "chat-b's llama-server to exit")
    assert stack.states() == {}
    assert page.evaluate("window.notReloaded") is True  # all of it live, no page load


def test_logs_page_shows_a_line_a_request_caused(stack: SwapperProcess, page: Any, shots: Path) -> None:
    from playwright.sync_api import expect

    goto(page, stack.url, "logs")
    page.select_option("#log-source", "chat-a")
    # 37 tokens: llama-server logs "eval time = ... / 37 tokens" for this request alone.
    stack.json("POST", "/v1/chat/completions", {"model": "chat-a", "messages": [], "max_tokens": 37})
    lines = page.locator("#log-lines")
    expect(lines).to_contain_text(re.compile(r"eval time =.*/\s+37 tokens"))
    page.fill("#log-filter", "37 tokens")
    shown = lines.inner_text().strip().splitlines()
    assert shown and all("37 tokens" in line for line in shown), shown
    page.fill("#log-filter", "")
    page.screenshot(path=shots / "logs.png")


def test_playground_streams_a_reply_and_activity_lists_it(
    stack: SwapperProcess, page: Any, shots: Path
) -> None:
    from playwright.sync_api import expect

    goto(page, stack.url, "playground")
    page.select_option("#chat-model", "chat-a")
    page.fill("#chat-max-tokens", "24")
    # Count the pieces the reply grows by, as the page receives them.
    page.evaluate(
        """() => {
          window.replyPieces = 0;
          new MutationObserver((changes) => {
            for (const c of changes) {
              const reply = c.target.dataset && c.target.dataset.role === 'reply';
              if (reply) window.replyPieces += c.addedNodes.length;
            }
          }).observe(document.getElementById('chat-log'), { childList: true, subtree: true });
        }"""
    )
    page.fill("#chat-prompt", "Tell me a story.")
    page.click("#chat-send")
    reply = page.locator('[data-role="reply"][data-done="true"]')
    reply.wait_for()
    # The tiny model always runs to max_tokens: 24 deltas, each added to the page as it came.
    assert reply.get_attribute("data-chunks") == "24"
    assert page.evaluate("window.replyPieces") == 24
    assert reply.inner_text().strip()
    expect(page.locator(".stats")).to_contain_text("24 tokens")  # from llama-server's timings
    page.screenshot(path=shots / "playground.png")

    goto(page, stack.url, "activity")
    row = page.locator('#activity-table tr[data-model="chat-a"]').first
    expect(row.locator('[data-role="completion"]')).to_have_text("24")
    entry = stack.json("GET", "/api/metrics")[-1]  # the newest: this chat (the first row)
    assert entry["model"] == "chat-a"
    assert entry["req_path"] == "/v1/chat/completions" and entry["resp_content_type"] == "text/event-stream"
    tokens = entry["tokens"]
    assert tokens["output_tokens"] == 24 and tokens["input_tokens"] > 0 and tokens["tokens_per_second"] > 0
    expect(row.locator('[data-role="prompt"]')).to_have_text(str(tokens["input_tokens"]))
    expect(row.locator('[data-role="speed"]')).to_have_text(f"{tokens['tokens_per_second']:.1f}")
    page.screenshot(path=shots / "activity.png")


def test_playground_embeds_and_transcribes(stack: SwapperProcess, page: Any, shots: Path) -> None:
    from playwright.sync_api import expect

    goto(page, stack.url, "playground")
    page.get_by_role("tab", name="Embeddings").click()
    page.select_option("#emb-model", "embed")
    page.get_by_role("button", name="Embed").click()
    expect(page.locator("#emb-out")).to_contain_text(re.compile(r"^\d+ dimensions: \[-?\d"))
    page.get_by_role("tab", name="Transcription").click()
    expect(page.locator("#stt-model")).to_have_value("whisper")  # the audio model is the default
    page.set_input_files("#stt-file", str(WAV))
    page.get_by_role("button", name="Transcribe").click()
    out = page.locator("#stt-out")
    expect(out).not_to_have_text("Transcribing…", timeout=90_000)  # a slow tiny whisper on 2 cores
    assert not out.inner_text().startswith("Error"), out.inner_text()
    entry = stack.json("GET", "/api/metrics")[-1]
    assert (entry["req_path"], entry["model"], entry["resp_status_code"]) == (
        "/v1/audio/transcriptions",
        "whisper",
        200,
    )
    page.screenshot(path=shots / "playground-transcription.png")


def test_status_page_shows_the_planner_and_samples(stack: SwapperProcess, page: Any, shots: Path) -> None:
    from playwright.sync_api import expect

    goto(page, stack.url, "status")
    expect(page.locator("#planner-use")).to_have_text("group")
    expect(page.locator("#status")).to_contain_text("chat-a, chat-b, embed, whisper")  # the (default) group
    expect(page.locator("#status")).to_contain_text("version")
    page.screenshot(path=shots / "status.png", full_page=True)


@pytest.mark.parametrize("viewport", [WIDE, PHONE], ids=["1280x800", "phone"])
def test_every_page_fits_the_screen(
    stack: SwapperProcess, browser: Any, shots: Path, viewport: dict[str, int]
) -> None:
    context, page, errors = open_page(browser, viewport)
    try:
        for name in PAGES:
            goto(page, stack.url, name)
            page.locator("main h1").wait_for()
            # Wide tables scroll inside their own box; the page itself never scrolls sideways.
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name} is {overflow}px wider than a {viewport['width']}px screen"
            page.screenshot(path=shots / f"{name}-{viewport['width']}.png")
    finally:
        context.close()
    assert errors == []


def test_an_api_key_is_asked_once_and_kept(browser: Any, tmp_path: Path, shots: Path) -> None:
    from playwright.sync_api import expect

    config = derived_config(tmp_path / "models.yaml", apiKeys=["ui-test-key"])
    with running_swapper(config, tmp_path / "swapper.log") as keyed:
        context, page, errors = open_page(browser, WIDE)
        try:
            page.goto(keyed.url + "/")
            dialog = page.locator("#key-dialog")
            expect(dialog).to_be_visible()
            expect(dialog).to_contain_text("needs an API key")
            page.screenshot(path=shots / "api-key.png")
            page.fill("#key-dialog input", "wrong")
            page.click("#key-dialog button[value=ok]")
            expect(dialog).to_contain_text("refused")
            page.fill("#key-dialog input", "ui-test-key")
            page.click("#key-dialog button[value=ok]")
            expect(card(page, "chat-a").locator('[data-role="state"]')).to_have_text("stopped")
            page.reload()  # the key is in local storage: no question this time
            page.locator("#conn.live").wait_for()
            expect(card(page, "chat-a")).to_be_visible()
            expect(dialog).not_to_be_visible()
        finally:
            context.close()
        assert errors == []


def test_an_external_service_shows_as_pinned_and_cannot_be_unloaded(
    browser: Any, tmp_path: Path, shots: Path
) -> None:
    """A service swapper does not run (issue 21): its card says so, with its health, and its
    Unload button is off (swapper never stops a pinned service)."""
    import subprocess

    import yaml
    from playwright.sync_api import expect

    from tests.conftest import _fake_server_cmd, _free_port

    port = _free_port()
    service = subprocess.Popen(
        _fake_server_cmd(port, "--model-name", "tts"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        config = derived_config(tmp_path / "models.yaml")
        data = yaml.safe_load(config.read_text())
        data["models"]["tts"] = {"name": "TTS (Docker)", "proxy": f"http://127.0.0.1:{port}"}
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        with running_swapper(config, tmp_path / "swapper.log") as stack:
            context, page, errors = open_page(browser, WIDE)
            try:
                goto(page, stack.url, "models")
                tts = card(page, "tts")
                expect(tts.locator('[data-role="state"]')).to_have_text("ready")  # adopted at start-up
                expect(tts.locator('[data-role="service"]')).to_have_text("external, pinned · healthy")
                expect(tts.locator("button.unload")).to_be_disabled()
                expect(
                    card(page, "chat-a").locator("button.unload")
                ).to_be_disabled()  # stopped: nothing to unload
                page.screenshot(path=shots / "models-service.png", full_page=True)
            finally:
                context.close()
            assert errors == []
        assert service.poll() is None  # swapper left it running
    finally:
        service.kill()
        service.wait()
