"""Tunnels come back after a restart: the hubs are asked to rebuild them.

A real ``jupyterhub-outpost`` process starts real processes (``sleep``
through SimpleLocalProcessSpawner: the start answer is their address), is
killed with SIGKILL, and restarted on the same database, as systemd would.
The new process asks the (fake) hub to rebuild each running server's SSH
port forward, as the hub's ``JUPYTERHUB_SETUPTUNNEL_URL`` expects it.
"""

import asyncio
import secrets
import time

import pytest

from .utils import (
    api_request,
    database_independent,
    json_of,
    key_of,
    process_config,
    process_env,
    start_body,
    tokens_of,
    wait_until,
)

pytestmark = pytest.mark.slow

SLEEP = ["sleep", "600"]


@pytest.fixture(autouse=True)
def _reset_fake_hub(fake_hub):
    """Each test starts with a hub that answers every call at once"""
    yield
    fake_hub.failures.clear()
    fake_hub.delays.clear()


def make_outpost(processes, workdir, extra="", **traits):
    """An Outpost process whose background rounds come every second"""
    traits = {"cleanup_interval": 1.0, "lease_ttl": 3.0, **traits}
    config = process_config(workdir, cmd=SLEEP, **traits) + extra
    env = process_env()
    process = processes(workdir, config_text=config, extra_env=env)
    process.start()
    return process


async def start_servers(outpost, fake_hub, tokens, names, hub="hub-a"):
    """Start one server per (user, name); return ``{path suffix: (body, address)}``"""
    started = {}
    for user, name in names:
        body = start_body(fake_hub.url, user=user, user_id=abs(hash(user)) % 10000, name=name)
        fake_hub.tokens.update(tokens_of(body))
        tokens.add(body["env"]["JUPYTERHUB_API_TOKEN"])
        response = await api_request(outpost, "services", method="POST", body=body, hub=hub)
        assert response.code == 200, response.body
        suffix = f"/{user}/{name}" if name else f"/{user}"
        started[suffix] = (body, json_of(response)["service"])
    return started


def tunnel_calls(fake_hub, servers):
    """The setuptunnel calls the hub got for ``servers``, by path suffix"""
    calls = {}
    for call in fake_hub.calls("setuptunnel"):
        for suffix in servers:
            if call["path"].endswith("/setuptunnel" + suffix):
                calls.setdefault(suffix, []).append(call)
    return calls


async def restart(outpost):
    await asyncio.to_thread(outpost.kill9)
    began = time.monotonic()
    await asyncio.to_thread(outpost.start)
    return began


def users(prefix, n):
    return [(f"{prefix}{i}", "" if i % 2 else f"srv{i}") for i in range(n)]


async def test_kill9_restart_asks_hub_to_rebuild_each_running_tunnel(tmp_path, fake_hub, processes):
    outpost = make_outpost(processes, tmp_path, ssh_recreate_at_start=True)
    servers = await start_servers(outpost, fake_hub, processes.tokens, users("tun", 16))
    servers.update(
        await start_servers(outpost, fake_hub, processes.tokens, users("tunb", 4), hub="hub-b")
    )
    # a server stopped before the crash is not running: no tunnel for it
    (stopped_suffix, (stopped, _)) = next(iter(servers.items()))
    response = await api_request(outpost, "services", *key_of(stopped), method="DELETE")
    assert response.code == 200, response.body
    running = {k: v for k, v in servers.items() if k != stopped_suffix}
    assert len(running) == 19
    assert tunnel_calls(fake_hub, servers) == {}  # nothing ran at the first start

    began = await restart(outpost)
    await wait_until(lambda: len(tunnel_calls(fake_hub, running)) == len(running), timeout=30,
                     message="a setuptunnel call per running server")  # fmt: skip
    elapsed = time.monotonic() - began
    print(f"\nrestart -> every setuptunnel answered ({len(running)} servers): {elapsed:.2f}s")
    await wait_until(lambda: "Tunnels rebuilt in" in outpost.log_text(), timeout=10,
                     message="the summary")  # fmt: skip

    calls = tunnel_calls(fake_hub, servers)
    assert stopped_suffix not in calls
    for suffix, (body, address) in running.items():
        (call,) = calls[suffix]  # one each
        assert call["token"] == body["env"]["JUPYTERHUB_API_TOKEN"]
        assert call["body"] == {"service": address}
        assert call["status"] == 204
    log = outpost.log_text()
    assert "hub-a 15 done" in log and "hub-b 4 done" in log
    for body, _ in servers.values():
        for token in tokens_of(body):
            assert token not in log

    # a graceful restart asks again, once
    await asyncio.to_thread(outpost.terminate)
    await asyncio.to_thread(outpost.start)
    await wait_until(lambda: all(len(c) == 2 for c in tunnel_calls(fake_hub, running).values()),
                     timeout=30, message="a second call per server")  # fmt: skip


