"""Rebuilding the hubs' SSH port forwards after the Outpost started.

A hub that cannot reach the servers directly reaches them through SSH local
port forwards to the Outpost host. When the Outpost (and with it its SSH
endpoint) restarts, those connections end, and the hub does not notice. So,
once after its start, the Outpost asks the hubs to rebuild them:

- for each running server, a ``POST`` of ``{"service": <start answer>}``
  to the server's ``JUPYTERHUB_SETUPTUNNEL_URL``, with the server's API
  token (the hub answers 204 once the forward works again);
- or, for a hub with a ``system`` in ``hub_api``, one
  ``GET {api}/recreateforward/{system}`` that rebuilds all its forwards.

Requests run in the background, a few at a time, and are retried with
backoff when the hub does not answer or is overloaded. Every outcome is
logged; tokens never are.
"""

import asyncio
import inspect
import time

from traitlets.config import LoggingConfigurable

from .hubclient import RETRY_STATUS
from .log import secrets


def endpoint_enabled(app):
    """True when the Outpost's own SSH endpoint is switched on"""
    return bool(getattr(app, "enable_ssh", False))


class TunnelRecreation(LoggingConfigurable):
    """One round of asking the hubs to rebuild their SSH port forwards

    Parameters:
        app: the :class:`~jupyterhub_outpost.app.JupyterHubOutpost`
    """

    def __init__(self, app, **kwargs):
        super().__init__(parent=app, **kwargs)
        self.app = app
        self._slots = asyncio.Semaphore(max(1, app.ssh_recreate_concurrency))
        self.one_call = app.recreate_forward_settings()
        for settings in self.one_call.values():
            secrets.add(settings.get("token"))

    async def wanted_for(self, hub):
        """Whether forwards of ``hub`` are rebuilt (``ssh_recreate_at_start``)"""
        setting = self.app.ssh_recreate_at_start
        if not callable(setting):
            return bool(setting)
        try:
            answer = setting(hub)
            if inspect.isawaitable(answer):
                answer = await answer
        except Exception as e:
            self.log.error("ssh_recreate_at_start failed for %s (%s): not rebuilding its tunnels",
                           hub, e)  # fmt: skip
            return False
        return bool(answer)

    async def run(self):
        """Ask every hub that wants it to rebuild its forwards.

        Returns ``{hub: {outcome: count}}`` with outcomes ``done``,
        ``refused`` (a final error answer), ``failed`` (no answer after
        every try) and ``skipped`` (no address or no tunnel URL known).
        """
        began = time.monotonic()
        by_hub = {}
        for record in await self.app.db.list_servers(secrets=True):
            if not (record.start_pending or record.stop_pending):
                by_hub.setdefault(record.hub, []).append(record)
        hubs = [hub for hub in sorted(by_hub) if await self.wanted_for(hub)]
        results = await asyncio.gather(*(self.recreate_hub(hub, by_hub[hub]) for hub in hubs))
        summary = dict(zip(hubs, results))
        if hubs:
            self.log.info(
                "Tunnels rebuilt in %.1fs: %s", time.monotonic() - began,
                "; ".join(f"{hub} {_counts(counts)}" for hub, counts in summary.items()),
            )  # fmt: skip
        return summary

    async def recreate_hub(self, hub, records):
        """Rebuild the forwards of one hub's running servers"""
        settings = self.one_call.get(hub)
        if settings:
            return await self._recreate_forward(hub, settings, len(records))
        outcomes = await asyncio.gather(*(self._setup_tunnel(r) for r in records))
        counts = {}
        for outcome in outcomes:
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def _retry_args(self):
        return {
            "retries": self.app.ssh_recreate_retries,
            "backoff": self.app.ssh_recreate_backoff,
            "timeout": self.app.ssh_recreate_timeout,
        }

    async def _setup_tunnel(self, record):
        log_name = "{}/{}/{}".format(*record.key)
        env = (record.request or {}).get("env") or {}
        if not record.service or not env.get("JUPYTERHUB_SETUPTUNNEL_URL"):
            self.log.info("%s - no tunnel to rebuild (%s)", log_name,
                          "no address" if not record.service else "no setuptunnel URL")  # fmt: skip
            return "skipped"
        async with self._slots:
            status, tries = await self.app.hub_client.setup_tunnel(
                env, record.service, log_name, **self._retry_args()
            )
        return self._outcome(log_name, "tunnel to " + record.service, status, tries)

    async def _recreate_forward(self, hub, settings, servers):
        system = settings.get("system", "")
        async with self._slots:
            status, tries = await self.app.hub_client.recreate_forward(
                settings["url"], settings["token"], system, hub, **self._retry_args()
            )
        outcome = self._outcome(hub, f"forwards of system {system} ({servers} servers)",
                                status, tries)  # fmt: skip
        return {outcome: 1}

    def _outcome(self, log_name, what, status, tries):
        if 200 <= status < 300:
            self.log.info("%s - %s rebuilt (%s after %i tries)", log_name, what, status, tries)
            return "done"
        if status == 0:
            return "skipped"
        if status in RETRY_STATUS:
            self.log.error("%s - %s not rebuilt: no answer after %i tries (last: %s)",
                           log_name, what, tries, status)  # fmt: skip
            return "failed"
        self.log.error("%s - %s not rebuilt: the hub answered %s", log_name, what, status)
        return "refused"


def _counts(counts):
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "nothing to do"
