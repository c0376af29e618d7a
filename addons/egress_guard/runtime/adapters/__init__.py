"""Adapters: the mitmproxy side of each concern — turn a flow into plain values, call the pure
decision functions in ``core``, carry out the answer. ``addon.EgressGuard`` calls them in order.

They see the gateway only through ``Runtime``: the policy, the approved exceptions in force,
the clock, the upload windows, how bodies are held, the scan pool, where requests may go, the
CONNECT state per client connection, and the request log.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from egress_guard.core.exceptions import ActiveExceptions
    from egress_guard.core.policy import Policy
    from egress_guard.core.upload import UploadWindows
    from egress_guard.requestlog.auditlog import RequestRow

    from ..flows import FlowState
    from ..heldbody import HoldSpec
    from ..portal import Portal
    from ..resolver import Destinations
    from ..scanpool import ScanPool


class Runtime(Protocol):
    clock: Callable[[], float]
    windows: UploadWindows
    scans: ScanPool
    destinations: Destinations
    portal: Portal | None  # signs the block pages' exception request forms
    tunnels: dict[str, FlowState]  # the CONNECT's state, by client connection id

    @property
    def policy(self) -> Policy: ...

    @property
    def hold(self) -> HoldSpec: ...

    @property
    def exceptions(self) -> ActiveExceptions: ...

    def now_ms(self) -> int: ...

    @property
    def fails_closed(self) -> bool: ...

    def refuses_for_audit(self) -> bool: ...

    def record(self, row: RequestRow) -> Future[None] | None: ...
