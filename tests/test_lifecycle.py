"""A server's life as a hub sees it: start (plain and async), poll, stop,
stop during a pending start, failed starts, and what the hub is told.

Every server is a real ``jupyterhub-singleuser`` process (or a real failed
attempt to start one); processes are found by the API token in their
environment.
"""

import asyncio
import gc
import logging
import os
import signal
import time

import pytest

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import api_request, json_of, pid_alive, pids_with_env, start_body, wait_until

START_FAILURE_KEYS = {"module", "class", "traceback", "args", "kwargs"}
ASYNC = {"execution-type": "async"}


def new_body(fake_hub, user, name, **kwargs):
    """A start body whose tokens the fake hub accepts"""
    body = start_body(fake_hub.url, user=user, name=name, **kwargs)
    fake_hub.tokens.add(body["env"]["JUPYTERHUB_API_TOKEN"])
    fake_hub.tokens.add(body["env"]["JUPYTERHUB_FLAVORS_UPDATE_TOKEN"])
    return body


def processes_of(body):
    return pids_with_env("JUPYTERHUB_API_TOKEN", body["env"]["JUPYTERHUB_API_TOKEN"])


def flavor_updates_of(fake_hub, body):
    token = body["env"]["JUPYTERHUB_FLAVORS_UPDATE_TOKEN"]
    return [c for c in fake_hub.calls("flavors") if c["token"] == token]


async def listing(app, hub="hub-a"):
    response = await api_request(app, "services", hub=hub)
    assert response.code == 200, response.body
    return json_of(response)


async def poll(app, name, start_id, hub="hub-a"):
    return await api_request(app, "services", name, start_id, hub=hub)


async def start_running(app, body):
    """Start ``body``'s server; return the pid of its process once it runs"""
    response = await api_request(app, "services", method="POST", body=body)
    assert response.code == 200, response.body
    [pid] = await wait_until(lambda: processes_of(body), timeout=20, message="the process")
    return pid


async def assert_forgotten(app, name, start_id, hub="hub-a"):
    response = await poll(app, name, start_id, hub=hub)
    assert response.code == 404, response.body
    assert all((s["name"], s["start_id"]) != (name, start_id) for s in await listing(app, hub))


async def assert_no_process_appears(body, within):
    """No process with this start's token shows up for ``within`` seconds"""
    with pytest.raises(TimeoutError):
        await wait_until(lambda: processes_of(body), timeout=within, message="a process")


# hub isolation


async def test_hubs_do_not_see_each_others_servers(app, fake_hub):
    body_a = new_body(fake_hub, "iso", "shared")
    start_id = body_a["user_options"]["start_id"]
    response = await api_request(app, "services", method="POST", body=body_a, hub="hub-a")
    assert response.code == 200, response.body
    [pid_a] = await wait_until(lambda: processes_of(body_a), timeout=20, message="hub-a's process")

    # for hub-b, hub-a's server does not exist
    assert (await poll(app, "shared", start_id, hub="hub-b")).code == 404
    response = await api_request(app, "services", "shared", start_id, method="DELETE", hub="hub-b")
    assert response.code == 404
    assert await listing(app, "hub-b") == []
    assert pid_alive(pid_a)

    # hub-b runs a server with the same name and start_id at the same time
    body_b = new_body(fake_hub, "iso", "shared", start_id=start_id)
    response = await api_request(app, "services", method="POST", body=body_b, hub="hub-b")
    assert response.code == 200, response.body
    [pid_b] = await wait_until(lambda: processes_of(body_b), timeout=20, message="hub-b's process")
    assert pid_b != pid_a
    for hub in ("hub-a", "hub-b"):
        assert [(s["name"], s["start_id"]) for s in await listing(app, hub)] == [
            ("shared", start_id)
        ]
        assert json_of(await poll(app, "shared", start_id, hub=hub)) == {"status": None}

    # stopping hub-b's server leaves hub-a's running
    response = await api_request(app, "services", "shared", start_id, method="DELETE", hub="hub-b")
    assert response.code == 200, response.body
    await wait_until(lambda: not pid_alive(pid_b), timeout=30, message="hub-b's process ended")
    await assert_forgotten(app, "shared", start_id, hub="hub-b")
    assert pid_alive(pid_a)
    assert json_of(await poll(app, "shared", start_id, hub="hub-a")) == {"status": None}

    response = await api_request(app, "services", "shared", start_id, method="DELETE", hub="hub-a")
    assert response.code == 200, response.body
    await wait_until(lambda: not pid_alive(pid_a), timeout=30, message="hub-a's process ended")
    await assert_forgotten(app, "shared", start_id, hub="hub-a")


