"""How does the Outpost do with thousands of servers, on SQLite and PostgreSQL?

Run from the repository root::

    python benchmarks/bench_scale.py                  # N 1000 and 10000, both databases (~10 min)
    python benchmarks/bench_scale.py --quick          # N 200, a smoke run (~1 min)
    python benchmarks/bench_scale.py --db sqlite --servers 1000

For each database (a temporary SQLite file; a fresh PostgreSQL database
``outpost_bench_<random>``, dropped afterwards, skipped with a note when the
server does not answer) and each N, a new Outpost process (log level WARNING,
no progress events, default ``db_workers``, the
:class:`benchmarks.noop_spawner.NoopSpawner`) is driven over HTTP:

1. ``GET /ping`` at 50 requests in flight: this machine's HTTP floor;
2. N starts (start_delay 0): the first half 10 at a time, the second half 50 at a time;
3. the Outpost's RSS (VmRSS, VmHWM) with N servers running;
4. polls round-robin over the N servers for 15 s, 50 in flight;
5. the same polls while N/10 (at most 1000) slow starts of 5 s each, sent
   all at once, are being accepted, waited for, and completed;
6. polls at a fixed rate (500/s, open loop, as hubs poll: a request is sent
   when due, whatever is still in flight) while 100 more slow starts run;
7. stops of every server, 50 at a time; then ``GET /services`` must list none.

It prints one table per database, each throughput also as a ratio to the
``/ping`` throughput of the same run. See benchmarks/README.md.
"""

import argparse
import asyncio
import collections
import os
import secrets
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit, urlunsplit

from _common import (
    Driver,
    HTTPPool,
    Meter,
    Outpost,
    f1,
    f2,
    ms,
    pct,
    print_table,
    proc_cpu_seconds,
    proc_status,
)

CONFIG = """\
c.JupyterHubOutpost.spawner_class = "benchmarks.noop_spawner.NoopSpawner"
c.JupyterHubOutpost.allowed_overrides = ["start_delay"]  # slow starts per request
c.JupyterHubOutpost.db_url = {db_url!r}
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
c.JupyterHubOutpost.send_events = False
c.JupyterHubOutpost.log_level = "WARN"
c.Spawner.start_timeout = 120
c.OutpostMetrics.enabled = {metrics}
c.OutpostMetrics.token = "{metrics_token}"
"""

METRICS_TOKEN = "bench-metrics-token"

HUB_PORT = 9  # discard: no request goes to the hub, send_events is off


# --------------------------------------------------------------------------
# databases


