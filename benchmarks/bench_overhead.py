"""How much time does the Outpost add to starts, and how fast are polls?

Run from the repository root::

    python benchmarks/bench_overhead.py            # about a minute
    python benchmarks/bench_overhead.py --quick    # a smoke run (~20 s)

Starts a real ``jupyterhub-outpost`` process (``python -m jupyterhub_outpost``)
on 127.0.0.1 with a temporary SQLite database and the
:class:`benchmarks.noop_spawner.NoopSpawner`, then drives it over HTTP with a
small keep-alive asyncio client, and prints:

1. start overhead: request latency minus the time ``Spawner.start()`` took
   (as the spawner logs it), for sequential starts with start_delay 0 and 0.2 s,
   and with progress events posted to a fake hub in this process;
2. poll latency and throughput with many running servers, idle and while
   slow (5 s) starts are in flight, next to the ``/ping`` floor of the same
   client and server;
3. the Outpost's RSS and CPU time.

See benchmarks/README.md for what each figure means.
"""

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time

from tornado import web
from tornado.httpserver import HTTPServer

from _common import (
    Driver,
    HTTPPool,
    Meter,
    Outpost,
    f1,
    f2,
    free_port,
    ms,
    pct,
    print_table,
    proc_cpu_seconds,
    proc_status,
    start_body,
)

CONFIG = """\
c.JupyterHubOutpost.spawner_class = "benchmarks.noop_spawner.NoopSpawner"
c.JupyterHubOutpost.allowed_overrides = ["start_delay"]  # slow starts per request
c.JupyterHubOutpost.db_url = "sqlite:///{workdir}/outpost.sqlite"
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
# progress events only for the hub "bench-events" (posted to a fake hub)
c.JupyterHubOutpost.send_events = lambda hub: hub == "bench-events"
c.HubClient.retries = 0
c.HubClient.request_timeout = 5
c.Spawner.start_timeout = 60
"""


# --------------------------------------------------------------------------
# a fake hub for progress events


class FakeHubHandler(web.RequestHandler):
    def post(self, *args):
        self.application.settings["counter"][0] += 1
        self.set_status(204)


def start_fake_hub():
    counter = [0]
    app = web.Application([(r"/(.*)", FakeHubHandler)], counter=counter)
    server = HTTPServer(app)
    port = free_port()
    server.listen(port, "127.0.0.1")
    return server, port, counter


class Bench(Driver):
    """The phases of this benchmark, on top of the shared start/poll/stop calls"""

    def __init__(self, args, outpost, pool, hub_port):
        super().__init__(outpost, pool, hub_port)
        self.args = args

    async def ping_run(self):
        with Meter(self.outpost.pid) as meter:
            latencies = await self.run_for(self.args.ping_seconds, self.args.concurrency,
                                           lambda i: self.ping())  # fmt: skip
        return latencies, meter

    async def start_overhead(self, hub, delay, n):
        """Sequential starts (each stopped right after); latencies by start_id"""
        results = []
        for _ in range(n):
            result = await self.start(hub, delay)
            if result is None:
                continue
            latency, name, start_id = result
            stop_latency = await self.stop(hub, name, start_id)
            results.append((start_id, latency, stop_latency))
        return results

    async def poll_for(self, servers, seconds):
        async def one(i):
            return await self.poll(*servers[i % len(servers)])

        with Meter(self.outpost.pid) as meter:
            latencies = await self.run_for(seconds, self.args.concurrency, one)
        return latencies, meter

    async def poll_during_slow_starts(self, servers):
        """Poll while ``slow`` starts of ``slow_delay`` s each are always in flight"""
        args = self.args
        stop_flag = asyncio.Event()
        slow_servers, slow_latencies = [], []

        async def slow_worker(offset):
            await asyncio.sleep(offset)
            while not stop_flag.is_set():
                name = self.new_name()
                body, start_id = start_body("bench", name, args.slow_delay, self.hub_port)
                slow_servers.append((name, start_id))
                began = time.perf_counter()
                status, _ = await self.pool.request("POST", "/services/", hub="bench", body=body)
                if status == 200:
                    slow_latencies.append(time.perf_counter() - began)
                elif not stop_flag.is_set():
                    self.error("slow start", status)

        # the slow starts need their own connections: the poll loops use
        # ``concurrency`` of them, the pool has room for both
        stagger = args.slow_delay / args.slow
        workers = [asyncio.create_task(slow_worker(i * stagger)) for i in range(args.slow)]
        await asyncio.sleep(args.slow_delay)  # until all are in flight
        latencies, meter = await self.poll_for(servers, args.poll_seconds)
        stop_flag.set()
        # stop them all, which cancels the starts still in flight
        await self.stop_all(slow_servers, args.concurrency)
        await asyncio.wait(workers, timeout=args.slow_delay + 5)
        return latencies, meter, slow_latencies


