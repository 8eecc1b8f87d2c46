"""Calling a Spawner's methods without blocking the event loop, in bounded time.

Spawner methods are coroutines in JupyterHub's own spawners, but a Spawner
or a hook may be a plain function that blocks (a ``subprocess.run``, a
synchronous HTTP call). Those run in a thread of their own pool; coroutine
functions run on the event loop, as in JupyterHub.
"""

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from jupyterhub.spawner import Spawner
from tornado.gen import is_coroutine_function

if hasattr(asyncio, "timeout"):  # Python >= 3.11: no extra task per call
    _deadline = asyncio.timeout
else:  # pragma: no cover
    _deadline = None


def hook_configured(spawner, name):
    """Whether ``spawner.run_<name>()`` has anything to do: the hook
    ``name`` is set, or the Spawner class runs its own code there"""
    runner = f"run_{name}"
    if getattr(type(spawner), runner, None) is not getattr(Spawner, runner):
        return True
    return getattr(spawner, name, None) is not None


def runs_on_loop(fn):
    """True for coroutine functions (async def, tornado coroutines)"""
    return inspect.iscoroutinefunction(fn) or is_coroutine_function(fn)


class SpawnerCalls:
    """Runs Spawner methods: coroutine functions on the loop, others in threads.

    Parameters:
        threads: the size of the pool for plain functions
    """

    def __init__(self, threads):
        self.executor = ThreadPoolExecutor(max(1, threads), thread_name_prefix="outpost-spawner")

    def submit(self, fn, *args, **kwargs):
        """An awaitable of ``fn(*args, **kwargs)``: a coroutine, or a Future of
        a thread's call. A plain function's awaitable result is awaited too."""
        if runs_on_loop(fn):
            return _awaited(fn(*args, **kwargs))
        loop = asyncio.get_running_loop()
        thread_call = loop.run_in_executor(self.executor, partial(fn, *args, **kwargs))
        return _awaited(thread_call)

    async def call(self, fn, *args, timeout=None, **kwargs):
        """``fn(*args, **kwargs)``'s result; ``asyncio.TimeoutError`` after ``timeout`` seconds"""
        awaitable = self.submit(fn, *args, **kwargs)
        if timeout is None:
            return await awaitable
        if _deadline is not None:
            async with _deadline(timeout):
                return await awaitable
        return await asyncio.wait_for(awaitable, timeout)  # pragma: no cover

    def shutdown(self):
        self.executor.shutdown(wait=False, cancel_futures=True)


async def _awaited(value):
    """The value, awaiting it (and what it returns) while it is awaitable"""
    while inspect.isawaitable(value):
        value = await value
    return value
