"""What does a start cost, does memory come back, and do polls stall at 10,000 servers?

Run from the repository root::

    python benchmarks/bench_start.py                 # all parts, SQLite and PostgreSQL (~12 min)
    python benchmarks/bench_start.py --quick         # a smoke run (~2 min)
    python benchmarks/bench_start.py --parts cost --db sqlite --profile /tmp/prof

Each part runs a new Outpost process (log level WARNING, no progress events,
:class:`benchmarks.noop_spawner.NoopSpawner`, start_delay 0) on a fresh
database: a SQLite file in a temporary directory, or a database
``outpost_bench_<random>`` on the PostgreSQL server of ``--pg-url``, dropped
afterwards. Throughputs are given as ratios to the ``GET /ping`` rate of the
same process in the same run, and CPU as the Outpost's own CPU time per
request (``/proc/<pid>/stat``), so that figures from a shared, noisy machine
compare.

Parts (``--parts``):

``cost``
    ``/ping`` for ``--ping-seconds``; ``--servers`` (1,000) starts of distinct
    users (a workshop: every start is a new user of the hub), ``--concurrency``
    (50) in flight; polls of those servers for ``--poll-seconds``; all stopped;
    then the same number of starts for the same users again (returning users),
    and stopped. With ``--profile DIR``, a second round of distinct-user starts
    runs under ``py-spy record --threads`` (after the measured rows) and the
    top entries per thread are printed.
``churn``
    Waves of ``--wave`` (2,000) starts and their stops, for at least
    ``--churn-seconds`` and ``--churn-servers`` (10,000) starts; RSS sampled
    every second. Prints RSS before the first wave, after each wave's starts
    and after its stops, and the last against the first.
``pause``
    ``--pause-servers`` (10,000) servers started, then polls at a fixed rate
    (``--poll-rate``, 500/s, open loop: each latency counts from when the poll
    was due) for ``--poll-seconds`` while ``--slow-starts`` (100) starts of 5 s
    each run; p50/p99/max, and the garbage collections of that window with
    their longest pause (from the Outpost's ``/metrics``).
"""

import argparse
import asyncio
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

from _common import Driver, HTTPPool, Meter, Outpost, f1, f2, ms, pct, print_table, proc_status
from bench_scale import _PGDatabase, _SQLiteFile, pg_reachable

CONFIG = """\
c.JupyterHubOutpost.spawner_class = "benchmarks.noop_spawner.NoopSpawner"
c.JupyterHubOutpost.allowed_overrides = ["start_delay"]
c.JupyterHubOutpost.db_url = {db_url!r}
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
c.JupyterHubOutpost.send_events = False
c.JupyterHubOutpost.log_level = "WARN"
c.Spawner.start_timeout = 120
c.OutpostMetrics.token = "{token}"
"""
METRICS_TOKEN = "bench-start-metrics"
PREFIX = "jupyterhub_outpost"
HUB_PORT = 9  # no request goes to the hub: send_events is off


class StartDriver(Driver):
    """Starts for named users (the Driver's starts are all of one user)"""

    async def start_users(self, users, concurrency, delay=0.0):
        """One start per user in ``users``; ([(name, start_id)], latencies)"""
        return await self.start_many(len(users), delay, concurrency, users=users)

    async def poll_round_robin(self, servers, seconds, concurrency):
        return await self.run_for(seconds, concurrency, lambda i: self.poll(*servers[i % len(servers)]))

    async def metrics(self):
        """The Outpost's /metrics as {sample name with labels: value}"""
        status, data = await self.pool.request(
            "GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
        )
        values = {}
        if status != 200:
            return values
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values


