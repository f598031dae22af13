"""Property-based fuzzing of `detr serve` from its own OpenAPI schema (schemathesis' hypothesis
strategies for each operation), over real HTTP: whatever the generated path parameters, query and
multipart body, no answer is a 5xx, every failure has the one error shape, and afterwards the server
still answers with its memory bounded."""

from __future__ import annotations

import httpx
import psutil
import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES_PER_OPERATION = 40


def test_fuzzed_requests_never_get_a_server_error(detr_server):
    process = psutil.Process(detr_server.pid)
    rss_before = process.memory_info().rss
    schema = schemathesis.openapi.from_url(f"{detr_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/model/predict", "/model/metadata", "/health/ready", "/metrics"}
    statuses: dict[str, set[int]] = {}

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(timeout=120)
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.formatted_path, case.query, response.text[:500])
            if response.status_code >= 400:
                body = response.json()
                assert body["status"] == "error" and isinstance(body["message"], str) and body["message"], body

        check()

    # The generated bodies reached the model's validation, not only the framework's.
    assert any(400 <= s < 500 for s in statuses["POST /model/predict"]), statuses
    assert httpx.get(f"{detr_server.url}/health/ready").json() == {"status": "ok"}
    grown = (process.memory_info().rss - rss_before) / 2**20
    assert grown < 300, f"the server grew by {grown:.0f} MiB while fuzzed"
