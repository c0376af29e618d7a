"""DLP incidents: which request rows open one, how severe each is, and the triage vocabulary.

An incident is not a row of its own. It is a request row that a marker blocked or alerted on,
or that was refused as unscannable, keyed by its request id, and it is derived when it is
read: the rows are in the store as soon as the log writer has them, so there is no job to
run, nothing on the proxy's hot path, and nothing two nodes could disagree on. Its triage is
the ``incident_events`` table, appended to and never changed; the state of an incident is the
latest event of each kind (status, assignee, classification), and its history is all of them.
The rows hold the marker ids and levels, never the text a marker matched.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

STATUSES = ("new", "investigating", "resolved")
CLASSIFICATIONS = ("true_positive", "false_positive", "expected_activity")
EVENT_KINDS = ("status", "assign", "classify", "comment")
MAX_COMMENT = 4000

# The rows that open an incident: a marker's block or alert, and every refusal of a body that
# could not be scanned (its error starts "unscannable:").
INCIDENT_CONDITION = (
    "((reason_kind = 'marker' AND decision IN ('block', 'alert')) "
    "OR (decision = 'block' AND startsWith(error, 'unscannable')))"
)
# Severity comes from the action the policy gives the marker's level: a level whose markings
# are blocked is one the policy holds most secret (high); an alert level is forwarded and
# flagged (medium); an unscannable body is one nobody knows the content of (low).
SEVERITY_SQL = "multiIf(notEmpty(marker_ids) AND decision = 'block', 3, notEmpty(marker_ids), 2, 1)"
SEVERITY_NAMES = {3: "high", 2: "medium", 1: "low"}


class IncidentError(ValueError):
    """An update that is not allowed; the message says why."""


@dataclass(frozen=True)
class Change:
    """What one update asks for; None leaves a field as it is (assignee "" unassigns)."""

    status: str | None = None
    assignee: str | None = None
    classification: str | None = None
    comment: str | None = None

    def check(self, current: dict[str, Any]) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise IncidentError(f"status must be one of {', '.join(STATUSES)}")
        if self.classification is not None and self.classification not in CLASSIFICATIONS:
            raise IncidentError(f"classification must be one of {', '.join(CLASSIFICATIONS)}")
        if self.comment is not None and len(self.comment) > MAX_COMMENT:
            raise IncidentError(f"a comment is at most {MAX_COMMENT} characters")
        if self.status == "resolved" and not (self.classification or current["classification"]):
            # A closed incident says what it was: the classification is the finding.
            raise IncidentError("an incident is resolved with a classification")
        if all(v is None for v in (self.status, self.assignee, self.classification)) and not (
            self.comment and self.comment.strip()
        ):
            raise IncidentError(
                "nothing to change: give a status, assignee, classification or comment"
            )

    def events(self) -> list[tuple[str, str, str]]:
        """(kind, value, comment) of each event this update appends, in that order."""
        out = []
        if self.assignee is not None:
            out.append(("assign", self.assignee, ""))
        if self.classification is not None:
            out.append(("classify", self.classification, ""))
        if self.status is not None:
            out.append(("status", self.status, ""))
        if self.comment is not None and self.comment.strip():
            out.append(("comment", "", self.comment.strip()))
        return out


def event_rows(
    request_id: str,
    change: Change,
    *,
    now: datetime,
    node: str,
    actor: str,
    roles: list[str],
    client_ip: str,
) -> list[tuple[Any, ...]]:
    """The ``incident_events`` rows of an update (``INCIDENT_EVENT_NAMES`` order), each with a
    new id. The state is the latest event by (ts, event_id): ids made by one process sort in
    the order it made them, so two updates within one millisecond keep their order."""
    ms = int(now.timestamp() * 1000)
    rand = uuid.uuid4().hex[:8]
    return [
        (now, node, f"{ms:013d}-{next(_SEQUENCE):09d}-{rand}", request_id, kind, value, comment,
         actor, roles, client_ip)
        for kind, value, comment in change.events()
    ]  # fmt: skip


_SEQUENCE = itertools.count()
