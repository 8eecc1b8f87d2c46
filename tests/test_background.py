"""Background work: runtime limits, runtime warnings, housekeeping against
the hubs' server lists, and the database lease that lets one process of
several do it.

Servers are real processes (``sleep 600`` started by
SimpleLocalProcessSpawner), found by the API token in their environment;
the hub is :class:`~tests.mocking.FakeHubAPI`.
"""

import asyncio
import secrets
import socket
import time

import pytest
from cryptography.fernet import Fernet

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import (
    key_of,
    processes_of,
    HUB_CREDENTIALS,
    api_request,
    free_port,
    json_of,
    new_db_url,
    pid_alive,
    process_config,
    query_db,
    start_body,
    tokens_of,
    wait_until,
)

SLEEP = ["sleep", "600"]
HUB_C = ("hub-c", "password-of-hub-c")


def new_body(fake_hub, flavor=None, user="rita", user_id=1):
    body = start_body(fake_hub.url, user=user, user_id=user_id,
                      user_options={"flavor": flavor} if flavor else None)  # fmt: skip
    fake_hub.tokens.update(tokens_of(body))
    return body


async def started(app, body, hub="hub-a", password=None):
    """Start; assert success and exactly one process; return its pid"""
    response = await api_request(app, "services", method="POST", body=body, hub=hub,
                                 password=password)  # fmt: skip
    assert response.code == 200, response.body
    pids = processes_of(body)
    assert len(pids) == 1, pids
    return pids[0]


async def poll(app, body, hub="hub-a", password=None):
    return await api_request(app, "services", *key_of(body), hub=hub, password=password)


async def wait_forgotten(app, body, hub="hub-a", password=None, timeout=10):
    """Wait until polling the server answers 404 (its record is gone)"""

    async def forgotten():
        return (await poll(app, body, hub=hub, password=password)).code == 404

    await wait_until(forgotten, timeout=timeout, message=f"{key_of(body)} forgotten")


async def assert_running(app, body, pid, hub="hub-a", password=None):
    assert pid_alive(pid), f"{key_of(body)} was stopped"
    response = await poll(app, body, hub=hub, password=password)
    assert response.code == 200, response.body
    assert json_of(response) == {"status": None}


def calls_with_token(fake_hub, kind, token):
    return [c for c in fake_hub.calls(kind) if c["token"] == token]


def flavor_updates_of(fake_hub, body):
    return calls_with_token(fake_hub, "flavors", body["env"]["JUPYTERHUB_FLAVORS_UPDATE_TOKEN"])


def runtime_warnings_of(fake_hub, body):
    events = calls_with_token(fake_hub, "event", body["env"]["JUPYTERHUB_API_TOKEN"])
    return [e for e in events if "will be stopped" in e["body"].get("message", "")]


# runtime limits


async def test_runtime_end_is_warned_once_then_the_server_is_stopped(tmp_path, fake_hub):
    flavors = {
        "short": {"display_name": "Short", "runtime": {"seconds": 5}},
        "endless": {"display_name": "Endless"},
    }
    cfg = outpost_config(tmp_path, spawner_cmd=SLEEP, flavors=flavors, cleanup_interval=0.5,
                         runtime_warning=3)  # fmt: skip
    app = await start_outpost(cfg)
    try:
        short, endless = new_body(fake_hub, "short"), new_body(fake_hub, "endless", user_id=2)
        began = time.monotonic()
        short_pid = await started(app, short)
        endless_pid = await started(app, endless)

        [warning] = await wait_until(lambda: runtime_warnings_of(fake_hub, short), timeout=10,
                                     message="the runtime warning")  # fmt: skip
        assert warning["path"].endswith("/users/progress/events/rita")
        message = warning["body"]["message"]
        assert "will be stopped in 1 minute," in message and "flavor short" in message, message
        assert "failed" not in warning["body"] and "ready" not in warning["body"]

        await wait_until(lambda: not pid_alive(short_pid), timeout=20, message="the end of runtime")
        assert time.monotonic() - began >= 4.5
        await wait_forgotten(app, short)
        # the hub hears of the freed place: start, then stop
        updates = await wait_until(lambda: flavor_updates_of(fake_hub, short)[1:], timeout=10,
                                   message="the flavor update after the stop")  # fmt: skip
        assert updates[0]["body"]["short"]["current"] == 0
        assert updates[0]["body"]["endless"]["current"] == 1
        # the warning came before the stop, and only once
        received = fake_hub.received
        assert received.index(warning) < received.index(updates[0])
        assert runtime_warnings_of(fake_hub, short) == [warning]
        # a flavor without runtime: neither warned nor stopped
        await assert_running(app, endless, endless_pid)
        assert runtime_warnings_of(fake_hub, endless) == []
    finally:
        await stop_outpost(app)


# one process of several does the background work


TAKING_OVER = "Taking over the background work"


def lease_owner(db_url):
    rows = query_db(db_url, "SELECT owner FROM leases WHERE name = 'background'")
    return rows and rows[0][0]


