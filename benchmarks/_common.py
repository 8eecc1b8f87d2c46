"""What the benchmark scripts share: a keep-alive HTTP client, the Outpost
process, request bodies shaped like the OutpostSpawner's, percentiles, CPU and
memory figures from /proc, and table printing.

The scripts import it as ``_common`` (they run as ``python benchmarks/<script>.py``,
which puts this directory first on ``sys.path``).
"""

import asyncio
import base64
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid

from cryptography.fernet import Fernet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUBS = {"bench": "bench-password-1", "bench-events": "bench-password-2"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def proc_name_and_cpu(pid):
    """(command name, CPU seconds) of process ``pid``, from ``/proc/<pid>/stat``"""
    with open(f"/proc/{pid}/stat") as f:
        head, _, tail = f.read().rpartition(")")
    fields = tail.split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    return head.partition("(")[2], (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_seconds(pid):
    return proc_name_and_cpu(pid)[1]


def loop_thread_cpu_seconds(pid):
    """CPU seconds of the main thread of process ``pid`` (the Outpost's event loop)"""
    return proc_name_and_cpu(f"{pid}/task/{pid}")[1]


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


def postgres_cpu_seconds():
    """CPU seconds used by the PostgreSQL server processes alive now"""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            name, cpu = proc_name_and_cpu(entry)
        except OSError:  # gone meanwhile
            continue
        if name == "postgres":
            total += cpu
    return total


class Meter:
    """Wall time and CPU use of the Outpost (and of its event loop's thread),
    of this client, of the PostgreSQL server, and of the rest of the machine
    (other processes compete for the same cores)"""

    def __init__(self, pid):
        self.pid = pid

    def _sample(self):
        return (time.perf_counter(), proc_cpu_seconds(self.pid), time.process_time(),
                machine_busy_seconds(), postgres_cpu_seconds(), loop_thread_cpu_seconds(self.pid))  # fmt: skip

    def __enter__(self):
        self._begin = self._sample()
        return self

    def __exit__(self, *exc):
        end = self._sample()
        self.wall, self.server_cpu, self.client_cpu, machine, postgres, self.loop_cpu = (
            b - a for a, b in zip(self._begin, end)
        )
        # backends that exited meanwhile are missing: a lower bound
        self.postgres_cpu = max(0.0, postgres)
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


def ms(seconds):
    return 1000 * seconds


def f1(x):
    return "nan" if x != x else f"{x:.1f}"


def f2(x):
    return "nan" if x != x else f"{x:.2f}"


def print_table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(row, widths))))


# --------------------------------------------------------------------------
# the Outpost process


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Outpost:
    """``python -m jupyterhub_outpost`` on 127.0.0.1 and a free port, with
    ``config`` as its outpost_config.py, the credentials of ``HUBS``, a fresh
    encryption key, and this repository on ``PYTHONPATH`` (for the NoopSpawner)"""

    def __init__(self, workdir, config, extra_args=()):
        self.workdir = workdir
        self.port = free_port()
        self.log_path = os.path.join(workdir, "outpost.log")
        config_path = os.path.join(workdir, "outpost_config.py")
        with open(config_path, "w") as f:
            f.write(config)
        env = dict(os.environ)
        env["OUTPOST_HUB_CREDENTIALS"] = json.dumps(HUBS)
        env["OUTPOST_CRYPT_KEY"] = Fernet.generate_key().decode()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub_outpost", "-f", config_path,
             "--ip", "127.0.0.1", "--port", str(self.port), *extra_args],
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

    def warnings(self):
        """Lines of the Outpost's log at level WARNING and above"""
        return [l for l in self.log_text().splitlines() if l.startswith(("[W", "[E", "[C"))]


# --------------------------------------------------------------------------
# requests


