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
from functools import partial

from sqlalchemy import and_, bindparam, delete, func, select, update

from .log import secrets
from .orm import Hub, StartRecord, User
from .utils import isoformat, utcnow

# the outcome of a start that has not ended (the column's default; the
# prepared insert gives it, and a reused start id is reset to it)
STARTING = "starting"
OUTCOMES = (STARTING, "ready", "failed", "cancelled", "stopped", "expired")
# most events kept per start, and longest message of one
MAX_EVENTS = 200
MAX_MESSAGE = 4096


# the statements of the writes, built once
_SAME_START = (
    (StartRecord.hub_id == bindparam("h_hub_id"))
    & (StartRecord.name == bindparam("h_name"))
    & (StartRecord.start_id == bindparam("h_start_id"))
)
# a start's row takes these from its server's row, and its outcome
_START_COLUMNS = ("hub_id", "user_id", "name", "start_id", "flavor", "started", "outcome")
_START_KEY = ("hub_id", "name", "start_id")
# what a start id used again (a hub's choice) resets of the row it had
_START_RESET = {"ended": None, "stopped": None, "outcome": STARTING, "data": None}
_END_START = update(StartRecord).where(_SAME_START).values(
    outcome=bindparam("outcome"), ended=bindparam("ended"), data=bindparam("data")
)
# a start that failed or was cancelled: its server ended with it
_END_START_AND_SERVER = _END_START.values(stopped=bindparam("ended"))
_SERVER_ENDED = (
    update(StartRecord)
    .where(_SAME_START, StartRecord.outcome == "ready")
    .values(outcome=bindparam("outcome"), stopped=bindparam("stopped"))
)


def _guarded(statement, guard, expressions):
    return statement if guard is None else statement.where(guard)


def _start_values():
    return {"outcome": STARTING}


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
        # the writes that go with the server's own (orm.FollowUp)
        self._start_row = db.follow_up(self._insert_start, columns=_START_COLUMNS)
        self._ready = db.follow_up(partial(_guarded, _END_START))
        self._ended = db.follow_up(partial(_guarded, _SERVER_ENDED))
        # the step of every insert of a server: its start's row
        self.begin_row = self._start_row.step(_start_values)
        self._failed_or_cancelled = db.prepare(_END_START_AND_SERVER)
        self.retention_days = retention_days
        self.per_user = per_user

    def _insert_start(self, guard, expressions):
        # guarded: the values are selected, when the server's row was inserted
        if guard is None:
            return self.db.insert_or_replace(StartRecord, _START_KEY, reset=_START_RESET)
        table = StartRecord.__table__
        values = select(*[expressions.get(c, bindparam(c, type_=table.c[c].type))
                          for c in _START_COLUMNS]).where(guard)  # fmt: skip
        return self.db.insert_or_replace(
            StartRecord, _START_KEY, reset=_START_RESET, rows=(_START_COLUMNS, values)
        )

    # writing (the ServerManager). Each write goes with the one of the
    # server's record that it tells of: the row of a start is inserted with
    # the server's record (``begin_row``), its outcome saved with the state
    # of the finished start, its end with the deletion of the record.

    def ready_step(self, hub_id, name, start_id, events):
        """The step that records that a start ended ready, for
        :meth:`~jupyterhub_outpost.orm.Database.save_state`"""
        events = list(events[-MAX_EVENTS:])
        return self._ready.step(self._end_values, hub_id, name, start_id, "ready", events, None, utcnow())

    def _end_values(self, hub_id, name, start_id, outcome, events, reason, ended):
        data = {"events": [clean_event(e) for e in events]}
        if reason:
            data["reason"] = secrets.scrub(str(reason))[:MAX_MESSAGE]
        return {"h_hub_id": hub_id, "h_name": name, "h_start_id": start_id, "outcome": outcome,
                "ended": ended, "data": self.db._seal(data)}  # fmt: skip

    async def end_start(self, key, outcome, events, reason=None):
        """Record on its own how the start of ``key`` (hub, name, start_id)
        ended (``failed`` or ``cancelled``: its server ended with it), when
        no other write goes with it"""
        hub, name, start_id = key
        hub_id = await self.db.hub_id(hub)
        values = partial(
            self._end_values, hub_id, name, start_id, outcome, list(events[-MAX_EVENTS:]), reason, utcnow()
        )  # fmt: skip
        await self.db._run(self._end_start, values)

    def _end_start(self, connection, values):
        self._failed_or_cancelled.execute(connection, values())

    def server_ended_step(self, hub_id, name, start_id, outcome="stopped"):
        """The step that records that a ready server ended (``stopped`` or
        ``expired``), for :meth:`~jupyterhub_outpost.orm.Database.delete_server`"""
        return self._ended.step(
            dict, h_hub_id=hub_id, h_name=name, h_start_id=start_id, outcome=outcome, stopped=utcnow()
        )  # fmt: skip

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
