"""Throughput and round trip through the Outpost's SSH endpoint, against OpenSSH's sshd.

One run measures, with the same OpenSSH client, cipher (aes128-gcm) and key
type (ed25519), a local forward (``ssh -N -L``) to one destination:

- direct: the destination itself, no SSH (the floor);
- sshd: Debian's OpenSSH server on 127.0.0.1 with a minimal config;
- outpost: a real ``jupyterhub-outpost`` process with the SSH endpoint on,
  the destination being a server it started (its recorded address).

The destination is a small TCP server started as that server's process: it
sinks an upload, sources a download, or echoes one byte at a time. Printed:
MB/s up and down, the median and p99 round trip of one-byte exchanges, and
the server side's CPU per MB (the Outpost process; sshd's per-connection
processes), each with its ratio to sshd's figure of the same run.

    python benchmarks/bench_ssh.py [--mb 256] [--pings 2000]

Needs ``ssh`` and ``/usr/sbin/sshd`` (``apt-get install openssh-client
openssh-server``) and root (sshd's privilege separation directory
``/run/sshd``; the forwards log in as the current user). Nothing leaves
127.0.0.1.
"""

import argparse
import base64
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

from _common import HUBS, Outpost, free_port

CIPHER = "aes128-gcm@openssh.com"
CHUNK = 256 * 1024

# upload "U"+size: read size bytes, answer "K"; download "D"+size: send size
# bytes; "P": echo every byte until the connection closes
DESTINATION = r"""
import os, socket, sys, threading, urllib.parse
port = urllib.parse.urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"]).port if len(sys.argv) < 2 else int(sys.argv[1])
block = b"x" * 262144
def serve(conn):
    with conn:
        mode = conn.recv(1)
        if mode == b"P":
            while True:
                byte = conn.recv(1)
                if not byte:
                    return
                conn.sendall(byte)
        size = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
        if mode == b"U":
            left = size
            while left:
                data = conn.recv(min(left, 1 << 20))
                if not data:
                    return
                left -= len(data)
            conn.sendall(b"K")
        elif mode == b"D":
            left = size
            while left:
                part = block[: min(left, len(block))]
                conn.sendall(part)
                left -= len(part)
listener = socket.create_server(("127.0.0.1", port))
while True:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

CONFIG = """\
c.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.JupyterHubOutpost.db_url = "sqlite:///{workdir}/outpost.sqlite"
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
c.JupyterHubOutpost.send_events = False
c.JupyterHubOutpost.log_level = "WARN"
c.JupyterHubOutpost.enable_ssh = True
c.JupyterHubOutpost.ssh_ip = "127.0.0.1"
c.JupyterHubOutpost.ssh_port = {ssh_port}
c.JupyterHubOutpost.ssh_authorized_keys = {{"bench": [{public_key!r}]}}
c.SimpleLocalProcessSpawner.home_dir_template = "{workdir}/home-{{username}}"
c.Spawner.ip = "127.0.0.1"
c.Spawner.cmd = {cmd!r}
c.Spawner.args = []
c.HubClient.retries = 0
"""

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {workdir}/sshd_host_key
AuthorizedKeysFile {workdir}/authorized_keys
PidFile {workdir}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding local
Ciphers {cipher}
"""


def cpu_seconds(pids):
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / ticks


def descendants(root):
    """``root`` and every process below it"""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError):
                pass
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return found