def spawner_start_ms(log_text):
    """start_id -> milliseconds Spawner.start() took, from the Outpost's log"""
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"NoopSpawner start (\S+) took ([\d.]+) ms", log_text)
    }


async def main(args):
    began = time.perf_counter()
    fake_hub, hub_port, hub_posts = start_fake_hub()
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as workdir:
        outpost = Outpost(workdir, CONFIG.format(workdir=workdir))
        pool = HTTPPool("127.0.0.1", outpost.port, args.concurrency + args.slow + 4)
        bench = Bench(args, outpost, pool, hub_port)
        try:
            await outpost.wait_ready(pool)
            await asyncio.wait_for(run(bench, args, hub_posts), args.deadline)
            left = await bench.cleanup(args.concurrency)
            print(f"\nservers left after cleanup: {left}")
            status = proc_status(outpost.pid)
            cpu = proc_cpu_seconds(outpost.pid)
            print(
                f"Outpost process: RSS {status['VmRSS']} (peak {status['VmHWM']}), "
                f"CPU time {cpu:.2f} s (user+sys), threads {status['Threads']}"
            )
            log_text = outpost.log_text()
            warnings = [l for l in log_text.splitlines() if l.startswith(("[W", "[E", "[C"))]
            print(f"Outpost log: {len(log_text.splitlines())} lines, "
                  f"{len(warnings)} warnings/errors")  # fmt: skip
            for line in warnings[:5]:
                print("   ", line[:200])
            print(f"request errors (unexpected status): {bench.errors or 'none'}")
        except BaseException:
            print("---- Outpost log (tail) ----", file=sys.stderr)
            print(outpost.log_text()[-5000:], file=sys.stderr)
            raise
        finally:
            pool.close()
            outpost.terminate()
            fake_hub.stop()
    print(f"total benchmark time: {time.perf_counter() - began:.1f} s")


