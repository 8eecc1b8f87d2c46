"""Saving a Spawner's state while its ``start()`` runs.

A start may launch a process, submit a batch job or create a pod long
before ``start()`` returns. If the Outpost dies in between, only the saved
state (pid, job id, pod name) lets a later process stop what was launched.
So while a start runs, :class:`StateKeeper` saves ``get_state()`` as soon as
it changes: when the Spawner calls ``db.commit()`` (batchspawner does), when
one of its traits changes (``pid``, ``job_id``, ...), and at least every
``interval`` seconds. It also notices when another process asked for the
server to be stopped, and then ends the start.
"""

import asyncio
import copy

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

    Parameters:
        managed: the :class:`~jupyterhub_outpost.servers.ManagedServer`
        db: the :class:`~jupyterhub_outpost.orm.Database`
        log: a logger
        interval: seconds between checks when nothing woke the keeper
        stop_check_every: checks between two reads of the stop flag
    """

    def __init__(self, managed, db, log, interval=0.1, stop_check_every=10):
        self.managed = managed
        self.db = db
        self.log = log
        self.interval = interval
        self.stop_check_every = stop_check_every
        self.stop_requested = False
        self._saved = _UNSAVED
        self._wake = asyncio.Event()
        self._task = None
        self._warned = False

    def wake(self, change=None):
        """Check the state at the next turn of the event loop"""
        self._wake.set()

    def start(self, on_stop_requested):
        """Begin watching; ``on_stop_requested()`` runs if another process asks for a stop"""
        self.managed.spawner.observe(self.wake, names=All)
        self._task = asyncio.ensure_future(self._run(on_stop_requested))

    async def stop(self):
        """Stop watching, after one last save of what changed"""
        self.managed.spawner.unobserve(self.wake, names=All)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        await self.save_if_changed()

    async def _run(self, on_stop_requested):
        checks = 0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.save_if_changed()
                checks += 1
                if checks % self.stop_check_every == 0 and await self._stop_asked():
                    self.stop_requested = True
                    on_stop_requested()
                    return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.log.warning("%s - could not save the state: %s", self.managed.log_name, e)

    async def save_if_changed(self):
        """Save ``get_state()`` if it differs from what was saved last"""
        state = state_to_save(self.managed.spawner)
        if state_is_unknown(state):
            if not self._warned:
                self._warned = True
                self.log.warning(
                    "%s - %s.get_state() returned %s, not a dict: after a restart, "
                    "this server's status cannot be told",
                    self.managed.log_name, type(self.managed.spawner).__name__,
                    state[UNKNOWN_STATE_KEY],
                )  # fmt: skip
        if state == self._saved:
            return
        state = copy.deepcopy(state)
        await self.db.save_state(self.managed.record.id, state)
        self._saved = state

    async def _stop_asked(self):
        record = self.managed.record
        found = await self.db.server_status(*record.key)
        return found is None or found[2]