class Run:
    """One Outpost process on a fresh database"""

    def __init__(self, args, db_context, concurrency):
        self.args = args
        self.db_context = db_context
        self.concurrency = concurrency

    async def __aenter__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="outpost-start-")
        workdir = self.tmp.name
        self.db = self.db_context(workdir)
        db_url = self.db.__enter__()
        config = CONFIG.format(db_url=db_url, workdir=workdir, token=METRICS_TOKEN)
        self.outpost = Outpost(workdir, config + "".join(f"{line}\n" for line in self.args.config))
        self.pool = HTTPPool("127.0.0.1", self.outpost.port, self.concurrency + self.args.slow_starts + 4)
        self.driver = StartDriver(self.outpost, self.pool, HUB_PORT)
        await self.outpost.wait_ready(self.pool)
        await self.driver.run_for(1, self.concurrency, lambda i: self.driver.ping())  # warm-up
        return self

    async def __aexit__(self, *exc):
        self.pool.close()
        self.outpost.terminate()
        self.warnings = self.outpost.warnings()
        self.db.__exit__(*exc)
        self.tmp.cleanup()

    def measure(self):
        return Meter(self.outpost.pid)

    def rss_mb(self):
        return int(proc_status(self.outpost.pid)["VmRSS"].split()[0]) / 1024


def row(label, latencies, meter, ping_rate, poll_cpu):
    rate = len(latencies) / meter.wall
    cpu = meter.server_cpu / max(1, len(latencies))
    return [label, len(latencies), f"{rate:.0f}", f"{rate / ping_rate:.3f}", f2(ms(pct(latencies, 50))),
            f2(ms(pct(latencies, 99))), f2(ms(cpu)), f2(cpu / poll_cpu) if poll_cpu else "-",
            f2(ms(meter.postgres_cpu / max(1, len(latencies)))), f"{meter.other_pct:.0f}%"]  # fmt: skip


async def part_cost(args, db_label, db_context):
    """The table: ping, starts of distinct and of returning users, polls"""
    c = args.concurrency
    async with Run(args, db_context, c) as run:
        d = run.driver
        with run.measure() as m_ping:
            pings = await d.run_for(args.ping_seconds, c, lambda i: d.ping())
        users = [f"student{i:05d}" for i in range(args.servers)]
        before = await d.metrics()
        with run.measure() as m_new:
            servers, new = await d.start_users(users, c)
        after = await d.metrics()
        with run.measure() as m_poll:
            polls = await d.poll_round_robin(servers, args.poll_seconds, c)
        await d.stop_all(servers, c)
        with run.measure() as m_back:
            servers, back = await d.start_users(users, c)
        await d.stop_all(servers, c)
        profile = None
        if args.profile:
            profile = await profile_starts(args, run, db_label, [f"late{i:05d}" for i in range(args.servers)])
        errors = d.errors
    ping_rate = len(pings) / m_ping.wall
    poll_cpu = m_poll.server_cpu / max(1, len(polls))
    rows = [
        row("GET /ping", pings, m_ping, ping_rate, poll_cpu),
        row("start, distinct users", new, m_new, ping_rate, poll_cpu),
        row("start, returning users", back, m_back, ping_rate, poll_cpu),
        row("poll", polls, m_poll, ping_rate, poll_cpu),
    ]
    print_table(
        f"{db_label}: the cost of a start (N={args.servers}, {c} in flight)",
        ["request", "done", "req/s", "x ping", "p50 ms", "p99 ms", "CPU ms/req", "CPU / poll's",
         "postgres CPU ms/req", "others CPU"],
        rows,
    )  # fmt: skip
    writes = after.get(f"{PREFIX}_db_writes_total", 0) - before.get(f"{PREFIX}_db_writes_total", 0)
    transactions = (after.get(f"{PREFIX}_db_write_transactions_total", 0)
                    - before.get(f"{PREFIX}_db_write_transactions_total", 0))  # fmt: skip
    print(f"   starts of distinct users: {writes / max(1, len(new)):.2f} database writes per start in "
          f"{transactions / max(1, len(new)):.2f} transactions ({writes / max(1, transactions):.1f} writes "
          f"per transaction)")
    for label, meter, n in (("distinct", m_new, len(new)), ("returning", m_back, len(back))):
        # below 100 % while starts run: the loop waits (for the database, say), not the starts for it
        print(f"   starts of {label} users: the event loop's thread was busy {100 * meter.loop_cpu / meter.wall:.0f} % "
              f"of the time ({ms(meter.loop_cpu / max(1, n)):.2f} ms CPU per start), the other threads "
              f"{ms((meter.server_cpu - meter.loop_cpu) / max(1, n)):.2f} ms per start")
    print(f"   unexpected statuses: {errors or 'none'}; Outpost log: {len(run.warnings)} warnings")
    for line in run.warnings[:3]:
        print(f"     {line[:200]}")
    if profile:
        print(profile)