async def run(bench, args, hub_posts):
    print(f"jupyterhub-outpost benchmark: pid {bench.outpost.pid}, port {bench.outpost.port}, "
          f"{os.cpu_count()} CPUs, client concurrency {args.concurrency}, "
          f"load average {open('/proc/loadavg').read().split()[0]}")  # fmt: skip

    # 0. the floor: /ping through the same client (after a warm-up)
    await bench.run_for(1, args.concurrency, lambda i: bench.ping())
    ping_lat, ping_meter = await bench.ping_run()
    ping_rate = len(ping_lat) / ping_meter.wall

    # 1. start overhead, sequential; the three runs take turns, so that
    # background load on the machine affects them alike
    await bench.start_overhead("bench", 0, 5)  # warm-up, not counted
    overhead_runs = [
        ("start_delay=0", "bench", 0.0),
        ("start_delay=0.2", "bench", 0.2),
        ("start_delay=0 +events", "bench-events", 0.0),
    ]
    results = {label: [] for label, _, _ in overhead_runs}
    with Meter(bench.outpost.pid) as overhead_meter:
        for _ in range(args.starts):
            for label, hub, delay in overhead_runs:
                results[label] += await bench.start_overhead(hub, delay, 1)
    spawner_ms = spawner_start_ms(bench.outpost.log_text())
    rows = []
    for label, _, _ in overhead_runs:
        timed = [(ms(lat), spawner_ms[sid], ms(stop)) for sid, lat, stop in results[label] if sid in spawner_ms]
        lat = [t[0] for t in timed]
        spawn = [t[1] for t in timed]
        extra = [t[0] - t[1] for t in timed]
        stops = [t[2] for t in timed]
        rows.append([label, len(timed), f2(pct(lat, 50)), f2(pct(spawn, 50)),
                     f2(pct(extra, 50)), f2(pct(extra, 90)), f2(pct(stops, 50)), f2(pct(stops, 90))])  # fmt: skip
    print_table(
        f"1. Start overhead: {args.starts} sequential starts per run, runs interleaved, "
        "each start stopped right after (ms)",
        ["run", "n", "latency p50", "start() p50", "added p50", "added p90", "stop p50", "stop p90"],
        rows,
    )
    print(f"   fake hub received {hub_posts[0]} progress/flavor posts; "
          f"other processes used {overhead_meter.other_pct:.0f}% CPU meanwhile")  # fmt: skip

    # 2. polls with many running servers
    with Meter(bench.outpost.pid) as start_meter:
        servers, _ = await bench.start_many(args.servers, 0.0, args.concurrency)
    print(f"\nstarted {len(servers)} servers in {start_meter.wall:.1f} s "
          f"({len(servers) / start_meter.wall:.0f} starts/s at concurrency {args.concurrency})")  # fmt: skip
    idle_lat, idle_meter = await bench.poll_for(servers, args.poll_seconds)
    busy_lat, busy_meter, slow_lat = await bench.poll_during_slow_starts(servers)

    rows = []
    for label, lat, meter in [
        ("GET /ping (floor)", ping_lat, ping_meter),
        (f"poll, idle ({len(servers)} servers)", idle_lat, idle_meter),
        (f"poll, {args.slow} slow starts in flight", busy_lat, busy_meter),
    ]:
        rate = len(lat) / meter.wall
        rows.append([label, len(lat), f"{rate:.0f}", f2(rate / ping_rate),
                     f2(ms(pct(lat, 50))), f2(ms(pct(lat, 90))), f2(ms(pct(lat, 99))),
                     f2(ms(max(lat) if lat else float("nan"))),
                     f2(ms(meter.server_cpu / max(1, len(lat)))),
                     f"{meter.server_pct:.0f}%", f"{meter.client_pct:.0f}%",
                     f"{meter.other_pct:.0f}%"])  # fmt: skip
    print_table(
        f"2. Throughput and latency at {args.concurrency} requests in flight (ms)",
        ["run", "n", "req/s", "x ping", "p50", "p90", "p99", "max", "CPU ms/req",
         "outpost CPU", "client CPU", "others CPU"],
        rows,
    )
    ratio = lambda p: pct(busy_lat, p) / pct(idle_lat, p)  # noqa: E731
    print(f"   ratio slow-starts/idle: p50 {ratio(50):.2f}x, p99 {ratio(99):.2f}x, "
          f"max {max(busy_lat) / max(idle_lat):.2f}x, "
          f"throughput {len(busy_lat) / busy_meter.wall / (len(idle_lat) / idle_meter.wall):.2f}x, "
          f"CPU ms/req {(busy_meter.server_cpu / len(busy_lat)) / (idle_meter.server_cpu / len(idle_lat)):.2f}x")
    busiest = max(m.other_pct for m in (ping_meter, idle_meter, busy_meter))
    if busiest > 50:
        print(f"   NOTE: other processes used up to {busiest:.0f}% CPU (of {100 * os.cpu_count()}%) "
              "during these runs: latencies and req/s are skewed by them; CPU ms/req is not")
    print(f"   slow starts ({args.slow_delay:g} s each) completed during the run: {len(slow_lat)}, "
          f"latency p50 {f1(ms(pct(slow_lat, 50)))} ms, max {f1(ms(max(slow_lat) if slow_lat else float('nan')))} ms")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=50, help="sequential starts per overhead run")
    parser.add_argument("--servers", type=int, default=200, help="running servers to poll")
    parser.add_argument("--concurrency", type=int, default=20, help="requests in flight")
    parser.add_argument("--ping-seconds", type=float, default=3)
    parser.add_argument("--poll-seconds", type=float, default=10, help="length of each poll run")
    parser.add_argument("--slow", type=int, default=20, help="slow starts kept in flight")
    parser.add_argument("--slow-delay", type=float, default=5, help="seconds each slow start takes")
    parser.add_argument("--deadline", type=float, default=170, help="give up after this many seconds")
    parser.add_argument("--quick", action="store_true", help="small numbers, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.starts, args.servers, args.ping_seconds, args.poll_seconds = 10, 40, 1, 2
        args.slow, args.slow_delay = 5, 1
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
