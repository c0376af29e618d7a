"""The OpenAPI 3 document of the exceptions API, served at ``/api/v1/openapi.json``: every
operation, its parameters and bodies, and the exact shape of every answer (objects closed
with ``additionalProperties: false``, so a field nobody documented is a failure of the
property test, tests/unit/test_exceptions_openapi.py)."""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from egress_guard import __version__
from egress_guard.core.exceptions import SUBJECT_NAME

from . import exception_ops as ops

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
_DURATION = r"^[1-9][0-9]{0,5}[smhdw]$"
_CONTROL = r"^(block|upload|unscannable|marker:[a-z][a-z0-9_]{0,63})$"
# A subject as the API reads it: a user or group name (letters in any script, digits, . _ @ -),
# or a network in canonical form (10.1.20.0/24, fd00:1::/64).
_SUBJECT = rf"^((user|group):{SUBJECT_NAME}|client:[0-9a-f:.]{{2,39}}/[0-9]{{1,3}})$"
_HOST = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$"
_PATH = r"^/[A-Za-z0-9._~%!$&'()*+,;=:@/-]{0,255}$"
_CATEGORY = r"^[a-z][a-z0-9_]{0,63}$"
_RULE = r"^[a-z0-9][a-z0-9._-]{0,127}$"
_REASON = {"type": "string", "minLength": 1, "maxLength": 2000, "pattern": r"\S"}
_ONE_TARGET = [{"required": ["host"]}, {"required": ["category"]}, {"required": ["rule"]}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: list[str] | None = None, **more: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
        **more,
    }


_STR = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": "string", "format": "date-time", "nullable": True}
_INT = {"type": "integer"}
_BYTES_OR_NULL = {"type": "integer", "minimum": 1, "nullable": True}
_STRINGS = {"type": "array", "items": _STR}

_ROW_TYPES: dict[str, Any] = {
    "ts": _TIME,
    "groups": _STRINGS,
    "marker_levels": _STRINGS,
    "port": _INT,
    "status": _INT,
    "request_bytes": _INT,
    "upload_bytes": _INT,
    "declared_bytes": _INT,
    "forwarded_bytes": _INT,
}