def wait_listening(port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def connect(port):
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def upload(port, size):
    block = b"x" * CHUNK
    with connect(port) as conn:
        began = time.perf_counter()
        conn.sendall(b"U" + size.to_bytes(8, "big"))
        left = size
        while left:
            part = block[: min(left, CHUNK)]
            conn.sendall(part)
            left -= len(part)
        assert conn.recv(1) == b"K"
        return time.perf_counter() - began


def download(port, size):
    with connect(port) as conn:
        began = time.perf_counter()
        conn.sendall(b"D" + size.to_bytes(8, "big"))
        left = size
        while left:
            data = conn.recv(min(left, 1 << 20))
            assert data, "the download ended early"
            left -= len(data)
        return time.perf_counter() - began


def round_trips(port, count):
    with connect(port) as conn:
        conn.sendall(b"P")
        times = []
        for _ in range(count):
            began = time.perf_counter()
            conn.sendall(b"!")
            assert conn.recv(1) == b"!"
            times.append(time.perf_counter() - began)
        return times


def forward(ssh_port, key, user, destination, workdir):
    """An ``ssh -N -L`` process and its local port"""
    local = free_port()
    proc = subprocess.Popen(
        ["ssh", "-N", "-oBatchMode=yes", "-oStrictHostKeyChecking=no",
         f"-oUserKnownHostsFile={workdir}/known_hosts", f"-oCiphers={CIPHER}",
         "-oHostKeyAlgorithms=ssh-ed25519", "-oIdentitiesOnly=yes", "-i", key,
         "-p", str(ssh_port), f"-L127.0.0.1:{local}:{destination}", f"{user}@127.0.0.1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ssh exited: {proc.stderr.read().decode()}")
        try:
            with connect(local) as conn:
                conn.sendall(b"P!")
                conn.settimeout(2)
                if conn.recv(1) == b"!":
                    return proc, local
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("the forward does not carry data")


def measure(port, size, pings, server_pids):
    """(MB/s up, MB/s down, round trips, CPU s per MB of the server side)"""
    before = cpu_seconds(server_pids())
    up = size / upload(port, size) / 1e6
    down = size / download(port, size) / 1e6
    cpu_per_mb = (cpu_seconds(server_pids()) - before) / (2 * size / 1e6)
    return up, down, round_trips(port, pings), cpu_per_mb


def api(outpost_port, method, path, body=None):
    credentials = base64.b64encode(f"bench:{HUBS['bench']}".encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{outpost_port}/{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", "Authorization": "Basic " + credentials},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def start_destination_server(outpost_port):
    """Start a server at the Outpost whose process is the destination;
    return (its address, its path)"""
    body = {
        "name": "bench", "env": {
            "JUPYTERHUB_API_TOKEN": uuid.uuid4().hex, "JUPYTERHUB_USER": "bench",
            "JUPYTERHUB_USER_ID": "1", "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api",
            "JUPYTERHUB_SERVICE_PREFIX": "/user/bench/bench/",
        },
        "user_options": {"start_id": uuid.uuid4().hex}, "misc": {},
    }  # fmt: skip
    service = api(outpost_port, "POST", "services", body)["service"]
    return service, f"services/bench/{body['user_options']['start_id']}"


def poll_p99(outpost_port, path, seconds):
    """p99 of the Outpost's answer to one hub's poll, polled back to back"""
    credentials = base64.b64encode(f"bench:{HUBS['bench']}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", outpost_port, timeout=30)
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        conn.request("GET", "/" + path, headers={"Authorization": "Basic " + credentials})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        times.append(time.perf_counter() - began)
        time.sleep(0.005)
    conn.close()
    return sorted(times)[int(0.99 * len(times))]


def poll_p99_during_transfers(outpost_port, path, local_port, seconds):
    """Poll p99 while uploads and downloads run through ``local_port``
    (no transfer when it is None)"""
    stop = threading.Event()

    def transfer():
        while not stop.is_set():
            upload(local_port, 32_000_000)
            download(local_port, 32_000_000)

    worker = threading.Thread(target=transfer) if local_port else None
    if worker:
        worker.start()
        time.sleep(0.5)
    try:
        return poll_p99(outpost_port, path, seconds)
    finally:
        stop.set()
        if worker:
            worker.join()


def wait_ping(port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the Outpost does not answer /ping")


def row(name, figures, base):
    up, down, trips, cpu = figures
    p50, p99 = statistics.median(trips) * 1e3, sorted(trips)[int(0.99 * len(trips))] * 1e3
    ratio = lambda a, b: f"{a / b:5.2f}" if b else "    -"  # noqa: E731
    if base is None:
        tail = ""
    else:
        b_up, b_down, b_trips, b_cpu = base
        tail = (f"   x sshd: up {ratio(up, b_up)}  down {ratio(down, b_down)}  "
                f"rtt +{p50 - statistics.median(b_trips) * 1e3:.3f} ms  cpu {ratio(cpu, b_cpu)}")
    cpu_text = f"{cpu * 1e3:7.2f}" if cpu else "      -"
    print(f"{name:8} {up:9.1f} {down:9.1f} {p50:9.3f} {p99:9.3f} {cpu_text}{tail}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="MB per transfer and direction")
    parser.add_argument("--pings", type=int, default=2000, help="one-byte round trips")
    parser.add_argument("--poll-seconds", type=float, default=5, help="seconds of polls per load")
    args = parser.parse_args()
    for tool in ("ssh", "ssh-keygen", "/usr/sbin/sshd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install openssh-client openssh-server")
    size = args.mb * 1_000_000
    workdir = tempfile.mkdtemp(prefix="bench-ssh-")
    key = os.path.join(workdir, "hub_key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    os.path.join(workdir, "sshd_host_key")], check=True)  # fmt: skip
    public_key = open(key + ".pub").read().strip()
    shutil.copy(key + ".pub", os.path.join(workdir, "authorized_keys"))

    ssh_port = free_port()
    cmd = [sys.executable, "-c", DESTINATION]
    outpost = Outpost(workdir, CONFIG.format(workdir=workdir, ssh_port=ssh_port,
                                             public_key=public_key, cmd=cmd))  # fmt: skip
    sshd = forwards = server_path = None
    try:
        wait_ping(outpost.port)
        destination, server_path = start_destination_server(outpost.port)
        dest_port = int(destination.rsplit(":", 1)[1])
        wait_listening(dest_port)
        sshd_port = free_port()
        with open(os.path.join(workdir, "sshd_config"), "w") as f:
            f.write(SSHD_CONFIG.format(port=sshd_port, workdir=workdir, cipher=CIPHER))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", os.path.join(workdir, "sshd_config")],
                                stderr=subprocess.DEVNULL)  # fmt: skip
        wait_listening(sshd_port)
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        sshd_forward, sshd_local = forward(sshd_port, key, user, destination, workdir)
        outpost_forward, outpost_local = forward(ssh_port, key, "bench", destination, workdir)
        forwards = [sshd_forward, outpost_forward]

        print(f"SSH forwarding benchmark: {args.mb} MB each way, {args.pings} one-byte round trips, "
              f"cipher {CIPHER}, ed25519 keys, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
        print(f"{'path':8} {'up MB/s':>9} {'down MB/s':>9} {'rtt p50':>9} {'rtt p99':>9} {'CPU ms/MB':>7}")
        direct = measure(dest_port, size, args.pings, lambda: [])
        via_sshd = measure(sshd_local, size, args.pings, lambda: descendants(sshd.pid))
        via_outpost = measure(outpost_local, size, args.pings, lambda: [outpost.pid])
        row("direct", direct, None)
        row("sshd", via_sshd, None)
        row("outpost", via_outpost, via_sshd)
        print("(CPU ms/MB: the server side only; rtt in ms; x sshd: the Outpost's figure over sshd's)")

        # what carrying the tunnels costs the HTTP API: the hub's polls, idle,
        # while sshd carries a bulk transfer (the Outpost only answers polls;
        # the machine's CPUs are as busy), and while the Outpost carries it
        idle = poll_p99_during_transfers(outpost.port, server_path, None, args.poll_seconds)
        beside = poll_p99_during_transfers(outpost.port, server_path, sshd_local, args.poll_seconds)
        inside = poll_p99_during_transfers(outpost.port, server_path, outpost_local, args.poll_seconds)
        print(f"poll p99: idle {idle * 1e3:.2f} ms, bulk transfer through sshd {beside * 1e3:.2f} ms "
              f"(x idle {beside / idle:.2f}), through the Outpost {inside * 1e3:.2f} ms "
              f"(x idle {inside / idle:.2f}, x sshd {inside / beside:.2f})")
    finally:
        for proc in forwards or []:
            proc.kill()
        if sshd is not None:
            sshd.kill()
        if server_path:
            api(outpost.port, "DELETE", server_path)
        outpost.terminate()


if __name__ == "__main__":
    main()
