"""Database models and the asynchronous :class:`Database` front end.

Every database call runs in a small pool of threads, so the event loop
never waits on the database: writes as one Core transaction each, reads on
their own threads. Calls return plain :class:`ServerRecord` objects or
tuples, never live ORM instances. Columns that hold secrets (spawner state,
the stored start request with the hub's API token) are encrypted and
decrypted in the worker threads, and only when a call needs them.
"""

import asyncio
import collections
import contextlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Optional

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Unicode,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import InterfaceError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .errors import DatabaseUnavailableError, ServerExistsError
from .groupcommit import GroupCommit, Later
from .utils import as_utc, remember, utcnow

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
    # indexed: flavor limits count the servers of one flavor
    flavor: Mapped[Optional[str]] = mapped_column(Unicode(255), nullable=True, index=True)
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
    # the Outpost process that runs this server's pending start or stop
    # (its process lease tells whether it still lives); "" when none
    owner: Mapped[str] = mapped_column(Unicode(255), default="")


class StartRecord(Base):
    """One start as it happened, kept after its server is gone (the spawn
    history, :mod:`jupyterhub_outpost.history`)"""

    __tablename__ = "start_history"
    __table_args__ = (
        UniqueConstraint("hub_id", "name", "start_id"),
        Index("ix_start_history_user_started", "hub_id", "user_id", "started"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hub_id: Mapped[int] = mapped_column(ForeignKey("hubs.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Unicode(255))
    start_id: Mapped[str] = mapped_column(Unicode(128))
    flavor: Mapped[Optional[str]] = mapped_column(Unicode(255), nullable=True)
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # when the start ended (ready, failed or cancelled), and when the server did
    ended: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True), nullable=True)
    stopped: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True), nullable=True)
    # starting, ready, failed, cancelled, stopped, expired
    outcome: Mapped[str] = mapped_column(Unicode(32), default="starting")
    # encrypted JSON: {"events": [...], "reason": ..., "logs": [...]}, scrubbed
    data: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True)


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
    owner: str
    state: Optional[dict] = field(default=None, repr=False)
    request: Optional[dict] = field(default=None, repr=False)

    @property
    def key(self):
        return (self.hub, self.name, self.start_id)

    @classmethod
    def new(cls, hub, name, start_id, user_name, hub_user_id, spawner_class, flavor=None,
            end_date=None, owner=""):  # fmt: skip
        """The record of a start not yet stored (for :meth:`Database.add_server`)"""
        return cls(
            id=None, hub=hub, name=name, start_id=start_id, user_name=user_name,
            hub_user_id=hub_user_id, spawner_class=spawner_class, flavor=flavor, service="",
            start_pending=True, stop_pending=False, started=None, last_update=None,
            end_date=end_date, end_warned=False, owner=owner,
        )  # fmt: skip


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
    Server.owner,
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


class _Statement:
    """A Core statement compiled once to the DBAPI's own SQL and parameter
    style, run on the DBAPI connection beneath a SQLAlchemy one.

    The reads of polls and the writes of every start and stop run this way:
    SQLAlchemy's work per execution (building an execution context,
    processing parameters, wrapping the result) was nearly half of a start's
    time on the writer thread. What it did that matters is done here, once
    or cheaply: the types' bind processors (dates and booleans on SQLite),
    the statement's literal values, and DBAPI errors raised as SQLAlchemy's.

    ``columns``: for an INSERT without values, the columns a call gives
    (each call gives all of them).
    """

    def __init__(self, statement, dialect, columns=None):
        self.statement = statement
        self.columns = columns
        compiled = statement.compile(dialect=dialect, column_keys=columns)
        if compiled.insert_prefetch or compiled.update_prefetch:
            missing = [c.key for c in compiled.insert_prefetch + compiled.update_prefetch]
            raise ValueError(f"give the columns with Python defaults too: {missing}")
        self.sql = str(compiled)
        self.dialect = dialect
        self._error = dialect.loaded_dbapi.Error
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        self._names = list(compiled.positiontup) if compiled.positional else list(binds)
        self._positional = compiled.positional
        # (key a call gives, literal value, bind processor) per parameter
        self._binds = []
        for name in self._names:
            bind = binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            key = bind.key if bind.required else None
            self._binds.append((key, None if bind.required else bind.effective_value, processor))
        dml = compiled.isinsert or compiled.isupdate or compiled.isdelete
        self.returns_rows = bool(compiled.effective_returning) if dml else True

    def params(self, values):
        """The DBAPI parameters of a call with ``values`` ({key: value})"""
        processed = []
        for key, literal, processor in self._binds:
            value = literal if key is None else values[key]
            processed.append(value if processor is None else processor(value))
        if self._positional:
            return tuple(processed)
        return dict(zip(self._names, processed))

    def run(self, dbapi_connection, params):
        """Run on a DBAPI connection with DBAPI ``params``: (rows changed,
        the first row returned or None); the DBAPI's errors as they are"""
        return self._reply(self._sent(dbapi_connection, params))

    def _sent(self, dbapi_connection, params):
        """A cursor that ran this statement with ``params`` (closed if that raised)"""
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self.sql, params)
        except BaseException:
            cursor.close()
            raise
        return cursor

    def _reply(self, cursor):
        """(rows changed, the first row returned or None) of ``cursor``, closed"""
        try:
            row = cursor.fetchone() if self.returns_rows else None
            return cursor.rowcount, row
        finally:
            cursor.close()

    def execute(self, connection, values):
        """Run in the transaction of ``connection`` (a SQLAlchemy
        Connection): (rows changed, the first row returned or None)"""
        return self.send(connection, values).settle()

    def send(self, connection, values):
        """Send in the transaction of ``connection``: a :class:`Later` of
        what :meth:`execute` returns. In a pipeline (PostgreSQL), the reply
        is read when it is settled."""
        params = self.params(values)
        try:
            cursor = self._sent(connection.connection.dbapi_connection, params)
        except self._error as e:
            raise self._wrapped(e, params) from e

        def settle():
            try:
                return self._reply(cursor)
            except self._error as e:
                raise self._wrapped(e, params) from e

        return Later(settle)

    def _wrapped(self, e, params):
        return DBAPIError.instance(self.sql, params, e, self._error, dialect=self.dialect)


