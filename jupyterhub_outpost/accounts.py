"""Looking up local accounts for starts, off the event loop.

Every start asks for the uid of its account (``min_account_uid``). The
account database may be remote (LDAP, sssd), so lookups run in a thread.
A lookup of an account that does not exist asks every source in
``nsswitch.conf`` and costs about as much as the rest of a start's
bookkeeping; a thread call costs half of that again. So an answer is kept
for ``ttl`` seconds, and the lookups asked for during one turn of the event
loop (a burst of starts) go to the thread together, in one call. Expired
answers are dropped, not kept until the next start of their account: what
a burst of starts leaves in memory would keep the memory of all of that
burst from being returned.
"""

import asyncio
import collections
import pwd
import time

from .utils import remember


def uid_of(account):
    """The uid of ``account``, None if there is no such account"""
    try:
        return pwd.getpwnam(account).pw_uid
    except (KeyError, ValueError):
        return None


class AccountLookups:
    """uids of accounts, cached for ``ttl`` seconds (at most ``kept`` of them)"""

    def __init__(self, ttl=10, kept=10000, lookup=uid_of, executor=None):
        self.ttl = ttl
        self.kept = kept
        self.lookup = lookup
        self.executor = executor
        # account -> (uid or None, when it expires), oldest first
        self._known = collections.OrderedDict()
        self._asked = {}  # account -> future: to be looked up with the next batch
        # lookups made and thread calls that made them (tests, benchmarks)
        self.lookups = 0
        self.batches = 0

    async def uid(self, account):
        """The uid of ``account`` (None: no such account)"""
        now = time.monotonic()
        self._drop_expired(now)
        known = self._known.get(account)
        if known is not None:
            return known[0]
        future = self._asked.get(account)
        if future is None:
            loop = asyncio.get_running_loop()
            if not self._asked:  # the first of this turn: send the batch after it
                loop.call_soon(self._send, loop)
            future = self._asked[account] = loop.create_future()
        # shielded: one caller cancelled does not cancel the others' answer
        return await asyncio.shield(future)

    def _send(self, loop):
        asked, self._asked = self._asked, {}
        accounts = list(asked)
        answer = loop.run_in_executor(self.executor, self._look_up, accounts)
        answer.add_done_callback(lambda done: self._answer(asked, done))

    def _look_up(self, accounts):
        return [self.lookup(account) for account in accounts]

    def _answer(self, asked, done):
        self.batches += 1
        self.lookups += len(asked)
        if done.cancelled():  # the executor was shut down
            for future in asked.values():
                future.cancel()
            return
        if done.exception() is not None:
            for future in asked.values():
                if not future.done():
                    future.set_exception(done.exception())
            return
        due = time.monotonic() + self.ttl
        for (account, future), uid in zip(asked.items(), done.result()):
            remember(self._known, account, (uid, due), self.kept)
            if not future.done():
                future.set_result(uid)

    def _drop_expired(self, now):
        known = self._known
        while known:
            account, (_, due) = next(iter(known.items()))
            if due > now:
                break
            del known[account]
