"""The garbage collector with thousands of servers: short pauses, memory that comes back.

Each running server keeps a few dozen objects that Python's cycle
collector tracks (its Spawner, traits, records). A full collection visits
all tracked objects while the event loop waits: with 10,000 running
servers about 480,000 objects, half a second on a small machine, during
which no poll is answered. Those objects live as long as their servers, so
visiting them again and again finds nothing to free.

:class:`CollectorPolicy` therefore moves what has settled out of the
collector's sight with :func:`gc.freeze`: once at startup, and after
servers were started or restored, at most once per ``freeze_interval``
(after a collection of the young generations, so that no fresh garbage is
frozen). A full collection then visits only what is newer than the last
freeze.

Frozen objects are still freed as soon as nothing refers to them. The
Outpost's own objects of a server hold no reference cycles, so a stopped
server's memory returns at once. A Spawner class that builds cycles of its
own would leave its stopped servers frozen: the policy keeps weak
references to the Spawners of stopped servers, and when more than
``leak_threshold`` of them are still alive a while later, it unfreezes
everything (the next full collection frees them, once) and says so in the
log.

It also times every collection (``gc.callbacks``), for the metrics.
"""

import asyncio
import gc
import time
import weakref

from traitlets import Float, Integer
from traitlets.config import LoggingConfigurable

# how long a stopped server's Spawner may live on before it counts as kept
RELEASE_GRACE = 30.0
# upper bounds (seconds) of the pause histogram
PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class CollectorPolicy(LoggingConfigurable):
    """When to freeze what the garbage collector need not scan again"""

    freeze_interval = Float(
        1.0,
        help="""Seconds between freezes of the objects that exist (at most; only
        after servers started or were restored). 0 turns freezing off: full
        collections then scan every running server's objects.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    leak_threshold = Integer(
        500,
        help="""Stopped servers whose Spawner is still alive 30 s after the stop
        (a Spawner class with reference cycles) before the frozen objects are
        handed back to the collector, which then frees them in one full
        collection.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._changed = False
        self._task = None
        self._released = []  # (weak reference to a stopped server's Spawner, when)
        self._began = None
        # pauses by generation: per bucket of PAUSE_BUCKETS (and above), and their sum;
        # plain numbers, so that the callback takes no lock while the collector runs
        self.pause_counts = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in range(3)]
        self.pause_sums = [0.0, 0.0, 0.0]
        self.longest_pause = 0.0
        self.freezes = 0
        self.unfreezes = 0

    # pauses

    def _timed(self, phase, info):
        if phase == "start":
            self._began = time.perf_counter()
            return
        if self._began is None:
            return
        seconds, self._began = time.perf_counter() - self._began, None
        generation = min(2, info.get("generation", 2))
        bucket = 0
        while bucket < len(PAUSE_BUCKETS) and seconds > PAUSE_BUCKETS[bucket]:
            bucket += 1
        self.pause_counts[generation][bucket] += 1
        self.pause_sums[generation] += seconds
        if seconds > self.longest_pause:
            self.longest_pause = seconds

    # freezing

    def start(self):
        """Freeze what exists now (modules, configuration, the application)
        and begin the periodic freezes"""
        if self._timed not in gc.callbacks:
            gc.callbacks.append(self._timed)
        if self.freeze_interval > 0:
            gc.collect()
            gc.freeze()
            self.freezes += 1
            self._task = asyncio.ensure_future(self._freeze_when_changed())

    async def stop(self):
        if self._timed in gc.callbacks:
            gc.callbacks.remove(self._timed)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def changed(self):
        """Servers started or were restored: their objects are worth freezing"""
        self._changed = True

    def released(self, spawner):
        """A server stopped: its Spawner should be freed soon"""
        if self.freeze_interval > 0:
            self._released.append((weakref.ref(spawner), time.monotonic()))

    async def _freeze_when_changed(self):
        while True:
            await asyncio.sleep(self.freeze_interval)
            if self._changed:
                self._changed = False
                self.freeze()
            self._check_released()

    def freeze(self):
        """Collect the young generations, then freeze all that is left"""
        gc.collect(1)
        gc.freeze()
        self.freezes += 1

    def _check_released(self):
        """Unfreeze when too many stopped servers' Spawners stay alive"""
        if not self._released:
            return
        cutoff = time.monotonic() - RELEASE_GRACE
        alive = [(ref, when) for ref, when in self._released if ref() is not None]
        kept = sum(1 for _, when in alive if when < cutoff)
        if kept > self.leak_threshold:
            self.log.info(
                "%i stopped servers' Spawners are still in memory after %.0f s (reference "
                "cycles): handing %i frozen objects back to the garbage collector",
                kept, RELEASE_GRACE, gc.get_freeze_count(),
            )  # fmt: skip
            gc.unfreeze()
            self.unfreezes += 1
            alive = [(ref, when) for ref, when in alive if when >= cutoff]
        self._released = alive
