"""Schema-driven fuzzing of the HTTP API (issue 15): schemathesis reads the live server's /openapi.json and sends
requests generated from it, valid and invalid (wrong types, missing fields, values past every limit in the
schema), to a real `sentilens serve` on 127.0.0.1. The invariant: 2xx or 4xx with the documented body, never a
5xx, never a traceback in the server log, and /healthz still answering after each request. Seeded and bounded
(a fixed number of examples per operation), about half a minute on two cores."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from serve_helpers import Server, train_tiny_fusion

pytestmark = pytest.mark.slow  # trains a real tiny model

EXAMPLES = 20
"""Generated requests per operation and mode (5 operations, valid and invalid)."""


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    run = train_tiny_fusion(tmp_path_factory.mktemp("fuzz"))
    server = Server(run, tmp_path_factory.mktemp("logs") / "fuzz.log",
                    ["--max-posts", "4", "--max-text-chars", "200", "--max-upload-bytes", "65536",
                     "--max-pixels", "10000"])
    yield server
    server.stop()


def operations(url: str) -> list:
    return [result.ok() for result in schemathesis.openapi.from_url(f"{url}/openapi.json").get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_generated_requests_never_get_a_server_error(fuzz_server, mode):
    # schemathesis' own pytest plugin does not load under this pytest; its strategies are driven by hypothesis here.
    found = operations(fuzz_server.url)
    assert {f"{op.method.upper()} {op.path}" for op in found} >= {
        "GET /healthz", "GET /v1/model", "POST /v1/predict", "POST /v1/predict/batch", "POST /v1/explain"}
    for operation in found:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # no parameters, no body: nothing can be made invalid
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def probe(case):
            response = case.call_and_validate(base_url=fuzz_server.url, timeout=60,
                                              checks=[not_a_server_error, response_schema_conformance])
            assert response.status_code < 500
            assert httpx.get(f"{fuzz_server.url}/healthz", timeout=60).status_code == 200

        probe()
    log = fuzz_server.text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
