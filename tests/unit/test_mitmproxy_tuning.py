"""The run path's tuning of mitmproxy: the addons it loads and the task naming it replaces."""

from __future__ import annotations

import asyncio
import os

from egress_guard.runtime.addon import mitmproxy_addons, skip_test_task_names


def test_tasks_are_named_without_an_environment_lookup_each_time():
    from mitmproxy.utils import asyncio_utils

    assert os.environ.get("PYTEST_CURRENT_TEST")  # what mitmproxy would look up and append
    skip_test_task_names()

    async def main() -> asyncio.Task[None]:
        task = asyncio_utils.create_task(asyncio.sleep(0), name="hook", client=("10.0.0.1", 1))
        await task
        return task

    task = asyncio.run(main())
    assert task.get_name() == "hook" and task.client == ("10.0.0.1", 1) and task.created > 0


def test_the_gateway_keeps_the_addons_that_guard_it():
    names = {type(a).__name__ for a in mitmproxy_addons()}
    # Open-proxy protection, h2c refusal, identity, and startup-error exits must stay.
    assert {"Block", "DisableH2C", "ProxyAuth", "Proxyserver", "ErrorCheck"} <= names
    assert not names & {"MapRemote", "MapLocal", "ModifyHeaders", "ClientPlayback", "Save"}
