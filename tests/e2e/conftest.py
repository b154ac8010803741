"""End-to-end tests: the web UI driven by Playwright in Debian's Chromium (never downloaded)."""

from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "e2e: drives the web UI in /usr/bin/chromium (installed by the test if missing)"
    )
