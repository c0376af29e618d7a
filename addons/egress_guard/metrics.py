"""Metrics: the Prometheus counters and gauges the gateway exports, and the /metrics server.

Labels are bounded sets (decision, reason kind, category, kind); never a user, host or any
request text, so the series count stays small and no secret ends up in a metric.
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

REQUESTS = Counter(
    "egress_guard_requests",
    "Requests, CONNECTs and tunnels seen, by outcome",
    ["kind", "decision", "reason_kind", "category"],
)
AUDIT_ROWS_WRITTEN = Counter("egress_guard_audit_rows_written", "Rows written to the store")
AUDIT_ROWS_DROPPED = Counter(
    "egress_guard_audit_rows_dropped", "Rows lost because the audit queue was full"
)
AUDIT_INSERT_ERRORS = Counter("egress_guard_audit_insert_errors", "Failed batch inserts")
AUDIT_QUEUE_DEPTH = Gauge("egress_guard_audit_queue_depth", "Rows waiting for the writer")
AUDIT_SPOOL_BYTES = Gauge("egress_guard_audit_spool_bytes", "Bytes of rows spooled on disk")
AUDIT_SPOOL_CORRUPT = Counter(
    "egress_guard_audit_spool_corrupt_frames", "Spool frames skipped for a bad checksum"
)
AUDIT_REFUSED = Counter(
    "egress_guard_audit_refused_requests",
    "Requests refused with 503 because the request log could not take their row (fail closed)",
)
CONSOLE_LOGINS = Counter(
    "egress_guard_console_logins",
    "Console logins and failed bearer tokens, by outcome (ok, failed, locked)",
    ["outcome"],
)
POLICY_RELOADS = Counter("egress_guard_policy_reloads", "Policy reload attempts", ["result"])
POLICY_RULES = Gauge("egress_guard_policy_rules", "Rules loaded per category", ["category"])
POLICY_VALID = Gauge("egress_guard_policy_last_reload_ok", "1 when the last reload succeeded")
EXCEPTION_USES = Counter(
    "egress_guard_exception_uses",
    "Requests that passed only because of an approved exception, by the control it lifted",
    ["control"],
)
EXCEPTIONS_ACTIVE = Gauge("egress_guard_exceptions_active", "Approved exceptions in force now")


def serve(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> object:
    """Start the /metrics HTTP server in a daemon thread; returns the server (has shutdown())."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


MARKER_MATCHES = Counter(
    "egress_guard_marker_matches",
    "Secret-marker matches, by marker level and destination category",
    ["level", "category"],
)
MARKER_ALERTS = Counter(
    "egress_guard_marker_alerts", "Requests forwarded with an alert-level marker", ["level"]
)
SCAN_VERDICTS = Counter("egress_guard_scan_verdicts", "Body scan verdicts", ["verdict"])
SCAN_SECONDS = Histogram(
    "egress_guard_scan_seconds",
    "Time to scan one body",
    ["where"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Exception-workflow notifications (egress_guard.notify counts through count_notification):
# channel is email or webhook; outcome is sent, retried (an attempt failed, another follows),
# failed (no attempt left, or the server refused for good) or dropped (queue full, shutting
# down, or a notice that could not be built).
NOTIFICATIONS = Counter(
    "egress_guard_notifications",
    "Exception notifications, by channel (email, webhook) and outcome",
    ["channel", "outcome"],
)
NOTIFICATION_QUEUE_DEPTH = Gauge(
    "egress_guard_notification_queue_depth", "Notifications waiting to be sent or retried"
)


def count_notification(channel: str, outcome: str) -> None:
    NOTIFICATIONS.labels(channel, outcome).inc()