@database_independent  # what is asked of the hub; the lease's part runs on both
async def test_retries_with_backoff_until_the_hub_answers(tmp_path, fake_hub, processes):
    outpost = make_outpost(processes, tmp_path, ssh_recreate_at_start=True,
                           ssh_recreate_retries=3, ssh_recreate_backoff=0.5)  # fmt: skip
    servers = await start_servers(outpost, fake_hub, processes.tokens, [("retry", "")])
    fake_hub.failures["setuptunnel"] = (2, 503)
    await restart(outpost)
    await wait_until(lambda: len(tunnel_calls(fake_hub, servers).get("/retry", [])) == 3,
                     timeout=30, message="three tries")  # fmt: skip
    calls = tunnel_calls(fake_hub, servers)["/retry"]
    assert [c["status"] for c in calls] == [503, 503, 204]
    gaps = [b["time"] - a["time"] for a, b in zip(calls, calls[1:])]
    # 0.5 s, then 1 s (each plus up to a quarter)
    assert 0.5 <= gaps[0] < 1.0 and 1.0 <= gaps[1] < 1.8, gaps
    await wait_until(lambda: "rebuilt (204 after 3 tries)" in outpost.log_text(), timeout=10,
                     message="the outcome in the log")  # fmt: skip
    assert "setuptunnel to" in outpost.log_text() and "try 2 of 4" in outpost.log_text()


@database_independent  # what is asked of the hub; the lease's part runs on both
async def test_bounded_retries_and_final_refusals(tmp_path, fake_hub, processes):
    outpost = make_outpost(processes, tmp_path, ssh_recreate_at_start=True,
                           ssh_recreate_retries=2, ssh_recreate_backoff=0.2)  # fmt: skip
    down = await start_servers(outpost, fake_hub, processes.tokens, [("down", "")])
    refused = await start_servers(outpost, fake_hub, processes.tokens, [("gone", "")], hub="hub-b")
    fake_hub.failures["setuptunnel"] = (100, 503)
    await asyncio.to_thread(outpost.kill9)
    # the hub no longer takes the token of hub-b's server: 403 is final, never retried
    fake_hub.tokens.discard(refused["/gone"][0]["env"]["JUPYTERHUB_API_TOKEN"])
    await asyncio.to_thread(outpost.start)
    await wait_until(lambda: "Tunnels rebuilt in" in outpost.log_text(), timeout=30,
                     message="the summary")  # fmt: skip
    assert len(tunnel_calls(fake_hub, down)["/down"]) == 3  # a try and 2 retries
    assert [kind for kind, _ in fake_hub.rejected].count("setuptunnel") == 1
    log = outpost.log_text()
    assert "not rebuilt: no answer after 3 tries (last: 503)" in log
    assert "not rebuilt: the hub answered 403" in log
    assert "hub-a 1 failed" in log and "hub-b 1 refused" in log


ONLY_HUB_A = """
async def only_hub_a(hub_name):
    return hub_name == "hub-a"

c.JupyterHubOutpost.ssh_recreate_at_start = only_hub_a
"""


@database_independent  # what is asked of the hub; the lease's part runs on both
async def test_switched_off_per_hub_by_a_callable(tmp_path, fake_hub, processes):
    outpost = make_outpost(processes, tmp_path, extra=ONLY_HUB_A)
    on = await start_servers(outpost, fake_hub, processes.tokens, [("ona", "")])
    off = await start_servers(outpost, fake_hub, processes.tokens, [("offb", "")], hub="hub-b")
    await restart(outpost)
    await wait_until(lambda: "Tunnels rebuilt in" in outpost.log_text(), timeout=30,
                     message="the summary")  # fmt: skip
    assert len(tunnel_calls(fake_hub, on)["/ona"]) == 1
    assert tunnel_calls(fake_hub, off) == {}
    assert "hub-b" not in outpost.log_text().split("Tunnels rebuilt in", 1)[1].splitlines()[0]


