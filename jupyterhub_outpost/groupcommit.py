"""Group commit: the writes that wait together run in one transaction.

When fifty starts arrive at once, each used to take a writer thread for a
transaction of its own: a pool checkout, ``BEGIN``, a few statements,
``COMMIT``, and a wake-up of the event loop per write. :class:`GroupCommit`
queues the writes instead; a writer thread takes what has queued up (at
most ``max_batch`` calls), runs them one after another in one transaction,
commits once and hands all results to the event loop in one wake-up. Under
light load a batch holds one call, so nothing waits for company.

One writer works at a time while its transactions are short: the writes
that arrive meanwhile wait for its next batch, which makes batches larger
and commits fewer. Another writer (up to ``workers``) begins only when
writes have waited ``spread_after`` seconds behind the busy ones: a slow
database or a long statement does not hold everything up.

Every call still sees the result it would have seen alone, in the order
the calls were made:

- The calls of a batch run in the order they were queued, on one
  connection, so each sees what the calls before it wrote.
- When any call of a batch raises (a key that exists, a limit reached, a
  lost connection), the batch's transaction is rolled back and each of its
  calls runs again in a transaction of its own, so one call's error is
  never another's. Calls are functions of the connection and their
  arguments, safe to run again after a rollback.
- A call whose caller was cancelled before its batch began is not run.

Most writes of starts and stops are one statement whose reply only makes
the call's result: a start's insert, the save that ends it, a stop's claim
and the deletion. They are queued as ``pipelined`` and return a
:class:`Later`. Where the database can (psycopg's pipeline mode on
PostgreSQL), the statements of such calls in a row go to the server
together and their replies are read once, after the last: a batch takes
two round trips (the replies, the commit), not one per write. The results
are made from the replies before the commit; a call that is not pipelined
first waits for the replies of those before it.

Each writer thread keeps its connection between batches (no pool checkout
per transaction). A connection to a database server that sat idle for more
than ``IDLE_PING`` seconds is pinged before its next batch (a restarted
server closed it meanwhile); after an error it is dropped and the calls run
again on new ones.
"""

import collections
import contextlib
import threading
import time

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError

#: most calls in one transaction: bounds how long a batch holds its locks
MAX_BATCH = 64
#: seconds a writer's connection to a database server may sit idle before
#: it is pinged (no ping while batches follow each other)
IDLE_PING = 1.0
#: seconds writes may wait behind busy writers before one more begins. On
#: PostgreSQL on the same host, a burst of starts then ran in batches of
#: about 16 writes instead of 7, for 15 % less CPU per start.
SPREAD_AFTER = 0.05

# errors of a statement, not of the connection: it stays
_KEPT_ON = (IntegrityError, DataError, ProgrammingError)


