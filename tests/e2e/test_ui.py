"""The web UI end to end: the real app as `ditmem serve` runs it by default (embedded worker,
trained toy preset) in Debian's Chromium, so the screenshots show a real ball.

Runs in the default suite. A missing /usr/bin/chromium is installed with
``scripts/install-browser.sh`` (apt, as root or with sudo), never skipped: Playwright only
drives the system browser and downloads nothing.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from playwright.sync_api import Page, expect, sync_playwright

from ditmem.compose import build_app
from ditmem.toy import write_toy_clip
from model.toy.world import sample_spec
from service.local_server import running_server
from tests.embedded import embedded_settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# The README's screenshots are refreshed on request (DITMEM_SCREENSHOTS=1), so an ordinary test
# run leaves the checkout untouched; otherwise they go to the test's temporary folder.
REFRESH_SCREENSHOTS = os.environ.get("DITMEM_SCREENSHOTS") == "1"
CAPTION = "a red ball falling"
PROMPT = "a red ball"  # says nothing of the motion: the memory clip does
# A toy request that takes a few seconds on 2 CPU cores (form fields): long enough for the test
# to cancel the job queued behind it.
SLOW = {"width": "32", "height": "32", "steps": "20"}


def ensure_chromium() -> Path:
    if not CHROMIUM.exists():
        subprocess.run([str(REPO / "scripts" / "install-browser.sh")], check=True, timeout=800)
    assert CHROMIUM.exists(), "scripts/install-browser.sh did not install /usr/bin/chromium"
    return CHROMIUM


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui")


@pytest.fixture(scope="module")
def base_url(root: Path):
    with running_server(build_app(embedded_settings(root, preset="toy"))) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url: str):
    executable = ensure_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base_url)
        context.set_default_timeout(30_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def fill_generate(page: Page, prompt: str, **params: str) -> None:
    page.get_by_role("button", name="Generate", exact=True).first.click()
    page.get_by_label("Prompt", exact=True).fill(prompt)
    for name, value in params.items():
        page.locator(f"#gen-{name}").fill(value)


def watch_job(page: Page, job, until: set[str], timeout: float = 90.0) -> list[tuple[str, float]]:
    """(status, progress value) as the page shows them, sampled every 50 ms."""
    seen: list[tuple[str, float]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.get_attribute("data-status")
        value = job.locator("progress").evaluate("p => p.hasAttribute('value') ? p.value : -1")
        seen.append((status, value))
        if status in until:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"job still {seen[-1] if seen else None} after {timeout} s")


def no_horizontal_scroll(page: Page) -> bool:
    return page.evaluate(
        "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )


def test_ui_end_to_end(page: Page, root: Path, base_url: str) -> None:
    screenshots = REPO / "docs" / "images" if REFRESH_SCREENSHOTS else root / "screenshots"
    started = time.monotonic()
    spec = sample_spec(torch.Generator().manual_seed(0), "red", "falling")
    clip = write_toy_clip(spec, root / "red-falling.mkv")
    screenshots.mkdir(parents=True, exist_ok=True)

    # Memory: upload through the file picker, see it in the gallery.
    page.goto("/#memory")
    expect(page.locator("#gallery-info")).to_contain_text("empty")
    page.get_by_label("Video file").set_input_files(clip)
    page.get_by_label("Caption").fill(CAPTION)
    page.get_by_label("Tags").fill("demo, red")
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-status")).to_contain_text("Added clip", timeout=90_000)
    card = page.locator("#gallery li.card", has_text=CAPTION)
    expect(card).to_have_count(1)
    expect(card.locator("img")).to_have_js_property("complete", True)
    clip_id = card.get_attribute("data-clip-id")
    expect(card).to_contain_text("demo")
    # The API's validation error is shown plainly: a text file is not a video.
    page.get_by_label("Video file").set_input_files(
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}
    )
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-status")).to_contain_text("Not a video")
    page.get_by_label("Video file").set_input_files([])
    page.screenshot(path=str(screenshots / "ui-memory.png"))
    # The drop area takes a dropped file as well as the picker.
    page.locator("#drop-zone").evaluate(
        """zone => {
            const data = new DataTransfer();
            data.items.add(new File(["x"], "dropped.mp4", {type: "video/mp4"}));
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
        }"""
    )
    expect(page.locator("#upload-file-name")).to_contain_text("dropped.mp4")

    # Generate: the retrieval preview follows the prompt.
    fill_generate(page, PROMPT, seed="7")  # the preset's defaults for everything else
    preview = page.locator(f'#preview-list li[data-clip-id="{clip_id}"]')
    expect(preview).to_contain_text(CAPTION)
    expect(preview.locator(".score")).to_have_text(re.compile(r"^-?\d\.\d{3}$"))
    page.screenshot(path=str(screenshots / "ui-generate.png"))

    # Submit: the job shows up in Jobs with a moving progress bar, then a playable video.
    page.get_by_label("Memory guidance").select_option("true")
    page.get_by_label("Step cache").select_option("taylorseer")
    requests: list[str] = []  # every GET of the page from here on: no polling while streaming
    page.on("request", lambda r: requests.append(r.url) if r.method == "GET" else None)
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/generate")) as sent:
        page.get_by_role("button", name="Generate", exact=True).last.click()
    body = sent.value.post_data_json
    assert body["memory_guidance"] is True and body["memory"] == {"k": 5}, body
    assert body["preview_every"] == 1  # live previews are on by default
    assert body["cache"] == {"kind": "taylorseer"}, body
    expect(page.locator("#view-jobs")).to_be_visible()
    job = page.locator("#jobs-list li.job[data-status]").filter(has_text=PROMPT).first
    expect(job).to_be_visible()
    seen = watch_job(page, job, {"succeeded", "failed", "canceled"})
    assert seen[-1][0] == "succeeded", (seen[-1], job.inner_text())
    job_id = job.get_attribute("data-job-id")
    paths = [url.split(base_url, 1)[-1] for url in requests]
    # Progress came over the job's event stream; the record was read once, at the end, and the
    # list once when the view opened: nothing polled.
    assert f"/jobs/{job_id}/events" in paths, paths
    assert paths.count(f"/jobs/{job_id}") <= 1, paths
    assert sum(path.startswith("/jobs?") for path in paths) <= 2, paths
    # The bar moved (a value > 0 while running), or at least the job was seen running.
    moved = any(value > 0 for status, value in seen if status == "running")
    assert moved or "running" in [status for status, _ in seen], seen
    expect(job.locator("progress")).to_be_hidden()  # the bar goes once the job is done
    video = job.locator("video")
    expect(video).to_have_attribute("src", f"/jobs/{job.get_attribute('data-job-id')}/video")
    page.wait_for_function(
        "v => Number.isFinite(v.duration) && v.duration > 0", arg=video.element_handle()
    )
    duration = video.evaluate("async v => { v.muted = true; await v.play(); return v.duration; }")
    assert math.isfinite(duration) and duration > 0
    download = job.get_by_role("link", name="Download mp4")
    expect(download).to_have_attribute("download", re.compile(r"\.mp4$"))
    expect(job.locator(f'.used li[data-clip-id="{clip_id}"]')).to_contain_text(CAPTION)
    page.screenshot(path=str(screenshots / "ui-jobs.png"))

    # A slow job, canceled from the UI. Another slow job ahead of it keeps it waiting long enough
    # for the click, however fast this machine is.
    fill_generate(page, "a slow green ball", **SLOW)
    page.get_by_label("Step cache").select_option("")  # slow jobs stay slow: no step skipped
    page.get_by_role("button", name="Generate", exact=True).last.click()
    fill_generate(page, "a slow blue ball", **SLOW)
    page.get_by_role("button", name="Generate", exact=True).last.click()
    slow = page.locator("#jobs-list li.job").filter(has_text="a slow blue ball").first
    expect(slow).to_have_attribute("data-status", re.compile("queued|running"))
    expect(slow.get_by_label(re.compile("step|queue"))).to_be_attached()
    slow.get_by_role("button", name="Cancel").click()
    expect(slow).to_have_attribute("data-status", "canceled", timeout=60_000)
    expect(slow.get_by_role("button", name="Cancel")).to_be_hidden()
    # The slow job ahead ran for seconds: the page showed its live previews as they came.
    green = page.locator("#jobs-list li.job").filter(has_text="a slow green ball").first
    expect(green).to_have_attribute("data-status", "succeeded", timeout=60_000)
    assert any("/preview?step=" in url for url in requests), requests[-20:]

    # Phone width: every view fits without horizontal scrolling.
    page.set_viewport_size({"width": 390, "height": 844})
    for view in ("generate", "jobs", "memory"):
        page.goto(f"/#{view}")
        expect(page.locator(f"#view-{view}")).to_be_visible()
        assert no_horizontal_scroll(page), f"{view} scrolls sideways at 390 px"
    page.set_viewport_size({"width": 1280, "height": 800})

    # Memory: delete the clip (accepting the confirmation) and see it gone.
    page.goto("/#memory")
    card = page.locator(f'#gallery li[data-clip-id="{clip_id}"]')
    expect(card).to_have_count(1)
    page.once("dialog", lambda dialog: dialog.accept())
    card.get_by_role("button", name="Delete").click()
    expect(card).to_have_count(0)
    expect(page.locator("#gallery-info")).to_contain_text("empty")
    expect(page.locator("#status")).to_contain_text(f"Deleted clip {clip_id}")
    assert time.monotonic() - started < 120
