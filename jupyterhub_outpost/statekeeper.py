"""Saving a Spawner's state while its ``start()`` runs.

A start may launch a process, submit a batch job or create a pod long
before ``start()`` returns. If the Outpost dies in between, only the saved
state (pid, job id, pod name) lets a later process stop what was launched.
So while a start runs, its :class:`StateKeeper` saves ``get_state()`` as soon as
it changes: when the Spawner calls ``db.commit()`` (batchspawner does), when
one of its traits changes (``pid``, ``job_id``, ...), and at least every
``interval`` seconds. It also notices when another process asked for the
server to be stopped, and then ends the start.
"""

import asyncio
import copy
import time

from traitlets import All

_UNSAVED = object()

# what is saved when get_state() returns something other than a dict: after
# a restart, such a server's status cannot be told (polls answer 503)
UNKNOWN_STATE_KEY = "_outpost_state_unknown"


def state_to_save(spawner):
    """``spawner.get_state()``, or a marker when it is not a dict"""
    state = spawner.get_state()
    if isinstance(state, dict):
        return state
    return {UNKNOWN_STATE_KEY: type(state).__name__}


def state_is_unknown(state):
    return isinstance(state, dict) and UNKNOWN_STATE_KEY in state


class StateKeeper:
    """Keeps the stored state of one starting server current.

    Made by :meth:`StateKeepers.add`; checks run when the Spawner commits or
    changes a trait, and at each tick of the shared :class:`StateKeepers`.
    """

    def __init__(self, keepers, managed, on_stop_requested, saved=_UNSAVED):
        self.keepers = keepers
        self.managed = managed
        self.on_stop_requested = on_stop_requested
        self._saved = saved
        self._writing = None  # the write in flight
        self._dirty = False  # changed while a write was in flight
        self._woken = None  # the timer of a check asked for
        self._warned = False

    def wake(self, change=None):
        """Check the state ``save_delay`` seconds from now (the changes of
        one step of a start, several traits at once, make one write)"""
        if self._woken is None:
            self._woken = asyncio.get_running_loop().call_later(self.keepers.save_delay, self._wake_up)

    def _wake_up(self):
        self._woken = None
        self.check()

    def check(self):
        """Start writing ``get_state()`` if it changed since the last write"""
        if self._writing is not None and not self._writing.done():
            self._dirty = True  # writes of one server stay in order
            return
        try:
            state = self._current()
        except Exception as e:  # a Spawner's get_state() failed: try again next tick
            self.keepers.log.warning("%s - get_state() failed: %s", self.managed.log_name, e)
            return
        if state is None:
            return
        self._writing = asyncio.ensure_future(self._write(state))

    def _current(self):
        """The state to write, or None when it did not change"""
        state = state_to_save(self.managed.spawner)
        if state_is_unknown(state) and not self._warned:
            self._warned = True
            self.keepers.log.warning(
                "%s - %s.get_state() returned %s, not a dict: after a restart, "
                "this server's status cannot be told",
                self.managed.log_name, type(self.managed.spawner).__name__,
                state[UNKNOWN_STATE_KEY],
            )  # fmt: skip
        if state == self._saved:
            return None
        return copy.deepcopy(state)

    async def _write(self, state):
        try:
            await self.keepers.db.save_state(self.managed.record.id, state)
            self._saved = self.managed.saved_state = state
        except Exception as e:
            self.keepers.log.warning("%s - could not save the state: %s", self.managed.log_name, e)
        if self._dirty:
            self._dirty = False
            self._writing = None
            self.check()

    async def stop(self, last_save=True):
        """Stop watching, after one last save of what changed (unless the
        caller saves the state next)"""
        self.managed.spawner.unobserve(self.wake, names=All)
        self.keepers.discard(self)
        if self._woken is not None:
            self._woken.cancel()
            self._woken = None
        while self._writing is not None and not self._writing.done():
            await asyncio.wait([self._writing])
        if not last_save:
            return
        state = self._current()
        if state is not None:
            await self.keepers.db.save_state(self.managed.record.id, state)
            self._saved = self.managed.saved_state = state


class StateKeepers:
    """The keepers of all starts of one process, on one shared tick.

    Every ``interval`` seconds each starting server's ``get_state()`` is
    compared with what was saved (a write only when it changed), and every
    ``stop_check_interval`` seconds one read asks the database which of
    them another process asked to stop. No task or query per server and tick.
    A change the Spawner makes (a trait, ``db.commit()``) is checked
    ``save_delay`` seconds after it: a start that ends within that time is
    saved once, at its end.

    Parameters:
        db: the :class:`~jupyterhub_outpost.orm.Database`
        log: a logger
    """

    def __init__(self, db, log, interval=0.1, stop_check_interval=1.0, save_delay=0.005):
        self.db = db
        self.log = log
        self.interval = interval
        self.save_delay = save_delay
        self.stop_check_interval = stop_check_interval
        self._keepers = set()
        self._ticker = None

    def add(self, managed, on_stop_requested, saved=_UNSAVED):
        """Keep ``managed``'s state saved while it starts; return its keeper.
        ``saved``: the state stored already (with the record)."""
        keeper = StateKeeper(self, managed, on_stop_requested, saved)
        managed.spawner.observe(keeper.wake, names=All)
        self._keepers.add(keeper)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick())
        keeper.wake()
        return keeper

    def discard(self, keeper):
        self._keepers.discard(keeper)

    async def _tick(self):
        last_stop_check = time.monotonic()
        while self._keepers:
            await asyncio.sleep(self.interval)
            for keeper in list(self._keepers):
                keeper.check()
            if time.monotonic() - last_stop_check >= self.stop_check_interval:
                last_stop_check = time.monotonic()
                await self._check_stops()

    async def _check_stops(self):
        keepers = {k.managed.record.id: k for k in self._keepers}
        if not keepers:
            return
        try:
            asked = await self.db.stop_requested(keepers)
        except Exception as e:
            self.log.warning("Could not read stop requests: %s", e)
            return
        for server_id in asked:
            keeper = keepers[server_id]
            if keeper in self._keepers:
                self._keepers.discard(keeper)
                keeper.on_stop_requested()