SCHEMAS: dict[str, Any] = {
    "Error": _obj(
        {
            "error": {**_STR, "description": "why, for a person"},
            "code": {
                **_STR,
                "description": "a refusal's code (self_approval, widening, not_approver, "
                "wrong_state, too_long, …)",
            },
        },
        ["error"],
    ),
    "Target": _obj(
        {
            "host": {**_STR, "description": "the host (and its subdomains unless exact)"},
            "exact": {"type": "boolean"},
            "path": {**_STR, "description": "a normalized path prefix"},
            "category": _STR,
            "rule_id": _STR,
            "text": {**_STR, "description": "the target as people read it"},
        }
    ),
    "Grant": _obj(
        {"per_request": _BYTES_OR_NULL, "per_window": _BYTES_OR_NULL},
        nullable=True,
        description="upload exceptions: the caps raised to exactly these bytes",
    ),
    "Terms": _obj(
        {
            "subject": {**_STR, "pattern": _SUBJECT},
            "control": {**_STR, "pattern": _CONTROL},
            "target": _ref("Target"),
            "start": _TIME,
            "expiry": _TIME,
            "duration": _STR,
            "grant": _ref("Grant"),
            "lowered_to": {"type": "string", "enum": ["", "alert", "log"]},
        }
    ),
    "Event": _obj(
        {
            "id": _STR,
            "kind": {
                "type": "string",
                "enum": ["requested", "granted", "approved", "denied", "cancelled", "revoked"],
            },
            "at": _TIME,
            "actor": _STR,
            "actor_roles": _STRINGS,
            "client_ip": _STR,
            "reason": _STR,
            "terms": {**_ref("Terms"), "nullable": True},
            "approvals_needed": _INT,
            "applied": {"type": "boolean", "description": "false: not a valid step when it came"},
        }
    ),
    "Exception": _obj(
        {
            "id": {**_STR, "pattern": _ID},
            "state": {"type": "string", "enum": list(ops.STATES)},
            "origin": {"type": "string", "enum": ["request", "grant"]},
            "requester": _STR,
            "requested_at": _TIME,
            "reason": _STR,
            "category": _STR,
            "request_id": _STR,
            "terms": _ref("Terms"),
            "requested_terms": _ref("Terms"),
            "approvals_needed": _INT,
            "approvers": _STRINGS,
            "decide_by": _TIME_OR_NULL,
            "approved_at": _TIME_OR_NULL,
            "ended_by": _STR,
            "ended_at": _TIME_OR_NULL,
            "end_reason": _STR,
            "events": {"type": "array", "items": _ref("Event")},
        },
        [
            "id",
            "state",
            "origin",
            "requester",
            "requested_at",
            "reason",
            "category",
            "request_id",
            "terms",
            "requested_terms",
            "approvals_needed",
            "approvers",
            "decide_by",
            "approved_at",
            "ended_by",
            "ended_at",
            "end_reason",
        ],
    ),
    "ExceptionList": _obj(
        {
            "exceptions": {"type": "array", "items": _ref("Exception")},
            "count": _INT,
            "partial": {
                "type": "boolean",
                "description": "with since: the store's older history could not be read",
            },
        }
    ),
    "Change": _obj({"exception": _ref("Exception"), "event": _ref("Event")}),
    "Row": _obj({c: _ROW_TYPES.get(c, _STR) for c in ops.APPROVER_COLUMNS}),
    "BlockedRequest": _obj(
        {
            "exception_id": _STR,
            "request_id": _STR,
            "row": {**_ref("Row"), "nullable": True},
            "rows": {"type": "array", "items": _ref("Row"), "maxItems": ops.MAX_BLOCKED_ROWS},
            "truncated": {"type": "boolean"},
        }
    ),
    "GrantRequest": _obj(
        {
            "subject": {
                **_STR,
                "pattern": _SUBJECT,
                "description": "user:NAME, group:NAME or client:CIDR",
                "example": "user:li.na",
            },
            "control": {**_STR, "pattern": _CONTROL, "default": "block"},
            "host": {
                **_STR,
                "pattern": _HOST,
                "description": "a host and its subdomains",
                "example": "mail.qq.com",
            },
            "exact": {"type": "boolean", "description": "the host alone"},
            "path": {**_STR, "pattern": _PATH, "description": "a path prefix (needs a host)"},
            "category": {**_STR, "pattern": _CATEGORY},
            "rule": {**_STR, "pattern": _RULE, "description": "a rule id"},
            "duration": {**_STR, "pattern": _DURATION, "example": "7d"},
            "start": {**_TIME, "description": "default: now"},
            "per_request": {"type": "integer", "minimum": 1},
            "per_window": {"type": "integer", "minimum": 1},
            "lowered_to": {"type": "string", "enum": ["alert", "log"]},
            "reason": _REASON,
        },
        ["subject", "duration", "reason"],
        anyOf=_ONE_TARGET,
        description="Who (subject), past what (control), where (host [+ path], category or "
        "rule), for how long (duration), and why. upload: per_request and/or per_window "
        "bytes; marker and unscannable: lowered_to (alert by default).",
    ),
    "ApproveRequest": _obj(
        {
            "duration": {**_STR, "pattern": _DURATION, "description": "shorter than asked"},
            "subject": {**_STR, "pattern": _SUBJECT, "description": "a network inside it"},
            "host": {
                **_STR,
                "pattern": _HOST,
                "description": "one host instead of the category or rule",
            },
            "exact": {"type": "boolean"},
            "path": {**_STR, "pattern": _PATH, "description": "a path prefix"},
            "per_request": {"type": "integer", "minimum": 1},
            "per_window": {"type": "integer", "minimum": 1},
            "lowered_to": {"type": "string", "enum": ["alert", "log"]},
            "reason": {"type": "string", "maxLength": 2000},
        },
        [],
        description="Every field optional: what is left out stays as asked. An approval may "
        "narrow, never widen.",
    ),
    "ReasonRequest": _obj({"reason": _REASON}),
}

