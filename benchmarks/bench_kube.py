"""KubeSpawner in the Outpost, against tests/fake_kubernetes.FakeKubernetesAPI.

Run from the repository root (``pip install -e '.[test]'`` first)::

    python benchmarks/bench_kube.py                 # 1,000 pods (~3 min on 2 cores)
    python benchmarks/bench_kube.py --servers 200   # a quicker run

One Outpost process (log level WARNING, no progress events) runs
``kubespawner.KubeSpawner`` and reaches the fake API server (in this process,
its own thread) through a kubeconfig file. It prints:

1. the Kubernetes API requests the Outpost made while every one of N running
   pods was polled once (one poll interval of a hub with N servers), and while
   it sat idle for 30 s (the shared watches reconnect every ``timeout_seconds``);
   as a baseline, what one GET per poll would have cost (N requests);
2. the Outpost's RSS (VmRSS) with no server, with one, and with N KubeSpawner
   servers (their pods run without processes: ``run_containers=False``);
3. the time from start request to a server that answers, with real
   jupyterhub-singleuser containers, and what of it the cluster (the fake,
   from pod creation to Running) and the Outpost (with KubeSpawner) took;
4. the Kubernetes API calls KubeSpawner made, as (verb, resource).
"""

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
import uuid

from _common import REPO, HTTPPool, Outpost, f1, ms, pct, print_table, proc_status

sys.path.insert(0, REPO)
from tests.fake_kubernetes import FakeKubernetesAPI  # noqa: E402
from tests.mocking import FakeHubAPI  # noqa: E402

CONFIG = """
c = get_config()  # noqa
c.JupyterHubOutpost.db_url = "sqlite:///{workdir}/outpost.sqlite"
c.JupyterHubOutpost.spawner_class = "kubespawner.KubeSpawner"
c.JupyterHubOutpost.send_events = False
c.JupyterHubOutpost.min_account_uid = 0
c.JupyterHubOutpost.log_level = "WARN"
c.KubeSpawner.namespace = "bench"
c.KubeSpawner.image = "quay.io/jupyter/base-notebook:2025-01-01"
c.KubeSpawner.cmd = ["jupyterhub-singleuser"]
c.KubeSpawner.args = ["--ServerApp.allow_root=True"]
c.KubeSpawner.start_timeout = 120
c.KubeSpawner.delete_grace_period = 1
"""


def body_for(name, hub_api):
    token = secrets.token_hex(16)
    prefix = f"/user/bench/{name}/"
    env = {
        "JUPYTERHUB_API_TOKEN": token, "JPY_API_TOKEN": token, "JUPYTERHUB_API_URL": hub_api,
        "JUPYTERHUB_USER": "bench", "JUPYTERHUB_USER_ID": "1", "JUPYTERHUB_SERVER_NAME": name,
        "JUPYTERHUB_SERVICE_PREFIX": prefix, "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_CLIENT_ID": f"jupyterhub-user-bench-{name}",
        "JUPYTERHUB_ACTIVITY_URL": f"{hub_api}/users/bench/activity",
        "JUPYTERHUB_SERVICE_URL": f"http://0.0.0.0:8888{prefix}",
    }  # fmt: skip
    start_id = uuid.uuid4().hex
    return {"name": name, "env": env, "user_options": {"start_id": start_id}, "misc": {},
            "certs": {}, "internal_trust_bundles": {}}, start_id  # fmt: skip


def rss_mb(pid):
    return int(proc_status(pid)["VmRSS"].split()[0]) / 1024


async def start(pool, name, hub_api):
    body, start_id = body_for(name, hub_api)
    began = time.monotonic()
    status, data = await pool.request("POST", "/services/", hub="bench", body=body, timeout=300)
    if status != 200:
        raise RuntimeError(f"start {name}: {status} {data[:300]!r}")
    return name, start_id, time.monotonic() - began, json.loads(data)["service"], began


