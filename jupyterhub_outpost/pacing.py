"""Pacing the Outpost's own work for starts, so that polls stay prompt.

An event loop runs, in each of its turns, every callback that became ready
during the turn before. When a hundred starts arrive together (a course
begins) or their Spawners return together, each of them brings a slice of
work (checking the request, building the Spawner, saving its end) into the
same turn, and a poll that arrives meanwhile waits for all of them.

:class:`Pacer` lets at most ``per_turn`` such slices run per turn of the
loop; the others wait for later turns, in the order they came. Polls do
not wait for the pacer: between two turns the loop reads what arrived, so
a poll waits for a few slices at most. Waiting for the database or for a
Spawner needs no pace.
"""

import asyncio
import collections


class Pacer:
    """At most ``per_turn`` callers of :meth:`wait` go on per turn of the event loop"""

    def __init__(self, per_turn=4):
        self.per_turn = max(1, per_turn)
        self._used = 0
        self._waiters = collections.deque()
        self._reset_scheduled = False

    async def wait(self):
        """Return when this caller may do its slice of work"""
        if self._used < self.per_turn and not self._waiters:
            self._used += 1
            self._schedule_reset()
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._schedule_reset()
        await future

    def _schedule_reset(self):
        if not self._reset_scheduled:
            self._reset_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self):
        self._reset_scheduled = False
        self._used = 0
        while self._waiters and self._used < self.per_turn:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                self._used += 1
        if self._waiters or self._used:
            self._schedule_reset()
