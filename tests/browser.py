"""Debian's Chromium, headless, driven by playwright (without playwright's own browser download):
the chat page's tests."""

from __future__ import annotations

import contextlib
import shutil


@contextlib.contextmanager
def chromium_page():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is not installed (scripts/setup.sh installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 900})
        finally:
            browser.close()
