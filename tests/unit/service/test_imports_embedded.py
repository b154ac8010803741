"""POST /memory/imports in embedded mode: a dataset in the imports folder, ingested row by row
by the worker thread through the same import jobs the fleet runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ditmem.compose import build_app
from tests.embedded import LOCAL, embedded_settings
from tests.media import moving_square, write_clip
from tests.unit.service.test_api_embedded import wait

# Five distinct files (content hashes): four colours, one of them in both directions.
CLIPS = {"red": ("red", 1), "green": ("green", -1), "blue": ("blue", 1),
         "yellow": ("yellow", -1), "red-left": ("red", -1)}  # fmt: skip
COLOURS = tuple(CLIPS)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imports-api")
    dataset = root / "imports" / "openvid"
    (dataset / "videos").mkdir(parents=True)
    rows = ["video,caption,tags"]
    for name, (colour, direction) in CLIPS.items():
        write_clip(dataset / "videos" / f"{name}.mp4", moving_square(colour, direction))
        rows.append(f"{name}.mp4,a {name} square sliding,{colour}")
    (dataset / "videos" / "broken.mp4").write_bytes(b"not a video at all")
    rows += [
        "red.mp4,the red one listed twice,",  # line 7: the same file again
        "broken.mp4,a broken file,",  # line 8
        "missing.mp4,no such file,",  # line 9
        "../../bank/manifest.sqlite3,outside the folder,",  # line 10
    ]
    (dataset / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def client(root: Path):
    with TestClient(build_app(embedded_settings(root)), base_url=LOCAL) as test_client:
        yield test_client


def _import(client: TestClient, **body) -> dict:
    request = {"captions": "openvid/captions.csv", "folder": "openvid/videos", **body}
    accepted = client.post("/memory/imports", json=request)
    assert accepted.status_code == 202, accepted.text
    job = wait(client, accepted.json()["id"], timeout=300)
    assert job["kind"] == "import" and job["status"] == "succeeded", job
    return job["result"]


def test_a_dataset_in_the_imports_storage_is_ingested_with_a_summary(client, root):
    result = _import(client, window=2, tags=["openvid"])  # a small window: parks and wakes

    assert (result["rows"], result["sent"], result["pending"]) == (9, 9, 0)
    assert (result["imported"], result["already_present"], result["rejected"]) == (5, 1, 3)
    reasons = {row["line"]: row for row in result["rejections"]}
    assert sorted(reasons) == [8, 9, 10]
    assert reasons[9]["reason"] == "missing.mp4: no such file"
    assert "outside" in reasons[10]["reason"]
    assert result["workers"] == {"embedded": 5}

    listed = client.get("/memory", params={"tag": "openvid"}).json()["items"]
    assert sorted(clip["source_name"] for clip in listed) == sorted(f"{c}.mp4" for c in COLOURS)
    blue = next(clip for clip in listed if clip["source_name"] == "blue.mp4")
    assert blue["tags"] == ["blue", "openvid"] and blue["caption"] == "a blue square sliding"
    # The dataset is only read; the bank is untouched by the row that pointed into it.
    assert len(list((root / "imports" / "openvid" / "videos").iterdir())) == 6
    assert client.get("/memory").json()["total"] == 5


def test_importing_again_resumes_without_ingesting_twice(client):
    result = _import(client)
    assert (result["imported"], result["already_present"], result["rejected"]) == (0, 6, 3)
    assert client.get("/memory").json()["total"] == 5


def test_bad_imports_are_refused_before_any_job(client):
    missing = client.post("/memory/imports", json={"captions": "openvid/nope.csv"})
    assert missing.status_code == 404 and "nope.csv" in missing.json()["error"]["message"]
    for key in ("../secrets.csv", "openvid/../../x.csv", "a\x00b.csv", "  ", "a\\b.csv"):
        escaping = client.post("/memory/imports", json={"captions": key})
        assert escaping.status_code == 422, key
    window = client.post("/memory/imports", json={"captions": "openvid/captions.csv", "window": 0})
    assert window.status_code == 422


def test_a_captions_file_without_the_needed_columns_fails_the_import(client, root):
    (root / "imports" / "openvid" / "bad.csv").write_text("name,description\nx.mp4,hello\n")
    accepted = client.post("/memory/imports", json={"captions": "openvid/bad.csv"})
    job = wait(client, accepted.json()["id"])
    assert job["status"] == "failed" and "video path column" in job["error"]