def pg_reachable(admin_url):
    """Whether the PostgreSQL server of ``admin_url`` answers (prints a note when not)"""
    import psycopg

    try:
        psycopg.connect(admin_url, autocommit=True, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        print(f"\nPostgreSQL at {admin_url} does not answer, skipped: {str(e).strip()}")
        return False
    return True


class _PGDatabase:
    """A fresh database on the server of ``admin_url``: entering creates it and
    gives its SQLAlchemy URL, leaving drops it"""

    def __init__(self, admin_url):
        self.admin_url = admin_url
        self.name = f"outpost_bench_{secrets.token_hex(4)}"

    def __enter__(self):
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        parts = urlsplit(self.admin_url)
        return urlunsplit(("postgresql+psycopg", parts.netloc, "/" + self.name, parts.query, ""))

    def __exit__(self, *exc):
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class _SQLiteFile:
    """A database file in ``workdir`` (removed with it)"""

    def __init__(self, workdir):
        self.path = os.path.join(workdir, "outpost.sqlite")

    def __enter__(self):
        return f"sqlite:///{self.path}"

    def __exit__(self, *exc):
        pass


# --------------------------------------------------------------------------
# one Outpost, one N


class ScaleRun(Driver):
    """The phases for one database and one N; rows and notes for the report"""

    def __init__(self, args, outpost, pool, db_label, n, metrics):
        super().__init__(outpost, pool, HUB_PORT)
        self.args = args
        self.db_label = db_label
        self.n = n
        self.metrics = metrics
        self.rows = []  # (phase, concurrency, latencies, meter)
        self.notes = []
        self.ping_rate = float("nan")

    def add_row(self, phase, concurrency, latencies, meter):
        self.rows.append((phase, concurrency, latencies, meter))
        if phase == "GET /ping":
            self.ping_rate = len(latencies) / meter.wall

    async def run(self):
        args, pid = self.args, self.outpost.pid
        await self.run_for(1, args.concurrency, lambda i: self.ping())  # warm-up
        with Meter(pid) as meter:
            latencies = await self.run_for(args.ping_seconds, args.concurrency, lambda i: self.ping())
        self.add_row("GET /ping", args.concurrency, latencies, meter)

        servers = []
        half = self.n // 2
        for count, concurrency in ((half, args.start_concurrency), (self.n - half, args.concurrency)):
            with Meter(pid) as meter:
                started, latencies = await self.start_many(count, 0.0, concurrency)
            servers += started
            self.add_row("start", concurrency, latencies, meter)
        status = proc_status(pid)
        self.notes.append(f"{len(servers)} servers running: RSS {status['VmRSS']}, peak {status['VmHWM']}, "
                          f"Outpost CPU so far {proc_cpu_seconds(pid):.1f} s")  # fmt: skip
        scraper = asyncio.ensure_future(self.scrape_every(1.0)) if self.metrics else None
        self.add_row("poll", args.concurrency, *await self.poll_for(servers, args.poll_seconds))
        if scraper is not None:
            scraper.cancel()
            during = await asyncio.gather(scraper, return_exceptions=True)
            alone = [await self.scrape() for _ in range(20)]
            size = len((await self.pool.request("GET", "/metrics", headers=self.scrape_headers))[1])
            self.notes.append(
                f"GET /metrics with {len(servers)} servers: p50 {f1(ms(pct(alone, 50)))} ms, max "
                f"{f1(ms(max(alone)))} ms alone ({size} bytes); once a second during the poll run "
                f"above: {len(during[0]) if isinstance(during[0], list) else 0} scrapes"
            )  # fmt: skip
        if args.profile:  # a separate run: py-spy slows the Outpost down
            await self.poll_for(servers, args.profile_seconds, profile=True)
        servers += await self.poll_during_slow_starts(servers, min(self.n // 10, args.slow_cap))
        if args.poll_rate:
            servers += await self.poll_during_slow_starts(
                servers, args.rate_slow_starts, rate=args.poll_rate
            )

        with Meter(pid) as meter:
            latencies = await self.stop_all(servers, args.concurrency)
        self.add_row("stop", args.concurrency, latencies, meter)
        left = len(await self.listed())
        status = proc_status(pid)
        self.notes.append(f"after stopping {len(servers)}: {left} servers left; RSS {status['VmRSS']}, "
                          f"peak {status['VmHWM']}, threads {status['Threads']}, "
                          f"Outpost CPU total {proc_cpu_seconds(pid):.1f} s")  # fmt: skip

    scrape_headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}

    async def scrape(self):
        """Seconds one ``GET /metrics`` takes"""
        began = time.perf_counter()
        status, _ = await self.pool.request("GET", "/metrics", headers=self.scrape_headers)
        assert status == 200, status
        return time.perf_counter() - began

    async def scrape_every(self, interval):
        """Scrape every ``interval`` s until cancelled; the scrape times"""
        times = []
        try:
            while True:
                times.append(await self.scrape())
                await asyncio.sleep(interval)
        except asyncio.CancelledError:
            return times

    async def poll_for(self, servers, seconds, profile=False, rate=None):
        async def one(i):
            return await self.poll(*servers[i % len(servers)])

        profile = self.start_profile(seconds) if profile and self.args.profile else None
        with Meter(self.outpost.pid) as meter:
            if rate:
                latencies = await self.run_at_rate(seconds, rate, one)
            else:
                latencies = await self.run_for(seconds, self.args.concurrency, one)
        if profile:
            self.notes.append(await profile)
        return latencies, meter

    async def poll_during_slow_starts(self, servers, count, rate=None):
        """Send ``count`` slow starts at once and poll meanwhile (``rate`` polls/s,
        or ``--concurrency`` in flight); returns the slow servers"""
        args = self.args
        began = time.perf_counter()
        answered = []

        async def slow_start():
            result = await self.start("bench", args.slow_delay)
            answered.append(time.perf_counter() - began)
            return result

        slow = [asyncio.create_task(slow_start()) for _ in range(count)]
        latencies, meter = await self.poll_for(servers, args.poll_seconds, rate=rate)
        if rate:
            self.add_row(f"poll {rate:g}/s, {count} slow starts", "-", latencies, meter)
        else:
            self.add_row(f"poll, {count} slow starts", args.concurrency, latencies, meter)
        done, pending = await asyncio.wait(slow, timeout=args.slow_delay + 60)
        results = [t.result() for t in done if not t.exception() and t.result()]
        slow_lat = [r[0] for r in results]
        self.notes.append(
            f"{count} slow starts ({args.slow_delay:g} s each) sent at once: {len(results)} succeeded, "
            f"{len(pending)} unfinished; latency p50 {f1(ms(pct(slow_lat, 50)))} ms, "
            f"max {f1(ms(max(slow_lat, default=float('nan'))))} ms; the last one answered "
            f"{max(answered, default=float('nan')):.1f} s after sending (poll window {args.poll_seconds:g} s)"
        )
        for task in pending:
            task.cancel()
        return [r[1:] for r in results]

    def start_profile(self, seconds):
        """py-spy on the Outpost for ``seconds``; a coroutine that returns a summary"""
        path = os.path.join(self.args.profile, f"poll-{self.db_label}-{self.n}.txt")
        proc = subprocess.Popen(
            ["py-spy", "record", "--pid", str(self.outpost.pid), "--duration", str(int(seconds)),
             "--rate", "100", "--format", "raw", "--output", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        async def summary():
            while proc.poll() is None:
                await asyncio.sleep(0.2)
            return profile_summary(path, int(seconds))

        return asyncio.ensure_future(summary())


def profile_summary(path, seconds, top=5, rate=100):
    """The functions with the most own samples in a py-spy raw (collapsed)
    profile, for the event loop's thread and for the other threads (DB workers)"""
    own = {"loop": collections.Counter(), "threads": collections.Counter()}
    loop_packages = collections.Counter()
    try:
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip().rpartition(" ")
                where = "loop" if stack.startswith("_run_module_as_main") else "threads"
                leaf = stack.rsplit(";", 1)[-1]
                own[where][leaf] += int(count)
                if where == "loop":  # "func (package/module.py:line)" -> package
                    loop_packages[leaf.rpartition(" (")[2].split("/")[0].split(".py:")[0]] += int(count)
    except OSError as e:
        return f"py-spy profile missing ({e})"
    samples = rate * seconds
    lines = [f"py-spy, {seconds:g} s more polls ({path}); own time as % of {seconds:g} s of one thread:"]
    for where, counter in own.items():
        busy = 100 * sum(counter.values()) / samples
        label = "event loop" if where == "loop" else "DB worker threads, summed (waits on the DB count)"
        lines.append(f"  {label}: non-idle {busy:.0f}%")
        lines += [f"    {100 * c / samples:5.1f}%  {frame}" for frame, c in counter.most_common(top)]
    lines.append("  event loop own time by package: " + ", ".join(
        f"{name} {100 * c / samples:.0f}%" for name, c in loop_packages.most_common(6)))  # fmt: skip
    return "\n      ".join(lines)


async def run_one(args, db_label, db_context, n, metrics):
    """One Outpost process on a fresh database, all phases for ``n`` servers"""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="outpost-scale-") as workdir:
        context = db_context(workdir)
        with context as db_url:
            config = CONFIG.format(db_url=db_url, workdir=workdir, metrics=metrics,
                                   metrics_token=METRICS_TOKEN)  # fmt: skip
            outpost = Outpost(workdir, config)
            pool = HTTPPool("127.0.0.1", outpost.port, args.concurrency + args.slow_cap + 4)
            bench = ScaleRun(args, outpost, pool, db_label, n, metrics)
            try:
                await outpost.wait_ready(pool)
                await asyncio.wait_for(bench.run(), args.deadline)
            except asyncio.TimeoutError:
                bench.notes.append(f"DID NOT FINISH within --deadline {args.deadline:g} s")
            finally:
                pool.close()
                outpost.terminate()
            warnings = outpost.warnings()
    bench.notes.append(f"Outpost log: {len(warnings)} warnings/errors; unexpected statuses: {bench.errors or 'none'}")
    bench.notes += [f"  {line[:200]}" for line in warnings[:3]]
    bench.notes.append(f"wall time for N={n}, metrics {'on' if metrics else 'off'}: "
                       f"{time.perf_counter() - began:.0f} s")
    return bench


def report(db_label, runs):
    rows, notes = [], []
    for bench in runs:
        for phase, concurrency, latencies, meter in bench.rows:
            rate = len(latencies) / meter.wall
            rows.append([f"{bench.n}{' m' if bench.metrics else ''}", phase, concurrency, len(latencies), f"{rate:.0f}",
                         f2(rate / bench.ping_rate), f2(ms(pct(latencies, 50))),
                         f2(ms(pct(latencies, 99))), f2(ms(max(latencies, default=float("nan")))),
                         f2(ms(meter.server_cpu / max(1, len(latencies)))),
                         f"{meter.server_pct:.0f}%", f"{meter.other_pct:.0f}%"])  # fmt: skip
        notes += [f"   N={bench.n}{' m' if bench.metrics else ''}: {note}" for note in bench.notes]
    for n in sorted({bench.n for bench in runs}):
        on = [b for b in runs if b.n == n and b.metrics]
        off = [b for b in runs if b.n == n and not b.metrics]
        if on and off:
            for (phase, _, lat_on, m_on), (_, _, lat_off, m_off) in zip(on[0].rows, off[0].rows):
                if phase.startswith("poll"):
                    rate_on, rate_off = len(lat_on) / m_on.wall, len(lat_off) / m_off.wall
                    notes.append(f"   N={n} {phase}: {rate_on:.0f} polls/s with metrics, {rate_off:.0f} "
                                 f"without (x {rate_on / rate_off:.3f})")  # fmt: skip
    print_table(
        f"{db_label}: requests/s, latency (ms), Outpost CPU",
        ["N (m: metrics)", "phase", "in flight", "requests", "req/s", "x ping", "p50", "p99", "max",
         "CPU ms/req", "outpost CPU", "others CPU"],
        rows,
    )  # fmt: skip
    print("\n".join(notes))


async def main(args):
    began = time.perf_counter()
    print(f"jupyterhub-outpost scale benchmark: {os.cpu_count()} CPUs, "
          f"load average {open('/proc/loadavg').read().split()[0]}; N {args.servers}; "
          f"databases {args.db}")  # fmt: skip
    for db_label in args.db:
        if db_label == "sqlite":
            db_context = _SQLiteFile
        else:
            if not pg_reachable(args.pg_url):
                continue
            db_context = lambda workdir: _PGDatabase(args.pg_url)  # noqa: E731
        runs = []
        for n in args.servers:
            for metrics in args.metrics:
                runs.append(await run_one(args, db_label, db_context, n, metrics))
            print(f"  ({db_label} N={n} done after {time.perf_counter() - began:.0f} s)", file=sys.stderr)
        report(db_label, runs)
    print(f"\ntotal benchmark time: {time.perf_counter() - began:.0f} s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="sqlite,postgresql",
                        help="databases, comma-separated: sqlite, postgresql")
    parser.add_argument("--servers", default="1000,10000", help="values of N, comma-separated")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL URL with rights to create and drop databases")
    parser.add_argument("--concurrency", type=int, default=50,
                        help="requests in flight for pings, polls, stops and the second half of the starts")
    parser.add_argument("--start-concurrency", type=int, default=10,
                        help="requests in flight for the first half of the starts")
    parser.add_argument("--ping-seconds", type=float, default=3)
    parser.add_argument("--poll-seconds", type=float, default=15, help="length of each poll run")
    parser.add_argument("--slow-cap", type=int, default=1000, help="at most this many slow starts (N/10)")
    parser.add_argument("--slow-delay", type=float, default=5, help="seconds each slow start takes")
    parser.add_argument("--poll-rate", type=float, default=500,
                        help="polls per second of the open-loop run during slow starts (0: no such run)")
    parser.add_argument("--rate-slow-starts", type=int, default=100,
                        help="slow starts sent at once during the open-loop poll run")
    parser.add_argument("--deadline", type=float, default=0,
                        help="give up one database and N after this many seconds (default 120 + N/25)")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the idle poll run, poll again under py-spy; raw profiles go to DIR")
    parser.add_argument("--profile-seconds", type=float, default=10, help="length of the profiled poll run")
    parser.add_argument("--quick", action="store_true", help="N 200, polls for 6 s: a smoke run")
    parser.add_argument("--metrics", choices=["on", "off", "both"], default="on",
                        help="Prometheus metrics in the Outpost (both: a run with and one without, "
                        "and the ratio of their poll rates)")
    args = parser.parse_args(argv)
    args.metrics = {"on": [True], "off": [False], "both": [False, True]}[args.metrics]
    args.db = [d.strip() for d in args.db.split(",") if d.strip()]
    args.servers = [int(n) for n in args.servers.split(",")]
    if args.quick:
        args.servers, args.ping_seconds, args.poll_seconds, args.profile_seconds = [200], 1, 6, 3
    for db in args.db:
        if db not in ("sqlite", "postgresql"):
            parser.error(f"unknown database {db!r}")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    args.deadline = args.deadline or 120 + max(args.servers) / 25
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
