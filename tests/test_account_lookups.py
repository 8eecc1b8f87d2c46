"""Account lookups: off the event loop, one thread call for the lookups of a
burst, each account answered as it would be alone"""

import asyncio
import os
import pwd
import threading

import pytest

from jupyterhub_outpost.accounts import AccountLookups, uid_of

from .utils import database_independent

pytestmark = database_independent


def test_uid_of_a_real_and_a_missing_account():
    me = pwd.getpwuid(os.getuid()).pw_name
    assert uid_of(me) == os.getuid()
    assert uid_of("no-such-account-here") is None
    assert uid_of("nul\0name") is None  # refused by the C library: no such account


async def test_the_lookups_of_one_turn_share_one_thread_call():
    threads = set()

    def lookup(account):
        threads.add(threading.current_thread())
        return {"alice": 1001, "root": 0}.get(account)

    lookups = AccountLookups(ttl=60, lookup=lookup)
    names = ["alice", "root", "nobody-here", "alice"] * 10
    uids = await asyncio.gather(*(lookups.uid(name) for name in names))
    assert uids == [1001, 0, None, 1001] * 10
    assert (lookups.batches, lookups.lookups) == (1, 3)  # each account once
    assert threading.current_thread() not in threads
    # known ones are answered from memory, new ones looked up
    assert await lookups.uid("alice") == 1001 and lookups.batches == 1
    assert await lookups.uid("bob") is None and lookups.batches == 2


async def test_answers_expire_and_a_failed_lookup_fails_its_callers_only():
    answers = {"alice": 1001}

    def lookup(account):
        if account == "broken":
            raise OSError("the account database is away")
        return answers.get(account)

    lookups = AccountLookups(ttl=0, lookup=lookup)
    assert await lookups.uid("alice") == 1001
    answers["alice"] = 1002
    assert await lookups.uid("alice") == 1002  # ttl 0: asked again
    with pytest.raises(OSError):
        await lookups.uid("broken")
    assert await lookups.uid("alice") == 1002


async def test_a_cancelled_caller_leaves_the_others_their_answer():
    release = threading.Event()

    def lookup(account):
        release.wait(10)
        return 1001

    lookups = AccountLookups(ttl=60, lookup=lookup)
    first = asyncio.ensure_future(lookups.uid("alice"))
    second = asyncio.ensure_future(lookups.uid("alice"))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert await second == 1001
    assert first.cancelled()


async def test_expired_answers_are_dropped_and_at_most_kept_remain():
    lookups = AccountLookups(ttl=0.05, kept=3, lookup=lambda account: 1000)
    await asyncio.gather(*(lookups.uid(f"user{i}") for i in range(5)))
    assert list(lookups._known) == ["user2", "user3", "user4"]  # the newest
    await asyncio.sleep(0.1)
    await lookups.uid("late")
    assert list(lookups._known) == ["late"]  # the expired ones are gone
