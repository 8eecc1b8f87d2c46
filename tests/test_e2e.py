"""End to end: a real JupyterHub with the public OutpostSpawner drives a real
Outpost process, which runs real jupyterhub-singleuser servers.

The hub runs with ``ssh_during_startup = False`` and connects straight to
the address the Outpost answers (everything is on 127.0.0.1).
"""

import asyncio
import time

import pytest

from .hub import JupyterHubProcess
from .utils import (
    needs_hub_proxy,
    HUB_CREDENTIALS,
    OutpostProcess,
    api_request,
    database_independent,
    json_of,
    new_db_url,
    pids_with_env,
    wait_until,
)

pytestmark = [
    pytest.mark.e2e,
    needs_hub_proxy,
]

OUTPOST_CONFIG = """
c = get_config()  # noqa
c.JupyterHubOutpost.db_url = "{db_url}"
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
c.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.JupyterHubOutpost.pending_timeout = 30
c.SimpleLocalProcessSpawner.home_dir_template = "{workdir}/home-{{username}}"
c.Spawner.ip = "127.0.0.1"
c.Spawner.args = ["--ServerApp.allow_root=True"]  # the test machines run as root
c.Spawner.start_timeout = 60

def allow_override(hub_name, misc):
    # memory limits are the operator's business
    return "mem_limit" not in misc

c.JupyterHubOutpost.allow_override = allow_override
# the traits the tests' hub users set through misc (the hook decides on mem_limit)
c.JupyterHubOutpost.allowed_overrides = ["cmd", "mem_limit"]
"""


