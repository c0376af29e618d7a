-- A read-only ClickHouse role for auditors who query the request log with their own tools
-- (clickhouse-client, Grafana's ClickHouse data source), on a ClickHouse server the gateway
-- writes to (--clickhouse https://…/egress). Run it as a ClickHouse admin; replace `egress`
-- with the gateway's database and the password placeholder before running:
--
--   clickhouse-client --multiquery < deploy/clickhouse-auditor.sql
--
-- The role can read the gateway's tables and nothing else: no INSERT, ALTER, DROP or
-- TRUNCATE, so the log stays the evidence it is. Every query it makes is bounded like the
-- console's (max_execution_time, max_result_rows) and lands in system.query_log (log_queries):
-- the console records its own readers in console_events; this is the trail of the others.

CREATE ROLE IF NOT EXISTS egress_auditor;

GRANT SELECT ON egress.requests TO egress_auditor;
GRANT SELECT ON egress.console_events TO egress_auditor;
GRANT SELECT ON egress.exception_events TO egress_auditor;
GRANT SELECT ON egress.incident_events TO egress_auditor;
GRANT SELECT ON egress.schema_migrations TO egress_auditor;
-- The retention proof reads rows and bytes per month from the parts of those tables.
GRANT SELECT(database, table, partition, rows, bytes_on_disk, data_uncompressed_bytes, active)
    ON system.parts TO egress_auditor;

-- readonly = 1: nothing is written, no setting is changed but the ones below. Grafana's
-- client sets max_execution_time itself, so that one may change in readonly mode, up to 300 s.
CREATE SETTINGS PROFILE IF NOT EXISTS egress_auditor_limits SETTINGS
    readonly = 1,
    max_execution_time = 60 MAX 300 CHANGEABLE_IN_READONLY,
    max_result_rows = 100000,
    result_overflow_mode = 'throw',
    max_memory_usage = 4000000000,
    log_queries = 1
    TO egress_auditor;

-- One account per auditor (names in the log say who ran what). Repeat per person.
CREATE USER IF NOT EXISTS li_auditor
    IDENTIFIED WITH sha256_password BY 'REPLACE-WITH-A-LONG-PASSWORD'
    DEFAULT ROLE egress_auditor
    SETTINGS PROFILE 'egress_auditor_limits';
GRANT egress_auditor TO li_auditor;