@database_independent  # what is asked of the hub; the lease's part runs on both
async def test_off_by_default_without_the_ssh_endpoint(tmp_path, fake_hub, processes):
    list_token = secrets.token_hex(16)
    fake_hub.list_tokens.add(list_token)
    housekeeping = {"hub-a": {"url": fake_hub.url, "token": list_token, "interval": 1}}
    outpost = make_outpost(processes, tmp_path, hub_housekeeping=housekeeping)
    servers = await start_servers(outpost, fake_hub, processes.tokens, [("quiet", "")])
    await restart(outpost)
    listed = len(fake_hub.calls("servers"))
    # housekeeping runs after the tunnels would have been asked for, in the same round
    await wait_until(lambda: len(fake_hub.calls("servers")) > listed + 1, timeout=30,
                     message="two background rounds after the restart")  # fmt: skip
    assert tunnel_calls(fake_hub, servers) == {}
    assert "Tunnels rebuilt" not in outpost.log_text()


@database_independent  # what is asked of the hub; the lease's part runs on both
async def test_one_call_per_hub_when_it_rebuilds_all_forwards(tmp_path, fake_hub, processes):
    token = secrets.token_hex(16)
    fake_hub.tokens.add(token)
    one_call = {"hub-a": {"url": fake_hub.url, "token": token, "system": "cluster 1"}}
    outpost = make_outpost(processes, tmp_path, ssh_recreate_at_start=True, hub_api=one_call)
    via_hook = await start_servers(outpost, fake_hub, processes.tokens, users("hook", 3))
    per_server = await start_servers(outpost, fake_hub, processes.tokens, [("each", "")],
                                     hub="hub-b")  # fmt: skip
    await restart(outpost)
    await wait_until(lambda: "Tunnels rebuilt in" in outpost.log_text(), timeout=30,
                     message="the summary")  # fmt: skip
    (call,) = fake_hub.calls("recreateforward")
    assert call["path"] == "/hub/api/recreateforward/cluster%201"
    assert call["token"] == token and call["status"] == 202
    assert tunnel_calls(fake_hub, via_hook) == {}
    assert len(tunnel_calls(fake_hub, per_server)["/each"]) == 1
    log = outpost.log_text()
    assert "forwards of system cluster 1 (3 servers) rebuilt" in log
    assert token not in log


@database_independent  # what the event loop does while a hub is slow
async def test_start_up_is_not_delayed_by_a_slow_hub(tmp_path, fake_hub, processes):
    outpost = make_outpost(processes, tmp_path, ssh_recreate_at_start=True)
    servers = await start_servers(outpost, fake_hub, processes.tokens, users("slow", 6))
    fake_hub.delays["setuptunnel"] = 4
    arrived = len(fake_hub.arrivals)
    await restart(outpost)
    await wait_until(lambda: len(fake_hub.arrivals) > arrived, timeout=15,
                     message="the first setuptunnel call to arrive")  # fmt: skip
    # while the hub sits on the calls, the API answers at once
    latencies = []
    for body, _ in servers.values():
        t0 = time.monotonic()
        response = await api_request(outpost, "services", *key_of(body))
        latencies.append(time.monotonic() - t0)
        assert response.code == 200 and json_of(response) == {"status": None}
        t0 = time.monotonic()
        assert (await api_request(outpost, "ping", auth=False)).code == 200
        latencies.append(time.monotonic() - t0)
    assert not tunnel_calls(fake_hub, servers)  # none answered yet
    assert max(latencies) < 1.0, latencies
    await wait_until(lambda: len(tunnel_calls(fake_hub, servers)) == len(servers), timeout=60,
                     message="every call answered")  # fmt: skip


async def test_after_kill9_the_new_process_takes_the_lease_of_the_dead_one_at_once(
    tmp_path, fake_hub, processes
):
    """The killed process' background lease would last another minute; the
    restarted process sees that its holder is gone and rebuilds at once"""
    outpost = make_outpost(processes, tmp_path, ssh_recreate_at_start=True, lease_ttl=120.0)
    servers = await start_servers(outpost, fake_hub, processes.tokens, users("fast", 3))
    began = await restart(outpost)
    await wait_until(lambda: len(tunnel_calls(fake_hub, servers)) == len(servers), timeout=20,
                     message="a setuptunnel call per running server")  # fmt: skip
    assert time.monotonic() - began < 20
    assert "that did the background work is gone" in outpost.log_text()
