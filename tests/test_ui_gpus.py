"""The web UI's status page with two GPUs: each GPU's row in the ledger, with its models.

In-process swapper (memory planner, fake upstream children) behind the fake NVML of
``tests/fake_nvml.py``, and Debian's Chromium driven by Playwright's async API in the same event
loop. Skipped without Playwright or Chromium, like ``tests/test_ui_browser.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swapper.app.server import make_app
from tests import fake_nvml
from tests.test_gpus_real import gpu_config
from tests.test_memory_real import ClientFactory, chat, runloop, wait_until
from tests.test_ui_browser import ARGS, CHROMIUM


def _missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None if os.path.exists(CHROMIUM) else f"no Chromium at {CHROMIUM}"


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


async def test_status_page_lists_each_gpu_with_its_models(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.async_api import async_playwright, expect

    fake_nvml.install(monkeypatch, gpus=2, total_mib=1000)
    cfg = gpu_config(
        tmp_path / "fp.json",
        {
            "a": ("--vram-mib 300 --vram-gpus 0", "memory: {estimate: 300MiB, devices: [0]}"),
            "b": ("--vram-mib 400 --vram-gpus 1", "memory: {estimate: 400MiB, devices: [1]}"),
        },
        memory="gpus:\n  1: {reserve: 100MiB}",
    )
    client = await aiohttp_client(make_app(cfg))
    await chat(client, "a")
    await chat(client, "b")
    await wait_until(lambda: (runloop(client).memory_status() or {}).get("nvml") is True, what="NVML")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(str(client.make_url("/ui/#/status")))
            ledger = page.locator("#status table").nth(2)  # GPUs, models, then the ledger's devices
            await expect(ledger.locator("tr", has_text="GPU 0")).to_contain_text("a")
            await expect(ledger.locator("tr", has_text="GPU 1")).to_contain_text("b")
            await expect(ledger.locator("tr", has_text="GPU 1")).to_contain_text("100 MiB")  # its reserve
            await expect(page.locator("#status")).to_contain_text("gpu 1")  # b's placement
            await page.screenshot(path=tmp_path / "status-gpus.png", full_page=True)
            assert errors == []
        finally:
            await browser.close()
