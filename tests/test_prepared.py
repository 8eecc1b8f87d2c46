"""The writes of starts and stops run as statements compiled once, on the
DBAPI connection: what they store reads back through SQLAlchemy as it was
given, and their errors are SQLAlchemy's"""

import asyncio
import logging
import threading
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from jupyterhub_outpost import dbutil, orm
from jupyterhub_outpost.crypto import CryptKeeper
from jupyterhub_outpost.history import StartHistory
from jupyterhub_outpost.orm import Database, Server, ServerRecord, StartRecord, User
from jupyterhub_outpost.utils import as_utc, utcnow

from .utils import ON_POSTGRES, drop_databases, new_db_url, wait_until

KEY = Fernet.generate_key().decode()


@pytest.fixture
async def db(tmp_path):
    url = new_db_url(tmp_path)
    dbutil.prepare_database(url, logging.getLogger("test"))
    database = Database(url, CryptKeeper([KEY]))
    yield database
    database.close()
    if ON_POSTGRES:
        drop_databases([url])


def record_user_id(db, record):
    return db._user_ids[(db.hub_ids[record.hub], record.hub_user_id)][0]


def stored(db, statement):
    with db.engine.connect() as connection:
        return connection.execute(statement).one()


async def test_a_recorded_start_reads_back_as_written(db):
    end = utcnow().replace(microsecond=123456) + timedelta(hours=2)
    record = ServerRecord.new("hub-a", "lab", "s1", "ann", "7", "x.Spawner", flavor="small",
                              end_date=end, owner="me")  # fmt: skip
    await db.add_server(record, {"env": {"A": "1"}}, state={"pid": 42})
    row = stored(db, select(Server).where(Server.id == record.id))
    # dates to the microsecond (SQLite keeps no time zone: UTC), booleans as booleans
    assert as_utc(row.end_date) == end and as_utc(row.started) == record.started
    assert row.start_pending is True and row.stop_pending is False and row.end_warned is False
    assert (row.name, row.start_id, row.flavor, row.owner, row.service) == ("lab", "s1", "small", "me", "")
    again = await db.get_server("hub-a", "lab", "s1", secrets=True)
    assert again.state == {"pid": 42} and again.request == {"env": {"A": "1"}}
    assert as_utc(again.end_date) == end

    # the end of the start: state and address, and start_pending cleared
    assert await db.save_state(record.id, {"pid": 43}, service="127.0.0.1:9", start_done=True)
    again = await db.get_server("hub-a", "lab", "s1", secrets=True)
    assert (again.state, again.service, again.start_pending) == ({"pid": 43}, "127.0.0.1:9", False)
    assert as_utc(again.last_update) >= record.started

    assert await db.delete_server(record.id) is True
    assert await db.delete_server(record.id) is False
    assert await db.get_server("hub-a", "lab", "s1") is None


async def test_a_second_start_of_a_key_is_refused_and_a_returning_user_reused(db):
    first = ServerRecord.new("hub-a", "lab", "s1", "ann", "7", "x.Spawner")
    await db.add_server(first, {})
    with pytest.raises(orm.ServerExistsError):
        await db.add_server(ServerRecord.new("hub-a", "lab", "s1", "ann", "7", "x.Spawner"), {})
    # the same hub user again, renamed at the hub: the same row, renamed
    second = ServerRecord.new("hub-a", "lab", "s2", "ann-renamed", "7", "x.Spawner")
    await db.add_server(second, {})
    user_id = stored(db, select(Server.user_id).where(Server.id == first.id))[0]
    assert stored(db, select(Server.user_id).where(Server.id == second.id))[0] == user_id
    assert stored(db, select(User.name).where(User.id == user_id))[0] == "ann-renamed"
    servers = await db.list_servers("hub-a")
    assert sorted(s.start_id for s in servers) == ["s1", "s2"]


