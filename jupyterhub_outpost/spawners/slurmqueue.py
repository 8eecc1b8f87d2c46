"""One ``squeue`` for all servers: the shared view of Slurm's queue.

Polls of Slurm jobs read one snapshot, refreshed by a single ``squeue``
call for every tracked job per interval (as KubeSpawner's reflector serves
every pod's poll from one watch). The interval is short while a start or
a stop waits for its job, long otherwise. When ``squeue`` fails, times
out, or no snapshot is recent enough, a status read raises
:class:`SlurmUnavailableError`: can't tell, never "stopped".
"""

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass

# squeue's long state names
PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
                            "SUSPENDED", "REQUEUE_FED", "SPECIAL_EXIT"})  # fmt: skip
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"})
# squeue -o: id, state, partition, priority, expected start, node, reason (last: may hold spaces)
FORMAT = "%i|%T|%P|%Q|%S|%B|%r"
PENDING_FORMAT = "%i|%P|%Q"

log = logging.getLogger("jupyterhub_outpost.slurm")


class SlurmUnavailableError(Exception):
    """Slurm's queue cannot be read now: a job's status is unknown"""


@dataclass(frozen=True)
class JobInfo:
    """One job as squeue showed it"""

    job_id: str
    state: str
    partition: str = ""
    priority: int = 0
    start: str = ""  # expected start (pending) or start time (running); "" if unknown
    node: str = ""
    reason: str = ""
    position: int = 0  # in the partition's queue of pending jobs, 0 if unknown

    @property
    def pending(self):
        return self.state in PENDING_STATES

    @property
    def running(self):
        return self.state in RUNNING_STATES

    @property
    def ended(self):
        return not (self.pending or self.running)


# a job that is no longer in squeue's output (its record was purged)
GONE = JobInfo(job_id="", state="GONE")


def parse_jobs(text):
    """``{job id: JobInfo}`` from ``squeue -h -o FORMAT`` output"""
    jobs = {}
    for line in text.splitlines():
        fields = line.strip().split("|", 6)
        if len(fields) != 7 or not fields[0]:
            continue
        job_id, state, partition, priority, start, node, reason = fields
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=state.split()[0] if state else "UNKNOWN",
            partition=partition,
            priority=_int(priority),
            start="" if start in ("N/A", "Unknown", "") else start,
            node="" if node in ("n/a", "(null)", "None assigned") else node,
            reason="" if reason in ("None", "(null)") else reason,
        )
    return jobs


def queue_positions(jobs, pending_text):
    """Positions of ``jobs`` that are pending, among all pending jobs of
    their partition (``squeue -h -t PD -o PENDING_FORMAT`` output): 1 is next"""
    by_partition = {}
    for line in pending_text.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3:
            by_partition.setdefault(fields[1], []).append((-_int(fields[2]), _int(fields[0])))
    positions = {}
    for job_id, info in jobs.items():
        if not info.pending or info.partition not in by_partition:
            continue
        mine = (-info.priority, _int(job_id))
        positions[job_id] = 1 + sum(1 for other in by_partition[info.partition] if other < mine)
    return positions


