"""Crash and restart: single-user servers outlive the Outpost process.

A real ``jupyterhub-outpost`` process starts real ``jupyterhub-singleuser``
servers (SimpleLocalProcessSpawner), is killed with SIGKILL or stopped with
SIGTERM, and a new process on the same database and working directory must
poll, list and stop the servers the old one started.
"""

import asyncio
import os
import signal

import pytest
from cryptography.fernet import Fernet

from .utils import (
    server_answers,
    OutpostProcess,
    api_request,
    json_of,
    new_db_url,
    pid_alive,
    kill_servers_of,
    pids_with_env,
    start_body,
    stored_bytes,
    tokens_of,
    wait_until,
)

pytestmark = pytest.mark.slow

CONFIG = """
c = get_config()  # noqa
c.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.JupyterHubOutpost.db_url = "{db_url}"
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
c.SimpleLocalProcessSpawner.home_dir_template = "{workdir}/home-{{username}}"
c.Spawner.ip = "127.0.0.1"
c.Spawner.args = ["--ServerApp.allow_root=True"]  # the test machines run as root
c.Spawner.start_timeout = 60
c.HubClient.retries = 0
c.HubClient.request_timeout = 5
"""


@pytest.fixture
def singleuser_tokens():
    """API tokens of the servers a test starts; their processes die at teardown"""
    tokens = set()
    yield tokens
    kill_servers_of(tokens)


@pytest.fixture
def outposts():
    """Make OutpostProcess objects; every one still running is ended at teardown"""
    made = []

    def make(workdir, **kwargs):
        config = CONFIG.format(workdir=workdir, db_url=new_db_url(workdir))
        process = OutpostProcess(workdir, config, **kwargs)
        made.append(process)
        return process

    yield make
    for process in made:
        process.end()


async def start_servers(outpost, fake_hub, tokens, names):
    """Start one real server per (user, name) at once; return their details.

    Each is a dict with ``body``, ``name``, ``start_id``, ``address`` and the
    ``pid`` of its jupyterhub-singleuser process, which answers HTTP.
    """
    bodies = []
    for i, (user, name) in enumerate(names):
        body = start_body(fake_hub.url, user=user, user_id=100 + i, name=name)
        fake_hub.tokens.update(tokens_of(body))
        tokens.add(body["env"]["JUPYTERHUB_API_TOKEN"])
        bodies.append(body)
    responses = await asyncio.gather(
        *(api_request(outpost, "services", method="POST", body=b) for b in bodies)
    )
    servers = []
    for body, response in zip(bodies, responses):
        assert response.code == 200, response.body
        address = json_of(response)["service"]
        prefix = body["env"]["JUPYTERHUB_SERVICE_PREFIX"]
        await wait_until(lambda: server_answers(address, prefix), timeout=60,
                         message=f"singleuser at {address}")
        pids = pids_with_env("JUPYTERHUB_API_TOKEN", body["env"]["JUPYTERHUB_API_TOKEN"])
        assert len(pids) == 1, pids
        servers.append({
            "body": body,
            "name": body["name"],
            "start_id": body["user_options"]["start_id"],
            "address": address,
            "prefix": prefix,
            "pid": pids[0],
        })  # fmt: skip
    return servers


async def poll(outpost, server):
    return await api_request(outpost, "services", server["name"], server["start_id"])


async def listed(outpost):
    response = await api_request(outpost, "services")
    assert response.code == 200, response.body
    return {(s["name"], s["start_id"]) for s in json_of(response)}


async def stop_and_check_gone(outpost, server):
    """DELETE a server: 200, its process ends, its record is gone (404)"""
    response = await api_request(outpost, "services", server["name"], server["start_id"],
                                 method="DELETE")
    assert response.code == 200, response.body
    await wait_until(lambda: not pid_alive(server["pid"]), timeout=30,
                     message=f"process {server['pid']} to end")
    assert (await poll(outpost, server)).code == 404


