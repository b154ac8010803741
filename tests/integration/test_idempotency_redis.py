"""``Idempotency-Key`` in Celery mode: the keys live in Redis, so parallel duplicates reaching
two API processes still make one job."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ditmem.compose import build_app
from service.local_server import running_server
from tests.integration.conftest import IntegrationEnv
from tests.unit.service.test_idempotency import BODY, check_one_job_for_many_submits

pytestmark = pytest.mark.integration


def test_parallel_duplicates_make_one_job(fresh_env: IntegrationEnv) -> None:
    with running_server(build_app(fresh_env.settings())) as url:
        check_one_job_for_many_submits(url)


def test_duplicates_sent_to_two_api_processes_make_one_job(fresh_env: IntegrationEnv) -> None:
    with running_server(build_app(fresh_env.settings())) as first, running_server(
        build_app(fresh_env.settings())
    ) as second:  # fmt: skip

        def submit(number: int) -> httpx.Response:
            url = (first, second)[number % 2]
            with httpx.Client(base_url=url, timeout=60) as client:
                return client.post("/generate", json=BODY, headers={"Idempotency-Key": "two-apis"})

        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(submit, range(10)))
    assert sorted(a.status_code for a in answers).count(202) == 1, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