def _int(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0


async def run_command(argv, timeout, stdin=None, env=None):
    """``(returncode, stdout, stderr)`` of a command, killed after ``timeout`` seconds"""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


class SlurmQueue:
    """The jobs of this process's Slurm servers, read with one squeue per interval.

    Parameters:
        squeue: the squeue command (argv list)
        interval: seconds between refreshes while no one waits
        busy_interval: seconds between refreshes while a start or stop waits
        timeout: seconds one squeue call may take
    """

    def __init__(self, squeue, interval, busy_interval, timeout):
        self.squeue = list(squeue)
        self.interval = interval
        self.busy_interval = busy_interval
        self.timeout = timeout
        self.jobs = {}  # job id -> JobInfo of the last snapshot that covered it
        self.tracked = set()
        self.covered = set()  # job ids the last successful snapshot asked for
        self.snapshot_time = None  # monotonic start of the last successful squeue
        self.error = None  # why the last refresh failed, None if it worked
        self.calls = 0  # squeue invocations (for tests, benchmarks and metrics)
        self.failures = 0  # refreshes that could not read the queue
        self._busy = 0  # starts and stops waiting for a job
        self._wake = asyncio.Event()
        self._refreshed = asyncio.get_running_loop().create_future()
        self._task = None

    @property
    def max_age(self):
        """Seconds a snapshot answers polls: two intervals and a call"""
        return 2 * self.interval + self.timeout

    def track(self, job_id):
        if job_id not in self.tracked:
            self.tracked.add(job_id)
            self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def untrack(self, job_id):
        self.tracked.discard(job_id)
        self.jobs.pop(job_id, None)

    def busy(self):
        """A context manager: refresh every ``busy_interval`` while it is held"""
        return _Busy(self)

    def next_refresh(self):
        """A Future resolved after the next refresh (whether it worked or not)"""
        return asyncio.shield(self._refreshed)

    def usable(self, job_id):
        """The JobInfo (or GONE) the snapshot has for ``job_id``, or None if
        no recent snapshot covers it; raises if the last refresh failed"""
        if self.error is not None:
            raise SlurmUnavailableError(self.error)
        if self.snapshot_time is None or job_id not in self.covered:
            return None
        age = time.monotonic() - self.snapshot_time
        if age > self.max_age:
            raise SlurmUnavailableError(f"Slurm's queue was last read {age:.0f} s ago")
        return self.jobs.get(job_id, GONE)

    async def status(self, job_id):
        """The job's JobInfo, or GONE once squeue no longer lists it.

        Waits for the first snapshot that covers a newly tracked job;
        raises :class:`SlurmUnavailableError` when squeue cannot tell.
        """
        self.track(job_id)
        deadline = time.monotonic() + self.max_age
        while True:
            info = self.usable(job_id)
            if info is not None:
                return info
            if time.monotonic() > deadline:
                raise SlurmUnavailableError("Slurm's queue could not be read in time")
            self._wake.set()
            await self.next_refresh()

    async def _run(self):
        """Refresh while jobs are tracked"""
        while self.tracked:
            self._wake.clear()
            await self.refresh()
            interval = self.busy_interval if self._busy else self.interval
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except asyncio.TimeoutError:
                pass
            if self._wake.is_set() and not self._busy:
                # a new job: read soon, but never more often than busy_interval
                await asyncio.sleep(self.busy_interval)

    async def refresh(self):
        """One squeue for every tracked job"""
        asked = set(self.tracked)
        started = time.monotonic()
        try:
            jobs = await self._read(asked)
        except SlurmUnavailableError as e:
            self.error = str(e)
            self.failures += 1
            log.warning("Slurm's queue cannot be read: %s", e)
        else:
            if self.error is not None:
                log.info("Slurm's queue can be read again")
            self.error = None
            self.jobs = {job_id: jobs[job_id] for job_id in asked if job_id in jobs}
            self.covered = asked
            self.snapshot_time = started
        done, self._refreshed = self._refreshed, asyncio.get_running_loop().create_future()
        done.set_result(None)

    async def _read(self, job_ids):
        if not job_ids:
            return {}
        ids = ",".join(sorted(job_ids, key=_int))
        code, out, err = await self._squeue(["-h", "-t", "all", "-j", ids, "-o", FORMAT])
        if code != 0:
            if "Invalid job id" in err:
                return {}  # none of them is known any more
            raise SlurmUnavailableError(f"squeue exited with {code}: {err.strip()[:300]}")
        jobs = parse_jobs(out)
        pending = {job_id: info for job_id, info in jobs.items() if info.pending}
        if pending and self._busy:
            partitions = ",".join(sorted({info.partition for info in pending.values()}))
            code, out, err = await self._squeue(
                ["-h", "-t", "PD", "-p", partitions, "-o", PENDING_FORMAT]
            )
            if code == 0:
                for job_id, position in queue_positions(pending, out).items():
                    jobs[job_id] = _with_position(jobs[job_id], position)
        return jobs

    async def _squeue(self, args):
        self.calls += 1
        try:
            return await run_command(self.squeue + args, self.timeout)
        except asyncio.TimeoutError:
            raise SlurmUnavailableError(f"squeue did not answer within {self.timeout} s") from None
        except OSError as e:
            raise SlurmUnavailableError(f"squeue could not run: {e}") from None


def _with_position(info, position):
    values = dict(info.__dict__)
    values["position"] = position
    return JobInfo(**values)


class _Busy:
    def __init__(self, queue):
        self.queue = queue

    def __enter__(self):
        self.queue._busy += 1
        self.queue._wake.set()
        return self.queue

    def __exit__(self, *exc):
        self.queue._busy -= 1


# one queue per event loop and settings
_queues = weakref.WeakKeyDictionary()


def shared_queue(squeue, interval, busy_interval, timeout):
    """The SlurmQueue of this event loop for these settings"""
    loop = asyncio.get_running_loop()
    by_settings = _queues.setdefault(loop, {})
    key = (tuple(squeue), interval, busy_interval, timeout)
    queue = by_settings.get(key)
    if queue is None:
        queue = by_settings[key] = SlurmQueue(squeue, interval, busy_interval, timeout)
    return queue


def queues():
    """Every SlurmQueue of this process (for the metrics)"""
    return [queue for by_settings in list(_queues.values()) for queue in by_settings.values()]