_ERRORS = {
    "400": "the input or the terms are refused (code says why)",
    "401": "no credential, or a wrong one",
    "403": "the caller's roles or the separation of duties refuse it",
    "404": "no such exception",
    "409": "the exception's state does not allow it",
    "429": "too many failed authentications from this address",
    "503": "the exception book or the store is unavailable",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(
    op_id: str,
    summary: str,
    ok: str,
    errors: tuple[str, ...],
    *,
    parameters: list[dict[str, Any]] | None = None,
    body: str | None = None,
    body_required: bool = True,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "responses": {"200": _json(_ref(ok), "done")}
        | {code: _json(_ref("Error"), _ERRORS[code]) for code in errors},
    }
    if parameters:
        out["parameters"] = parameters
    if body is not None:
        out["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return out


_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": _ID},
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_READ_ERRORS = ("400", "401", "403", "429", "503")
_ONE_ERRORS = ("401", "403", "404", "429", "503")
_CHANGE_ERRORS = ("400", "401", "403", "404", "409", "429", "503")


def _paths() -> dict[str, Any]:
    base = "/api/v1/exceptions"
    return {
        base: {
            "get": _op(
                "listExceptions",
                "The exceptions: pending the oldest first, otherwise the newest first. Without "
                "since: those the gateway holds (every live one, and those ended in the last 7 "
                "days); with since: also the store's older ones created since then.",
                "ExceptionList",
                _READ_ERRORS,
                parameters=[
                    _query("state", {"type": "string", "enum": list(ops.STATE_FILTERS)}, "all"),
                    _query("user", _STR, "the requester, or the user it is for"),
                    _query("subject", {**_STR, "pattern": _SUBJECT}, "user:…, group:…, client:…"),
                    _query("control", _STR, "block, upload, marker, marker:LEVEL, unscannable"),
                    _query("since", _STR, "created since (ISO 8601, or a duration ago: 30d)"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": ops.MAX_LIST}, ""),
                ],
            ),
            "post": _op(
                "grantException",
                "Grant an exception without a request (approver). It counts as the first "
                "approval: a control that needs two is in force once another approver approves.",
                "Change",
                _CHANGE_ERRORS,
                body="GrantRequest",
            ),
        },
        f"{base}/{{id}}": {
            "get": _op(
                "showException",
                "One exception as it stands, with every event of its history.",
                "Exception",
                _ONE_ERRORS,
                parameters=[_ID_PARAM],
            )
        },
        f"{base}/{{id}}/approve": {
            "post": _op(
                "approveException",
                "Approve a pending exception (approver), as asked or narrowed.",
                "Change",
                _CHANGE_ERRORS,
                parameters=[_ID_PARAM],
                body="ApproveRequest",
                body_required=False,
            )
        },
        f"{base}/{{id}}/deny": {
            "post": _op(
                "denyException",
                "Deny a pending exception (approver), with the reason the requester reads.",
                "Change",
                _CHANGE_ERRORS,
                parameters=[_ID_PARAM],
                body="ReasonRequest",
            )
        },
        f"{base}/{{id}}/revoke": {
            "post": _op(
                "revokeException",
                "End an approved exception early (approver).",
                "Change",
                _CHANGE_ERRORS,
                parameters=[_ID_PARAM],
                body="ReasonRequest",
            )
        },
        f"{base}/{{id}}/request": {
            "get": _op(
                "blockedRequest",
                "The blocked request a requested exception came from, with its connection's "
                f"rows (at most {ops.MAX_BLOCKED_ROWS}, the columns an approver needs). The "
                "read is recorded.",
                "BlockedRequest",
                _ONE_ERRORS,
                parameters=[_ID_PARAM],
            )
        },
        "/api/v1/openapi.json": {
            "get": {
                "operationId": "openApiDocument",
                "summary": "This document.",
                "responses": {
                    "200": _json({"type": "object"}, "the OpenAPI document"),
                    "401": _json(_ref("Error"), _ERRORS["401"]),
                    "429": _json(_ref("Error"), _ERRORS["429"]),
                },
            }
        },
    }


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "egress-guard exceptions API",
            "version": __version__,
            "description": "Temporary exceptions: approvers decide (the approver role), "
            "approvers and auditors read. Authenticate with an account's API token.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def document() -> dict[str, Any]:
    """The document (a copy: callers may change it)."""
    return copy.deepcopy(_document())
