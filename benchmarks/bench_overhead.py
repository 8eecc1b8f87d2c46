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
import base64
import json
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from cryptography.fernet import Fernet
from tornado import web
from tornado.httpserver import HTTPServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUBS = {"bench": "bench-password-1", "bench-events": "bench-password-2"}
CLK_TCK = os.sysconf("SC_CLK_TCK")

CONFIG = """\
c.JupyterHubOutpost.spawner_class = "benchmarks.noop_spawner.NoopSpawner"
c.JupyterHubOutpost.db_url = "sqlite:///{workdir}/outpost.sqlite"
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
# progress events only for the hub "bench-events" (posted to a fake hub)
c.JupyterHubOutpost.send_events = lambda hub: hub == "bench-events"
c.HubClient.retries = 0
c.HubClient.request_timeout = 5
c.Spawner.start_timeout = 60
"""


# --------------------------------------------------------------------------
# a minimal keep-alive HTTP/1.1 client on asyncio streams


class HTTPPool:
    """At most ``size`` requests in flight, each on a reused connection"""

    def __init__(self, host, port, size):
        self.host = host
        self.port = port
        self.idle = []
        self.slots = asyncio.Semaphore(size)

    async def request(self, method, path, hub=None, body=None, headers=None, timeout=60):
        """Send one request; return ``(status, body_bytes)``"""
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 "Accept: application/json", f"Content-Length: {len(payload)}"]
        if body is not None:
            lines.append("Content-Type: application/json")
        if hub is not None:
            token = base64.b64encode(f"{hub}:{HUBS[hub]}".encode()).decode()
            lines.append(f"Authorization: Basic {token}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        async with self.slots:
            return await asyncio.wait_for(self._send(raw), timeout)

    async def _send(self, raw):
        for attempt in (0, 1):
            reused = bool(self.idle)
            reader, writer = self.idle.pop() if reused else await asyncio.open_connection(
                self.host, self.port
            )
            try:
                writer.write(raw)
                status, data, keep = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle connection: retry once
                raise
            except BaseException:
                writer.close()
                raise
            if keep:
                self.idle.append((reader, writer))
            else:
                writer.close()
            return status, data

    def close(self):
        for _, writer in self.idle:
            writer.close()
        self.idle = []


async def _read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        data = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            data += chunk[:-2]
    else:
        data = await reader.readexactly(int(headers.get("content-length", "0")))
    keep = headers.get("connection", "").lower() != "close"
    return status, data, keep


# --------------------------------------------------------------------------
# figures


def pct(values, p):
    """Nearest-rank percentile (p in 0..100) of a list; nan when empty"""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid):
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            values[key] = value.strip()
    return values


def machine_busy_seconds():
    """CPU seconds all processes of this machine have used (from /proc/stat)"""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


class Meter:
    """Wall time and CPU use of the Outpost, of this client, and of the rest
    of the machine (other processes compete for the same cores)"""

    def __init__(self, pid):
        self.pid = pid

    def _sample(self):
        return (time.perf_counter(), proc_cpu_seconds(self.pid), time.process_time(),
                machine_busy_seconds())  # fmt: skip

    def __enter__(self):
        self._begin = self._sample()
        return self

    def __exit__(self, *exc):
        end = self._sample()
        self.wall, self.server_cpu, self.client_cpu, machine = (
            b - a for a, b in zip(self._begin, end)
        )
        self.other_cpu = max(0.0, machine - self.server_cpu - self.client_cpu)

    @property
    def server_pct(self):
        return 100 * self.server_cpu / self.wall

    @property
    def client_pct(self):
        return 100 * self.client_cpu / self.wall

    @property
    def other_pct(self):
        return 100 * self.other_cpu / self.wall


