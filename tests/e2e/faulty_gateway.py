"""A gateway that breaks on demand, for the durability and console tests: ``egress-guard run``
itself, with a store and a request log that read a fault file. While the file holds a fault's
name, it is on: ``store-down`` (every insert fails) and ``crash-after-insert`` (the process
dies right after an insert, before its checkpoint). ``clock+SECONDS`` moves the gateway's
clock that far ahead of the wall clock (expiry tests: the clock is read through the file, so a
test moves time while the gateway runs).

    python tests/e2e/faulty_gateway.py FAULT_FILE run --listen … (the options of run)

``GatewayProcess(fault_file=…)`` starts the gateway this way.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from egress_guard import cli
from egress_guard.requestlog.store import Store, StoreError
from egress_guard.runtime.gateway import Gateway


class Faults:
    """The faults named in a file, read at every check: a test switches them while it runs."""

    def __init__(self, path: Path):
        self.path = path

    def names(self) -> list[str]:
        try:
            return self.path.read_text().split()
        except OSError:  # no file: no fault
            return []

    def active(self, name: str) -> bool:
        return name in self.names()

    def clock(self) -> float:
        """The wall clock, moved ahead by the ``clock+SECONDS`` the file names."""
        ahead = sum(float(n[6:]) for n in self.names() if n.startswith("clock+"))
        return time.time() + ahead


class FaultyStore(Store):
    """The real store, whose inserts fail while ``store-down`` is on."""

    def __init__(self, dsn: str, faults: Faults):
        self.faults = faults
        super().__init__(dsn)

    def _fail_if_down(self) -> None:
        if self.faults.active("store-down"):
            raise StoreError("store unavailable (injected fault)")

    def insert_requests(self, rows: Sequence[Sequence[Any]], token: str = "") -> None:
        self._fail_if_down()
        super().insert_requests(rows, token)

    def insert_console_event(self, row: Sequence[Any]) -> None:
        self._fail_if_down()
        super().insert_console_event(row)


def faulty_gateway(faults: Faults) -> Gateway:
    def crash_if_asked() -> None:
        if faults.active("crash-after-insert"):
            os._exit(137)  # as a kill would: no cleanup, the batch inserted, not checkpointed

    return Gateway(
        clock=faults.clock,
        open_store=lambda dsn: FaultyStore(dsn, faults),
        after_insert=crash_if_asked,
    )


if __name__ == "__main__":
    faults = Faults(Path(sys.argv[1]))
    cli.main(sys.argv[2:], prog_name="egress-guard", obj=lambda: faulty_gateway(faults))