@pytest.fixture(scope="module")
async def outpost(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e-outpost")
    config = OUTPOST_CONFIG.format(workdir=workdir, db_url=new_db_url(workdir))
    process = OutpostProcess(workdir, config)
    process.start("--log-level=DEBUG")
    yield process
    # servers outlive the Outpost by design: stop what a failed test left
    for hub_name in ("hub-a", "hub-b"):
        for server in await outpost_listing(process, hub_name):
            await api_request(process, "services", server["name"], server["start_id"],
                              hub=hub_name, method="DELETE")
    process.terminate()


def outpost_url(outpost):
    return f"http://127.0.0.1:{outpost.port}/services/"


@pytest.fixture(scope="module")
async def hub(tmp_path_factory, outpost):
    workdir = tmp_path_factory.mktemp("e2e-hub")
    process = JupyterHubProcess(workdir, outpost_url(outpost), "hub-a", HUB_CREDENTIALS["hub-a"])
    process.start()
    yield process
    process.stop()
    process.kill_proxy()


async def create_users(hub, *names):
    code, _ = await hub.api("users", method="POST", body={"usernames": list(names)})
    assert code in (201, 409)


async def start_server(hub, user, server, options=None):
    code, data = await hub.api(f"users/{user}/servers/{server}", method="POST", body=options or {})
    return code, data


async def server_model(hub, user, server):
    code, data = await hub.api(f"users/{user}")
    assert code == 200, (code, data)
    return data.get("servers", {}).get(server)


async def wait_ready(hub, user, server, timeout=90):
    async def ready():
        model = await server_model(hub, user, server)
        return model is not None and model.get("ready")

    await wait_until(ready, timeout=timeout, message=f"{user}/{server} ready at the hub")


async def running_server(hub, user):
    """User ``user`` with a ready server "lab" (through the real OutpostSpawner)"""
    await create_users(hub, user)
    await start_server(hub, user, "lab")
    await wait_ready(hub, user, "lab")


async def wait_gone(hub, user, server, timeout=60):
    async def gone():
        return await server_model(hub, user, server) is None

    await wait_until(gone, timeout=timeout, message=f"{user}/{server} gone at the hub")


async def outpost_listing(outpost, hub_name="hub-a"):
    response = await api_request(outpost, "services", hub=hub_name)
    assert response.code == 200
    return json_of(response)


async def stop_server(hub, user, server):
    code, data = await hub.api(f"users/{user}/servers/{server}", method="DELETE")
    assert code in (202, 204), (code, data)
    await wait_gone(hub, user, server)


@database_independent  # the hub's side of the protocol; restarts and crashes run on both
async def test_concurrent_starts_are_ready_and_usable(hub, outpost):
    users = ["ada", "bob", "cyd"]
    await create_users(hub, *users)
    updates = flavor_updates(hub)
    results = await asyncio.gather(*(start_server(hub, u, "lab") for u in users))
    assert all(code in (201, 202) for code, _ in results), results
    progress = [asyncio.ensure_future(hub.progress(u, "lab")) for u in users]
    for user, stream in zip(users, progress):
        events = await stream
        assert events and events[-1].get("ready") is True, events
        messages = " ".join(str(e.get("message", "")) for e in events)
        assert "Outpost: starting the server" in messages, events
    for user in users:
        await wait_ready(hub, user, "lab")
        token = await hub.user_token(user)
        response = await hub.proxied(f"/user/{user}/lab/api/status", token)
        assert response.code == 200, response.body
        me = await hub.proxied(f"/user/{user}/lab/api/me", token)
        assert me.code == 200 and b'"' + user.encode() + b'"' in me.body
    listing = await outpost_listing(outpost)
    assert sorted(s["user"] for s in listing if s["name"] == "lab") == users
    # the Outpost reported its flavor usage after the starts (a burst shares updates)
    await wait_until(lambda: flavor_updates(hub) > updates, timeout=20, message="usage")

    # several of the hub's polls (every 2 s) later the servers still run
    hub_log_before = hub.log_text().count("Communicated poll with Outpost")
    await wait_until(
        lambda: hub.log_text().count("Communicated poll with Outpost") >= hub_log_before + 6,
        timeout=30, message="hub polls",
    )
    for user in users:
        assert (await server_model(hub, user, "lab"))["ready"]

    updates = flavor_updates(hub)
    for user in users:
        await stop_server(hub, user, "lab")
    assert [s for s in await outpost_listing(outpost) if s["name"] == "lab"] == []
    for user in users:
        await wait_until(lambda: singleuser_pids(user, hub) == [], timeout=30, message="exit")
    await wait_until(lambda: flavor_updates(hub) > updates, timeout=20, message="usage")


def singleuser_pids(user, hub):
    """pids of running jupyterhub-singleuser processes of ``user`` at ``hub``"""
    at_hub = set(pids_with_env("JUPYTERHUB_API_URL", hub.api_url))
    return [
        pid
        for pid in pids_with_env("JUPYTERHUB_USER", user)
        if pid in at_hub and b"jupyterhub-singleuser" in _cmdline(pid)
    ]


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def flavor_updates(hub):
    return hub.log_text().count("POST /hub/api/outpostflavors/outpost-e2e")


async def last_event_text(events):
    return " ".join(f"{e.get('message', '')} {e.get('html_message', '')}" for e in events)


@database_independent  # the hub's side of the protocol; restarts and crashes run on both
async def test_failed_start_names_the_cause_and_leaves_nothing(hub, outpost):
    await create_users(hub, "dan")
    updates = flavor_updates(hub)
    code, _ = await start_server(hub, "dan", "broken", {"misc": {"cmd": ["/nonexistent/singleuser"]}})
    assert code in (201, 202)
    events = await hub.progress("dan", "broken")
    assert events and events[-1].get("failed") is True, events
    assert "/nonexistent/singleuser" in await last_event_text(events), events
    await wait_gone(hub, "dan", "broken")
    assert [s for s in await outpost_listing(outpost) if s["name"] == "broken"] == []
    await wait_until(lambda: flavor_updates(hub) > updates, timeout=20, message="flavor update")


@database_independent  # the hub's side of the protocol; restarts and crashes run on both
async def test_a_server_that_exits_at_once_tells_the_user_why(hub, outpost):
    await create_users(hub, "ian")
    dies = ["sh", "-c", "echo 'Running as root is not recommended. Use --allow-root to bypass.' >&2; exit 1"]
    began = time.monotonic()
    code, _ = await start_server(hub, "ian", "lab", {"misc": {"cmd": dies}})
    assert code in (201, 202)
    events = await hub.progress("ian", "lab")
    elapsed = time.monotonic() - began
    # the server's own words, then the hub's poll ends the start
    assert events and events[-1].get("failed") is True, events
    text = await last_event_text(events)
    assert "exited with status 1" in text and "Use --allow-root to bypass" in text, events
    # well before the hub would have given up waiting for an answer (60 s here)
    assert elapsed < 15, elapsed
    print(f"\nstart request -> the user's failed event with the server's output: {elapsed:.1f} s")
    await wait_gone(hub, "ian", "lab")
    assert [s for s in await outpost_listing(outpost) if s["user"] == "ian"] == []


@database_independent  # the hub's side of the protocol; restarts and crashes run on both
async def test_refused_override_is_shown_to_the_user(hub, outpost):
    await create_users(hub, "eve")
    code, _ = await start_server(hub, "eve", "big", {"misc": {"mem_limit": "64G"}})
    assert code in (201, 202)
    events = await hub.progress("eve", "big")
    assert events and events[-1].get("failed") is True, events
    text = await last_event_text(events)
    assert "refused" in text and "mem_limit" in text, events
    await wait_gone(hub, "eve", "big")
    assert [s for s in await outpost_listing(outpost) if s["name"] == "big"] == []
    assert singleuser_pids("eve", hub) == []


async def test_hub_restart_keeps_servers(hub, outpost):
    await running_server(hub, "fay")
    pids = singleuser_pids("fay", hub)
    assert len(pids) == 1

    hub.stop()
    hub.start()
    await wait_ready(hub, "fay", "lab", timeout=60)
    token = await hub.user_token("fay")
    response = await hub.proxied("/user/fay/lab/api/status", token)
    assert response.code == 200, response.body
    assert singleuser_pids("fay", hub) == pids
    await stop_server(hub, "fay", "lab")
    await wait_until(lambda: singleuser_pids("fay", hub) == [], timeout=30, message="process ended")


async def test_outpost_crash_keeps_servers_pollable_and_stoppable(hub, outpost):
    await running_server(hub, "gus")
    pids = singleuser_pids("gus", hub)
    assert len(pids) == 1

    outpost.kill9()
    outpost.start("--log-level=DEBUG")
    # the hub keeps polling (every 2 s) and keeps the server
    polls = hub.log_text().count("Communicated poll with Outpost")
    await wait_until(
        lambda: hub.log_text().count("Communicated poll with Outpost") >= polls + 3,
        timeout=30, message="hub polls after the restart",
    )
    assert (await server_model(hub, "gus", "lab"))["ready"]
    token = await hub.user_token("gus")
    assert (await hub.proxied("/user/gus/lab/api/status", token)).code == 200

    await stop_server(hub, "gus", "lab")
    await wait_until(lambda: singleuser_pids("gus", hub) == [], timeout=30, message="process ended")
    assert await outpost_listing(outpost) == []


@database_independent  # the hub's side of the protocol; restarts and crashes run on both
async def test_server_ended_at_the_outpost_is_noticed_by_the_hub(hub, outpost):
    await running_server(hub, "hal")
    (record,) = [s for s in await outpost_listing(outpost) if s["user"] == "hal"]
    response = await api_request(outpost, "services", "lab", record["start_id"], method="DELETE")
    assert response.code == 200
    await wait_gone(hub, "hal", "lab", timeout=30)
    assert singleuser_pids("hal", hub) == []


ASYNC_HUB_EXTRA = """
# start in the background at the Outpost; the hub then finds the server at
# the port it chose itself, on the loopback interface
c.OutpostSpawner.custom_misc = lambda spawner, user_options: {"port": spawner.port}
c.OutpostSpawner.update_expected_path = lambda spawner, url: f"http://127.0.0.1:{spawner.port}"
"""


@pytest.fixture(scope="module")
async def async_hub(tmp_path_factory, outpost):
    """A second hub, with its own credentials, starting and stopping asynchronously"""
    workdir = tmp_path_factory.mktemp("e2e-hub-b")
    process = JupyterHubProcess(
        workdir, outpost_url(outpost), "hub-b", HUB_CREDENTIALS["hub-b"],
        start_async=True, stop_async=True,
    )
    with open(process.config_path, "a") as f:
        f.write(ASYNC_HUB_EXTRA)
    process.start()
    yield process
    process.stop()
    process.kill_proxy()


@database_independent  # the hub's side of the protocol; restarts and crashes run on both
async def test_two_hubs_async_and_isolated(hub, async_hub, outpost):
    await create_users(hub, "ida")
    await create_users(async_hub, "ida")
    await start_server(hub, "ida", "lab")
    code, _ = await start_server(async_hub, "ida", "lab")
    assert code in (201, 202)
    events = await async_hub.progress("ida", "lab")
    assert events and events[-1].get("ready") is True, events
    await wait_ready(hub, "ida", "lab")
    await wait_ready(async_hub, "ida", "lab")
    for each in (hub, async_hub):
        token = await each.user_token("ida")
        assert (await each.proxied("/user/ida/lab/api/status", token)).code == 200

    listing_a = await outpost_listing(outpost, "hub-a")
    listing_b = await outpost_listing(outpost, "hub-b")
    assert [s["user"] for s in listing_a] == ["ida"]
    assert [s["user"] for s in listing_b] == ["ida"]
    assert listing_a[0]["start_id"] != listing_b[0]["start_id"]
    # hub-b cannot see or stop hub-a's server
    response = await api_request(outpost, "services", "lab", listing_a[0]["start_id"], hub="hub-b")
    assert response.code == 404
    response = await api_request(
        outpost, "services", "lab", listing_a[0]["start_id"], hub="hub-b", method="DELETE"
    )
    assert response.code == 404
    assert len(singleuser_pids("ida", hub)) == 1
    assert len(singleuser_pids("ida", async_hub)) == 1

    await stop_server(async_hub, "ida", "lab")
    await wait_until(lambda: singleuser_pids("ida", async_hub) == [], timeout=30, message="b's server ended")
    assert len(singleuser_pids("ida", hub)) == 1

    async def b_forgotten():
        return await outpost_listing(outpost, "hub-b") == []

    # an asynchronous stop forgets the record just after the process ended
    await wait_until(b_forgotten, timeout=30, message="hub-b's record gone")
    assert (await server_model(hub, "ida", "lab"))["ready"]
    await stop_server(hub, "ida", "lab")
    await wait_until(lambda: singleuser_pids("ida", hub) == [], timeout=30, message="a's server ended")
