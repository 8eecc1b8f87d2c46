"""When a Spawner misbehaves, the hub is told the truth, in bounded time.

A poll answers the Spawner's own ``poll()``, also while a stop runs or after
one failed, and 503 ("cannot tell", the hub keeps the server) when that
hangs or fails; it never reports a status for a server whose process may
still run. Stops are bounded by ``stop_timeout``; a failed stop leaves the
server listed, running and stoppable again. Plain-function Spawner methods
run off the event loop. Every server is a real process (``sleep``), found
by the API token in its environment.
"""

import asyncio
import time

import pytest

from .conftest import _running_outposts, outpost_config, start_outpost, stop_outpost
from .utils import (
    api_request,
    json_of,
    kill_servers_of,
    pid_alive,
    processes_of,
    start_body,
    tokens_of,
    wait_until,
)

FAULTY = "tests.mocking.FaultySpawner"
ASYNC = {"execution-type": "async"}


@pytest.fixture(scope="module")
async def faulty(tmp_path_factory, fake_hub):
    """An Outpost running FaultySpawner with short poll and stop timeouts"""
    cfg = outpost_config(
        tmp_path_factory.mktemp("faulty"),
        spawner_cmd=["sleep", "600"],
        spawner_class=FAULTY,
        poll_timeout=1.0,
        stop_timeout=2.0,
        allowed_overrides=["poll_delay", "failing_stops", "hanging_stops", "stop_delay", "state_none"],
    )
    outpost = await start_outpost(cfg)
    yield outpost
    await stop_outpost(outpost)


@pytest.fixture
def tokens():
    made = set()
    yield made
    kill_servers_of(made)


async def start_server(outpost, fake_hub, tokens, **misc):
    """Start a server with these misc overrides; return (body, path, pid)"""
    body = start_body(fake_hub.url, user="faults", misc=misc)
    fake_hub.tokens.update(tokens_of(body))
    tokens.update(tokens_of(body))
    response = await api_request(outpost, "services", method="POST", body=body)
    assert response.code == 200, response.body
    [pid] = await wait_until(lambda: processes_of(body), timeout=20, message="the process")
    return body, ("services", body["name"], body["user_options"]["start_id"]), pid


async def ping_latencies(outpost, until):
    """/ping latencies (s) measured every 20 ms until ``until`` is done"""
    latencies = []
    while not until.done():
        began = time.perf_counter()
        response = await api_request(outpost, "ping", auth=False)
        assert response.code == 200
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(0.02)
    return latencies


async def test_a_failed_stop_leaves_the_server_running_listed_and_stoppable(faulty, fake_hub, tokens):
    body, path, pid = await start_server(faulty, fake_hub, tokens, failing_stops=1)

    response = await api_request(faulty, *path, method="DELETE")
    assert response.code == 503, response.body
    assert "backend refused" in json_of(response)["message"]

    assert pid_alive(pid)
    poll = await api_request(faulty, *path)
    assert (poll.code, json_of(poll)) == (200, {"status": None})
    listed = json_of(await api_request(faulty, "services"))
    assert [(s["start_id"], s["stop_pending"]) for s in listed] == [(path[2], False)]

    again = await api_request(faulty, *path, method="DELETE")
    assert again.code == 200, again.body
    await wait_until(lambda: not pid_alive(pid), timeout=10, message="the process to end")
    assert (await api_request(faulty, *path)).code == 404


async def test_polls_during_a_stop_ask_the_spawner(faulty, fake_hub, tokens):
    body, path, pid = await start_server(faulty, fake_hub, tokens, stop_delay=1.5)
    response = await api_request(faulty, *path, method="DELETE", headers=ASYNC)
    assert response.code == 202, response.body
    # the stop is under way and the process still runs: not a status
    poll = await api_request(faulty, *path)
    assert (poll.code, json_of(poll)) == (200, {"status": None})
    assert pid_alive(pid)
    await wait_until(lambda: not pid_alive(pid), timeout=10, message="the process to end")

    async def forgotten():
        return (await api_request(faulty, *path)).code == 404

    await wait_until(forgotten, timeout=10, message="the server to be forgotten")