class FollowUp:
    """A kind of write that goes with one of a server's own writes (its
    insert, the save that ends its start, its deletion): in the same
    transaction, and only when that write changed the server's row. The
    spawn history's writes are such.

    ``build(guard, expressions)`` gives the write as a Core statement.
    ``guard`` is None when it runs as a statement of its own after the
    server's write; else it is a SQL condition (the server's row was
    changed) that the statement must carry. ``expressions`` ({column: SQL
    expression}) are written instead of the values a call gives for those
    columns (the id of a user written in the same statement).

    On PostgreSQL the two writes run as one statement, a data-modifying
    ``WITH``: one round trip and one statement for the server to run,
    instead of two. SQLite has no such statements.

    :meth:`step` gives what a call of :meth:`Database.add_server`,
    :meth:`~Database.save_state` or :meth:`~Database.delete_server` takes as
    ``then``.
    """

    def __init__(self, db, build, columns=None):
        self._db = db
        self._build = build
        self.alone = db.prepare(build(None, {}), columns=columns)
        # the prepared write of the server -> both as one statement
        self._merged = {}

    def step(self, make_values, *args, **kwargs):
        """This write, with the values ``make_values(*args, **kwargs)``
        returns; they are made in the writer thread, and added to those of
        the server's write (the names the two share have the same values)"""
        return _Step(self, partial(make_values, *args, **kwargs))

    def merged(self, base, account=None):
        """The prepared server's write ``base`` and this one as one statement.
        It returns the changed row's id, or no row.

        ``account``: for the insert of a server, a ``WITH`` that writes its
        user and returns the user's id; the statement returns it too."""
        prepared = self._merged.get((base, account))
        if prepared is None:
            statement = base.statement
            expressions = {}
            if account is not None:
                expressions["user_id"] = select(account.c.id).scalar_subquery()
            if base.columns:  # an INSERT that a call gives the values of
                table = statement.table
                statement = statement.values({
                    c: expressions.get(c, bindparam(c, type_=table.c[c].type)) for c in base.columns
                })  # fmt: skip
            if not base.returns_rows:
                statement = statement.returning(statement.table.c.id)
            # (named, not changed.c.id: a statement once compiled keeps the
            # columns it returned then, none, in the copies made from it)
            changed = statement.cte("changed")
            follow = self._build(exists().select_from(changed), expressions).cte("follow")
            returned = [literal_column("id", Integer), *expressions.values()]
            merged = select(*returned).select_from(changed).add_cte(follow)
            prepared = self._merged[base, account] = self._db.prepare(merged)
        return prepared


@dataclass(frozen=True)
class _Step:
    kind: FollowUp
    make_values: object


# What a poll needs: one read of the unique key, three narrow columns
_SERVER_STATUS = select(Server.id, Server.start_pending, Server.stop_pending).where(
    Server.hub_id == bindparam("hub_id"),
    Server.name == bindparam("name"),
    Server.start_id == bindparam("start_id"),
)


