"""Faults: failure injection at the store boundary, for the durability tests.

Off unless the environment variable ``EGRESS_GUARD_FAULT_FILE`` names a file; while that file
holds a fault's name, the fault is active: ``store-down`` (every insert fails) and
``crash-after-insert`` (the process dies right after an insert, before its checkpoint).
"""

from __future__ import annotations

import os


def active(name: str) -> bool:
    path = os.environ.get("EGRESS_GUARD_FAULT_FILE")
    if not path:
        return False
    try:
        with open(path) as f:
            return name in f.read().split()
    except OSError:
        return False