async def test_default_server_with_empty_name(app, fake_hub):
    body = new_body(fake_hub, "dora", "")
    start_id = body["user_options"]["start_id"]
    pid = await start_running(app, body)
    # poll and stop address it as /services//{start_id}
    assert json_of(await poll(app, "", start_id)) == {"status": None}
    assert [(s["name"], s["start_id"]) for s in await listing(app)] == [("", start_id)]
    response = await api_request(app, "services", "", start_id, method="DELETE")
    assert response.code == 200, response.body
    await wait_until(lambda: not pid_alive(pid), timeout=30, message="process ended")
    await assert_forgotten(app, "", start_id)


async def test_concurrent_stops_both_succeed(app, fake_hub):
    body = new_body(fake_hub, "stan", "twostops")
    start_id = body["user_options"]["start_id"]
    pid = await start_running(app, body)
    responses = await asyncio.gather(
        *(api_request(app, "services", "twostops", start_id, method="DELETE") for _ in range(2))
    )
    codes = [r.code for r in responses]
    assert 200 in codes and set(codes) <= {200, 404}, [(r.code, r.body) for r in responses]
    await wait_until(lambda: not pid_alive(pid), timeout=30, message="process ended")
    await assert_forgotten(app, "twostops", start_id)


# events and flavor updates


async def test_start_sends_events_and_flavor_updates(app, fake_hub):
    body = new_body(fake_hub, "evelyn", "events")
    start_id = body["user_options"]["start_id"]
    token = body["env"]["JUPYTERHUB_API_TOKEN"]
    flavors_token = body["env"]["JUPYTERHUB_FLAVORS_UPDATE_TOKEN"]
    response = await api_request(app, "services", method="POST", body=body)
    assert response.code == 200, response.body
    host, port = json_of(response)["service"].split(":")
    assert host == "127.0.0.1" and int(port) > 0

    # events arrive while the start request is still open
    events = fake_hub.calls("event", "evelyn", "events")
    assert events, fake_hub.received
    for event in events:
        assert event["token"] == token
        assert "ready" not in event["body"]
        assert not event["body"].get("failed")
        assert event["body"].get("message") or event["body"].get("html_message")
        assert isinstance(event["body"].get("progress"), (int, float))

    # the flavor usage after the start, with the flavors token
    updates = await wait_until(
        lambda: flavor_updates_of(fake_hub, body), timeout=15, message="flavor update after start"
    )
    assert [u["body"] for u in updates] == [{}]
    assert all(u["path"].endswith("/outpostflavors/outpost-test") for u in updates)

    response = await api_request(app, "services", "events", start_id, method="DELETE")
    assert response.code == 200, response.body
    updates = await wait_until(
        lambda: flavor_updates_of(fake_hub, body)[1:], timeout=15, message="flavor update after stop"
    )
    assert [u["body"] for u in flavor_updates_of(fake_hub, body)] == [{}, {}]
    assert all(u["token"] == flavors_token for u in flavor_updates_of(fake_hub, body))
    # nothing was refused by the hub: every call carried the right token
    assert not [r for r in fake_hub.rejected if "evelyn" in r[1]]


async def test_poll_reports_exit_status_of_ended_server(app, fake_hub):
    body = new_body(fake_hub, "ender", "ends")
    start_id = body["user_options"]["start_id"]
    pid = await start_running(app, body)
    assert json_of(await poll(app, "ends", start_id)) == {"status": None}

    os.kill(pid, signal.SIGKILL)
    response = await wait_until(
        lambda: _ended_poll(app, "ends", start_id), timeout=20, message="a non-null status"
    )
    assert json_of(response)["status"] not in (None, 0)
    response = await api_request(app, "services", "ends", start_id, method="DELETE")
    assert response.code == 200, response.body
    await assert_forgotten(app, "ends", start_id)


