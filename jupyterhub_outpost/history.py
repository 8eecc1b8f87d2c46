"""The spawn history: what happened to each start, kept after its server is gone.

One row per start (``start_history``): when it began and ended, how
(``starting``, then ``ready``, ``failed`` or ``cancelled``; ``stopped`` or
``expired`` once its server ended), and, encrypted like the other records,
the progress events the hub was sent and the reason of a failure. Messages
are scrubbed of secrets before they are stored. Rows are kept for
``history_retention_days`` and at most ``history_per_user`` per user of a
hub (the newest); the process holding the background lease prunes them.

A start's events are kept in memory while it runs and written when it ends:
an Outpost that is killed during a start loses that start's events, not its
row.
"""

from datetime import timedelta

from sqlalchemy import and_, delete, func, insert, select, update

from .log import secrets
from .orm import Hub, Server, StartRecord, User
from .utils import isoformat, utcnow

OUTCOMES = ("starting", "ready", "failed", "cancelled", "stopped", "expired")
# most events kept per start, and longest message of one
MAX_EVENTS = 200
MAX_MESSAGE = 4096


def clean_event(event):
    """The parts of a progress event worth keeping, scrubbed and bounded"""
    kept = {}
    for key in ("progress", "message", "html_message", "failed"):
        value = event.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = secrets.scrub(value)[:MAX_MESSAGE]
        elif not isinstance(value, (int, float, bool)):
            continue
        kept[key] = value
    return kept


