"""Webhooks of real jobs (embedded mode, tiny preset) to a local HTTP receiver: signatures that
verify with the Standard Webhooks library (and a tampered body that does not), retries with
backoff after failures and timeouts, giving up after the retry window, the attempts on the job,
and the URLs refused by default."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from ditmem.compose import build_app
from tests.embedded import LOCAL, embedded_settings
from tests.media import moving_square, write_clip
from tests.webhook_receiver import new_secret, webhook_receiver

SECRET = new_secret()
FAST = {"prompt": "a red ball", "memory": {"k": 0}, "steps": 1}


def settings_for(root: Path, **overrides):
    values = dict(webhook_secret=SECRET, webhook_allow_private=True, webhook_backoff_s=0.1,
                  webhook_poll_s=0.05, webhook_timeout_s=1.0, webhook_retry_for_s=20)  # fmt: skip
    return embedded_settings(root, **(values | overrides))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(build_app(settings_for(tmp_path_factory.mktemp("hooks"))),
                    base_url=LOCAL) as test_client:  # fmt: skip
        yield test_client


def wait_job(client, job_id, until, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: {job}")


def test_deliveries_are_signed_and_verify_and_a_tampered_one_does_not(client):
    with webhook_receiver() as receiver:
        webhook = {"url": receiver.url, "events": ["started", "succeeded"]}
        job_id = client.post("/generate", json=FAST | {"webhook": webhook}).json()["id"]
        started, succeeded = receiver.wait_for(2)
    verifier = Webhook(SECRET)
    payloads = [verifier.verify(item.body, item.headers) for item in (started, succeeded)]
    assert [p["type"] for p in payloads] == ["job.started", "job.succeeded"]
    assert {p["data"]["id"] for p in payloads} == {job_id}
    assert payloads[1]["data"]["video_url"] == f"/jobs/{job_id}/video"
    assert started.headers["webhook-id"] != succeeded.headers["webhook-id"]
    tampered = succeeded.body.replace(b"succeeded", b"failed")
    with pytest.raises(WebhookVerificationError):
        verifier.verify(tampered, succeeded.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(succeeded.body, succeeded.headers)
    job = wait_job(client, job_id, lambda j: j["webhook_deliveries"].get("succeeded", {})
                   .get("state") == "delivered")  # fmt: skip
    assert job["webhook_deliveries"]["succeeded"]["attempts"] == 1
    assert job["webhook_deliveries"]["succeeded"]["last_status"] == 200


def test_a_failing_receiver_gets_retries_with_the_same_id_until_it_answers(client):
    with webhook_receiver([500, 503, "sleep:2", 200]) as receiver:
        body = FAST | {"webhook": {"url": receiver.url}}
        job_id = client.post("/generate", json=body).json()["id"]
        deliveries = receiver.wait_for(4)
        job = wait_job(client, job_id, lambda j: j["webhook_deliveries"].get("succeeded", {})
                       .get("state") == "delivered")  # fmt: skip
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1  # one delivery, retried
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(deliveries)]
    assert gaps[1] > gaps[0] * 1.5  # backoff: each wait about twice the last
    record = job["webhook_deliveries"]["succeeded"]
    # The third attempt timed out (1 s timeout, the receiver took 2 s): a failure too.
    assert record["attempts"] == 4 and record["last_status"] == 200
    assert record["last_error"] is None and record["state"] == "delivered"


def test_a_receiver_that_never_answers_2xx_is_given_up_on(tmp_path):
    settings = settings_for(tmp_path, webhook_retry_for_s=0.6)
    with TestClient(build_app(settings), base_url=LOCAL) as client:
        with webhook_receiver([500] * 100) as receiver:
            body = FAST | {"webhook": {"url": receiver.url}}
            job_id = client.post("/generate", json=body).json()["id"]
            job = wait_job(client, job_id, lambda j: j["webhook_deliveries"].get("succeeded", {})
                           .get("state") == "gave_up")  # fmt: skip
        record = job["webhook_deliveries"]["succeeded"]
        assert record["attempts"] >= 2 and record["last_status"] == 500
        assert record["last_error"] == "HTTP 500"
        assert client.app.state.ditmem.store.pending_deliveries() == 0


def test_an_upload_with_a_webhook_reports_its_ingest(client, tmp_path):
    clip = write_clip(tmp_path / "red.mp4", moving_square("red", 1))
    with webhook_receiver() as receiver, open(clip, "rb") as handle:
        response = client.post(
            "/memory", files={"file": ("red.mp4", handle, "video/mp4")},
            data={"caption": "a red square", "webhook": json.dumps({"url": receiver.url})},
        )  # fmt: skip
        assert response.status_code == 202, response.text
        [delivery] = receiver.wait_for(1)
    payload = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert payload["type"] == "job.succeeded" and payload["data"]["result"]["clip_id"] >= 1


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://127.0.0.1:9/hook", "webhook_refused"),
        ("http://10.1.2.3/hook", "webhook_refused"),
        ("http://169.254.169.254/latest/meta-data", "webhook_refused"),
        ("http://[::1]/hook", "webhook_refused"),
        ("http://localhost/hook", "webhook_refused"),
        ("ftp://example.com/hook", "webhook_refused"),
        ("http://user:pw@example.com/hook", "webhook_refused"),
        ("not a url", "webhook_refused"),
    ],
)
def test_urls_webhooks_may_not_reach_are_422(tmp_path_factory, url, code):
    strict = settings_for(tmp_path_factory.mktemp("strict"), webhook_allow_private=False)
    with TestClient(build_app(strict), base_url=LOCAL) as client:
        response = client.post("/generate", json=FAST | {"webhook": {"url": url}})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == code
        assert client.get("/jobs").json()["total"] == 0  # nothing was queued


def test_webhooks_without_a_secret_are_422(tmp_path):
    with TestClient(build_app(embedded_settings(tmp_path)), base_url=LOCAL) as client:
        response = client.post("/generate", json=FAST | {"webhook": {"url": "https://x.org/h"}})
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "webhooks_not_configured"
        bad_events = client.post(
            "/generate", json=FAST | {"webhook": {"url": "https://x.org/h", "events": ["oops"]}}
        )
        assert bad_events.status_code == 422