async def in_parallel(items, concurrency, one):
    queue = list(items)
    results = []

    async def worker():
        while queue:
            results.append(await one(queue.pop()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def beyond_watches(requests):
    return [r for r in requests if not (r[0] == "GET" and r[1].rstrip("/").endswith(("/pods", "/events")))]


async def answers(address, prefix):
    from tornado.httpclient import AsyncHTTPClient

    try:
        response = await AsyncHTTPClient().fetch(f"{address}{prefix}api", raise_error=False, request_timeout=2)
    except OSError:
        return False
    return response.code == 200


async def main(args):
    workdir = tempfile.mkdtemp(prefix="bench-kube-")
    base_env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    fake = FakeKubernetesAPI(workdir, run_containers=False, base_env=base_env).start()
    hub = FakeHubAPI()
    hub.start()
    os.environ["KUBECONFIG"] = fake.kubeconfig
    outpost = Outpost(workdir, CONFIG.format(workdir=workdir))
    pool = HTTPPool("127.0.0.1", outpost.port, 50)
    try:
        await outpost.wait_ready(pool, timeout=60)
        rss_empty = rss_mb(outpost.pid)
        servers = [await start(pool, "s0", hub.url)]
        rss_one = rss_mb(outpost.pid)

        began = time.monotonic()
        servers += await in_parallel([f"s{i}" for i in range(1, args.servers)], 20,
                                     lambda n: start(pool, n, hub.url))  # fmt: skip
        start_wall = time.monotonic() - began
        rss_n = rss_mb(outpost.pid)

        # 1. one poll of every server, then 30 s idle
        count = len(fake.requests)
        latencies = []

        async def poll(server):
            t = time.monotonic()
            status, data = await pool.request("GET", f"/services/{server[0]}/{server[1]}", hub="bench")
            latencies.append(time.monotonic() - t)
            if status != 200 or json.loads(data) != {"status": None}:
                raise RuntimeError(f"poll {server[0]}: {status} {data[:200]!r}")

        t = time.monotonic()
        await in_parallel(servers, 20, poll)
        poll_wall = time.monotonic() - t
        during_polls = fake.requests[count:]
        count = len(fake.requests)
        await asyncio.sleep(30)
        idle = fake.requests[count:]

        print_table(
            f"1. Kubernetes API requests, {args.servers} running pods",
            ["window", "requests", "beyond list+watch", "one GET per poll (baseline)"],
            [[f"1 poll of each server ({f1(poll_wall)} s, p50 {f1(ms(pct(latencies, 50)))} ms, "
              f"p90 {f1(ms(pct(latencies, 90)))} ms)", len(during_polls), len(beyond_watches(during_polls)),
              args.servers],
             ["30 s idle", len(idle), len(beyond_watches(idle)), "-"]],
        )  # fmt: skip
        print_table(
            "2. Outpost RSS (VmRSS)",
            ["servers", "MB", "per server (KB)"],
            [[0, f1(rss_empty), "-"], [1, f1(rss_one), "-"],
             [args.servers, f1(rss_n), f1((rss_n - rss_one) * 1024 / max(1, args.servers - 1))]],
        )  # fmt: skip
        lat = [s[2] for s in servers]
        print(f"   {args.servers} starts (20 at a time) took {f1(start_wall)} s; "
              f"start latency p50 {f1(ms(pct(lat, 50)))} ms, p90 {f1(ms(pct(lat, 90)))} ms")

        await in_parallel(servers, 20, lambda s: pool.request(
            "DELETE", f"/services/{s[0]}/{s[1]}", hub="bench", timeout=120))  # fmt: skip

        # 3. real containers: start request -> server answers
        fake.run_containers = True
        rows = []
        for i in range(args.real):
            name, start_id, latency, service, began = await start(pool, f"real{i}", hub.url)
            prefix = f"/user/bench/{name}/"
            while not await answers(service, prefix):
                await asyncio.sleep(0.05)
            ready = time.monotonic() - began
            pod = next(n for n in fake.timeline if n.endswith(f"--{name}") or n.endswith(f"-{name}"))
            cluster = fake.timeline[pod]["running"] - fake.timeline[pod]["created"]
            rows.append((latency, ready, cluster))
            await pool.request("DELETE", f"/services/{name}/{start_id}", hub="bench", timeout=120)
        print_table(
            f"3. Start request -> ready server, real jupyterhub-singleuser pods ({args.real} in turn), median",
            ["start answered (ms)", "server answers (ms)", "cluster: pod created -> Running (ms)",
             "Outpost + KubeSpawner (ms)", "server process after Running (ms)"],
            [[f1(ms(pct([r[0] for r in rows], 50))), f1(ms(pct([r[1] for r in rows], 50))),
              f1(ms(pct([r[2] for r in rows], 50))), f1(ms(pct([r[0] - r[2] for r in rows], 50))),
              f1(ms(pct([r[1] - r[0] for r in rows], 50)))]],
        )  # fmt: skip
        print("4. Kubernetes API calls KubeSpawner made (verb, resource):")
        for verb, resource in sorted(fake.calls()):
            print(f"   {verb:7} {resource}")
    finally:
        pool.close()
        outpost.terminate()
        fake.stop()
        hub.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=1000, help="running KubeSpawner servers (default 1000)")
    parser.add_argument("--real", type=int, default=5, help="starts with real containers (default 5)")
    asyncio.run(main(parser.parse_args()))
