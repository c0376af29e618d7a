"""The request log: one row per request, queued off the hot path, made durable in a spool,
written to ClickHouse; evidence exports of it."""
