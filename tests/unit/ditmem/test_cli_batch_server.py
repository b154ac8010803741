"""``ditmem batch --server``: a batch made by a real ditmem service over HTTP (embedded mode on a
real socket, toy preset) gives the same videos and records as the batch made in-process, stays
under the service's queue bound through its 429s, resumes, and cancels what is in flight when
it is interrupted."""

from __future__ import annotations

import _thread
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from ditmem.cli import app
from ditmem.compose import build_app
from model.video_io import read_video
from runtime.batch import plan, read_prompts
from runtime.batch_outputs import BatchOptions
from runtime.batch_remote import BatchOnServer, ServerOptions
from runtime.keys import ApiKey, hash_key
from service.local_server import running_server
from tests.embedded import embedded_settings

PROMPTS = ["a red square moving right", "a blue square falling", "a green square bouncing",
           "a red square moving left", "a blue square moving right"]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("batch-server")


@pytest.fixture(scope="module")
def server(root) -> str:
    # A queue bound of 2 jobs per key: a client keeping 4 in flight meets the service's 429.
    settings = embedded_settings(root, preset="toy", device="cpu", max_queued_per_key=2)
    with running_server(build_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def prompt_file(root) -> Path:
    path = root / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture
def runner(monkeypatch, root) -> CliRunner:
    monkeypatch.setenv("DITMEM_PRESET", "toy")
    monkeypatch.setenv("DITMEM_DEVICE", "cpu")
    monkeypatch.setenv("DITMEM_BANK_DIR", str(root / "local-bank"))
    return CliRunner()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "batch.jsonl").read_text().splitlines()]


def frames(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): read_video(p) for p in sorted(out.rglob("*.mp4"))}


@pytest.fixture(scope="module")
def on_server(server, prompt_file, root) -> tuple[Path, list[int]]:
    """The batch made on the service, counting the status of every POST /generate."""
    statuses: list[int] = []

    def count(response: httpx.Response) -> None:
        if response.request.method == "POST":
            statuses.append(response.status_code)

    client = httpx.Client(base_url=server, event_hooks={"response": [count]}, timeout=30)
    out = root / "served"
    runner = BatchOnServer(ServerOptions(url=server, in_flight=4, poll_s=0.05), client)
    planned = plan(read_prompts(prompt_file), "plain", seed=7)
    summary = runner.run(planned, out, BatchOptions(), progress=False)
    client.close()
    assert (summary.made, summary.failed, summary.skipped) == (5, 0, 0), summary.failures
    return out, statuses


