"""egress-guard: an egress-control gateway built as mitmproxy addons.

Modules, one concern each: ``hosts`` (normalization), ``policy`` (YAML → Policy),
``identity``, ``blocklist`` (suffix-map matcher), ``decision`` (pure allow/block),
``blockpage``, ``auditlog`` (row queue + writer), ``store`` (ClickHouse), ``metrics``,
``console`` (admin API), ``gateway`` (the mitmproxy addons), ``ut1`` (list import), ``cli``.
"""

__version__ = "0.1.0"
