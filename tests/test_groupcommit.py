"""Group commit: writes queued together share a transaction, and each still
sees the result it would have seen alone"""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from jupyterhub_outpost.groupcommit import GroupCommit
from jupyterhub_outpost.orm import new_engine

from .utils import ON_POSTGRES, drop_databases, new_db_url


@pytest.fixture(params=[1], ids=lambda n: f"{n}-writers")
def writes(request, tmp_path):
    url = new_db_url(tmp_path)
    engine = new_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE items (k INTEGER PRIMARY KEY, v TEXT)"))
    executor = ThreadPoolExecutor(request.param)
    group = GroupCommit(engine, executor, workers=request.param)
    yield group, engine
    executor.shutdown(wait=True)
    group.close()
    engine.dispose()
    if ON_POSTGRES:
        drop_databases([url])


def insert(connection, k, v):
    connection.execute(text("INSERT INTO items (k, v) VALUES (:k, :v)"), {"k": k, "v": v})
    # what the calls before it in the same transaction wrote is visible
    return connection.execute(text("SELECT count(*) FROM items")).scalar()


def rows(engine):
    with engine.connect() as connection:
        return dict(connection.execute(text("SELECT k, v FROM items ORDER BY k")).all())


def blocked(group, loop):
    """A first call that holds the writer until the returned event is set"""
    release = threading.Event()
    first = group.submit(loop, lambda connection: release.wait(10), ())
    return first, release


async def test_writes_queued_together_share_one_transaction_in_order(writes):
    group, engine = writes
    loop = asyncio.get_running_loop()
    first, release = blocked(group, loop)
    futures = [group.submit(loop, insert, (k, f"v{k}")) for k in range(20)]
    release.set()
    assert await first is True
    # each call saw the rows of the calls queued before it
    assert await asyncio.gather(*futures) == list(range(1, 21))
    assert rows(engine) == {k: f"v{k}" for k in range(20)}
    assert group.calls == 21
    assert group.batches == 2  # the blocking call alone, then the 20 together


async def test_a_failing_call_fails_alone_and_the_others_are_written(writes):
    group, engine = writes
    loop = asyncio.get_running_loop()
    first, release = blocked(group, loop)
    ok1 = group.submit(loop, insert, (1, "one"))
    duplicate = group.submit(loop, insert, (1, "again"))
    ok2 = group.submit(loop, insert, (2, "two"))
    release.set()
    await first
    results = await asyncio.gather(ok1, duplicate, ok2, return_exceptions=True)
    assert results[0] == 1 and results[2] == 2  # as if each had run alone, in order
    assert isinstance(results[1], IntegrityError)
    assert rows(engine) == {1: "one", 2: "two"}
    # the next write finds the writer's connection usable
    assert await group.submit(loop, insert, (3, "three")) == 3


async def test_a_call_cancelled_before_its_batch_is_not_run(writes):
    group, engine = writes
    loop = asyncio.get_running_loop()
    first, release = blocked(group, loop)
    cancelled = group.submit(loop, insert, (7, "never"))
    kept = group.submit(loop, insert, (8, "kept"))
    cancelled.cancel()
    release.set()
    await first
    assert await kept == 1
    assert rows(engine) == {8: "kept"}


async def test_errors_are_translated_for_the_caller(writes):
    group, _ = writes
    group.translate = lambda e: LookupError("translated") if isinstance(e, ZeroDivisionError) else None

    def fails(connection):
        return 1 / 0

    with pytest.raises(LookupError, match="translated"):
        await group.submit(asyncio.get_running_loop(), fails, ())


@pytest.mark.parametrize("writes", [4], indirect=True)
async def test_with_several_writers_a_burst_still_shares_transactions(writes):
    group, engine = writes
    loop = asyncio.get_running_loop()
    futures = [group.submit(loop, insert, (k, f"v{k}")) for k in range(60)]
    assert sorted(await asyncio.gather(*futures)) == list(range(1, 61))
    assert rows(engine) == {k: f"v{k}" for k in range(60)}
    # one writer took them while its transactions were short: the first
    # call alone (its writer began at once), then the rest together
    assert group.batches <= 2


@pytest.mark.parametrize("writes", [2], indirect=True)
async def test_a_long_transaction_does_not_hold_up_the_writes_behind_it(writes):
    group, engine = writes
    loop = asyncio.get_running_loop()
    first, release = blocked(group, loop)
    try:
        # a second writer begins once this has waited SPREAD_AFTER
        assert await asyncio.wait_for(group.submit(loop, insert, (1, "one")), 10) == 1
        assert not first.done()
    finally:
        release.set()
    assert await first is True
    assert rows(engine) == {1: "one"}