def test_the_service_makes_the_same_videos_and_records_as_this_machine(on_server, runner, root,
                                                                       prompt_file):  # fmt: skip
    served, _ = on_server
    local = root / "local"
    result = runner.invoke(app, ["batch", str(prompt_file), "--out", str(local), "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert "5 made, 0 already there, 0 failed (5 planned)" in result.stdout
    mine, theirs = frames(local), frames(served)
    assert sorted(mine) == sorted(theirs) == [f"{n:05d}.mp4" for n in range(1, 6)]
    for name in mine:
        np.testing.assert_array_equal(mine[name], theirs[name], err_msg=name)
    by_output = {line["output"]: line for line in records(served)}
    for line in records(local):
        remote = by_output[line["output"]]
        assert remote["params"] == line["params"]
        assert remote["seed"] == line["seed"] and remote["preset"] == line["preset"] == "toy"
        assert remote["job_id"] and remote["server"] and remote["run_s"] is not None
    assert not (served / ".partial").exists()


def test_the_client_stays_under_the_queue_bound(on_server):
    _, statuses = on_server
    assert 429 in statuses  # 4 in flight against a bound of 2: it met the bound ...
    assert statuses.count(202) == 5  # ... waited, and every video was still submitted once


def test_a_second_run_resumes(on_server, runner, prompt_file, server):
    served, _ = on_server
    (served / "00003.mp4").unlink()
    (served / "00004.mp4").write_bytes(b"not a video")
    result = runner.invoke(app, ["batch", str(prompt_file), "--out", str(served), "--seed", "7",
                                 "--server", server])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 made, 3 already there, 0 failed (5 planned)" in result.stdout
    assert read_video(served / "00004.mp4").shape[0] == 8
    assert len(records(served)) == 7


def test_interrupting_cancels_the_jobs_in_flight(root, prompt_file, tmp_path):
    """Ctrl-C while jobs are queued and running: none keeps a worker busy for nobody."""
    accepted: list[str] = []

    def count(response: httpx.Response) -> None:
        if response.request.method == "POST" and response.status_code == 202:
            response.read()
            accepted.append(response.json()["id"])

    def interrupt_once_three_are_in_flight() -> None:
        deadline = time.monotonic() + 60
        while len(accepted) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # the client has them in flight (and their streams open)
        _thread.interrupt_main()  # what Ctrl-C does

    # The tiny preset's slowest request takes seconds, and two of them run ahead of the batch:
    # its jobs are still queued when the client is interrupted.
    slow_body = {"num_frames": 17, "width": 128, "height": 128, "steps": 8, "memory": {"k": 0}}
    with running_server(build_app(embedded_settings(root / "slow", device="cpu"))) as url:
        with httpx.Client(base_url=url) as other_client:
            ahead = [other_client.post("/generate", json={"prompt": "ahead", **slow_body})
                     .json()["id"] for _ in range(2)]  # fmt: skip
        client = httpx.Client(base_url=url, event_hooks={"response": [count]})
        runner = BatchOnServer(ServerOptions(url=url, in_flight=3), client)
        slow = BatchOptions(num_frames=17, width=128, height=128, steps=8)
        threading.Thread(target=interrupt_once_three_are_in_flight, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            runner.run(plan(read_prompts(prompt_file), "plain"), tmp_path / "out", slow,
                       progress=False)  # fmt: skip
        assert len(accepted) == 3
        with httpx.Client(base_url=url) as check:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                jobs = [check.get(f"/jobs/{job_id}").json() for job_id in accepted]
                if all(job["status"] == "canceled" for job in jobs):
                    break
                time.sleep(0.1)
            assert [job["status"] for job in jobs] == ["canceled"] * 3, jobs
            for job_id in ahead:
                check.delete(f"/jobs/{job_id}")
    assert not (tmp_path / "out" / ".partial").exists()
    assert list((tmp_path / "out").rglob("*.mp4")) == []


def test_a_batch_follows_event_streams_instead_of_polling(server, prompt_file, tmp_path):
    gets: list[str] = []
    client = httpx.Client(base_url=server, timeout=30,
                          event_hooks={"request": [lambda r: gets.append(r.url.path)
                                                   if r.method == "GET" else None]})  # fmt: skip
    runner = BatchOnServer(ServerOptions(url=server, in_flight=2, poll_s=0.05), client)
    summary = runner.run(plan(read_prompts(prompt_file), "plain", seed=100), tmp_path / "o",
                         BatchOptions(), progress=False)  # fmt: skip
    client.close()
    assert summary.made == 5
    streams = [path for path in gets if path.endswith("/events")]
    records = [path for path in gets if path.startswith("/jobs/") and path.count("/") == 2]
    assert len(streams) == 5  # one stream per job ...
    assert len(records) == 5  # ... and its record read once, to download its video


def test_server_errors_are_clear(runner, prompt_file, tmp_path, server):
    nothing = runner.invoke(app, ["batch", str(prompt_file), "--out", str(tmp_path / "a"),
                                  "--server", "http://127.0.0.1:9"])  # fmt: skip
    assert nothing.exit_code == 2 and "no ditmem service at http://127.0.0.1:9" in nothing.output
    other = runner.invoke(app, ["batch", str(prompt_file), "--out", str(tmp_path / "b"),
                                "--server", server, "--preset", "tiny"])  # fmt: skip
    assert other.exit_code == 2 and "runs preset 'toy', not 'tiny'" in other.output
    bank = runner.invoke(app, ["batch", str(prompt_file), "--out", str(tmp_path / "c"),
                               "--server", server, "--bank", str(tmp_path)])  # fmt: skip
    assert bank.exit_code == 2 and "--bank applies to a batch on this machine" in bank.output
    bad = runner.invoke(app, ["batch", str(prompt_file), "--out", str(tmp_path / "d"),
                              "--server", server, "--steps", "999"])  # fmt: skip
    assert bad.exit_code == 1 and "0 made, 0 already there, 5 failed" in bad.stdout
    assert "steps" in bad.output


def test_a_service_with_keys_refuses_a_wrong_one(root, prompt_file, runner, tmp_path):
    key = ApiKey(name="batch", sha256=hash_key("right-secret"))
    settings = embedded_settings(root / "keyed", preset="toy", device="cpu", auth="keys",
                                 api_keys=[key])  # fmt: skip
    with running_server(build_app(settings)) as url:
        wrong = runner.invoke(app, ["batch", str(prompt_file), "--out", str(tmp_path / "w"),
                                    "--server", url, "--api-key", "wrong"])  # fmt: skip
        assert wrong.exit_code == 2 and "refused the API key" in wrong.output
        right = runner.invoke(app, ["batch", str(prompt_file), "--out", str(tmp_path / "r"),
                                    "--server", url, "--samples", "1", "--steps", "2"],
                              env={"DITMEM_API_KEY": "right-secret"})  # fmt: skip
        assert right.exit_code == 0, right.output
        assert len(list((tmp_path / "r").glob("*.mp4"))) == 5
