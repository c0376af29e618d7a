"""Background work off the event loop that must never hold up the gateway's exit.

asyncio's default executor is a ``ThreadPoolExecutor``, and Python joins its threads when the
interpreter exits. A call stuck in a hung ClickHouse server (it accepts, then answers nothing
until a long timeout) would then keep a stopping gateway alive for minutes. The gateway's
background calls (store refreshes, policy checks, the console's queries) go to daemon threads
instead: at exit a stuck one is left behind, and what it was doing is redone at the next start
(the spool and the exception snapshot are on disk).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class DaemonExecutor(ThreadPoolExecutor):
    """A fixed pool of daemon threads taking calls from one queue. A ``ThreadPoolExecutor``
    only by type (asyncio's default executor must be one); none of its machinery is used."""

    def __init__(self, workers: int = 8, name: str = "egress-guard-bg"):
        super().__init__(max_workers=1)  # never given work: submit below is the pool
        self._calls: queue.SimpleQueue[
            tuple[Future[Any], Callable[..., Any], tuple, dict] | None
        ] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._shut:
            raise RuntimeError("cannot schedule new calls after shutdown")
        future: Future[Any] = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting coroutine
                future.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; a call in progress is not waited for beyond a moment (a hung
        store call would never end)."""
        self._shut = True
        for _ in self._threads:
            self._calls.put(None)
        if wait:
            for thread in self._threads:
                thread.join(0.5)