def start_body(hub, name, delay, hub_port, user="bench", user_id="1"):
    """A start request shaped like the OutpostSpawner's"""
    start_id = uuid.uuid4().hex
    api = f"http://127.0.0.1:{hub_port}/hub/api"
    token = secrets.token_hex(16)
    env = {
        "JUPYTERHUB_API_TOKEN": token,
        "JPY_API_TOKEN": token,
        "JUPYTERHUB_API_URL": api,
        "JUPYTERHUB_USER": user,
        "JUPYTERHUB_USER_ID": user_id,
        "JUPYTERHUB_SERVER_NAME": name,
        "JUPYTERHUB_SERVICE_PREFIX": f"/user/{user}/{name}/",
        "JUPYTERHUB_ACTIVITY_URL": f"{api}/users/{user}/activity",
        "JUPYTERHUB_EVENTS_URL": f"{api}/users/progress/events/{user}/{name}",
        "JUPYTERHUB_SETUPTUNNEL_URL": f"{api}/users/setuptunnel/{user}/{name}",
        "JUPYTERHUB_SERVICE_URL": f"http://0.0.0.0:8888/user/{user}/{name}/",
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


class Driver:
    """Starts, polls and stops servers through ``pool``; counts unexpected statuses"""

    def __init__(self, outpost, pool, hub_port):
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

    async def start(self, hub, delay, user="bench"):
        """One start (of hub user ``user``); returns (latency s, name, start_id)
        or None on failure"""
        name = self.new_name()
        user_id = "1" if user == "bench" else str(uuid.uuid5(uuid.NAMESPACE_DNS, user).int % 10**9)
        body, start_id = start_body(hub, name, delay, self.hub_port, user, user_id)
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

    async def poll(self, name, start_id, hub="bench"):
        """One poll; True when the server answered as running"""
        status, data = await self.pool.request("GET", f"/services/{name}/{start_id}", hub=hub)
        ok = status == 200 and json.loads(data) == {"status": None}
        if not ok:
            self.error("poll", status)
        return ok

    async def ping(self):
        status, _ = await self.pool.request("GET", "/ping")
        if status != 200:
            self.error("ping", status)
        return status == 200

    async def run_for(self, seconds, concurrency, one_request):
        """Call ``one_request(i)`` from ``concurrency`` loops for ``seconds``;
        return the latencies of the calls that returned true"""
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

    async def start_many(self, n, delay, concurrency, hub="bench", users=None):
        """``n`` starts (one per user of ``users``, if given), ``concurrency``
        at a time; returns ([(name, start_id)], latencies)"""
        servers, latencies = [], []
        todo = iter(users if users is not None else ["bench"] * n)

        async def worker():
            for user in todo:
                result = await self.start(hub, delay, user)
                if result is not None:
                    latencies.append(result[0])
                    servers.append(result[1:])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return servers, latencies

    async def stop_all(self, servers, concurrency, hub="bench"):
        """Stop ``servers``, ``concurrency`` at a time; returns the latencies"""
        todo = iter(list(servers))
        latencies = []

        async def worker():
            for name, start_id in todo:
                latencies.append(await self.stop(hub, name, start_id))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies

    async def run_at_rate(self, seconds, rate, one_request):
        """Open loop: call ``one_request(i)`` every ``1/rate`` s whatever is
        still in flight, as hubs do; each latency counts from the moment its
        request was due, so a stalled server cannot hide its stall. Returns
        the latencies; ``self.timeline`` holds (s into the run when due, latency)."""
        latencies, tasks = [], []
        began = time.perf_counter()
        self.timeline = []

        async def one(i, due):
            if await one_request(i):
                latencies.append(time.perf_counter() - due)
                self.timeline.append((due - began, latencies[-1]))

        for i in range(int(seconds * rate)):
            due = began + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        return latencies

    async def listed(self, hub="bench"):
        """The servers ``GET /services`` lists for ``hub``"""
        status, data = await self.pool.request("GET", "/services", hub=hub)
        return json.loads(data) if status == 200 else []

    async def cleanup(self, concurrency, hubs=tuple(HUBS)):
        """Stop whatever is still listed; return how many servers are left"""
        left = 0
        for hub in hubs:
            for attempt in range(3):
                listed = await self.listed(hub)
                if not listed:
                    break
                await self.stop_all([(s["name"], s["start_id"]) for s in listed], concurrency, hub=hub)
                await asyncio.sleep(0.5)
            left += len(await self.listed(hub))
        return left
