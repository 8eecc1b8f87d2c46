"""Which process stops a server: claims in the database.

Several Outpost processes may share one database, and any of them may have
died in the middle of a start or a stop. Before a process stops a server,
it claims it: a conditional update that only one process can win. It may

- claim a running server (``stop_pending``, itself as owner);
- take over the pending start or stop of a process known to be gone
  (:mod:`.liveness`; without a known owner, after ``pending_timeout``);
- ask the live process that is starting the server to end that start
  (it looks for such requests while the start runs), and wait;
- wait while another live process stops it.
"""

import time

from .errors import ServerBusyError
from .liveness import known_gone
from .utils import as_utc, utcnow, wait_until


class StopClaims:
    """The claims of one process.

    Parameters:
        db: the :class:`~jupyterhub_outpost.orm.Database`
        owner: this process' name in the records
        pending_timeout: seconds after which a pending record without a
            known owner is taken as interrupted
        wait_timeout: seconds a stop waits for another process' stop
    """

    def __init__(self, db, owner, pending_timeout, wait_timeout):
        self.db = db
        self.owner = owner
        self.pending_timeout = pending_timeout
        self.wait_timeout = wait_timeout

    async def claim(self, record):
        """Make this process the one that stops ``record``.

        Returns the record, or None once another process stopped the server;
        raises :class:`~jupyterhub_outpost.errors.ServerBusyError` when
        another process' stop takes longer than ``wait_timeout``.
        """
        deadline = time.monotonic() + self.wait_timeout
        while True:
            if await self._claim(record):
                return record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerBusyError(
                    "Another Outpost process is stopping this server; try again later"
                )
            record = await self._next_change(record, remaining)
            if record is None:
                return None

    async def _claim(self, record):
        """True if this process may stop ``record`` now"""
        pending = record.start_pending or record.stop_pending
        if record.owner == self.owner and pending:
            return True
        if pending:
            if await self.owner_gone(record):
                return await self.db.take_over(record.id, record.owner, self.owner)
            if record.start_pending:
                # the process that starts it ends the start when it sees this
                await self.db.request_stop(record.id)
            return False
        return await self.db.claim_stop(record.id, self.owner)

    async def _next_change(self, record, timeout):
        """The record once its stop can go on, or None once it is gone"""
        result = {}

        async def changed():
            current = await self.db.get_server(*record.key)
            if current is None or current.id != record.id:
                result["record"] = None
                return True
            if not (current.start_pending or current.stop_pending) or await self.owner_gone(current):
                result["record"] = current
                return True
            return False

        try:
            await wait_until(changed, timeout=timeout, message="the other stop")
        except TimeoutError:
            return record
        return result["record"]

    async def owner_gone(self, record, leases=None, now=None):
        """True if the process that runs ``record``'s pending start or stop ended.

        Without a recorded owner (or its lease), only age tells:
        ``pending_timeout`` seconds since the last update.
        """
        now = now or utcnow()
        if record.owner == self.owner:
            return False
        if record.owner:
            if leases is None:
                leases = await self.db.process_leases({record.owner})
            lease = leases.get(record.owner)
            if lease is not None:
                return known_gone(lease, now)
        age = (now - as_utc(record.last_update)).total_seconds()
        return age >= self.pending_timeout

    async def take_over_interrupted(self, records):
        """The pending ``records`` whose process is gone, claimed by this one"""
        now = utcnow()
        leases = await self.db.process_leases({r.owner for r in records if r.owner})
        taken = []
        for record in records:
            if await self.owner_gone(record, leases, now) and await self.db.take_over(
                record.id, record.owner, self.owner
            ):
                taken.append(record)
        return taken