class GroupCommit:
    """Writes in batches on the threads of ``executor``.

    Parameters:
        engine: the SQLAlchemy engine
        executor: a ``ThreadPoolExecutor``; at most ``workers`` of its
            threads write at a time
        workers: how many batches may run at once (a second one only
            after writes waited ``spread_after`` seconds)
        translate: ``translate(exception)`` -> the exception to raise to the
            caller instead (e.g. connection errors), or None to raise as is
        observe: ``observe(seconds, failed)`` after each call, in its thread
            (seconds: the call's transaction, begin to commit), or None
        pipeline: ``pipeline(connection)`` -> a context manager: the
            statements sent within it go to the server together, its end
            reads their replies; or None (each statement waits for its reply)
    """

    def __init__(
        self, engine, executor, workers, translate=None, observe=None,
        max_batch=MAX_BATCH, spread_after=SPREAD_AFTER, pipeline=None,
    ):  # fmt: skip
        self.engine = engine
        self.pipeline = pipeline
        self.executor = executor
        self.workers = workers
        self.translate = translate
        self.observe = observe
        self.max_batch = max_batch
        self.spread_after = spread_after
        self._queue = collections.deque()
        self._lock = threading.Lock()
        self._draining = 0  # writer threads at work (guarded by _lock)
        self._spread_check = None  # the loop's timer that may add a writer (guarded by _lock)
        self._local = threading.local()  # each writer thread's connection
        self._connections = set()  # all of them (guarded by _lock), closed by close()
        # figures: calls run, and the transactions they took (calls / batches: the mean batch)
        self.batches = 0
        self.calls = 0

    def submit(self, loop, fn, args, pipelined=False):
        """Queue ``fn(connection, *args)``; an asyncio future of ``loop`` for its result.

        ``pipelined``: ``fn`` sends one statement and returns a
        :class:`Later` of its result, without waiting for the reply."""
        future = loop.create_future()
        with self._lock:
            self._queue.append((future, fn, args, pipelined))
            start = self._draining == 0
            if start:
                self._draining = 1
            elif self._draining < self.workers and self._spread_check is None:
                self._spread_check = loop.call_later(self.spread_after, self._spread, loop)
        if start:
            self.executor.submit(self._drain, loop)
        return future

    def _spread(self, loop):
        """On the loop, ``spread_after`` seconds after a write queued behind
        busy writers: one more writer if writes still wait"""
        with self._lock:
            self._spread_check = None
            start = bool(self._queue) and self._draining < self.workers
            if start:
                self._draining += 1
                if self._draining < self.workers:  # and another if they wait on
                    self._spread_check = loop.call_later(self.spread_after, self._spread, loop)
        if start:
            try:
                self.executor.submit(self._drain, loop)
            except RuntimeError:  # shut down: the writers at work take what waits
                with self._lock:
                    self._draining -= 1

    # the writer threads

    def _drain(self, loop):
        while True:
            with self._lock:
                if not self._queue:
                    self._draining -= 1
                    return
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            # a caller cancelled meanwhile (reading a future's state is safe here)
            batch = [call for call in batch if not call[0].cancelled()]
            if not batch:
                continue
            try:
                results = self._run_batch(batch)
            except BaseException as e:  # a bug here must not leave callers waiting
                results = [(future, None, e) for future, *_ in batch]
            loop.call_soon_threadsafe(_deliver, results)

    def _run_batch(self, batch):
        self.calls += len(batch)
        if len(batch) > 1:
            self.batches += 1
            began = time.perf_counter()
            try:
                connection = self._connection()
                with connection.begin():
                    results = self._calls(connection, batch)
            except Exception as e:
                self._after_error(e)  # and each call again on its own, below
            else:
                self._observed(time.perf_counter() - began, False, len(batch))
                return results
        return [self._run_alone(*call) for call in batch]

    def _calls(self, connection, batch):
        """Run the calls of a batch in the transaction of ``connection``; the
        statements of pipelined calls in a row are sent together, and their
        replies read after the last"""
        results = []
        with contextlib.ExitStack() as stack:
            sending = False  # in a pipeline
            for future, fn, args, pipelined in batch:
                if pipelined and self.pipeline is not None:
                    if not sending:
                        stack.enter_context(self.pipeline(connection))
                        sending = True
                elif sending:
                    stack.close()  # the replies so far, before this call's statements
                    sending = False
                results.append(fn(connection, *args))
        return [(future, _settled(result), None) for (future, *_), result in zip(batch, results)]

    def _connection(self):
        connection = getattr(self._local, "connection", None)
        now = time.monotonic()
        if connection is not None and not (connection.closed or connection.invalidated):
            idle = now - self._local.used
            if idle > IDLE_PING and self.engine.dialect.name != "sqlite" and not self._alive(connection):
                connection = None
        else:
            connection = None
        if connection is None:
            self.close_connection()
            connection = self._local.connection = self.engine.connect()
            with self._lock:
                self._connections.add(connection)
        self._local.used = now
        return connection

    def _alive(self, connection):
        try:
            connection.exec_driver_sql("SELECT 1")
            connection.rollback()
            return True
        except DBAPIError:
            return False

    def _after_error(self, e):
        """Drop this thread's connection when ``e`` may have broken it"""
        if isinstance(e, DBAPIError) and not isinstance(e, _KEPT_ON):
            self.close_connection()

    def close_connection(self):
        """Close this thread's connection (the next batch opens a new one)"""
        connection = self._local.__dict__.pop("connection", None)
        if connection is not None:
            with self._lock:
                self._connections.discard(connection)
            _close(connection)

    def close(self):
        """Close the writer threads' connections (once their work is done)"""
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            _close(connection)


    def _run_alone(self, future, fn, args, _pipelined):
        self.batches += 1
        began, error, result = time.perf_counter(), None, None
        try:
            connection = self._connection()
            with connection.begin():
                result = _settled(fn(connection, *args))
        except Exception as e:
            self._after_error(e)
            translated = self.translate(e) if self.translate is not None else None
            if translated is not None:
                translated.__cause__ = e
            error = translated or e
        self._observed(time.perf_counter() - began, error is not None, 1)
        return future, result, error

    def _observed(self, seconds, failed, calls):
        if self.observe is not None:
            for _ in range(calls):
                self.observe(seconds, failed)


class Later:
    """The result of a call that sent its statement: ``settle()`` reads the
    reply and gives the result (or raises), once the batch's statements
    are all sent"""

    __slots__ = ("settle",)

    def __init__(self, settle):
        self.settle = settle

    def then(self, fn):
        """A Later of ``fn(this one's result)``"""
        return Later(lambda: fn(self.settle()))


def _settled(result):
    return result.settle() if isinstance(result, Later) else result


def _deliver(results):
    """On the event loop: resolve the futures of one batch"""
    for future, result, error in results:
        if future.done():  # cancelled while its batch ran
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _close(connection):
    try:
        connection.close()
    except Exception:
        pass
