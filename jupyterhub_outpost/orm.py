"""Database models and the asynchronous :class:`Database` front end.

Every database call runs in a short-lived Session inside a small thread
pool, so the event loop never waits on the database. Calls return plain
:class:`ServerRecord` objects, never live ORM instances. Columns that hold
secrets (spawner state, the stored start request with the hub's API token)
are encrypted in the same worker thread before they are written.
"""

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Optional

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Unicode,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import InterfaceError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from .errors import DatabaseUnavailableError, ServerExistsError
from .utils import utcnow

log = logging.getLogger(__name__)

# names for constraints, so that alembic migrations can refer to them
meta = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class Base(DeclarativeBase):
    metadata = meta


class Hub(Base):
    """A JupyterHub that uses this Outpost, named by its credential"""

    __tablename__ = "hubs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Unicode(255), unique=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class User(Base):
    """A user of one hub (the hub's user id, and the name last seen)"""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("hub_id", "hub_user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hub_id: Mapped[int] = mapped_column(ForeignKey("hubs.id", ondelete="CASCADE"))
    hub_user_id: Mapped[str] = mapped_column(Unicode(255))
    name: Mapped[str] = mapped_column(Unicode(255))


class Server(Base):
    """One start of one server, as the hub knows it: (hub, name, start_id)"""

    __tablename__ = "servers"
    __table_args__ = (UniqueConstraint("hub_id", "name", "start_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hub_id: Mapped[int] = mapped_column(ForeignKey("hubs.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Unicode(255))
    start_id: Mapped[str] = mapped_column(Unicode(128))
    spawner_class: Mapped[str] = mapped_column(Unicode(1023))
    flavor: Mapped[Optional[str]] = mapped_column(Unicode(255), nullable=True)
    # encrypted JSON: Spawner.get_state()
    state: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True)
    # encrypted JSON: env, user_options, misc of the start request (no certificates)
    request: Mapped[bytes] = mapped_column(LargeBinary)
    service: Mapped[str] = mapped_column(Unicode(1023), default="")
    start_pending: Mapped[bool] = mapped_column(Boolean, default=True)
    stop_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_update: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow
    )
    # when the flavor's runtime ends (None: no limit), and whether the hub
    # was warned about it
    end_date: Mapped[Optional[datetime]] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    end_warned: Mapped[bool] = mapped_column(Boolean, default=False)


class Lease(Base):
    """Who runs a piece of background work, until when (one process at a time).

    The row named ``flavor-accounting`` is a lock: writing it first makes the
    count-and-insert of a start with flavor limits one serialized step.
    """

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(Unicode(255), primary_key=True)
    owner: Mapped[str] = mapped_column(Unicode(255), default="")
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


ACCOUNTING_LOCK = "flavor-accounting"


@dataclass
class ServerRecord:
    """A plain copy of one server row (secrets decrypted only when asked for)"""

    id: int
    hub: str
    name: str
    start_id: str
    user_name: str
    hub_user_id: str
    spawner_class: str
    flavor: Optional[str]
    service: str
    start_pending: bool
    stop_pending: bool
    started: datetime
    last_update: datetime
    end_date: Optional[datetime]
    end_warned: bool
    state: Optional[dict] = field(default=None, repr=False)
    request: Optional[dict] = field(default=None, repr=False)

    @property
    def key(self):
        return (self.hub, self.name, self.start_id)


def _sqlite_pragmas(dbapi_conn, connection_record):
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def new_engine(url, **kwargs):
    """Create an engine with the settings each backend needs"""
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"check_same_thread": False})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        kwargs.setdefault("pool_pre_ping", True)
        engine = create_engine(url, **kwargs)
    return engine


_SERVER_COLUMNS = (
    Server.id,
    Hub.name,
    Server.name,
    Server.start_id,
    User.name,
    User.hub_user_id,
    Server.spawner_class,
    Server.flavor,
    Server.service,
    Server.start_pending,
    Server.stop_pending,
    Server.started,
    Server.last_update,
    Server.end_date,
    Server.end_warned,
)

# One server by its key. Built once: every poll runs it, and building the
# statement took longer than SQLite took to execute it.
_SERVER_BY_KEY = (
    select(*_SERVER_COLUMNS)
    .join(Hub, Hub.id == Server.hub_id)
    .join(User, User.id == Server.user_id)
    .where(
        Server.hub_id == bindparam("hub_id"),
        Server.name == bindparam("name"),
        Server.start_id == bindparam("start_id"),
    )
)
_SERVER_BY_KEY_WITH_SECRETS = _SERVER_BY_KEY.add_columns(Server.state, Server.request)


