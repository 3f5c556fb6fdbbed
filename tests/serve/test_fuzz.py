"""API fuzzing with schemathesis: requests generated from the app's own OpenAPI schema (valid and
invalid bodies for every route) against the session's real server (random 2-layer model, SmolLM2
tokenizer). Checks: no 5xx, documented status codes and content types, bodies matching the
schema (OpenAI's error shape for errors). Bounded: FUZZ_EXAMPLES per operation and FUZZ_BUDGET_S
seconds in all (examples past the budget are not sent)."""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

from fmstack.serve.api import ServerState, build_app  # noqa: E402

FUZZ_EXAMPLES = 15
FUZZ_BUDGET_S = 45.0
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

schema = schemathesis.openapi.from_dict(build_app(ServerState(None, None, "tiny")).openapi())
SENT: dict[str, int] = {}
_T0: list[float] = []


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_fuzz(case, server):
    if not _T0:
        _T0.append(time.monotonic())
    if time.monotonic() - _T0[0] > FUZZ_BUDGET_S:
        return
    key = f"{case.method} {case.path}"
    SENT[key] = SENT.get(key, 0) + 1
    case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=60)


def test_fuzzing_reached_every_route_and_server_survived(server):
    """Runs after the fuzz test (file order): it sent requests to every route and the server lives."""
    if not SENT:
        pytest.skip("run together with test_api_fuzz")
    print(f"\nschemathesis sent {sum(SENT.values())} requests: {dict(sorted(SENT.items()))}")
    assert {key.split(" ", 1)[1] for key in SENT} == set(schema.raw_schema["paths"])
    assert server.alive()