async def test_a_hanging_poll_answers_503_within_poll_timeout(faulty, fake_hub, tokens):
    body, path, pid = await start_server(faulty, fake_hub, tokens, poll_delay=60)
    polling = asyncio.ensure_future(api_request(faulty, *path))
    latencies = await ping_latencies(faulty, polling)
    response = polling.result()
    assert response.code == 503, response.body
    assert "did not answer within 1.0 s" in json_of(response)["message"]
    assert response.request_time < 3, response.request_time
    assert max(latencies) < 0.5, max(latencies)
    assert pid_alive(pid)


async def test_a_hanging_stop_fails_within_stop_timeout_and_can_be_retried(faulty, fake_hub, tokens):
    body, path, pid = await start_server(faulty, fake_hub, tokens, hanging_stops=1)
    began = time.monotonic()
    response = await api_request(faulty, *path, method="DELETE")
    assert response.code == 503, response.body
    assert "did not finish within 2.0 s" in json_of(response)["message"]
    assert time.monotonic() - began < 5
    assert pid_alive(pid)
    poll = await api_request(faulty, *path)
    assert (poll.code, json_of(poll)) == (200, {"status": None})

    again = await api_request(faulty, *path, method="DELETE")
    assert again.code == 200, again.body
    await wait_until(lambda: not pid_alive(pid), timeout=10, message="the process to end")


async def test_a_blocking_poll_runs_off_the_event_loop(tmp_path, fake_hub, tokens):
    cfg = outpost_config(
        tmp_path, spawner_cmd=["sleep", "600"],
        spawner_class="tests.mocking.BlockingPollSpawner", poll_timeout=10.0,
    )
    cfg.BlockingPollSpawner.poll_delay = 2.0
    outpost = await start_outpost(cfg)
    try:
        body, path, pid = await start_server(outpost, fake_hub, tokens)
        polls = asyncio.ensure_future(
            asyncio.gather(*(api_request(outpost, *path) for _ in range(3)))
        )
        latencies = await ping_latencies(outpost, polls)
        assert [(r.code, json_of(r)) for r in polls.result()] == [(200, {"status": None})] * 3
        # while the poll blocked its thread for 2 s, /ping answered at once
        assert len(latencies) > 20 and max(latencies) < 0.5, (len(latencies), max(latencies))
    finally:
        await stop_outpost(outpost)


async def test_a_lost_state_after_a_restart_is_503_not_stopped(tmp_path, fake_hub, tokens):
    cfg = outpost_config(
        tmp_path, spawner_cmd=["sleep", "600"], spawner_class=FAULTY,
        allowed_overrides=["state_none"],
    )
    first = await start_outpost(cfg)
    body, path, pid = await start_server(first, fake_hub, tokens, state_none=True)
    await first.shutdown()  # running servers keep running
    _running_outposts.remove(first)

    second = await start_outpost(cfg)
    try:
        assert pid_alive(pid)
        poll = await api_request(second, *path)
        assert poll.code == 503, poll.body
        assert "no state" in json_of(poll)["message"]
        assert json_of(await api_request(second, "services"))[0]["start_id"] == path[2]
    finally:
        await stop_outpost(second)


@pytest.mark.parametrize(
    "ignores, bound", [("INT", 1 * 1.1 + 1.5), ("INT TERM", 2 * 1.1 + 1.5)], ids=["SIGINT", "SIGINT+SIGTERM"]
)
async def test_a_stop_of_a_stubborn_process_stays_within_the_spawner_timeouts(
    tmp_path, fake_hub, tokens, ignores, bound
):
    """SIGINT, then SIGTERM after interrupt_timeout, then SIGKILL after term_timeout:
    the DELETE answers within those timeouts, and the process is gone"""
    cfg = outpost_config(tmp_path, spawner_cmd=["sh", "-c", f"trap '' {ignores}; exec sleep 600"])
    cfg.Spawner.interrupt_timeout = 1
    cfg.Spawner.term_timeout = 1
    outpost = await start_outpost(cfg)
    try:
        body, path, pid = await start_server(outpost, fake_hub, tokens)
        began = time.monotonic()
        response = await api_request(outpost, *path, method="DELETE")
        took = time.monotonic() - began
        assert response.code == 200, response.body
        assert not pid_alive(pid)
        assert took < bound, took
    finally:
        await stop_outpost(outpost)