class Database:
    """Asynchronous access to the Outpost's tables.

    Parameters:
        url: SQLAlchemy URL
        crypt: a :class:`~jupyterhub_outpost.crypto.CryptKeeper`
        workers: threads for database work (1 for SQLite)
    """

    def __init__(self, url, crypt, workers=None, engine_kwargs=None):
        self.url = url
        self.crypt = crypt
        self.engine = new_engine(url, **(engine_kwargs or {}))
        self.session_factory = sessionmaker(bind=self.engine, expire_on_commit=False)
        if workers is None:
            workers = 1 if url.startswith("sqlite") else 4
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="outpost-db")
        self._hub_ids = {}

    async def _run(self, fn, *args):
        """Run ``fn(session, *args)`` in a worker thread, in one transaction"""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(self._call, fn, *args))

    async def _read(self, fn, *args):
        """Run ``fn(connection, *args)`` in a worker thread: reads only.

        A Core connection costs about half of an ORM session per call; polls
        are the most frequent requests.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, partial(self._call, fn, *args, read_only=True)
        )

    def _call(self, fn, *args, read_only=False):
        try:
            if read_only:
                with self.engine.connect() as connection:
                    return fn(connection, *args)
            with self.session_factory() as session, session.begin():
                return fn(session, *args)
        except (OperationalError, InterfaceError) as e:
            log.error("Database error: %s", e.__class__.__name__)
            raise DatabaseUnavailableError(
                "The database is not reachable right now; try again later"
            ) from e

    def close(self):
        self.executor.shutdown(wait=True)
        self.engine.dispose()

    # encryption helpers (run in the worker thread)
    def _seal(self, obj):
        return self.crypt.encrypt(json.dumps(obj).encode("utf8"))

    def _open(self, blob):
        if blob is None:
            return None
        return json.loads(self.crypt.decrypt(blob))

    def _record(self, row, state=None, request=None):
        return ServerRecord(*row, state=state, request=request)

    # hubs
    async def hub_id(self, name):
        """The id of the hub ``name``, created on first use (cached)"""
        if name not in self._hub_ids:
            self._hub_ids[name] = await self._run(self._ensure_hub, name)
        return self._hub_ids[name]

    def _ensure_hub(self, session, name):
        hub_id = session.scalar(select(Hub.id).where(Hub.name == name))
        if hub_id is None:
            try:
                with session.begin_nested():
                    hub = Hub(name=name)
                    session.add(hub)
                hub_id = hub.id
            except IntegrityError:
                hub_id = session.scalar(select(Hub.id).where(Hub.name == name))
        return hub_id

    # servers
    async def add_server(self, hub, user_name, hub_user_id, name, start_id, **kwargs):
        """Record a new start (start_pending). Raises :class:`ServerExistsError`."""
        hub_id = await self.hub_id(hub)
        return await self._run(
            self._add_server, hub_id, user_name, hub_user_id, name, start_id, kwargs
        )

    def _user(self, session, hub_id, hub_user_id, user_name):
        user = session.scalar(
            select(User).where(User.hub_id == hub_id, User.hub_user_id == hub_user_id)
        )
        if user is None:
            try:
                with session.begin_nested():
                    user = User(hub_id=hub_id, hub_user_id=hub_user_id, name=user_name)
                    session.add(user)
            except IntegrityError:  # created by a concurrent start
                return self._user(session, hub_id, hub_user_id, user_name)
        elif user.name != user_name:
            user.name = user_name
        return user

    def _add_server(self, session, hub_id, user_name, hub_user_id, name, start_id, kw):
        check_limits = kw.get("check_limits")
        if check_limits is not None:
            # the first write of this transaction: concurrent starts with
            # limits wait here, so the count below cannot be outdated
            session.execute(
                update(Lease).where(Lease.name == ACCOUNTING_LOCK).values(owner="")
            )
        user = self._user(session, hub_id, hub_user_id, user_name)
        if check_limits is not None:
            check_limits(*self._counts_for(session, user.id, kw.get("flavor")))
        server = Server(
            hub_id=hub_id,
            user_id=user.id,
            name=name,
            start_id=start_id,
            spawner_class=kw["spawner_class"],
            flavor=kw.get("flavor"),
            request=self._seal(kw["request"]),
            start_pending=True,
            end_date=kw.get("end_date"),
        )
        try:
            with session.begin_nested():
                session.add(server)
        except IntegrityError:
            raise ServerExistsError(
                f"Server {name!r} with start_id {start_id!r} already exists"
            ) from None
        return server.id

    def _counts_for(self, session, user_id, flavor):
        """(servers of flavor, the user's of flavor, the user's in all); stopping ones excluded"""
        running = Server.stop_pending.is_(False)
        total = session.scalar(
            select(func.count()).where(running, Server.flavor == flavor)
        )
        user_rows = session.execute(
            select(Server.flavor, func.count())
            .where(running, Server.user_id == user_id)
            .group_by(Server.flavor)
        ).all()
        user_flavor = sum(n for f, n in user_rows if f == flavor)
        return total, user_flavor, sum(n for _, n in user_rows)

    async def flavor_counts(self):
        """Flavor name -> servers running now (stopping ones excluded)"""
        return await self._read(self._flavor_counts)

    def _flavor_counts(self, session):
        rows = session.execute(
            select(Server.flavor, func.count())
            .where(Server.stop_pending.is_(False), Server.flavor.is_not(None))
            .group_by(Server.flavor)
        )
        return dict(rows.all())

    async def get_server(self, hub, name, start_id, secrets=False):
        """One server of one hub, or None. ``secrets`` decrypts state and request."""
        hub_id = await self.hub_id(hub)
        return await self._read(self._get_server, hub_id, name, start_id, secrets)

    def _get_server(self, session, hub_id, name, start_id, secrets):
        query = _SERVER_BY_KEY_WITH_SECRETS if secrets else _SERVER_BY_KEY
        params = {"hub_id": hub_id, "name": name, "start_id": start_id}
        row = session.execute(query, params).first()
        if row is None:
            return None
        if secrets:
            return self._record(
                row[:-2], state=self._open(row[-2]), request=self._open(row[-1])
            )
        return self._record(row)

    async def list_servers(self, hub=None, pending_only=False, secrets=False):
        """Servers of one hub (all hubs when ``hub`` is None)"""
        hub_id = None if hub is None else await self.hub_id(hub)
        return await self._read(self._list_servers, hub_id, pending_only, secrets)

    def _list_servers(self, session, hub_id, pending_only, secrets):
        query = (
            select(*_SERVER_COLUMNS)
            .join(Hub, Hub.id == Server.hub_id)
            .join(User, User.id == Server.user_id)
            .order_by(Server.id)
        )
        if hub_id is not None:
            query = query.where(Server.hub_id == hub_id)
        if pending_only:
            query = query.where(Server.start_pending | Server.stop_pending)
        if secrets:
            query = query.add_columns(Server.state, Server.request)
            return [
                self._record(r[:-2], state=self._open(r[-2]), request=self._open(r[-1]))
                for r in session.execute(query)
            ]
        return [self._record(r) for r in session.execute(query)]

    async def save_state(self, server_id, state, service=None, start_done=False):
        """Store the spawner's state (and, when a start finished, its address)"""
        return await self._run(self._save_state, server_id, state, service, start_done)

    def _save_state(self, session, server_id, state, service, start_done):
        values = {"state": self._seal(state), "last_update": utcnow()}
        if service is not None:
            values["service"] = service
        if start_done:
            values["start_pending"] = False
        result = session.execute(
            update(Server).where(Server.id == server_id).values(**values)
        )
        return result.rowcount == 1

    async def claim_stop(self, server_id):
        """Mark a server as stopping. True if this call set the flag."""
        return await self._run(self._claim_stop, server_id)

    def _claim_stop(self, session, server_id):
        result = session.execute(
            update(Server)
            .where(Server.id == server_id, Server.stop_pending.is_(False))
            .values(stop_pending=True, last_update=utcnow())
        )
        return result.rowcount == 1

    async def delete_server(self, server_id):
        """Forget a server. True if it was still recorded."""
        return await self._run(self._delete_server, server_id)

    def _delete_server(self, session, server_id):
        result = session.execute(delete(Server).where(Server.id == server_id))
        return result.rowcount == 1

    # leases for background work, and the runtime of servers

    async def acquire_lease(self, name, owner, ttl):
        """Take or renew lease ``name`` for ``ttl`` seconds. True if ``owner`` holds it."""
        return await self._run(self._acquire_lease, name, owner, ttl)

    def _acquire_lease(self, session, name, owner, ttl):
        now = utcnow()
        expires = now + timedelta(seconds=ttl)
        result = session.execute(
            update(Lease)
            .where(Lease.name == name, or_(Lease.owner == owner, Lease.expires < now))
            .values(owner=owner, expires=expires)
        )
        if result.rowcount == 1:
            return True
        if session.get(Lease, name) is not None:
            return False
        try:
            with session.begin_nested():
                session.add(Lease(name=name, owner=owner, expires=expires))
        except IntegrityError:
            return False
        return True

    async def release_lease(self, name, owner):
        await self._run(self._release_lease, name, owner)

    def _release_lease(self, session, name, owner):
        session.execute(
            update(Lease)
            .where(Lease.name == name, Lease.owner == owner)
            .values(expires=utcnow() - timedelta(seconds=1))
        )

    async def servers_ending(self, before):
        """Running servers whose runtime ends before ``before`` (with secrets)"""
        return await self._read(self._servers_ending, before)

    def _servers_ending(self, session, before):
        query = (
            select(*_SERVER_COLUMNS, Server.state, Server.request)
            .join(Hub, Hub.id == Server.hub_id)
            .join(User, User.id == Server.user_id)
            .where(
                Server.end_date.is_not(None),
                Server.end_date <= before,
                Server.stop_pending.is_(False),
                Server.start_pending.is_(False),
            )
            .order_by(Server.end_date)
        )
        return [
            self._record(r[:-2], state=self._open(r[-2]), request=self._open(r[-1]))
            for r in session.execute(query)
        ]

    async def mark_end_warned(self, server_id):
        await self._run(self._mark_end_warned, server_id)

    def _mark_end_warned(self, session, server_id):
        session.execute(update(Server).where(Server.id == server_id).values(end_warned=True))

