"""Property-based API checks from the OpenAPI schema: whatever a client sends, no 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from ditmem.compose import build_app
from service.local_server import running_server
from tests.embedded import embedded_settings


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    app = build_app(embedded_settings(root, max_upload_mb=1, max_queued_per_key=5))
    with running_server(app) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_no_server_errors(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
        def no_5xx(case) -> None:
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.method, case.path, response.text[:500])
            content_type = response.headers.get("content-type") or [""]
            content_type = content_type[0] if isinstance(content_type, list) else content_type
            if response.status_code >= 400 and content_type.startswith("application/json"):
                assert set(response.json()["error"]) == {"code", "message", "details"}

        no_5xx()
