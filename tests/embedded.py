"""Settings of an embedded-mode (no Redis) API on the tiny preset, rooted in a test folder."""

from __future__ import annotations

from pathlib import Path

from runtime.settings import Settings

# A local name: open mode answers to localhost names only (DNS rebinding), not "testserver".
LOCAL = "http://localhost"


def embedded_settings(root: Path, **overrides) -> Settings:
    values = {
        "preset": "tiny",
        "redis_url": None,
        "bank_dir": root / "bank",
        "results_dir": root / "results",
        "uploads_dir": root / "uploads",
        "imports_dir": root / "imports",
    }
    return Settings(**(values | overrides))


# The slowest request the tiny preset accepts (a few seconds on 2 CPU cores): long enough for
# tests to see a job running or queued behind another one.
SLOW_REQUEST = {"num_frames": 17, "width": 128, "height": 128, "steps": 8}