# --------------------------------------------------------------------------
# the Outpost process and a fake hub for progress events


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Outpost:
    def __init__(self, workdir):
        self.workdir = workdir
        self.port = free_port()
        self.log_path = os.path.join(workdir, "outpost.log")
        config_path = os.path.join(workdir, "outpost_config.py")
        with open(config_path, "w") as f:
            f.write(CONFIG.format(workdir=workdir))
        env = dict(os.environ)
        env["OUTPOST_HUB_CREDENTIALS"] = json.dumps(HUBS)
        env["OUTPOST_CRYPT_KEY"] = Fernet.generate_key().decode()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub_outpost", "-f", config_path,
             "--ip", "127.0.0.1", "--port", str(self.port)],
            cwd=workdir, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.pid = self.proc.pid

    async def wait_ready(self, pool, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Outpost exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                status, _ = await pool.request("GET", "/ping", timeout=2)
                if status == 200:
                    return
            except (OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the Outpost did not answer /ping within {timeout}s")

    def terminate(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()

    def log_text(self):
        with open(self.log_path, encoding="utf8", errors="replace") as f:
            return f.read()


# --------------------------------------------------------------------------
# requests


def start_body(hub, name, delay, hub_port):
    """A start request shaped like the OutpostSpawner's"""
    start_id = uuid.uuid4().hex
    api = f"http://127.0.0.1:{hub_port}/hub/api"
    token = secrets.token_hex(16)
    env = {
        "JUPYTERHUB_API_TOKEN": token,
        "JPY_API_TOKEN": token,
        "JUPYTERHUB_API_URL": api,
        "JUPYTERHUB_USER": "bench",
        "JUPYTERHUB_USER_ID": "1",
        "JUPYTERHUB_SERVER_NAME": name,
        "JUPYTERHUB_SERVICE_PREFIX": f"/user/bench/{name}/",
        "JUPYTERHUB_ACTIVITY_URL": f"{api}/users/bench/activity",
        "JUPYTERHUB_EVENTS_URL": f"{api}/users/progress/events/bench/{name}",
        "JUPYTERHUB_SETUPTUNNEL_URL": f"{api}/users/setuptunnel/bench/{name}",
        "JUPYTERHUB_SERVICE_URL": f"http://0.0.0.0:8888/user/bench/{name}/",
    }
    if hub == "bench-events":
        env["JUPYTERHUB_FLAVORS_UPDATE_URL"] = f"{api}/outpostflavors/bench"
        env["JUPYTERHUB_FLAVORS_UPDATE_TOKEN"] = secrets.token_hex(16)
    body = {
        "name": name,
        "env": env,
        "user_options": {"start_id": start_id},
        "misc": {"start_delay": delay, "port": 0},
        "certs": {},
        "internal_trust_bundles": {},
    }
    return body, start_id


class Bench:
    def __init__(self, args, outpost, pool, hub_port):
        self.args = args
        self.outpost = outpost
        self.pool = pool
        self.hub_port = hub_port
        self.counter = 0
        self.errors = {}

    def new_name(self):
        self.counter += 1
        return f"s{self.counter}"

    def error(self, what, status):
        key = f"{what} {status}"
        self.errors[key] = self.errors.get(key, 0) + 1

    async def start(self, hub, delay):
        """One start; returns (latency s, name, start_id) or None on failure"""
        name = self.new_name()
        body, start_id = start_body(hub, name, delay, self.hub_port)
        began = time.perf_counter()
        status, data = await self.pool.request("POST", "/services/", hub=hub, body=body)
        latency = time.perf_counter() - began
        if status != 200:
            self.error("start", status)
            return None
        return latency, name, start_id

    async def stop(self, hub, name, start_id):
        began = time.perf_counter()
        status, _ = await self.pool.request("DELETE", f"/services/{name}/{start_id}", hub=hub)
        if status not in (200, 404):
            self.error("stop", status)
        return time.perf_counter() - began

    async def run_for(self, seconds, concurrency, one_request):
        """Call ``one_request(i)`` from ``concurrency`` loops for ``seconds``; return latencies"""
        latencies = []
        deadline = time.perf_counter() + seconds

        async def loop(worker):
            i = worker
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                if await one_request(i):
                    latencies.append(time.perf_counter() - began)
                i += concurrency

        await asyncio.gather(*(loop(w) for w in range(concurrency)))
        return latencies

    # phases

    async def ping(self):
        async def one(i):
            status, _ = await self.pool.request("GET", "/ping")
            if status != 200:
                self.error("ping", status)
            return status == 200

        with Meter(self.outpost.pid) as meter:
            latencies = await self.run_for(self.args.ping_seconds, self.args.concurrency, one)
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

    async def start_many(self, n, delay, hub="bench"):
        """``n`` starts, ``concurrency`` at a time; returns [(name, start_id)]"""
        servers = []
        todo = iter(range(n))

        async def worker():
            for _ in todo:
                result = await self.start(hub, delay)
                if result is not None:
                    servers.append(result[1:])

        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))
        return servers

    async def poll_for(self, servers, seconds):
        async def one(i):
            name, start_id = servers[i % len(servers)]
            status, data = await self.pool.request("GET", f"/services/{name}/{start_id}", hub="bench")
            ok = status == 200 and json.loads(data) == {"status": None}
            if not ok:
                self.error("poll", status)
            return ok

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
        await self.stop_all(slow_servers)
        await asyncio.wait(workers, timeout=args.slow_delay + 5)
        return latencies, meter, slow_latencies

    async def stop_all(self, servers, hub="bench"):
        todo = iter(list(servers))

        async def worker():
            for name, start_id in todo:
                await self.stop(hub, name, start_id)

        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))

    async def cleanup(self):
        """Stop whatever is still listed; return how many servers are left"""
        left = 0
        for hub in HUBS:
            for attempt in range(3):
                status, data = await self.pool.request("GET", "/services", hub=hub)
                listed = json.loads(data) if status == 200 else []
                if not listed:
                    break
                await self.stop_all([(s["name"], s["start_id"]) for s in listed], hub=hub)
                await asyncio.sleep(0.5)
            status, data = await self.pool.request("GET", "/services", hub=hub)
            left += len(json.loads(data)) if status == 200 else 0
        return left


def spawner_start_ms(log_text):
    """start_id -> milliseconds Spawner.start() took, from the Outpost's log"""
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"NoopSpawner start (\S+) took ([\d.]+) ms", log_text)
    }


def ms(seconds):
    return 1000 * seconds


# --------------------------------------------------------------------------
# report


def print_table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(row, widths))))


def f1(x):
    return "nan" if x != x else f"{x:.1f}"


def f2(x):
    return "nan" if x != x else f"{x:.2f}"


async def main(args):
    began = time.perf_counter()
    fake_hub, hub_port, hub_posts = start_fake_hub()
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as workdir:
        outpost = Outpost(workdir)
        pool = HTTPPool("127.0.0.1", outpost.port, args.concurrency + args.slow + 4)
        bench = Bench(args, outpost, pool, hub_port)
        try:
            await outpost.wait_ready(pool)
            await asyncio.wait_for(run(bench, args, hub_posts), args.deadline)
            left = await bench.cleanup()
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
    await bench.run_for(1, args.concurrency, lambda i: bench.pool.request("GET", "/ping"))
    ping_lat, ping_meter = await bench.ping()
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
        servers = await bench.start_many(args.servers, 0.0)
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