async def test_errors_of_the_driver_are_raised_as_sqlalchemy_errors(db):
    bad = db.prepare(insert(Server), columns=orm._SERVER_ROW)
    row = {name: None for name in orm._SERVER_ROW}
    row.update(hub_id=999, user_id=999, name="x", start_id="y", spawner_class="s", request=b"",
               service="", start_pending=True, stop_pending=False, started=utcnow(),
               last_update=utcnow(), end_warned=False, owner="")  # fmt: skip
    with pytest.raises(IntegrityError):  # no such hub: a foreign key
        await db._run(bad.execute, row)
    # the writer's connection serves the next write
    record = ServerRecord.new("hub-a", "lab", "s1", "ann", "7", "x.Spawner")
    await db.add_server(record, {})
    assert record.id is not None

    # the same, sent in a batch with another write (PostgreSQL: in one pipeline)
    results = await in_one_batch(db, db._run(bad.send, row, pipelined=True), db.save_state(record.id, {"pid": 5}))
    assert isinstance(results[0], IntegrityError) and results[1] is True
    assert (await db.get_server("hub-a", "lab", "s1", secrets=True)).state == {"pid": 5}


def test_a_column_with_a_python_default_must_be_given(db):
    with pytest.raises(ValueError, match="outcome"):
        db.prepare(insert(StartRecord), columns=("hub_id", "user_id", "name", "start_id",
                                                 "flavor", "started"))  # fmt: skip


async def test_the_ids_of_the_latest_users_only_are_kept(db, monkeypatch):
    monkeypatch.setattr(orm, "USER_IDS_KEPT", 2)
    for i, user in enumerate(["ann", "bob", "cyd", "ann"]):
        await db.add_server(ServerRecord.new("hub-a", "lab", f"s{i}", user, user, "x.Spawner"), {})
    assert [hub_user for _, hub_user in db._user_ids] == ["cyd", "ann"]
    # a forgotten user's next start finds the same row
    await db.add_server(ServerRecord.new("hub-a", "lab", "s9", "bob", "bob", "x.Spawner"), {})
    ids = {s.user_name for s in await db.list_servers("hub-a")}
    assert ids == {"ann", "bob", "cyd"}
    assert stored(db, select(func.count()).select_from(User))[0] == 3


async def test_a_starts_history_is_written_with_its_servers_writes_and_only_with_them(db, monkeypatch):
    history = StartHistory(db)
    statements = []
    send = orm._Statement.send
    monkeypatch.setattr(orm._Statement, "send", lambda self, *a: statements.append(self) or send(self, *a))

    def row_of(start_id):
        return stored(db, select(StartRecord.outcome, StartRecord.flavor, StartRecord.data)
                      .where(StartRecord.start_id == start_id))  # fmt: skip

    # a start, its end and its stop
    record = ServerRecord.new("hub-a", "lab", "s1", "ann", "7", "x.Spawner", flavor="small")
    await db.add_server(record, {}, then=history.begin_row)
    assert row_of("s1")[:2] == ("starting", "small")
    events = [{"progress": 50, "message": "half"}]
    hub_id = db.hub_ids["hub-a"]
    ready = history.ready_step(hub_id, "lab", "s1", events)
    assert await db.save_state(record.id, {"pid": 1}, service="127.0.0.1:9", start_done=True, then=ready)
    outcome, _, data = row_of("s1")
    assert outcome == "ready" and db._open(data)["events"] == [{"progress": 50, "message": "half"}]
    ended = history.server_ended_step(hub_id, "lab", "s1")
    assert await db.delete_server(record.id, then=ended) is True
    assert row_of("s1")[0] == "stopped"
    # on PostgreSQL each write of the server is one statement with its
    # history (the insert with its new user too); SQLite runs them one by one
    assert len(statements) == (3 if ON_POSTGRES else 7)
    assert stored(db, select(User.name).where(User.id == record_user_id(db, record)))[0] == "ann"

    # where the server's write changes nothing, its history is not written
    again = ServerRecord.new("hub-a", "lab", "s1", "ann", "7", "x.Spawner", flavor="large")
    await db.add_server(again, {}, then=history.begin_row)
    with pytest.raises(orm.ServerExistsError):
        await db.add_server(ServerRecord.new("hub-a", "lab", "s1", "ann", "7", "x.Spawner"), {},
                            then=history.begin_row)  # fmt: skip
    # (the start id used again started its row anew, and the refused one left it)
    assert row_of("s1") == ("starting", "large", None)
    assert await db.request_stop(again.id)  # a stop asked for during the start
    ready = history.ready_step(hub_id, "lab", "s1", events)
    assert not await db.save_state(again.id, None, service="127.0.0.1:9", start_done=True, then=ready)
    assert row_of("s1")[0] == "starting"
    assert await db.delete_server(again.id) is True
    ended = history.server_ended_step(hub_id, "lab", "s1")
    assert await db.delete_server(again.id, then=ended) is False
    assert row_of("s1")[0] == "starting"

    # a known user this process does not remember, renamed at the hub: the
    # same row, renamed, for the server and its history
    db._user_ids.clear()
    renamed = ServerRecord.new("hub-a", "lab", "s2", "ann-2", "7", "x.Spawner")
    await db.add_server(renamed, {}, then=history.begin_row)
    user_id = stored(db, select(Server.user_id).where(Server.id == renamed.id))[0]
    assert stored(db, select(User.id, User.name).where(User.hub_user_id == "7")) == (user_id, "ann-2")
    assert stored(db, select(StartRecord.user_id).where(StartRecord.start_id == "s2"))[0] == user_id
    assert record_user_id(db, renamed) == user_id