async def _ended_poll(app, name, start_id):
    response = await poll(app, name, start_id)
    assert response.code == 200, response.body
    return response if json_of(response)["status"] is not None else None


# failed starts


async def test_failed_start_is_419_naming_the_cause(app, fake_hub):
    body = new_body(fake_hub, "fay", "broken", misc={"cmd": ["/nonexistent/program"]})
    start_id = body["user_options"]["start_id"]
    response = await api_request(app, "services", method="POST", body=body)
    assert response.code == 419, response.body
    model = json_of(response)
    assert set(model) == START_FAILURE_KEYS
    assert model["class"] == "FileNotFoundError"
    assert isinstance(model["args"], list)
    # what the OutpostSpawner shows the user: module, class and args
    shown = f"{model['module']}{model['class']}: {' - '.join(str(a) for a in model['args'])}"
    assert "/nonexistent/program" in shown, shown
    assert "FileNotFoundError" in model["traceback"]

    await assert_forgotten(app, "broken", start_id)
    updates = await wait_until(
        lambda: flavor_updates_of(fake_hub, body), timeout=15, message="flavor update"
    )
    assert [u["body"] for u in updates] == [{}]


@pytest.fixture
def asyncio_log():
    """Records of the ``asyncio`` logger (unretrieved task exceptions and the like)"""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


async def test_failed_async_start_sends_failed_event_then_flavor_update(app, fake_hub, asyncio_log):
    body = new_body(fake_hub, "fay", "broken-async", misc={"cmd": ["/nonexistent/program"]})
    start_id = body["user_options"]["start_id"]
    response = await api_request(app, "services", method="POST", body=body, headers=ASYNC)
    assert response.code == 202, response.body
    assert json_of(response) == {"service": ""}

    def failed_events():
        return [e for e in fake_hub.calls("event", "fay", "broken-async") if e["body"].get("failed")]

    [failed] = await wait_until(failed_events, timeout=20, message="a failed event")
    assert failed["token"] == body["env"]["JUPYTERHUB_API_TOKEN"]
    assert "FileNotFoundError" in failed["body"]["message"]
    assert "/nonexistent/program" in failed["body"]["message"]
    assert "ready" not in failed["body"]

    [update] = await wait_until(
        lambda: flavor_updates_of(fake_hub, body), timeout=15, message="flavor update"
    )
    assert update["body"] == {}
    assert fake_hub.received.index(update) > fake_hub.received.index(failed)
    await wait_until(
        lambda: _forgotten(app, "broken-async", start_id), timeout=15, message="record removed"
    )
    # the failure was reported once, not again as an unretrieved task exception
    gc.collect()
    assert [r.getMessage() for r in asyncio_log] == []


async def _forgotten(app, name, start_id):
    return (await poll(app, name, start_id)).code == 404 and await listing(app) == []


# a spawner whose start takes a while


@pytest.fixture(scope="module")
async def slow_app(tmp_path_factory, fake_hub):
    """An Outpost running tests.mocking.SlowStartSpawner"""
    workdir = tmp_path_factory.mktemp("slow")
    outpost = await start_outpost(
        outpost_config(workdir, spawner_class="tests.mocking.SlowStartSpawner")
    )
    outpost.workdir = workdir
    yield outpost
    await stop_outpost(outpost)


async def test_async_start_answers_at_once_then_runs(slow_app, fake_hub):
    delay = 4
    body = new_body(fake_hub, "ada", "later", misc={"start_delay": delay})
    start_id = body["user_options"]["start_id"]
    began = time.monotonic()
    response = await api_request(slow_app, "services", method="POST", body=body, headers=ASYNC)
    assert response.code == 202, response.body
    assert json_of(response) == {"service": ""}
    assert time.monotonic() - began < delay

    # pending: pollable as running, listed as pending
    assert json_of(await poll(slow_app, "later", start_id)) == {"status": None}
    [entry] = await listing(slow_app)
    assert (entry["name"], entry["start_id"], entry["start_pending"]) == ("later", start_id, True)

    async def started():
        servers = await listing(slow_app)
        return servers and not servers[0]["start_pending"]

    await wait_until(started, timeout=30, message="start no longer pending")
    [entry] = await listing(slow_app)
    assert entry["stop_pending"] is False and entry["user"] == "ada"
    [pid] = await wait_until(lambda: processes_of(body), timeout=20, message="the process")
    assert json_of(await poll(slow_app, "later", start_id)) == {"status": None}

    response = await api_request(slow_app, "services", "later", start_id, method="DELETE", headers=ASYNC)
    assert response.code == 202, response.body
    await wait_until(lambda: not pid_alive(pid), timeout=30, message="process ended")
    await wait_until(
        lambda: _forgotten(slow_app, "later", start_id), timeout=15, message="record removed"
    )


