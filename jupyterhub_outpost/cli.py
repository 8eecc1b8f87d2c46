"""Commands for operators on the Outpost's host, reading its database:
``jupyterhub-outpost servers`` and ``jupyterhub-outpost history USER``
(with the service's ``-f outpost_config.py``)."""

import asyncio
import logging

from traitlets import Unicode
from traitlets.config import Application

from ._version import __version__
from .app import JupyterHubOutpost, aliases, flags


def table(header, rows):
    """Rows as left-aligned columns under ``header``"""
    rows = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


class OutpostCommand(Application):
    """A command that reads the records of a configured Outpost"""

    version = __version__
    aliases = dict(aliases, hub="OutpostCommand.hub")
    flags = flags
    hub = Unicode("", help="Only the servers or starts of this hub.").tag(config=True)

    @property
    def classes(self):
        return [JupyterHubOutpost, OutpostCommand]

    def outpost(self):
        """The configured Outpost with its database open (nothing listens)"""
        outpost = JupyterHubOutpost(parent=self)
        outpost.load_config_file(outpost.config_file)
        if outpost.log_level < logging.WARNING:
            outpost.log_level = logging.WARNING  # the answer goes to stdout, only problems to stderr
        outpost.init_logging()
        outpost.init_secrets()
        outpost.init_db()
        return outpost

    async def start(self):
        outpost = self.outpost()
        try:
            print(await self.answer(outpost))
        finally:
            await asyncio.get_running_loop().run_in_executor(None, outpost.db.close)


class ServersCommand(OutpostCommand):
    """What runs now, per hub, from the records"""

    name = "jupyterhub-outpost-servers"
    description = "List the servers the Outpost's records hold, per hub."

    async def answer(self, outpost):
        records = await outpost.db.list_servers(self.hub or None)
        records.sort(key=lambda r: (r.hub, r.user_name, r.name, r.started))

        def state(record):
            return "stopping" if record.stop_pending else "starting" if record.start_pending else "running"

        rows = [[r.hub, r.user_name, r.name or "(default)", r.start_id, r.flavor, state(r),
                 r.started.strftime("%Y-%m-%d %H:%M:%S"), r.service] for r in records]  # fmt: skip
        header = ["HUB", "USER", "SERVER", "START ID", "FLAVOR", "STATE", "STARTED", "ADDRESS"]
        return table(header, rows) + f"\n{len(rows)} server(s)"


class HistoryCommand(OutpostCommand):
    """The recent starts of one user, with their outcome and failure reason"""

    name = "jupyterhub-outpost-history"
    description = """The recent starts of one user (the hub's user name), newest
    first: jupyterhub-outpost history USER [--hub HUB] -f outpost_config.py"""

    async def answer(self, outpost):
        if len(self.extra_args) != 1:
            self.log.critical("Give one user name: jupyterhub-outpost history USER")
            self.exit(2)
        from .history import StartHistory

        history = StartHistory(outpost.db, per_user=outpost.history_per_user)
        user = self.extra_args[0]
        hubs = [self.hub] if self.hub else sorted(outpost.hub_credentials) or [None]
        rows = []
        for hub in hubs:
            for start in await history.of_user(hub, user):
                rows.append([start["hub"], start["name"] or "(default)", start["start_id"], start["flavor"],
                             start["started"], start["outcome"], (start["reason"] or "")[:120]])  # fmt: skip
        rows.sort(key=lambda row: row[4], reverse=True)
        header = ["HUB", "SERVER", "START ID", "FLAVOR", "STARTED", "OUTCOME", "REASON"]
        return table(header, rows) + f"\n{len(rows)} start(s) of {user}"
