"""Slurm jobs through the Outpost: where a start's time goes, squeue load, early deaths.

    python benchmarks/bench_slurm.py            # about 1 minute (2 cores)
    python benchmarks/bench_slurm.py --servers 50 --starts 5 --poll-seconds 10

Needs root and Slurm's packages (ci/test.sh installs them); starts the
tests' one-node cluster (ci/slurm-localhost.sh up). Runs an Outpost in this
process with OutpostSlurmSpawner (tests/slurm.py settings), and a fake hub
API for events. Prints:

1. start to ready, split: Outpost (request to sbatch, and after the port
   report), sbatch, queue wait (sbatch to RUNNING seen in squeue), server
   start-up (RUNNING to port report, then to the first HTTP answer);
2. with N light servers running (they report a port, then sleep): squeue
   calls per interval while every server is polled continuously, poll
   latency percentiles, against GET /ping in the same run, and against one
   plain ``squeue -j`` (what batchspawner runs per poll);
3. time from a job's death (before its port report) to the failed event.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tornado.httpclient import AsyncHTTPClient  # noqa: E402

from tests.conftest import start_outpost, stop_outpost  # noqa: E402
from tests.mocking import FakeHubAPI  # noqa: E402
from tests.slurm import SETUP, slurm_outpost_config  # noqa: E402
from tests.utils import api_request, json_of, server_answers, start_body, tokens_of  # noqa: E402

SLEEPER = ["/bin/sh", "-c", "exec sleep 600"]
DIE = os.path.join(REPO, "benchmarks", "slurm_die.py")


def pct(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def key(body):
    return ("hub-a", body["name"], body["user_options"]["start_id"])


async def starts(outpost, hub, count):
    rows = []
    for i in range(count):
        body = start_body(hub.url, name=f"bench{i}")
        hub.tokens.update(tokens_of(body))
        t0 = time.monotonic()
        response = await api_request(outpost, "services", method="POST", body=body)
        answered = time.monotonic()
        assert response.code == 200, response.body
        timings = dict(outpost.server_manager.active[key(body)].spawner.timings)
        address = json_of(response)["service"]
        while not await server_answers(address, body["env"]["JUPYTERHUB_SERVICE_PREFIX"]):
            await asyncio.sleep(0.05)
        ready = time.monotonic()
        total = answered - t0
        outpost_part = total - timings["sbatch"] - timings["queue"] - timings["server"]
        rows.append({
            "total to ready": ready - t0, "Outpost": outpost_part, "sbatch": timings["sbatch"],
            "queue wait": timings["queue"], "server: to port report": timings["server"],
            "server: to first HTTP answer": ready - answered,
        })  # fmt: skip
        await api_request(outpost, "services", *key(body)[1:], method="DELETE")
    print(f"\n1. Start to ready server ({count} sequential starts of jupyterhub-singleuser, "
          "squeue_busy_interval 0.2 s)")  # fmt: skip
    print(f"{'part':34}{'p50 s':>8}{'max s':>8}")
    for name in rows[0]:
        values = [r[name] for r in rows]
        print(f"{name:34}{pct(values, 50):8.2f}{max(values):8.2f}")


async def many(outpost, hub, count, seconds, concurrency):
    client = AsyncHTTPClient(force_instance=True, max_clients=max(count, concurrency))
    bodies = []
    for i in range(count):
        body = start_body(hub.url, name=f"light{i}", misc={"cmd": SLEEPER, "req_srun": ""})
        hub.tokens.update(tokens_of(body))
        bodies.append(body)
    t0 = time.monotonic()
    responses = await asyncio.gather(*(
        api_request(outpost, "services", method="POST", body=b, client=client) for b in bodies))
    assert all(r.code == 200 for r in responses), [r.body for r in responses if r.code != 200][:3]
    started = time.monotonic() - t0
    queue = outpost.server_manager.active[key(bodies[0])].spawner.queue
    await asyncio.sleep(queue.interval)

    async def measure(paths, auth=True):
        latencies, deadline, calls0 = [], time.monotonic() + seconds, queue.calls

        async def worker(offset):
            i = offset
            while time.monotonic() < deadline:
                t = time.monotonic()
                response = await api_request(outpost, *paths[i % len(paths)], client=client, auth=auth)
                latencies.append(time.monotonic() - t)
                assert response.code == 200, response.body
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return latencies, queue.calls - calls0

    polls, calls = await measure([["services", *key(b)[1:]] for b in bodies])
    pings, _ = await measure([["ping"]], auth=False)
    plain = []
    job_ids = [outpost.server_manager.active[key(b)].spawner.job_id for b in bodies]
    for job_id in job_ids[:20]:
        t = time.monotonic()
        subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %B"], capture_output=True)
        plain.append(time.monotonic() - t)
    intervals = seconds / queue.interval
    print(f"\n2. {count} light servers (started in {started:.1f} s), every one polled for "
          f"{seconds} s, {concurrency} polls in flight, squeue_interval {queue.interval} s")
    print(f"   squeue calls: {calls} in {intervals:.0f} intervals = {calls / intervals:.2f} per interval "
          f"(batchspawner: one per poll = {len(polls) / intervals:.0f} per interval)")
    print(f"{'':28}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for name, values in (("poll", polls), ("GET /ping (same run)", pings)):
        print(f"{name:28}{len(values):9}{pct(values, 50) * 1000:9.1f}{pct(values, 99) * 1000:9.1f}")
    print(f"{'one plain squeue -j (x20)':28}{len(plain):9}{pct(plain, 50) * 1000:9.1f}"
          f"{pct(plain, 99) * 1000:9.1f}")
    print(f"   poll p99 / ping p99 = {pct(polls, 99) / pct(pings, 99):.2f}")
    await asyncio.gather(*(api_request(outpost, "services", *key(b)[1:], method="DELETE", client=client)
                           for b in bodies))  # fmt: skip
    client.close()


async def early_deaths(outpost, hub, count, workdir):
    offset = time.time() - time.monotonic()
    delays = []
    for i in range(count):
        died = os.path.join(workdir, f"died-{i}")
        body = start_body(hub.url, name=f"die{i}", misc={"batchspawner_singleuser_cmd": f"/usr/bin/python3 {DIE} {died}"})
        hub.tokens.update(tokens_of(body))
        token = body["env"]["JUPYTERHUB_API_TOKEN"]
        response = await api_request(outpost, "services", method="POST", body=body,
                                     headers={"execution-type": "async"})  # fmt: skip
        assert response.code == 202, response.body
        while True:
            failed = [c for c in hub.calls("event") if c["token"] == token and c["body"].get("failed")]
            if failed:
                break
            await asyncio.sleep(0.02)
        with open(died) as f:
            delays.append(failed[0]["time"] + offset - float(f.read()))
    print(f"\n3. Early death (the job exits before its port report; {count} runs, "
          "squeue_busy_interval 0.2 s)")
    print(f"   job's exit to the user's failed event: p50 {pct(delays, 50):.2f} s, max {max(delays):.2f} s")


async def main(args):
    subprocess.run(["bash", SETUP, "up"], check=True)
    import tempfile
    from pathlib import Path

    workdir = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    hub = FakeHubAPI()
    hub.start()
    outpost = await start_outpost(slurm_outpost_config(workdir, squeue_interval=args.interval))
    try:
        await starts(outpost, hub, args.starts)
        await many(outpost, hub, args.servers, args.poll_seconds, args.concurrency)
        await early_deaths(outpost, hub, args.starts, str(workdir))
    finally:
        await stop_outpost(outpost)
        hub.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=50)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--poll-seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--interval", type=float, default=1.0, help="squeue_interval (s)")
    asyncio.run(main(parser.parse_args()))
