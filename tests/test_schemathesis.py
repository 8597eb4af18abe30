"""schemathesis over /openapi.json (tiny model, bounded examples): no input makes a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from hypothesis import HealthCheck, given, settings

from helpers.server import ServerHandle, serve_in_background
from tests.conftest import free_port

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation import GenerationMode  # noqa: E402

EXAMPLES = 15  # per operation and mode: enough to hit each field's edges, a few seconds in all


@pytest.fixture(scope="module")
def server(tiny_chat) -> Iterator[ServerHandle]:
    # Tiny replies: schemathesis may ask for max_tokens up to the cap, and each case is a request.
    with serve_in_background(tiny_chat, port=free_port(), default_max_new_tokens=4,
                             max_new_tokens_cap=8) as handle:
        yield handle


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_a_server_error(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /", "POST /v1/chat/completions", "GET /v1/models", "GET /health"}
    session = requests.Session()
    seen: list[int] = []

    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # no parameters: nothing can be made invalid
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:
            response = case.call(base_url=server.url, session=session, timeout=30)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text)

        check()
    assert seen
    if mode == GenerationMode.NEGATIVE:
        assert any(400 <= status < 500 for status in seen)