async def profile_starts(args, run, db_label, users):
    path = os.path.join(args.profile, f"starts-{db_label}.txt")
    proc = subprocess.Popen(
        ["py-spy", "record", "--pid", str(run.outpost.pid), "--threads", "--rate", "200", *args.py_spy_args,
         "--format", "raw", "--output", path, "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1)
    began = time.perf_counter()
    servers, _ = await run.driver.start_users(users, args.concurrency)
    seconds = time.perf_counter() - began
    proc.send_signal(2)  # SIGINT: py-spy writes what it has
    while proc.poll() is None:
        await asyncio.sleep(0.1)
    await run.driver.stop_all(servers, args.concurrency)
    return summarize_profile(path, len(servers), seconds)


def summarize_profile(path, starts, seconds, top=8):
    """Share of samples per thread and the functions with most own and total time"""
    threads = collections.Counter()
    own = collections.Counter()
    total = collections.Counter()
    samples = 0
    try:
        # (py-spy may write a frame's name as garbage, a carriage return say:
        # lines end at newlines only, and a line that does not parse is skipped)
        with open(path, newline="\n", errors="replace") as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not count.isdigit():
                    continue
                count = int(count)
                frames = stack.split(";")
                thread = re.sub(r"\s*\(.*", "", frames[0])
                thread = "event loop" if "MainThread" in frames[0] or "_run_module_as_main" in stack[:200] else thread
                samples += count
                threads[thread] += count
                own[frames[-1]] += count
                for frame in set(frames[1:]):
                    total[frame] += count
    except OSError as e:
        return f"   py-spy profile missing ({e})"
    lines = [f"   py-spy --threads, {starts} starts of new users in {seconds:.1f} s ({path}), {samples} samples:"]
    lines.append("     threads: " + ", ".join(f"{t} {100 * c / samples:.0f}%" for t, c in threads.most_common(5)))
    lines.append("     most own time:")
    lines += [f"       {100 * c / samples:5.1f}%  {frame[:150]}" for frame, c in own.most_common(top)]
    lines.append("     most total time (project functions):")
    mine = [(f, c) for f, c in total.most_common() if "jupyterhub_outpost" in f]
    lines += [f"       {100 * c / samples:5.1f}%  {frame[:150]}" for frame, c in mine[:top]]
    return "\n".join(lines)


async def part_churn(args, db_label, db_context):
    """Waves of starts and stops; RSS after each"""
    c = args.concurrency
    async with Run(args, db_context, c) as run:
        d = run.driver
        warm, _ = await d.start_users([f"warm{i}" for i in range(c)], c)
        await d.stop_all(warm, c)
        before = run.rss_mb()
        samples, waves = [], []
        began = time.perf_counter()

        async def sample():
            while True:
                samples.append((time.perf_counter() - began, run.rss_mb()))
                await asyncio.sleep(1)

        sampler = asyncio.ensure_future(sample())
        started = 0
        while started < args.churn_servers or time.perf_counter() - began < args.churn_seconds:
            users = [f"u{(started + i) % (2 * args.wave):05d}" for i in range(args.wave)]
            servers, _ = await d.start_users(users, c)
            up = run.rss_mb()
            await d.stop_all(servers, c)
            started += len(servers)
            waves.append((time.perf_counter() - began, started, up, run.rss_mb()))
        sampler.cancel()
        peak = max(rss for _, rss in samples)
        left = len(await d.listed())
        errors = d.errors
    rows = [[i + 1, f"{t:.0f}", n, f1(up), f1(down), f"{100 * (down / before - 1):+.1f}%"]
            for i, (t, n, up, down) in enumerate(waves)]  # fmt: skip
    print_table(
        f"{db_label}: RSS over churn (waves of {args.wave} starts, then their stops; RSS before: {before:.1f} MB)",
        ["wave", "s", "started so far", "RSS MB, started", "RSS MB, stopped", "vs before"],
        rows,
    )
    print(f"   peak RSS sampled {peak:.1f} MB; {left} servers left; unexpected statuses: {errors or 'none'}")
    print("   RSS curve (s: MB): " + ", ".join(f"{t:.0f}: {mb:.0f}" for t, mb in samples[:: max(1, len(samples) // 24)]))


async def part_pause(args, db_label, db_context):
    """Open-loop polls at 10,000 servers during slow starts, GC included"""
    c = args.concurrency
    async with Run(args, db_context, c) as run:
        d = run.driver
        servers, _ = await d.start_users([f"p{i:05d}" for i in range(args.pause_servers)], c)
        rss = run.rss_mb()
        gc_before = await d.metrics()
        # the slow starts come from another process, as from another hub: this
        # process' own work for them would otherwise delay its polls
        burst = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--burst", str(run.outpost.port),
            str(args.slow_starts), "5", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert await burst.stdout.readline() == b"ready\n"
        spy = None
        if args.profile:  # the window under py-spy, in time order (speedscope)
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(run.outpost.pid), "--rate", "500", "--format", "speedscope",
                 "--output", os.path.join(args.profile, f"pause-{db_label}.json"), "--nonblocking",
                 "--duration", str(int(args.poll_seconds) + 1)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.sleep(1)
        burst.stdin.write(b"go\n")
        with run.measure() as meter:
            latencies = await d.run_at_rate(
                args.poll_seconds, args.poll_rate, lambda i: d.poll(*servers[i % len(servers)])
            )
        ok = [tuple(line.split()) for line in (await burst.communicate())[0].decode().splitlines()]
        if spy is not None:
            spy.wait()
        gc_after = await d.metrics()
        await d.stop_all(servers + ok, c)
        errors = d.errors
    gcs = {}
    for key, value in gc_after.items():
        if key.startswith(f"{PREFIX}_gc_pause_seconds_count"):
            gen = re.search(r'generation="(\d)"', key).group(1)
            gcs[gen] = value - gc_before.get(key, 0)
    longest = gc_after.get(f"{PREFIX}_gc_pause_longest_seconds", float("nan"))
    slow_gcs = {}
    for key, value in gc_after.items():
        if key.startswith(f"{PREFIX}_gc_pause_seconds_bucket") and 'le="0.01"' in key:
            gen = re.search(r'generation="(\d)"', key).group(1)
            total = gc_after[f'{PREFIX}_gc_pause_seconds_count{{generation="{gen}"}}']
            before = gc_before.get(f'{PREFIX}_gc_pause_seconds_count{{generation="{gen}"}}', 0)
            slow_gcs[gen] = (total - before) - (value - gc_before.get(key, 0))
    print_table(
        f"{db_label}: polls at {args.poll_rate:g}/s (open loop) with {len(servers)} servers, "
        f"during {args.slow_starts} slow starts (5 s)",
        ["polls", "p50 ms", "p99 ms", "max ms", "CPU ms/poll", "others CPU", "slow starts ok", "RSS MB"],
        [[len(latencies), f2(ms(pct(latencies, 50))), f2(ms(pct(latencies, 99))),
          f2(ms(max(latencies, default=float("nan")))), f2(ms(meter.server_cpu / max(1, len(latencies)))),
          f"{meter.other_pct:.0f}%", f"{len(ok)}/{args.slow_starts}", f1(rss)]],
    )  # fmt: skip
    worst = collections.defaultdict(float)
    for due, latency in d.timeline:
        worst[int(due)] = max(worst[int(due)], latency)
    print("   slowest poll per second of the window (ms): "
          + ", ".join(f"{second}: {ms(worst[second]):.0f}" for second in sorted(worst)))
    print(f"   garbage collections in the window by generation: {gcs or 'not reported'}; "
          f"over 10 ms: {slow_gcs}; longest pause since the Outpost started: {f1(ms(longest))} ms")
    print(f"   unexpected statuses: {errors or 'none'}")


PARTS = {"cost": part_cost, "churn": part_churn, "pause": part_pause}


async def burst(port, count, delay):
    """``--burst``: send ``count`` starts of ``delay`` seconds at once; print
    the name and start id of each that succeeded"""
    pool = HTTPPool("127.0.0.1", port, count)
    driver = StartDriver(None, pool, HUB_PORT)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    results = await asyncio.gather(*(driver.start("bench", delay, f"slow{i}") for i in range(count)))
    pool.close()
    for result in results:
        if result:
            print(*result[1:])


async def main(args):
    began = time.perf_counter()
    print(f"jupyterhub-outpost start benchmark: {os.cpu_count()} CPUs, load average "
          f"{open('/proc/loadavg').read().split()[0]}; parts {','.join(args.parts)}; databases {','.join(args.db)}")
    for db_label in args.db:
        if db_label == "sqlite":
            db_context = _SQLiteFile
        elif pg_reachable(args.pg_url):
            db_context = lambda workdir: _PGDatabase(args.pg_url)  # noqa: E731
        else:
            continue
        for part in args.parts:
            await PARTS[part](args, db_label, db_context)
            print(f"  ({db_label} {part} done after {time.perf_counter() - began:.0f} s)", file=sys.stderr)
    print(f"\ntotal benchmark time: {time.perf_counter() - began:.0f} s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="sqlite,postgresql", help="sqlite, postgresql, comma-separated")
    parser.add_argument("--parts", default="cost,churn,pause", help="cost, churn, pause, comma-separated")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--servers", type=int, default=1000, help="starts per row of the cost table")
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight")
    parser.add_argument("--ping-seconds", type=float, default=3)
    parser.add_argument("--poll-seconds", type=float, default=10)
    parser.add_argument("--profile", metavar="DIR", help="profile a round of starts with py-spy into DIR")
    parser.add_argument("--gil", dest="py_spy_args", action="store_const", const=["--gil"], default=[],
                        help="profile only the thread that holds the GIL (where the CPU time goes)")
    parser.add_argument("--wave", type=int, default=2000, help="starts per churn wave")
    parser.add_argument("--churn-servers", type=int, default=10000, help="at least this many starts in all")
    parser.add_argument("--churn-seconds", type=float, default=180, help="and churn for at least this long")
    parser.add_argument("--pause-servers", type=int, default=10000)
    parser.add_argument("--poll-rate", type=float, default=500)
    parser.add_argument("--slow-starts", type=int, default=100)
    parser.add_argument("--config", action="append", default=[], metavar="LINE",
                        help="a line to add to the Outpost's config, e.g. 'c.JupyterHubOutpost.db_workers = 1'")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args(argv)
    args.db = [d.strip() for d in args.db.split(",") if d.strip()]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for part in args.parts:
        if part not in PARTS:
            parser.error(f"unknown part {part!r}")
    if args.quick:
        args.servers, args.ping_seconds, args.poll_seconds = 300, 1, 4
        args.wave, args.churn_servers, args.churn_seconds, args.pause_servers = 500, 1000, 10, 1000
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    return args


if __name__ == "__main__":
    if sys.argv[1:2] == ["--burst"]:  # a helper process of the pause part
        asyncio.run(burst(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
    else:
        asyncio.run(main(parse_args()))
