"""The account journal (every permission change made with ``egress-guard account``), copied
into the console's event log, because the rules ask for permission changes to be logged."""

from __future__ import annotations

import asyncio
import json
import logging

from .context import ConsoleContext

log = logging.getLogger("egress_guard.console")


async def watch_accounts(ctx: ConsoleContext, every: float = 2.0) -> None:
    """Copy new journal entries every ``every`` seconds; an entry is marked recorded only
    once the store has it, so none is lost while the store is down."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            for change, offset in await loop.run_in_executor(None, ctx.accounts.unrecorded_changes):
                await ctx.record_event(
                    actor=change.get("by") or "account-file",
                    roles=[],
                    via="cli",
                    client_ip="",
                    action="account_change",
                    outcome="ok",
                    detail=json.dumps(
                        {k: change.get(k, "") for k in ("account", "change", "roles", "ts")},
                        sort_keys=True,
                    ),
                )
                await loop.run_in_executor(None, ctx.accounts.mark_recorded, offset)
        except Exception as e:  # the store is down: the journal waits
            log.error("cannot record account changes yet: %s", e)
        await asyncio.sleep(every)
