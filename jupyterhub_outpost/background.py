"""Background work that one process does for all: runtime limits,
housekeeping against the hubs, rebuilding the hubs' SSH tunnels after a
start, and finishing interrupted starts and stops.

Several Outpost processes may share one database. A lease in the database
(not a file) decides which of them does this work; when that process dies,
its lease expires and another takes over. What the work needs (end dates,
pending flags) lives in the database, so it survives restarts.
"""

import asyncio
from datetime import timedelta

from traitlets.config import LoggingConfigurable

from .liveness import known_gone, process_identity
from .orm import PROCESS_LEASE_PREFIX
from .tunnels import TunnelRecreation
from .utils import as_utc, utcnow

LEASE = "background"

# process leases expired this long ago, owning nothing, are deleted
FORGET_PROCESSES_AFTER = timedelta(days=1)


class BackgroundWork(LoggingConfigurable):
    """The periodic loop of one Outpost process

    Parameters:
        app: the :class:`~jupyterhub_outpost.app.JupyterHubOutpost`
    """

    def __init__(self, app, **kwargs):
        super().__init__(parent=app, **kwargs)
        self.app = app
        self.owner = app.process_owner
        self.identity = process_identity()
        self.holds_lease = False
        self._last_housekeeping = {}
        self._task = None
        self._renewer = None
        # tunnels are rebuilt once, the first time this process holds the lease
        self._tunnels_rebuilt = False
        self._tunnels = None

    @property
    def process_lease(self):
        return PROCESS_LEASE_PREFIX + self.owner

    async def register_process(self):
        """Take this process' own lease, which tells others that it lives"""
        await self.app.db.acquire_lease(self.process_lease, self.identity, self.app.lease_ttl)

    def start(self):
        self._task = asyncio.create_task(self._loop())
        self._renewer = asyncio.create_task(self._renew_process_lease())

    async def stop(self):
        for task in (self._task, self._renewer, self._tunnels):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        leases = [(self.process_lease, self.identity)]
        if self.holds_lease:
            leases.append((LEASE, self.owner))
        for name, owner in leases:
            try:
                await self.app.db.release_lease(name, owner)
            except Exception as e:
                self.log.warning("Could not release the lease %s: %s", name, e)

    async def _renew_process_lease(self):
        """Renew this process' lease three times per ``lease_ttl``, whatever
        the background rounds do meanwhile"""
        interval = self.app.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.register_process()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.log.warning("Could not renew this process' lease: %s", e)

    async def _loop(self):
        interval = self.app.cleanup_interval
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("Background work failed; trying again in %is", interval)
            await asyncio.sleep(interval)

    async def run_once(self):
        """One round: take or renew the lease; if held, do the work"""
        # every process, lease or not: what it holds in memory, and what
        # crashed processes left (a claim in the database decides who)
        manager = self.app.server_manager
        await manager.drop_forgotten()
        await manager.cleanup_interrupted()
        held = await self.app.db.acquire_lease(LEASE, self.owner, self.app.lease_ttl)
        if not held:
            held = await self._take_from_dead_holder()
        if held != self.holds_lease:
            self.log.info(
                "%s the background work (runtime limits, housekeeping, cleanup)",
                "Taking over" if held else "Another process does",
            )
            self.holds_lease = held
        if not held:
            return
        self.rebuild_tunnels()
        await self.app.db.forget_old_processes(utcnow() - FORGET_PROCESSES_AFTER)
        # renewed between the parts, so that a long round keeps the lease
        if await self.renew():
            await self.enforce_runtimes()
        if await self.renew():
            await self.housekeeping()
        if await self.renew():
            await self.prune_history()

    async def prune_history(self):
        """Forget the starts the spawn history no longer keeps"""
        try:
            removed = await self.app.server_manager.history.prune()
        except Exception as e:
            self.log.warning("Spawn history: pruning failed: %s", e)
            return
        if removed:
            self.log.info("Spawn history: forgot %i old start(s)", removed)

    async def _take_from_dead_holder(self):
        """Take the lease at once when its holder is known to be gone (a crash
        and restart on this host), instead of waiting until it expires"""
        db = self.app.db
        holder = await db.lease_holder(LEASE)
        if not holder or holder == self.owner:
            return False
        leases = await db.process_leases({holder})
        if not known_gone(leases.get(holder), utcnow()):
            return False
        self.log.info("The process %s that did the background work is gone", holder)
        await db.release_lease(LEASE, holder)
        return await db.acquire_lease(LEASE, self.owner, self.app.lease_ttl)

    def rebuild_tunnels(self):
        """Once per process start: ask the hubs to rebuild their SSH tunnels.

        Runs the first time this process holds the lease (at once after a
        start, or once the lease of a process that died has expired), in a
        task of its own: retries towards a slow hub never delay the rounds.
        """
        if self._tunnels_rebuilt:
            return
        self._tunnels_rebuilt = True
        if self.app.ssh_recreate_at_start is False:
            return
        self._tunnels = asyncio.create_task(self._rebuild_tunnels())

    async def _rebuild_tunnels(self):
        try:
            await TunnelRecreation(self.app).run()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("Rebuilding the hubs' tunnels failed")

    async def renew(self):
        """Renew the lease; False (and stop this round) if another process took it"""
        self.holds_lease = await self.app.db.acquire_lease(LEASE, self.owner, self.app.lease_ttl)
        return self.holds_lease

    async def enforce_runtimes(self):
        """Warn servers whose runtime ends soon; stop those whose runtime ended"""
        now = utcnow()
        warning = timedelta(seconds=self.app.runtime_warning)
        manager = self.app.server_manager
        for record in await self.app.db.servers_ending(now + warning):
            end_date = as_utc(record.end_date)
            if end_date <= now:
                self.log.info("%s/%s/%s - runtime ended; stopping", *record.key)
                try:
                    await manager.stop(*record.key, outcome="expired")
                except Exception as e:
                    self.log.error("%s/%s/%s - stop at end of runtime failed: %s", *record.key, e)
            elif not record.end_warned and self.app.runtime_warning > 0:
                await self._warn(record, end_date, now)

    async def _warn(self, record, end_date, now):
        minutes = max(1, round((end_date - now).total_seconds() / 60))
        message = self.app.runtime_warning_message.format(
            remaining=f"{minutes} minute{'' if minutes == 1 else 's'}",
            minutes=minutes,
            end_date=end_date.strftime("%Y-%m-%d %H:%M UTC"),
            flavor=record.flavor or "",
        )
        event = {"progress": 100, "message": message, "html_message": message}
        await self.app.hub_client.send_event(record.request["env"], event, "{}/{}/{}".format(*record.key))
        await self.app.db.mark_end_warned(record.id)

    async def housekeeping(self):
        """Stop servers that a hub no longer knows (per hub, when configured)"""
        now = utcnow()
        for hub, settings in self.app.housekeeping_settings().items():
            interval = settings.get("interval", 300)
            last = self._last_housekeeping.get(hub)
            if last is not None and (now - last).total_seconds() < interval:
                continue
            self._last_housekeeping[hub] = now
            await self.housekeeping_for(hub, settings)

    async def housekeeping_for(self, hub, settings):
        known = await self.app.hub_client.list_servers(settings["url"], settings["token"], hub)
        if known is None:
            self.log.warning("Housekeeping for %s skipped: its server list is unavailable", hub)
            return []
        grace = timedelta(seconds=settings.get("grace", 600))
        now = utcnow()
        stopped = []
        for record in await self.app.db.list_servers(hub):
            if record.start_pending or record.stop_pending:
                continue
            if now - as_utc(record.started) < grace:
                continue
            if f"{record.hub_user_id}_{record.name}_{record.start_id}" in known:
                continue
            self.log.warning("%s/%s/%s - unknown to the hub; stopping", *record.key)
            try:
                await self.app.server_manager.stop(*record.key)
                stopped.append(record.key)
            except Exception as e:
                self.log.error("%s/%s/%s - housekeeping stop failed: %s", *record.key, e)
        return stopped