# The writes of every start and stop, built once (building them per call cost
# more than running them, and each built statement took a cache entry).
# Inserts that may meet an existing key say so by returning no row, rather
# than by an error that a savepoint would have to catch.
def _insert_new(table, dialect_insert, key):
    """``INSERT ... ON CONFLICT (key) DO NOTHING RETURNING id`` of ``table``"""
    return dialect_insert(table).on_conflict_do_nothing(index_elements=key).returning(table.id)


# the columns of a new server's row: all but its id
_SERVER_ROW = (
    "hub_id", "user_id", "name", "start_id", "spawner_class", "flavor", "state", "request",
    "service", "start_pending", "stop_pending", "started", "last_update", "end_date",
    "end_warned", "owner",
)  # fmt: skip
_USER_BY_HUB_ID = select(User.id, User.name).where(
    User.hub_id == bindparam("hub_id"), User.hub_user_id == bindparam("hub_user_id")
)
_USER_RENAME = update(User).where(User.id == bindparam("uid")).values(name=bindparam("name"))
_TAKE_ACCOUNTING_LOCK = update(Lease).where(Lease.name == ACCOUNTING_LOCK).values(owner="")
_SERVER_UPDATE = update(Server).where(Server.id == bindparam("sid"))


def _account_upsert():
    """(PostgreSQL) a hub's user, created or renamed, as a ``WITH`` that
    returns its id (new or known alike)"""
    statement = postgresql_insert(User).values(
        hub_id=bindparam("hub_id"), hub_user_id=bindparam("hub_user_id"), name=bindparam("user_name")
    )
    return (
        statement.on_conflict_do_update(
            index_elements=[User.hub_id, User.hub_user_id], set_={"name": statement.excluded.name}
        )
        .returning(User.id)
        .cte("account")
    )


def _state_update(state, service, start_done):
    """The update of a server's state (unless ``state`` is False: kept as
    stored), its address, and the end of its start"""
    values = {"last_update": bindparam("last_update")}
    if state:
        values["state"] = bindparam("state")
    if service:
        values["service"] = bindparam("service")
    statement = _SERVER_UPDATE
    if start_done:
        # a finished start: unless a stop was asked for meanwhile (by another process)
        statement = statement.where(Server.stop_pending.is_(False))
        values.update(start_pending=False, owner="")
    return statement.values(**values)


# (with the state, with the service address, start done) -> statement
_SAVE_STATE = {
    (state, service, done): _state_update(state, service, done)
    for state in (False, True) for service in (False, True) for done in (False, True)
}
# this process stops a running server
_CLAIM_STOP = (
    update(Server)
    .where(
        Server.id == bindparam("sid"),
        Server.stop_pending.is_(False),
        Server.start_pending.is_(False),
    )
    .values(stop_pending=True, owner=bindparam("me"), last_update=bindparam("last_update"))
)
# a stop for a server another live process is starting: that process ends the start
_REQUEST_STOP = (
    update(Server)
    .where(
        Server.id == bindparam("sid"),
        Server.stop_pending.is_(False),
        Server.start_pending.is_(True),
    )
    .values(stop_pending=True, last_update=bindparam("last_update"))
)
# a stop failed: the server runs on, and may be stopped again
_RELEASE_STOP = (
    update(Server)
    .where(Server.id == bindparam("sid"), Server.owner == bindparam("me"))
    .values(stop_pending=False, owner="", last_update=bindparam("last_update"))
)
# the start or stop of a dead process: this process finishes it (as a stop)
_TAKE_OVER = (
    update(Server)
    .where(
        Server.id == bindparam("sid"),
        Server.owner == bindparam("dead"),
        Server.start_pending | Server.stop_pending,
    )
    .values(stop_pending=True, owner=bindparam("me"), last_update=bindparam("last_update"))
)
_DELETE_SERVER = delete(Server).where(Server.id == bindparam("sid"))

PROCESS_LEASE_PREFIX = "process:"
# users whose ids a process keeps (a returning user's start then skips two
# statements); the least recently started are forgotten
USER_IDS_KEPT = 10000


