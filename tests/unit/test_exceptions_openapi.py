"""The exceptions API against its own OpenAPI document, property-based (schemathesis): the
document the console serves is loaded, and every operation in it is driven with inputs drawn
from its schema — valid ones and ones that break it — by an approver, a second approver and
an auditor, against the in-process console over TLS with a real book. Ids are drawn from the
exceptions that exist (a pending request made fresh for the example, the seeded ones) as well
as from the id pattern, so approvals, denials and revocations succeed as well as fail. No
answer may be a 5xx, have a status the document does not list, or a body outside its schema.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode
from test_console_app import accounts_file  # noqa: F401 (a fixture)
from test_console_exceptions import Setup, make_setup, policy, tls_files  # noqa: F401

from egress_guard.console.exceptions_openapi import document
from exception_fixtures import ACTIVE_ID, PENDING_ID, granted, requested

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
OPERATIONS = [
    "GET /api/v1/exceptions",
    "POST /api/v1/exceptions",
    "GET /api/v1/exceptions/{id}",
    "POST /api/v1/exceptions/{id}/approve",
    "POST /api/v1/exceptions/{id}/deny",
    "POST /api/v1/exceptions/{id}/revoke",
    "GET /api/v1/exceptions/{id}/request",
    "GET /api/v1/openapi.json",
]
FRESH = "a fresh pending request"
FRESH_GRANT = "a fresh active grant"
UNKNOWN = "ex-nosuchthing0"
FRESH_IDS = itertools.count()  # one module, one book: an id is never made twice


@pytest.fixture(scope="module")
def console(tls_files, accounts_file, policy, tmp_path_factory) -> Iterator[Setup]:  # noqa: F811
    setup = make_setup(tls_files, accounts_file, policy, tmp_path_factory.mktemp("book"))
    yield setup
    setup.close()


@pytest.fixture(scope="module")
def schema(console: Setup) -> Any:
    served = console.call("/api/v1/openapi.json", console.tokens["auditor"])
    assert served.status == 200
    assert served.json() == document()
    return schemathesis.openapi.from_dict(served.json())


def test_the_document_names_every_exceptions_api_route(schema):
    from egress_guard.console.app import ROUTES

    labels = {r.ok().label for r in schema.get_all_operations()}
    assert labels == set(OPERATIONS)
    api = {
        p.replace("([^/]+)", "{id}")
        for p, _ in ROUTES
        if p.startswith("/api/v1/exceptions") or p == "/api/v1/openapi.json"
    }
    assert api == {label.split(" ")[1] for label in labels}


# One call per operation that must succeed (run first, as explicit examples): the answers
# of the success paths are checked against the document whatever the random inputs reach.
# (label → (pick, caller, case arguments))
SUCCEEDING: dict[str, tuple[str | None, str, dict[str, Any]]] = {
    "GET /api/v1/exceptions": (None, "auditor", {"query": {"state": "all"}}),
    "POST /api/v1/exceptions": (
        None,
        "approver",
        {"body": {"subject": "user:li.na", "host": "pan.example", "duration": "1d", "reason": "r"}},
    ),
    "GET /api/v1/exceptions/{id}": (PENDING_ID, "auditor", {}),
    "POST /api/v1/exceptions/{id}/approve": (FRESH, "approver", {"body": {"duration": "1h"}}),
    "POST /api/v1/exceptions/{id}/deny": (FRESH, "approver2", {"body": {"reason": "no"}}),
    "POST /api/v1/exceptions/{id}/revoke": (FRESH_GRANT, "approver2", {"body": {"reason": "r"}}),
    "GET /api/v1/exceptions/{id}/request": (FRESH, "approver", {}),
    "GET /api/v1/openapi.json": (None, "approver", {}),
}
CALLERS = ["approver", "approver2", "auditor"]


@pytest.mark.parametrize("label", OPERATIONS)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_within_its_schema(console, schema, label, mode):
    operation = schema.find_operation_by_label(label)
    ids = st.sampled_from([None, FRESH, FRESH, FRESH_GRANT, PENDING_ID, ACTIVE_ID, UNKNOWN])
    seen: dict[int, int] = {}
    pick, caller, kwargs = SUCCEEDING[label]
    if "{id}" in label:
        kwargs = kwargs | {"path_parameters": {"id": UNKNOWN}}
    if "body" in kwargs:
        kwargs = kwargs | {"media_type": "application/json"}

    def fresh_id(pick: str) -> str:
        """A new pending request (FRESH) or active grant (FRESH_GRANT) to decide on."""
        exception_id = f"ex-fresh{next(FRESH_IDS):07d}"
        if pick == FRESH:
            event = requested(console.clock_ms, exception_id, request_id=exception_id)
        else:
            event = granted(console.clock_ms, exception_id, by="li.all")
        console.exceptions.append(event)
        return exception_id

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every run: a failure is reproducible
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=operation.as_strategy(generation_mode=mode),
        pick=ids,
        who=st.sampled_from(CALLERS),
    )
    @example(case=operation.Case(**kwargs), pick=pick, who=caller)
    def run(case: Any, pick: str | None, who: str) -> None:
        if case.path_parameters and "id" in case.path_parameters and pick is not None:
            case.path_parameters["id"] = (
                pick if pick not in (FRESH, FRESH_GRANT) else fresh_id(pick)
            )
        console.clock.t += 3600  # past the failed-token throttle a mangled credential trips
        response = case.call(
            base_url=console.origin,
            headers={"Authorization": f"Bearer {console.tokens[who]}"},
            verify=str(console.ca),
        )
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)

    run()
    assert not any(status >= 500 for status in seen), seen
    assert 200 in seen, seen  # the explicit example at least
    if mode is GenerationMode.NEGATIVE and label != "GET /api/v1/openapi.json":
        # A broken input is refused, never an error: a mangled credential is a 401.
        assert set(seen) - {200} <= {400, 401, 403, 404, 409}, seen


def test_the_document_is_valid_json_with_closed_answers():
    doc = document()
    json.dumps(doc)
    for name, schema in doc["components"]["schemas"].items():
        assert schema["additionalProperties"] is False, name
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "default" not in op["responses"], (method, path)  # every status named
            assert "200" in op["responses"] and "401" in op["responses"]
