"""kill -9 at any moment loses nothing and leaves no ghost.

A real ``jupyterhub-outpost`` process starts and stops real processes
(SlowStartSpawner running ``sleep``, which ignores SIGINT here, so that a
stop takes ``interrupt_timeout``), and is killed with SIGKILL at seeded random
moments while starts (before and after their process is launched) and stops
are in flight. After each kill a new process on the same database takes
over, as systemd would restart it, and the test audits as a hub would:

- lost: a process of one of the test's servers runs, and no record that
  polls "running" tracks it (nobody would ever stop it);
- ghost: a record polls "running" while its process is gone.

Both must be 0 after every kill. Interrupted starts and stops are finished
by the new process at once (the killed process is known to be gone), not
after ``pending_timeout``.
"""

import asyncio
import collections
import random

import pytest

from .utils import (
    api_request,
    json_of,
    kill_servers_of,
    process_config,
    process_env,
    processes_of,
    start_body,
    tokens_of,
    wait_until,
)

pytestmark = pytest.mark.slow

KILLS = 12
# ignores SIGINT, ends on SIGTERM (an ignored signal stays ignored across exec)
IGNORES_SIGINT = ["sh", "-c", "trap '' INT; exec sleep 3600"]
ASYNC = {"execution-type": "async"}


@pytest.fixture
def outpost(tmp_path, processes):
    config = process_config(
        tmp_path,
        cmd=IGNORES_SIGINT,
        spawner_class="tests.mocking.SlowStartSpawner",
        allowed_overrides=["start_delay", "delay_after_launch", "unsaved_pid"],
        pending_timeout=3600.0,  # what is interrupted must not wait for this
    )
    config += "c.Spawner.interrupt_timeout = 1\nc.Spawner.term_timeout = 5\n"
    env = process_env()
    process = processes(tmp_path, config_text=config, extra_env=env)
    process.start()
    return process


def new_start(fake_hub, bodies, rng, i):
    """A start body whose process is launched after or before a delay"""
    misc = {"start_delay": round(rng.uniform(0.0, 1.5), 2), "delay_after_launch": rng.random() < 0.6}
    body = start_body(fake_hub.url, user=f"crash{i}", user_id=1000 + i, misc=misc)
    fake_hub.tokens.update(tokens_of(body))
    bodies[body["user_options"]["start_id"]] = body
    return body


async def _answer_of(request):
    """A request cut by the kill: its answer or the error that ended it"""
    try:
        return await request
    except OSError as e:
        return e


async def settled(outpost):
    """The listing once no start or stop is pending any more"""

    async def listing():
        response = await api_request(outpost, "services", timeout=10)
        if response.code != 200:
            return None
        servers = json_of(response)
        if any(s["start_pending"] or s["stop_pending"] for s in servers):
            return None
        return servers or [None]

    servers = await wait_until(listing, timeout=60, message="no pending start or stop")
    return [s for s in servers if s]


async def audit(outpost, bodies):
    """(lost, ghosts, running start ids), asking the Outpost as the hub does"""
    running, ghosts = set(), 0
    for server in await settled(outpost):
        response = await api_request(outpost, "services", server["name"], server["start_id"])
        assert response.code == 200, response.body
        body = bodies[server["start_id"]]
        if json_of(response)["status"] is None:
            running.add(server["start_id"])
            ghosts += not processes_of(body)
        else:  # ended: the hub would stop it
            stop = await api_request(outpost, "services", server["name"], server["start_id"], method="DELETE")
            assert stop.code == 200, stop.body
    lost = sum(1 for start_id, body in bodies.items() if start_id not in running and processes_of(body))
    return lost, ghosts, running


async def test_kill_9_at_any_moment_loses_and_ghosts_nothing(outpost, fake_hub):
    rng = random.Random(20261201)
    bodies, figures, running = {}, collections.Counter(), set()
    try:
        for kill in range(KILLS):
            in_flight = []
            for _ in range(2):
                body = new_start(fake_hub, bodies, rng, len(bodies))
                headers = ASYNC if rng.random() < 0.5 else None
                in_flight.append(api_request(outpost, "services", method="POST", body=body, headers=headers))
            for start_id in rng.sample(sorted(running), min(len(running), 2)):
                body = bodies[start_id]
                headers = ASYNC if rng.random() < 0.5 else None
                in_flight.append(api_request(outpost, "services", "", start_id, method="DELETE", headers=headers))
                figures["stops sent"] += 1
            figures["starts sent"] += 2
            requests = [asyncio.ensure_future(_answer_of(r)) for r in in_flight]
            # the moment of the crash: anywhere in the starts and stops
            await asyncio.sleep(rng.uniform(0.05, 2.5))
            outpost.kill9()
            await asyncio.wait(requests, timeout=10)
            log_before = len(outpost.log_text())
            await asyncio.to_thread(outpost.start)
            lost, ghosts, running = await audit(outpost, bodies)
            after = outpost.log_text()[log_before:]
            figures["interrupted starts"] += after.count("after an interrupted start")
            figures["interrupted stops"] += after.count("after an interrupted stop")
            figures["lost"] += lost
            figures["ghosts"] += ghosts
            assert (lost, ghosts) == (0, 0), (kill, lost, ghosts, after[-3000:])
        print(f"\nkill -9 figures after {KILLS} kills: {dict(figures)}; {len(running)} running at the end")
        assert figures["interrupted starts"] >= 5 and figures["interrupted stops"] >= 3, figures

        # every server that exists can be stopped
        for start_id in sorted(running):
            response = await api_request(outpost, "services", "", start_id, method="DELETE")
            assert response.code == 200, response.body
        assert all(not processes_of(body) for body in bodies.values())
        assert await settled(outpost) == []
    finally:
        kill_servers_of({t for body in bodies.values() for t in tokens_of(body)})


async def test_a_process_born_before_its_pid_was_saved_is_found_and_stopped(outpost, fake_hub):
    """The crash lands after the process was born and before its pid reached the
    database: the restarted Outpost finds it by the server's token and stops it"""
    body = start_body(fake_hub.url, user="unsaved", misc={
        "start_delay": 60, "delay_after_launch": True, "unsaved_pid": True})
    fake_hub.tokens.update(tokens_of(body))
    try:
        response = await api_request(outpost, "services", method="POST", body=body, headers=ASYNC)
        assert response.code == 202, response.body
        [pid] = await wait_until(lambda: processes_of(body), timeout=20, message="the process")
        outpost.kill9()
        await asyncio.to_thread(outpost.start)
        await wait_until(lambda: not processes_of(body), timeout=30, message="the process to end")
        assert await settled(outpost) == []
        assert f"found process {pid} of the interrupted start" in outpost.log_text()
    finally:
        kill_servers_of(tokens_of(body))
