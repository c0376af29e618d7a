"""Background calls on daemon threads: results and errors reach the caller, and a call that
never returns (a hung store) does not hold up the shutdown."""

import asyncio
import threading
import time

import pytest

from egress_guard.runtime.background import DaemonExecutor


def test_results_and_errors_reach_the_awaiting_coroutine():
    async def main() -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(DaemonExecutor(2))
        value = await loop.run_in_executor(None, sum, [1, 2, 3])
        with pytest.raises(ZeroDivisionError):
            await loop.run_in_executor(None, lambda: 1 / 0)
        return value, threading.current_thread().name

    assert asyncio.run(main())[0] == 6


def test_a_call_that_never_returns_does_not_hold_up_the_shutdown():
    stuck = threading.Event()
    executor = DaemonExecutor(1)
    executor.submit(stuck.wait)  # never set: a store call in a server that answers nothing
    start = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - start < 2
    assert all(t.daemon for t in executor._threads)
    with pytest.raises(RuntimeError):
        executor.submit(len, "")