class Database:
    """Asynchronous access to the Outpost's tables.

    Writes run in Core transactions on a pool of ``workers`` threads (one for
    SQLite, which has one writer at a time anyway); the writes that queue up
    while one transaction runs share the next (:mod:`.groupcommit`). Reads run on separate
    ``read_workers`` threads, so that polls never queue behind writes; the
    read a poll makes runs as one precompiled statement on a DBAPI
    connection that each reader thread keeps (autocommit, no pool checkout,
    no transaction round trips).

    Parameters:
        url: SQLAlchemy URL
        crypt: a :class:`~jupyterhub_outpost.crypto.CryptKeeper`
        workers: threads for writes (default: 1 for SQLite, 4 otherwise)
        read_workers: threads for reads (default 2)
    """

    def __init__(self, url, crypt, workers=None, read_workers=None, engine_kwargs=None):
        self.url = url
        self.crypt = crypt
        self.is_sqlite = url.startswith("sqlite")
        memory = self.is_sqlite and (url in ("sqlite://", "sqlite:///:memory:"))
        if workers is None:
            workers = 1 if self.is_sqlite else 4
        read_workers = read_workers or 2
        engine_kwargs = dict(engine_kwargs or {})
        if not memory:
            # every thread may hold a connection at once, reader threads keep theirs
            engine_kwargs.setdefault("pool_size", workers + 2 * read_workers)
        self.engine = new_engine(url, **engine_kwargs)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="outpost-db")
        # an in-memory database exists once per connection: one thread for all
        self.read_executor = (
            self.executor
            if memory
            else ThreadPoolExecutor(read_workers, thread_name_prefix="outpost-db-read")
        )
        dbapi = self.engine.dialect.loaded_dbapi
        self._connection_errors = (dbapi.OperationalError, dbapi.InterfaceError)
        self._local = threading.local()
        self._readers = set()
        self._readers_lock = threading.Lock()
        # the statements of a batch's writes sent together (psycopg's pipeline mode)
        pipelines = self.engine.dialect.driver == "psycopg" and dbapi.Pipeline.is_supported()
        self.writes = GroupCommit(
            self.engine, self.executor, workers, self._translate, self._observe_write,
            pipeline=self._pipeline if pipelines else None,
        )  # fmt: skip
        self._dialect_insert = dialect_insert = sqlite_insert if self.is_sqlite else postgresql_insert
        # a server's write and the one that follows it as one statement (FollowUp)
        self.merges_writes = not self.is_sqlite
        self._account = _account_upsert() if self.merges_writes else None
        self._status = self.prepare(_SERVER_STATUS)
        self._user_upsert = self.prepare(
            _insert_new(User, dialect_insert, [User.hub_id, User.hub_user_id]),
            columns=("hub_id", "hub_user_id", "name"),
        )
        self._insert_server = self.prepare(
            _insert_new(Server, dialect_insert, [Server.hub_id, Server.name, Server.start_id]),
            columns=_SERVER_ROW,
        )
        self._user_by_hub_id = self.prepare(_USER_BY_HUB_ID)
        self._user_rename = self.prepare(_USER_RENAME)
        self._save_state_statements = {key: self.prepare(s) for key, s in _SAVE_STATE.items()}
        self._take_accounting_lock = self.prepare(_TAKE_ACCOUNTING_LOCK)
        self._claim_stop_statement = self.prepare(_CLAIM_STOP)
        self._delete_server_statement = self.prepare(_DELETE_SERVER)
        self._hub_ids = {}
        # (hub id, hub's user id) -> (user id, name), of the latest starts
        self._user_ids = collections.OrderedDict()
        # the process whose starts add_server records (see servers.owner)
        self.owner = ""
        # called with (kind, seconds, failed) after each call, in its thread
        self.observer = None

    async def _run(self, fn, *args, pipelined=False):
        """Run ``fn(connection, *args)`` in a writer thread, in a transaction
        (shared with the writes queued meanwhile: :mod:`.groupcommit`).
        ``pipelined``: ``fn`` sends one statement and returns a
        :class:`~.groupcommit.Later` of its result."""
        return await self.writes.submit(asyncio.get_running_loop(), fn, args, pipelined)

    @contextlib.contextmanager
    def _pipeline(self, connection):
        """(psycopg) the statements sent meanwhile go to the server together;
        their replies are read at the end"""
        dbapi = self.engine.dialect.loaded_dbapi
        try:
            with connection.connection.dbapi_connection.pipeline():
                yield
        except dbapi.Error as e:
            raise DBAPIError.instance("(pipeline)", None, e, dbapi.Error, dialect=self.engine.dialect) from e

    def _translate(self, e):
        if isinstance(e, (OperationalError, InterfaceError)):
            return _unavailable(e)
        return None

    def _observe_write(self, seconds, failed):
        if self.observer is not None:
            self.observer("write", seconds, failed)

    async def _read(self, fn, *args):
        """Run ``fn(connection, *args)`` in a reader thread: reads only"""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.read_executor, partial(self._call, fn, *args)
        )

    def _call(self, fn, *args):
        began, failed = time.perf_counter(), True
        try:
            with self.engine.connect() as connection:
                result = fn(connection, *args)
            failed = False
            return result
        except (OperationalError, InterfaceError) as e:
            raise _unavailable(e) from e
        finally:
            if self.observer is not None:
                self.observer("read", time.perf_counter() - began, failed)

    # the hot read path: a DBAPI connection per reader thread

    def _reader(self):
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self.engine.raw_connection()
            if not self.is_sqlite:
                # one statement, one round trip: no BEGIN/ROLLBACK around reads
                connection.rollback()
                connection.driver_connection.autocommit = True
            with self._readers_lock:
                self._readers.add(connection)
            self._local.connection = connection
        return connection

    def _drop_reader(self):
        connection = self._local.__dict__.pop("connection", None)
        if connection is not None:
            with self._readers_lock:
                self._readers.discard(connection)
            connection.invalidate()

    def _fetch_one(self, statement, values):
        """One row of a precompiled statement; reconnects once after a lost connection"""
        began, failed = time.perf_counter(), True
        try:
            row = self._fetch_one_row(statement, values)
            failed = False
            return row
        finally:
            if self.observer is not None:
                self.observer("poll", time.perf_counter() - began, failed)

    def _fetch_one_row(self, statement, values):
        for attempt in (1, 2):
            try:
                return statement.run(self._reader(), statement.params(values))[1]
            except self._connection_errors as e:
                self._drop_reader()
                if attempt == 2:
                    raise _unavailable(e) from e
            except (OperationalError, InterfaceError) as e:  # from connecting
                self._drop_reader()
                raise _unavailable(e) from e

    def close(self):
        self.executor.shutdown(wait=True)
        self.read_executor.shutdown(wait=True)
        self.writes.close()
        with self._readers_lock:
            readers, self._readers = self._readers, set()
        for connection in readers:
            connection.invalidate()
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

    def prepare(self, statement, columns=None):
        """``statement`` compiled once for this database, for the reads of
        polls and the writes every start or stop makes:
        ``prepared.execute(connection, values)`` returns (rows changed,
        first row returned). ``columns``: those an INSERT without values
        is given."""
        return _Statement(statement, self.engine.dialect, columns)

    def follow_up(self, build, columns=None):
        """A :class:`FollowUp` write, built by ``build(guard, expressions)``;
        ``columns`` as for :meth:`prepare`"""
        return FollowUp(self, build, columns)

    def _write(self, connection, base, values, then=None, account=None):
        """Run the prepared server's write ``base`` with ``values``, and the
        step ``then`` of a :class:`FollowUp` if it changed a row: a
        :class:`~.groupcommit.Later` of (whether a row changed, the first
        row ``base`` returned or None). On PostgreSQL this sends one
        statement. ``account``: see :meth:`FollowUp.merged` (PostgreSQL only)."""
        if then is None:
            return base.send(connection, values).then(_changed)
        values = {**values, **then.make_values()}
        if self.merges_writes:
            return then.kind.merged(base, account).send(connection, values).then(_merged_changed)
        changed, row = _changed(base.execute(connection, values))
        if changed:
            then.kind.alone.execute(connection, values)
        return Later(lambda: (changed, row))

    def insert_or_replace(self, table, key, reset=None, rows=None):
        """A prebuilt ``INSERT`` into ``table`` (an ORM class) that, when a row
        with the same ``key`` columns exists, overwrites it instead: with
        the inserted values, and the ``reset`` ones ({column: value}).
        ``rows``: (column names, a SELECT of their values) to insert,
        instead of the values a call gives"""
        statement = self._dialect_insert(table)
        if rows is not None:
            statement = statement.from_select(*rows)
        replaced = {c.name: statement.excluded[c.name] for c in table.__table__.columns
                    if c.name not in key and c.name != "id"}  # fmt: skip
        replaced.update(reset or {})
        return statement.on_conflict_do_update(
            index_elements=[getattr(table, name) for name in key], set_=replaced
        )

    # hubs
    @property
    def hub_ids(self):
        """Hub name -> id, of the hubs this process has used (read only)"""
        return self._hub_ids

    async def hub_id(self, name):
        """The id of the hub ``name``, created on first use (cached)"""
        if name not in self._hub_ids:
            self._hub_ids[name] = await self._run(self._ensure_hub, name)
        return self._hub_ids[name]

    def _ensure_hub(self, connection, name):
        query = select(Hub.id).where(Hub.name == name)
        hub_id = connection.scalar(query)
        if hub_id is None:
            try:
                with connection.begin_nested():
                    result = connection.execute(insert(Hub).values(name=name))
                    hub_id = result.inserted_primary_key[0]
            except IntegrityError:  # created by another process meanwhile
                hub_id = connection.scalar(query)
        return hub_id

    # servers
    async def add_server(self, record, request, state=None, check_limits=None, then=None):
        """Record a new start (start pending) from ``record``, a
        :class:`ServerRecord` without id; fill in its id and times.

        ``request`` (stored encrypted) and ``state`` (the Spawner's state
        before its start, stored encrypted) belong to the record;
        ``check_limits(servers of flavor, the user's of flavor, the user's
        servers)`` may raise to refuse the start; ``then``, a step of a
        :class:`FollowUp` given the values of the row, is written with it.

        Raises :class:`ServerExistsError`, or what ``check_limits`` raises.
        """
        hub_id = await self.hub_id(record.hub)
        key = (hub_id, record.hub_user_id)
        known = self._user_ids.get(key)
        user_id = known[0] if known and known[1] == record.user_name else None
        # one statement on PostgreSQL, but for limits to check or a user to write on its own
        pipelined = check_limits is None and (user_id is not None or then is not None)
        record.id, user_id, record.started = await self._run(
            self._add_server, hub_id, user_id, record, request, state, check_limits, then,
            pipelined=pipelined,
        )  # fmt: skip
        record.last_update = record.started
        # kept only now: the transaction that created the user is committed
        remember(self._user_ids, key, (user_id, record.user_name), USER_IDS_KEPT)
        return record

    def _user(self, connection, hub_id, hub_user_id, user_name):
        """The id of a hub's user, created or renamed as needed: one statement
        for a new user, two for a known one (no savepoint). None are needed
        for the users of the last ``USER_IDS_KEPT`` starts, whose ids are
        kept; on PostgreSQL a start's user is written with its server (by
        ``_account_upsert``, in the statement of the insert)."""
        values = {"hub_id": hub_id, "hub_user_id": hub_user_id, "name": user_name}
        _, row = self._user_upsert.execute(connection, values)
        if row is not None:
            return row[0]
        _, (user_id, name) = self._user_by_hub_id.execute(connection, values)
        if name != user_name:
            self._user_rename.execute(connection, {"uid": user_id, "name": user_name})
        return user_id

    def _add_server(self, connection, hub_id, user_id, record, request, state, check_limits, then):
        if check_limits is not None:
            # the first write of this transaction: concurrent starts with
            # limits wait here, so the count below cannot be outdated
            self._take_accounting_lock.execute(connection, {})
        # on PostgreSQL a user not known here is written with the server
        with_user = user_id is None and check_limits is None and then is not None and self.merges_writes
        if user_id is None and not with_user:
            user_id = self._user(connection, hub_id, record.hub_user_id, record.user_name)
        if check_limits is not None:
            check_limits(*self._counts_for(connection, user_id, record.flavor))
        now = utcnow()
        row = {
            "hub_id": hub_id,
            "user_id": user_id,
            "name": record.name,
            "start_id": record.start_id,
            "spawner_class": record.spawner_class,
            "flavor": record.flavor,
            "state": None if state is None else self._seal(state),
            "request": self._seal(request),
            "service": "",
            "start_pending": True,
            "stop_pending": False,
            "started": now,
            "last_update": now,
            "end_date": record.end_date,
            "end_warned": False,
            "owner": record.owner,
        }
        if with_user:
            row.update(hub_user_id=record.hub_user_id, user_name=record.user_name)
        account = self._account if with_user else None

        def inserted(result):
            row = result[1]
            if row is None:
                # the key exists: nothing was written but possibly a new user
                # (kept: it exists) and the lock
                raise ServerExistsError(
                    f"Server {record.name!r} with start_id {record.start_id!r} already exists"
                )
            return row[0], row[1] if with_user else user_id, now

        return self._write(connection, self._insert_server, row, then, account).then(inserted)

    def _counts_for(self, connection, user_id, flavor):
        """(servers of flavor, the user's of flavor, the user's in all); stopping ones excluded"""
        running = Server.stop_pending.is_(False)
        total = connection.scalar(
            select(func.count()).where(running, Server.flavor == flavor)
        )
        user_rows = connection.execute(
            select(Server.flavor, func.count())
            .where(running, Server.user_id == user_id)
            .group_by(Server.flavor)
        ).all()
        user_flavor = sum(n for f, n in user_rows if f == flavor)
        return total, user_flavor, sum(n for _, n in user_rows)

    async def server_summary(self):
        """``{(hub, flavor, state): servers}`` of all records, with state
        pending, running or stopping and flavor "" for none (one grouped query)"""
        return await self._read(self._server_summary)

    def _server_summary(self, connection):
        rows = connection.execute(
            select(Hub.name, Server.flavor, Server.start_pending, Server.stop_pending, func.count())
            .join(Hub, Hub.id == Server.hub_id)
            .group_by(Hub.name, Server.flavor, Server.start_pending, Server.stop_pending)
        ).all()
        summary = {}
        for hub, flavor, start_pending, stop_pending, count in rows:
            state = "stopping" if stop_pending else "pending" if start_pending else "running"
            key = (hub, flavor or "", state)
            summary[key] = summary.get(key, 0) + count
        return summary

    async def flavor_counts(self):
        """Flavor name -> servers running now (stopping ones excluded)"""
        return await self._read(self._flavor_counts)

    def _flavor_counts(self, connection):
        rows = connection.execute(
            select(Server.flavor, func.count())
            .where(Server.stop_pending.is_(False), Server.flavor.is_not(None))
            .group_by(Server.flavor)
        )
        return dict(rows.all())

    async def server_status(self, hub, name, start_id):
        """``(id, start_pending, stop_pending)`` of one server, or None.

        The read behind every poll: one lookup of the unique key.
        """
        hub_id = self._hub_ids.get(hub)
        if hub_id is None:
            hub_id = await self.hub_id(hub)
        values = {"hub_id": hub_id, "name": name, "start_id": start_id}
        loop = asyncio.get_running_loop()
        row = await loop.run_in_executor(
            self.read_executor, self._fetch_one, self._status, values
        )
        if row is None:
            return None
        return row[0], bool(row[1]), bool(row[2])

    async def stop_requested(self, server_ids):
        """Which of ``server_ids`` are to be stopped (stop asked for, or gone)"""
        return await self._read(self._stop_requested, list(server_ids))

    def _stop_requested(self, connection, server_ids):
        rows = connection.execute(
            select(Server.id, Server.stop_pending).where(Server.id.in_(server_ids))
        ).all()
        found = {server_id for server_id, _ in rows}
        return {server_id for server_id, stop in rows if stop} | (set(server_ids) - found)

    async def server_ids(self):
        """The ids of all recorded servers"""
        return await self._read(self._server_ids)

    def _server_ids(self, connection):
        return set(connection.scalars(select(Server.id)))

    async def get_server(self, hub, name, start_id, secrets=False):
        """One server of one hub, or None. ``secrets`` decrypts state and request."""
        hub_id = await self.hub_id(hub)
        return await self._read(self._get_server, hub_id, name, start_id, secrets)

    def _get_server(self, connection, hub_id, name, start_id, secrets):
        query = _SERVER_BY_KEY_WITH_SECRETS if secrets else _SERVER_BY_KEY
        params = {"hub_id": hub_id, "name": name, "start_id": start_id}
        row = connection.execute(query, params).first()
        if row is None:
            return None
        if secrets:
            return self._record(
                row[:-2], state=self._open(row[-2]), request=self._open(row[-1])
            )
        return self._record(row)

    async def start_ids_of(self, hub, name, limit=2):
        """The start ids of hub ``hub``'s servers named ``name`` (at most ``limit``)"""
        hub_id = await self.hub_id(hub)
        return await self._read(self._start_ids_of, hub_id, name, limit)

    def _start_ids_of(self, connection, hub_id, name, limit):
        query = select(Server.start_id).where(Server.hub_id == hub_id, Server.name == name)
        return list(connection.scalars(query.limit(limit)))

    async def list_servers(self, hub=None, pending_only=False, secrets=False):
        """Servers of one hub (all hubs when ``hub`` is None)"""
        hub_id = None if hub is None else await self.hub_id(hub)
        return await self._read(self._list_servers, hub_id, pending_only, secrets)

    def _list_servers(self, connection, hub_id, pending_only, secrets):
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
                for r in connection.execute(query)
            ]
        return [self._record(r) for r in connection.execute(query)]

    async def save_state(self, server_id, state, service=None, start_done=False, then=None):
        """Store the spawner's state (None: keep the stored one) and, when a
        start finished, its address. True when the record was updated; then
        ``then``, a step of a :class:`FollowUp`, is written with it."""
        return await self._run(self._save_state, server_id, state, service, start_done, then, pipelined=True)

    def _save_state(self, connection, server_id, state, service, start_done, then=None):
        params = {"sid": server_id, "last_update": utcnow()}
        if state is not None:
            params["state"] = self._seal(state)
        if service is not None:
            params["service"] = service
        statement = self._save_state_statements[state is not None, service is not None, start_done]
        return self._write(connection, statement, params, then).then(_first)

    async def claim_stop(self, server_id, owner):
        """Mark a running server as stopping by ``owner``. True if this call set the flag."""
        return await self._run(self._claim_stop, server_id, owner, pipelined=True)

    def _claim_stop(self, connection, server_id, owner):
        params = {"sid": server_id, "me": owner, "last_update": utcnow()}
        return self._claim_stop_statement.send(connection, params).then(_one_changed)

    async def request_stop(self, server_id):
        """Ask the process that starts a server to end that start.
        True if this call set the flag."""
        return await self._run(self._request_stop, server_id)

    def _request_stop(self, connection, server_id):
        params = {"sid": server_id, "last_update": utcnow()}
        return connection.execute(_REQUEST_STOP, params).rowcount == 1

    async def release_stop(self, server_id, owner):
        """After a failed stop: the server is running (and stoppable) again"""
        return await self._run(self._release_stop, server_id, owner)

    def _release_stop(self, connection, server_id, owner):
        params = {"sid": server_id, "me": owner, "last_update": utcnow()}
        return connection.execute(_RELEASE_STOP, params).rowcount == 1

    async def take_over(self, server_id, dead_owner, owner):
        """Take the pending start or stop of a dead process, to stop the server.
        True if this call took it."""
        return await self._run(self._take_over, server_id, dead_owner, owner)

    def _take_over(self, connection, server_id, dead_owner, owner):
        params = {"sid": server_id, "dead": dead_owner, "me": owner, "last_update": utcnow()}
        return connection.execute(_TAKE_OVER, params).rowcount == 1

    # the processes that own pending starts and stops

    async def process_leases(self, owners):
        """``{owner: (identity, expires)}`` of the process leases of ``owners``"""
        if not owners:
            return {}
        return await self._read(self._process_leases, sorted(owners))

    def _process_leases(self, connection, owners):
        names = [PROCESS_LEASE_PREFIX + o for o in owners]
        rows = connection.execute(
            select(Lease.name, Lease.owner, Lease.expires).where(Lease.name.in_(names))
        )
        prefix = len(PROCESS_LEASE_PREFIX)
        return {name[prefix:]: (identity, as_utc(expires)) for name, identity, expires in rows}

    async def forget_old_processes(self, before):
        """Delete process leases that expired before ``before`` and own nothing"""
        return await self._run(self._forget_old_processes, before)

    def _forget_old_processes(self, connection, before):
        owners = select(PROCESS_LEASE_PREFIX + Server.owner).where(Server.owner != "")
        result = connection.execute(
            delete(Lease).where(
                Lease.name.startswith(PROCESS_LEASE_PREFIX),
                Lease.expires < before,
                Lease.name.not_in(owners),
            )
        )
        return result.rowcount

    async def delete_server(self, server_id, then=None):
        """Forget a server. True if it was still recorded; then ``then``, a
        step of a :class:`FollowUp`, is written with its deletion."""
        return await self._run(self._delete_server, server_id, then, pipelined=True)

    def _delete_server(self, connection, server_id, then=None):
        return self._write(connection, self._delete_server_statement, {"sid": server_id}, then).then(_first)

    # leases for background work, and the runtime of servers

    async def acquire_lease(self, name, owner, ttl):
        """Take or renew lease ``name`` for ``ttl`` seconds. True if ``owner`` holds it."""
        return await self._run(self._acquire_lease, name, owner, ttl)

    def _acquire_lease(self, connection, name, owner, ttl):
        now = utcnow()
        expires = now + timedelta(seconds=ttl)
        result = connection.execute(
            update(Lease)
            .where(Lease.name == name, or_(Lease.owner == owner, Lease.expires < now))
            .values(owner=owner, expires=expires)
        )
        if result.rowcount == 1:
            return True
        if connection.scalar(select(Lease.name).where(Lease.name == name)) is not None:
            return False
        try:
            with connection.begin_nested():
                connection.execute(insert(Lease).values(name=name, owner=owner, expires=expires))
        except IntegrityError:
            return False
        return True

    async def lease_holder(self, name):
        """The owner of lease ``name`` (expired or not), or None"""
        return await self._read(self._lease_holder, name)

    def _lease_holder(self, connection, name):
        return connection.scalar(select(Lease.owner).where(Lease.name == name))

    async def release_lease(self, name, owner):
        await self._run(self._release_lease, name, owner)

    def _release_lease(self, connection, name, owner):
        connection.execute(
            update(Lease)
            .where(Lease.name == name, Lease.owner == owner)
            .values(expires=utcnow() - timedelta(seconds=1))
        )

    async def servers_ending(self, before):
        """Running servers whose runtime ends before ``before`` (with secrets)"""
        return await self._read(self._servers_ending, before)

    def _servers_ending(self, connection, before):
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
            for r in connection.execute(query)
        ]

    async def mark_end_warned(self, server_id):
        await self._run(self._mark_end_warned, server_id)

    def _mark_end_warned(self, connection, server_id):
        connection.execute(update(Server).where(Server.id == server_id).values(end_warned=True))



def _first(result):
    return result[0]


def _one_changed(result):
    return result[0] == 1


def _changed(result):
    changed, row = result
    return changed > 0 or row is not None, row


def _merged_changed(result):
    row = result[1]
    return row is not None, row


def _unavailable(e):
    log.error("Database error: %s", e.__class__.__name__)
    return DatabaseUnavailableError("The database is not reachable right now; try again later")
