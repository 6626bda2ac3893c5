"""The browser tests' Chromium (Debian's, driven by playwright; never playwright's own download)
and a console page signed in with a key."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.conftest import ADMIN_KEY

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
NEEDS_CHROMIUM = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


@contextmanager
def launched() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


def signed_in(browser: Any, url: str, wait_ms: int, key: str = ADMIN_KEY) -> Any:
    """A new page of a fresh context, signed in to the console at ``url`` with ``key``."""
    page = browser.new_context().new_page()
    page.set_default_timeout(wait_ms)
    page.goto(f"{url}/ui/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/overview")
    return page