class StartHistory:
    """Reads and writes the ``start_history`` table through a
    :class:`~jupyterhub_outpost.orm.Database` (its threads and its keys)"""

    def __init__(self, db, retention_days=7, per_user=20):
        self.db = db
        self.retention_days = retention_days
        self.per_user = per_user

    # writing (the ServerManager)

    async def begin(self, server_id):
        """A row for the start recorded as server ``server_id``"""
        return await self.db._run(self._begin, server_id)

    def _begin(self, connection, server_id):
        # a start id used again (a hub's choice) starts its row anew
        key = select(Server.hub_id, Server.name, Server.start_id).where(Server.id == server_id)
        found = connection.execute(key).first()
        if found is None:
            return
        connection.execute(delete(StartRecord).where(
            StartRecord.hub_id == found.hub_id, StartRecord.name == found.name,
            StartRecord.start_id == found.start_id,
        ))  # fmt: skip
        columns = select(Server.hub_id, Server.user_id, Server.name, Server.start_id, Server.flavor,
                         Server.started).where(Server.id == server_id)  # fmt: skip
        connection.execute(
            insert(StartRecord).from_select(
                ["hub_id", "user_id", "name", "start_id", "flavor", "started"], columns
            )
        )

    async def end_start(self, key, outcome, events, reason=None):
        """The start of ``key`` (hub, name, start_id) ended: ready, failed or cancelled"""
        data = {"events": [clean_event(e) for e in events[-MAX_EVENTS:]]}
        if reason:
            data["reason"] = secrets.scrub(str(reason))[:MAX_MESSAGE]
        values = {"outcome": outcome, "ended": utcnow(), "data": self.db._seal(data)}
        if outcome != "ready":
            values["stopped"] = values["ended"]
        await self.db._run(self._update, *key, values)

    async def server_ended(self, key, outcome="stopped"):
        """The server of ``key`` ended: ``stopped`` or ``expired``"""
        await self.db._run(self._update, *key, {"outcome": outcome, "stopped": utcnow()},
                           StartRecord.outcome == "ready")  # fmt: skip

    def _update(self, connection, hub, name, start_id, values, *where):
        hub_id = select(Hub.id).where(Hub.name == hub).scalar_subquery()
        connection.execute(
            update(StartRecord)
            .where(StartRecord.hub_id == hub_id, StartRecord.name == name,
                   StartRecord.start_id == start_id, *where)  # fmt: skip
            .values(**values)
        )

    # reading (the API and the CLI)

    async def of_start(self, hub, name, start_id):
        """One start of hub ``hub`` with its events, or None"""
        rows = await self.db._read(self._select, hub, {"name": name, "start_id": start_id}, 1)
        return rows[0] if rows else None

    async def of_user(self, hub, user, limit=None):
        """The recent starts of user ``user`` (the hub's user name) of hub
        ``hub``, newest first, without their events"""
        rows = await self.db._read(self._select, hub, {"user": user}, limit or self.per_user)
        for row in rows:
            row.pop("events", None)
        return rows

    async def of_hubs(self, hub=None, outcome=None, since=None, limit=50):
        """Recent starts of all hubs (or one), newest first, without events"""
        rows = await self.db._read(self._select, hub, {"outcome": outcome, "since": since}, limit)
        for row in rows:
            row.pop("events", None)
        return rows

    def _select(self, connection, hub, match, limit):
        query = (
            select(Hub.name, User.name, StartRecord.name, StartRecord.start_id, StartRecord.flavor,
                   StartRecord.started, StartRecord.ended, StartRecord.stopped,
                   StartRecord.outcome, StartRecord.data)  # fmt: skip
            .join(Hub, Hub.id == StartRecord.hub_id)
            .join(User, User.id == StartRecord.user_id)
            .order_by(StartRecord.started.desc(), StartRecord.id.desc())
            .limit(limit)
        )
        if hub is not None:
            query = query.where(Hub.name == hub)
        if match.get("name") is not None:
            query = query.where(StartRecord.name == match["name"], StartRecord.start_id == match["start_id"])
        if match.get("user") is not None:
            query = query.where(User.name == match["user"])
        if match.get("outcome") is not None:
            query = query.where(StartRecord.outcome == match["outcome"])
        if match.get("since") is not None:
            query = query.where(StartRecord.started >= match["since"])
        found = []
        for hub_name, user, name, start_id, flavor, started, ended, stopped, outcome, data in connection.execute(query):
            opened = self.db._open(data) or {}
            found.append({
                "hub": hub_name, "user": user, "name": name, "start_id": start_id, "flavor": flavor,
                "started": isoformat(started), "ended": isoformat(ended) if ended else None,
                "stopped": isoformat(stopped) if stopped else None, "outcome": outcome,
                "reason": opened.get("reason"), "events": opened.get("events", []),
            })  # fmt: skip
        return found

    async def counts_since(self, since):
        """``{(hub, outcome): starts}`` that began at or after ``since``"""
        return await self.db._read(self._counts_since, since)

    def _counts_since(self, connection, since):
        rows = connection.execute(
            select(Hub.name, StartRecord.outcome, func.count())
            .join(Hub, Hub.id == StartRecord.hub_id)
            .where(StartRecord.started >= since)
            .group_by(Hub.name, StartRecord.outcome)
        )
        return {(hub, outcome): count for hub, outcome, count in rows}

    # retention (the background work)

    async def prune(self):
        """Delete rows past the retention and beyond ``per_user``; their number"""
        return await self.db._run(self._prune, utcnow() - timedelta(days=self.retention_days))

    def _prune(self, connection, cutoff):
        removed = connection.execute(delete(StartRecord).where(StartRecord.started < cutoff)).rowcount
        # users with more rows than they may keep, then the oldest of theirs
        crowded = connection.execute(
            select(StartRecord.hub_id, StartRecord.user_id)
            .group_by(StartRecord.hub_id, StartRecord.user_id)
            .having(func.count() > self.per_user)
        ).all()
        for hub_id, user_id in crowded:
            keep = (
                select(StartRecord.id)
                .where(StartRecord.hub_id == hub_id, StartRecord.user_id == user_id)
                .order_by(StartRecord.started.desc(), StartRecord.id.desc())
                .limit(self.per_user)
            )
            removed += connection.execute(
                delete(StartRecord).where(
                    and_(StartRecord.hub_id == hub_id, StartRecord.user_id == user_id,
                         StartRecord.id.not_in(keep))  # fmt: skip
                )
            ).rowcount
        return removed
