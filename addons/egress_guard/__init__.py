"""egress-guard: an egress-control gateway built as mitmproxy addons.

The layers, each importing only the ones below it:

- ``cli`` — ``egress-guard …``: runs the gateway, manages accounts, talks to the admin API.
- ``runtime`` — everything that faces mitmproxy: the one addon and its hook chain, the
  concern adapters, the body gate, per-flow state, the scan worker pool, the settings.
- ``console`` — the admin API and web console for admins, approvers and auditors; accounts.
- ``requestlog`` — the request log: rows, queue, durable spool, ClickHouse store, evidence.
- ``core`` — pure decisions and policy: hosts, policy files, blocklists, identities, upload
  caps, the marker scanner and its decoders, block pages. Nothing here touches mitmproxy,
  the network or the store.
- ``metrics`` — the Prometheus metrics every layer counts into (a leaf).
"""

__version__ = "0.1.0"
