"""Headless chromium for tests: Debian's chromium driven by Playwright (which downloads nothing here)."""

from __future__ import annotations

import shutil

import pytest

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser():
    """(sync_playwright, chromium path), or pytest.skip with the reason."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it drives the system chromium)")
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); .ci/run installs it")
    return sync_playwright, exe


def open_page(url: str, fn, viewport=(1200, 900)):
    """Open ``url`` headless, run ``fn(page)``; returns (its result, console errors and page errors)."""
    sync_playwright, exe = browser()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=BROWSER_ARGS)
        page = b.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.goto(url)
        try:
            return fn(page), errors
        finally:
            b.close()
