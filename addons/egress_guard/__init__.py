"""egress-guard: an egress-control gateway built as mitmproxy addons.

Pure decisions: ``hosts`` (normalization), ``policy`` (YAML → Policy), ``identity``,
``blocklist`` (suffix-map matcher), ``decision``, ``upload`` (caps and windows), ``scan``
(marker automaton, verdicts), ``decode`` (body decoders), ``selector`` (override selectors),
``units``. The proxy side: ``gateway`` (runtime and the one addon), ``adapters/`` (one per
concern), ``flows`` (per-flow state, block responses), ``bodygate`` (the mitmproxy patches),
``blockpage``. The log: ``auditlog`` (queue + writer), ``spool`` (durable on-disk queue),
``store`` (ClickHouse). Around it: ``metrics``, ``console`` (admin API), ``cli``, ``ut1``,
``faults`` (test-only failure injection).
"""

__version__ = "0.1.0"