async def test_servers_survive_kill9_and_are_managed_after_restart(
    tmp_path, fake_hub, outposts, singleuser_tokens
):
    outpost = outposts(tmp_path)
    await asyncio.to_thread(outpost.start)
    updates_before = len(fake_hub.calls("flavors"))
    servers = await start_servers(
        outpost, fake_hub, singleuser_tokens,
        [("alice", "crash-one"), ("bob", "crash-two"), ("carol", "")],
    )  # fmt: skip
    assert await listed(outpost) == {(s["name"], s["start_id"]) for s in servers}
    # the flavor usage has reached the hub (starts in a burst share updates)
    await wait_until(lambda: len(fake_hub.calls("flavors")) > updates_before, timeout=10,
                     message="flavor updates")

    await asyncio.to_thread(outpost.kill9)
    assert outpost.proc.returncode == -signal.SIGKILL
    for server in servers:
        assert pid_alive(server["pid"])
        assert await server_answers(server["address"], server["prefix"])

    # the crash left the records readable, but no token in clear text
    raw = stored_bytes(new_db_url(tmp_path))  # SQLite: the files
    assert b"crash-one" in raw  # the right file: names are not secret
    for server in servers:
        for token in tokens_of(server["body"]):
            assert token.encode() not in raw
            assert token not in outpost.log_text()

    # one server dies while no Outpost is running
    alive, dead = servers[:2], servers[2]
    os.kill(dead["pid"], signal.SIGKILL)
    await wait_until(lambda: not pid_alive(dead["pid"]), timeout=10, message="victim gone")

    await asyncio.to_thread(outpost.start)
    assert "Using the encryption key in" in outpost.log_text()
    assert os.stat(tmp_path / "jupyterhub_outpost_crypt_key").st_mode & 0o777 == 0o600

    for server in alive:
        response = await poll(outpost, server)
        assert response.code == 200, response.body
        assert json_of(response) == {"status": None}
    response = await poll(outpost, dead)
    assert response.code == 200, response.body
    assert json_of(response)["status"] is not None
    assert await listed(outpost) == {(s["name"], s["start_id"]) for s in servers}

    assert all(pid_alive(server["pid"]) for server in alive)
    await asyncio.gather(*(stop_and_check_gone(outpost, server) for server in alive))
    # the hub stops a server whose poll returned a status
    await stop_and_check_gone(outpost, dead)
    assert await listed(outpost) == set()

    await asyncio.to_thread(outpost.terminate)
    assert outpost.proc.returncode == 0


async def test_graceful_restart_keeps_servers_and_rotates_keys(
    tmp_path, fake_hub, outposts, singleuser_tokens
):
    old_key = Fernet.generate_key().decode()
    outpost = outposts(tmp_path, extra_env={"OUTPOST_CRYPT_KEY": old_key})
    await asyncio.to_thread(outpost.start)
    (server,) = await start_servers(outpost, fake_hub, singleuser_tokens, [("dave", "calm")])

    await asyncio.to_thread(outpost.terminate)
    assert outpost.proc.returncode == 0
    assert "running servers keep running" in outpost.log_text()
    assert pid_alive(server["pid"])
    assert await server_answers(server["address"], server["prefix"])
    # the key came from the environment: no key file was generated
    assert not os.path.exists(tmp_path / "jupyterhub_outpost_crypt_key")

    # a restart with the wrong key cannot tell the server's status: 5xx, so
    # that the hub keeps the server (a status or a 404 would make it forget)
    outpost.env["OUTPOST_CRYPT_KEY"] = Fernet.generate_key().decode()
    await asyncio.to_thread(outpost.start)
    response = await poll(outpost, server)
    assert response.code >= 500, response.body
    assert await listed(outpost) == {(server["name"], server["start_id"])}
    await asyncio.to_thread(outpost.terminate)
    assert pid_alive(server["pid"])

    # rotation: a new key in front, the old one still decrypts
    outpost.env["OUTPOST_CRYPT_KEY"] = f"{Fernet.generate_key().decode()};{old_key}"
    await asyncio.to_thread(outpost.start)
    response = await poll(outpost, server)
    assert response.code == 200, response.body
    assert json_of(response) == {"status": None}
    await stop_and_check_gone(outpost, server)
    await asyncio.to_thread(outpost.terminate)
    assert outpost.proc.returncode == 0
