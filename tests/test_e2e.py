"""End to end: a real JupyterHub with the public OutpostSpawner drives a real
Outpost process, which runs real jupyterhub-singleuser servers.

The hub runs with ``ssh_during_startup = False`` and connects straight to
the address the Outpost answers (everything is on 127.0.0.1).
"""

import asyncio
import shutil

import pytest

from .hub import JupyterHubProcess
from .utils import (
    HUB_CREDENTIALS,
    OutpostProcess,
    api_request,
    json_of,
    wait_until,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("configurable-http-proxy") is None,
        reason="configurable-http-proxy (npm) is not installed",
    ),
]

OUTPOST_CONFIG = """
c = get_config()  # noqa
c.JupyterHubOutpost.db_url = "sqlite:///{workdir}/outpost.sqlite"
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
"""


@pytest.fixture(scope="module")
async def outpost(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e-outpost")
    process = OutpostProcess(workdir, OUTPOST_CONFIG.format(workdir=workdir))
    process.start("--log-level=DEBUG")
    yield process
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


async def test_concurrent_starts_are_ready_and_usable(hub, outpost):
    users = ["ada", "bob", "cyd"]
    await create_users(hub, *users)
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

    # several of the hub's polls (every 2 s) later the servers still run
    hub_log_before = hub.log_text().count("Communicated poll with Outpost")
    await wait_until(
        lambda: hub.log_text().count("Communicated poll with Outpost") >= hub_log_before + 6,
        timeout=30, message="hub polls",
    )
    for user in users:
        assert (await server_model(hub, user, "lab"))["ready"]

    for user in users:
        await stop_server(hub, user, "lab")
    assert [s for s in await outpost_listing(outpost) if s["name"] == "lab"] == []