async def in_one_batch(db, *calls):
    """The results of ``calls`` (coroutines of db's writes), queued behind a
    write that holds the writer: they run as one batch"""
    loop = asyncio.get_running_loop()
    running, release = threading.Event(), threading.Event()
    # one writer: no other takes the writes that wait behind the held one
    workers, db.writes.workers = db.writes.workers, 1
    try:
        held = db.writes.submit(loop, lambda connection: running.set() or release.wait(10), ())
        assert await loop.run_in_executor(None, running.wait, 10)
        batch = asyncio.gather(*calls, return_exceptions=True)
        # each call queues one write
        await wait_until(lambda: len(db.writes._queue) == len(calls), timeout=10, interval=0.01,
                         message="all queued")  # fmt: skip
    finally:
        release.set()
        db.writes.workers = workers
    assert await held is True
    return await batch


async def test_a_burst_of_starts_and_stops_is_sent_together_and_each_gets_its_own_answer(db, monkeypatch):
    history = StartHistory(db)
    pipelines = []
    if ON_POSTGRES:  # the statements of a batch go out together
        pipeline = db._pipeline
        monkeypatch.setattr(db.writes, "pipeline", lambda c: pipelines.append(c) or pipeline(c))
    first = ServerRecord.new("hub-a", "lab", "s0", "ann", "7", "x.Spawner")
    await db.add_server(first, {})  # ann's id is kept: her next starts are one statement each
    batches = db.writes.batches

    records = [ServerRecord.new("hub-a", "lab", f"s{i}", "ann", "7", "x.Spawner") for i in range(1, 6)]
    results = await in_one_batch(
        db,
        *(db.add_server(r, {}, then=history.begin_row) for r in records),
        db.save_state(first.id, {"pid": 2}, service="127.0.0.1:9", start_done=True),
        # not sent with the others: it sees what the calls before it wrote
        # (the start ended: no start to stop)
        db.request_stop(first.id),
        db.claim_stop(first.id, "me"),
        db.delete_server(first.id),
        db.save_state(10**6, {"pid": 3}),  # no such server
    )
    assert db.writes.batches == batches + 2  # the holding write, then all in one
    # each call has its own answer, as if it had run alone, in order
    assert results == [*records, True, False, True, True, False]
    assert len({r.id for r in records}) == 5
    for r in records:
        again = await db.get_server("hub-a", "lab", r.start_id)
        assert again.id == r.id and again.start_pending is True
        assert stored(db, select(StartRecord.outcome).where(StartRecord.start_id == r.start_id))[0] == "starting"
    assert await db.get_server("hub-a", "lab", "s0") is None
    if ON_POSTGRES:  # two runs of statements sent together, around the one that is not
        assert len(pipelines) == 2

    # a start refused in a batch (its key exists) sends the batch back to run
    # call by call: the others are written all the same
    taken = ServerRecord.new("hub-a", "lab", "s1", "ann", "7", "x.Spawner")
    new = ServerRecord.new("hub-a", "lab", "s6", "ann", "7", "x.Spawner")
    results = await in_one_batch(db, db.save_state(records[0].id, {"pid": 4}), db.add_server(taken, {}),
                                 db.add_server(new, {}))  # fmt: skip
    assert results[0] is True and isinstance(results[1], orm.ServerExistsError) and results[2] is new
    assert (await db.get_server("hub-a", "lab", "s1", secrets=True)).state == {"pid": 4}
    assert (await db.get_server("hub-a", "lab", "s6")).id == new.id