@pytest.mark.parametrize("after_launch", [False, True], ids=["before-launch", "after-launch"])
async def test_stop_during_pending_start_cancels_it(slow_app, fake_hub, after_launch):
    delay = 6
    name = "cancel-after" if after_launch else "cancel-before"
    body = new_body(
        fake_hub, "carl", name, misc={"start_delay": delay, "delay_after_launch": after_launch}
    )
    start_id = body["user_options"]["start_id"]
    began = time.monotonic()
    pending_start = asyncio.ensure_future(
        api_request(slow_app, "services", method="POST", body=body)
    )

    async def start_pending():
        servers = await listing(slow_app)
        return servers and servers[0]["start_pending"]

    await wait_until(start_pending, timeout=10, message="start pending")
    if after_launch:
        await wait_until(lambda: processes_of(body), timeout=10, message="the launched process")
    assert not pending_start.done()

    response = await api_request(slow_app, "services", name, start_id, method="DELETE")
    assert response.code == 200, response.body
    assert time.monotonic() - began < delay, "the stop waited for the start"

    start_response = await asyncio.wait_for(pending_start, timeout=10)
    assert start_response.code == 419, start_response.body
    model = json_of(start_response)
    assert set(model) == START_FAILURE_KEYS
    assert "cancel" in " ".join(str(a) for a in model["args"]).lower()

    await wait_until(lambda: not processes_of(body), timeout=20, message="no process left")
    await assert_forgotten(slow_app, name, start_id)
    assert await listing(slow_app) == []
    # the cancelled start does not launch anything later either
    remaining = began + delay + 1.5 - time.monotonic()
    if remaining > 0:
        await assert_no_process_appears(body, within=remaining)
    await assert_forgotten(slow_app, name, start_id)


async def test_async_stop_during_pending_async_start(slow_app, fake_hub):
    delay = 5
    body = new_body(fake_hub, "carl", "both-async", misc={"start_delay": delay})
    start_id = body["user_options"]["start_id"]
    began = time.monotonic()
    response = await api_request(slow_app, "services", method="POST", body=body, headers=ASYNC)
    assert response.code == 202, response.body
    response = await api_request(
        slow_app, "services", "both-async", start_id, method="DELETE", headers=ASYNC
    )
    assert response.code == 202, response.body
    await wait_until(
        lambda: _forgotten(slow_app, "both-async", start_id), timeout=15, message="record removed"
    )
    remaining = began + delay + 1.5 - time.monotonic()
    if remaining > 0:
        await assert_no_process_appears(body, within=remaining)
    assert processes_of(body) == []


async def test_start_over_start_timeout_is_419_and_leaves_nothing(slow_app, fake_hub):
    body = new_body(
        fake_hub, "tim", "too-slow",
        misc={"start_delay": 60, "delay_after_launch": True, "start_timeout": 2},
    )  # fmt: skip
    start_id = body["user_options"]["start_id"]
    began = time.monotonic()
    response = await api_request(slow_app, "services", method="POST", body=body)
    assert response.code == 419, response.body
    assert time.monotonic() - began < 30
    model = json_of(response)
    assert set(model) == START_FAILURE_KEYS
    assert model["class"] == "TimeoutError"
    assert "2" in " ".join(str(a) for a in model["args"])
    # the process it had launched is gone, and so is the record
    await wait_until(lambda: not processes_of(body), timeout=20, message="no process left")
    await assert_forgotten(slow_app, "too-slow", start_id)