@pytest.mark.slow
async def test_one_process_does_background_work_and_another_takes_over(
    tmp_path, fake_hub, processes
):
    db_path = str(tmp_path / "shared.sqlite")
    config = process_config(
        tmp_path, db_path=db_path, cmd=SLEEP, cleanup_interval=0.5, lease_ttl=3.0,
        runtime_warning=0.0, flavors={"short": {"runtime": {"seconds": 4}}},
    )  # fmt: skip
    env = {"OUTPOST_CRYPT_KEY": Fernet.generate_key().decode()}
    one = processes(tmp_path / "one", config_text=config, extra_env=env)
    two = processes(tmp_path / "two", config_text=config, extra_env=env)
    await asyncio.to_thread(one.start)
    await asyncio.to_thread(two.start)

    def holders():
        return [p for p in (one, two) if TAKING_OVER in p.log_text()]

    [holder] = await wait_until(holders, timeout=10, message="a process taking over")
    [survivor] = [p for p in (one, two) if p is not holder]
    shared_db_url = new_db_url(tmp_path, "shared.sqlite")  # process_config's database
    owner = lease_owner(shared_db_url)
    assert owner.startswith(f"{socket.gethostname()}-{holder.proc.pid}-"), owner

    # a server with a short runtime, started by the process that will die
    body = new_body(fake_hub, "short")
    processes.tokens.add(body["env"]["JUPYTERHUB_API_TOKEN"])
    pid = await started(holder, body)
    await wait_until(lambda: flavor_updates_of(fake_hub, body), timeout=10,
                     message="the flavor update after the start")  # fmt: skip
    assert holders() == [holder]
    await asyncio.to_thread(holder.kill9)
    assert pid_alive(pid)

    # the survivor takes over once the lease expired, and ends the runtime
    await wait_until(lambda: TAKING_OVER in survivor.log_text(), timeout=15,
                     message="the survivor taking over")  # fmt: skip
    assert lease_owner(shared_db_url).startswith(f"{socket.gethostname()}-{survivor.proc.pid}-")
    await wait_until(lambda: not pid_alive(pid), timeout=20, message="the end of runtime")
    await wait_forgotten(survivor, body)
    log = survivor.log_text()
    assert "runtime ended; stopping" in log and "Process %i never died" % pid not in log
    assert "runtime ended" not in holder.log_text()
    updates = await wait_until(lambda: flavor_updates_of(fake_hub, body)[1:], timeout=10,
                               message="the flavor update after the stop")  # fmt: skip
    assert updates[0]["body"]["short"]["current"] == 0

    await asyncio.to_thread(survivor.terminate)
    assert survivor.proc.returncode == 0


# housekeeping: servers a hub no longer knows


def listed_name(body):
    """How the OutpostSpawner's server list names a server"""
    env = body["env"]
    return "{}_{}_{}".format(env["JUPYTERHUB_USER_ID"], *key_of(body))


async def test_housekeeping_stops_only_what_the_hub_does_not_know(tmp_path, fake_hub):
    token_a, token_b = secrets.token_hex(16), secrets.token_hex(16)
    fake_hub.list_tokens.update({token_a, token_b})
    closed = f"http://127.0.0.1:{free_port()}/hub/api"
    hub_api = {
        "hub-a": {"url": fake_hub.url, "token": token_a, "housekeeping": {"interval": 0, "grace": 0}},
        "hub-b": {"url": fake_hub.url, "token": token_b, "housekeeping": {"interval": 0, "grace": 600}},
        "hub-c": {"url": closed, "token": "anything", "housekeeping": {"interval": 0, "grace": 0}},
    }
    cfg = outpost_config(
        tmp_path, spawner_cmd=SLEEP, cleanup_interval=0.5, hub_api=hub_api,
        hub_credentials={**HUB_CREDENTIALS, HUB_C[0]: HUB_C[1]},
    )  # fmt: skip
    fake_hub.list_status = 500  # the hub cannot say, at first
    app = await start_outpost(cfg)

    def rounds():
        """Server lists hub-a's housekeeping asked for so far"""
        return len(calls_with_token(fake_hub, "servers", token_a))

    async def more_rounds(n):
        target = rounds() + n
        await wait_until(lambda: rounds() >= target, timeout=15, message=f"{n} housekeeping rounds")

    try:
        known, unknown = new_body(fake_hub, user_id=1), new_body(fake_hub, user_id=2)
        young = new_body(fake_hub, user_id=1)
        lonely = new_body(fake_hub, user_id=1)
        known_pid, unknown_pid = await started(app, known), await started(app, unknown)
        young_pid = await started(app, young, hub="hub-b")
        lonely_pid = await started(app, lonely, *HUB_C)

        # while the list is unavailable (500, or nothing listens), nothing is stopped
        await more_rounds(3)
        await assert_running(app, known, known_pid)
        await assert_running(app, unknown, unknown_pid)

        fake_hub.server_list = [listed_name(known), "99_other_0123"]
        fake_hub.list_status = 200
        await wait_until(lambda: not pid_alive(unknown_pid), timeout=15,
                         message="the unknown server to be stopped")  # fmt: skip
        await wait_forgotten(app, unknown)
        assert len(await wait_until(lambda: flavor_updates_of(fake_hub, unknown)[1:],
                                    timeout=10, message="update")) == 1  # fmt: skip

        await more_rounds(3)
        await assert_running(app, known, known_pid)  # listed
        await assert_running(app, young, young_pid, hub="hub-b")  # within grace
        await assert_running(app, lonely, lonely_pid, *HUB_C)  # its hub unreachable
    finally:
        fake_hub.list_status, fake_hub.server_list = 200, []
        await stop_outpost(app)
