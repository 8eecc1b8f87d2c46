"""Several ``jupyterhub-outpost`` processes on one database serve as one Outpost.

Two real processes (console script) share one database, as behind a load
balancer: a server started through one is listed, polled and stopped
through the other, and stops of the same server sent to both at once end
it exactly once (the stop claims the server in the database; the other
process waits until the record is gone and answers 200, or answers 404
when the record is gone already). Its 409 after waiting ``OTHER_STOP_WAIT``
(15 s) in vain is not accepted here: a NoopSpawner's stop takes no time, so
a 409 would mean a lost or stuck stop.

The first test runs a real ``jupyterhub-singleuser`` that is not a child
of the Outpost process that started it (``tests.mocking.DetachedProcessSpawner``,
like a batch job or a pod). The races use the benchmarks' NoopSpawner,
which launches nothing: what they test is the Outposts' coordination.
"""

import asyncio
import os
import re

from tornado.httpclient import AsyncHTTPClient

from .utils import (
    api_request,
    json_of,
    key_of,
    new_db_url,
    pids_with_env,
    process_config,
    process_env,
    processes_of,
    query_db,
    server_answers,
    start_body,
    tokens_of,
    wait_until,
)

NOOP = "benchmarks.noop_spawner.NoopSpawner"
DETACHED = "tests.mocking.DetachedProcessSpawner"
SLOW = "tests.mocking.SlowStartSpawner"


async def two_processes(tmp_path, processes, spawner_class, cmd=None):
    """Two Outpost processes on one database, with one key and one config"""
    config = process_config(
        tmp_path, db_path=tmp_path / "shared.sqlite", cmd=cmd, spawner_class=spawner_class
    )
    env = process_env()
    one = processes(tmp_path / "one", config_text=config, extra_env=env)
    two = processes(tmp_path / "two", config_text=config, extra_env=env)
    await asyncio.to_thread(one.start)  # creates the tables
    await asyncio.to_thread(two.start)
    return one, two


def records(tmp_path):
    """How many servers the shared database of :func:`two_processes` holds"""
    [(count,)] = query_db(new_db_url(tmp_path, "shared.sqlite"), "SELECT count(*) FROM servers")
    return count


def new_body(fake_hub, i, name=""):
    body = start_body(fake_hub.url, user=f"user{i}", user_id=i, name=name)
    fake_hub.tokens.update(tokens_of(body))
    return body


async def start(process, body, **kwargs):
    return await api_request(process, "services", method="POST", body=body, **kwargs)


async def poll(process, body):
    return await api_request(process, "services", *key_of(body))


async def stop(process, body, **kwargs):
    return await api_request(process, "services", *key_of(body), method="DELETE", **kwargs)


async def listing(process):
    response = await api_request(process, "services")
    assert response.code == 200, response.body
    return {(s["name"], s["start_id"]) for s in json_of(response)}


async def assert_nothing_left(tmp_path, *processes):
    """No process lists a server, and the shared database holds none"""
    for process in processes:
        assert await listing(process) == set()
    assert records(tmp_path) == 0


async def start_all(targets, bodies, client):
    responses = await asyncio.gather(
        *(start(t, b, client=client) for t, b in zip(targets, bodies))
    )
    assert [r.code for r in responses] == [200] * len(bodies), [r.body for r in responses]


def stopped_lines(process, body, hub="hub-a"):
    """The log lines in which ``process`` reports that it stopped this server"""
    line = "{}/{}/{} - stopped".format(hub, *key_of(body))
    return [x for x in process.log_text().splitlines() if x.endswith(line)]


def assert_clean_logs(*processes):
    """No internal error, no failed stop, no server that would not die"""
    for process in processes:
        text = process.log_text()
        for bad in ("Traceback", "Uncaught exception", "stop failed", "never died"):
            assert bad not in text, f"{bad!r} in the log of {process.workdir}:\n{text[-4000:]}"
        assert not re.search(r"\b5\d\d (GET|POST|DELETE)\b", text), text[-4000:]


def many_connections(n):
    """A client of its own: the shared one keeps 10 connections"""
    return AsyncHTTPClient(force_instance=True, max_clients=n)


async def test_a_server_started_through_one_process_is_managed_through_another(
    tmp_path, fake_hub, processes
):
    one, two = await two_processes(tmp_path, processes, DETACHED)
    body = new_body(fake_hub, 1, name="elsewhere")
    token = body["env"]["JUPYTERHUB_API_TOKEN"]
    processes.tokens.add(token)

    response = await start(one, body)
    assert response.code == 200, response.body
    address = json_of(response)["service"]
    prefix = body["env"]["JUPYTERHUB_SERVICE_PREFIX"]
    await wait_until(lambda: server_answers(address, prefix), timeout=60,
                     message=f"the server at {address}")  # fmt: skip
    [pid] = pids_with_env("JUPYTERHUB_API_TOKEN", token)

    # the other process lists and polls it
    assert await listing(two) == {key_of(body)}
    for process in (two, one):
        response = await poll(process, body)
        assert response.code == 200, response.body
        assert json_of(response) == {"status": None}

    # and stops it: when the answer comes, the process is gone (reaped, not
    # a zombie that merely looks dead) and both processes forgot the server
    response = await stop(two, body)
    assert response.code == 200, response.body
    assert not os.path.exists(f"/proc/{pid}")
    assert pids_with_env("JUPYTERHUB_API_TOKEN", token) == []
    for process in (one, two):
        response = await poll(process, body)
        assert response.code == 404, response.body
        assert await listing(process) == set()
    assert records(tmp_path) == 0
    assert len(stopped_lines(two, body)) == 1
    assert stopped_lines(one, body) == []
    assert_clean_logs(one, two)


async def test_stops_sent_to_both_processes_at_once_end_the_server_once(
    tmp_path, fake_hub, processes
):
    one, two = await two_processes(tmp_path, processes, NOOP)
    bodies = [new_body(fake_hub, i, name=f"race{i}") for i in range(6)]
    client = many_connections(4)
    try:
        # started through either process: the one that holds the spawner in
        # memory races one that rebuilds it from the database, both ways
        await start_all([one, two] * 3, bodies, client)
        assert await listing(one) == await listing(two) == {key_of(b) for b in bodies}

        for body in bodies:
            responses = await asyncio.gather(
                stop(one, body, client=client), stop(two, body, client=client)
            )
            codes = sorted(r.code for r in responses)
            assert codes in ([200, 200], [200, 404]), [(r.code, r.body) for r in responses]
            for response in responses:
                if response.code == 404:
                    assert json_of(response) == {"status": 404, "message": "No such server"}
                else:
                    assert json_of(response) == {"logs": []}
            # the spawner's stop ran in exactly one of them
            assert len(stopped_lines(one, body) + stopped_lines(two, body)) == 1
            for process in (one, two):
                assert (await poll(process, body)).code == 404
        await assert_nothing_left(tmp_path, one, two)
    finally:
        client.close()
    assert_clean_logs(one, two)


async def test_fifty_concurrent_stops_over_two_processes_all_finish(
    tmp_path, fake_hub, processes
):
    one, two = await two_processes(tmp_path, processes, NOOP)
    bodies = [new_body(fake_hub, 100 + i, name=f"many{i}") for i in range(25)]
    client = many_connections(50)
    try:
        await start_all([one, two] * 12 + [one], bodies, client)
        assert await listing(one) == await listing(two) == {key_of(b) for b in bodies}

        # each server is stopped through both at once; all 50 requests in flight
        requests = [stop(p, b, client=client) for b in bodies for p in (one, two)]
        responses = await asyncio.wait_for(asyncio.gather(*requests), timeout=45)
        codes = [r.code for r in responses]
        assert set(codes) <= {200, 404}, [(r.code, r.body) for r in responses]
        for i, body in enumerate(bodies):
            assert 200 in codes[2 * i : 2 * i + 2], codes
            assert len(stopped_lines(one, body) + stopped_lines(two, body)) == 1, key_of(body)
        await assert_nothing_left(tmp_path, one, two)
    finally:
        client.close()
    assert_clean_logs(one, two)
    print(f"\n50 concurrent stops over two processes: {codes.count(200)} x 200, "
          f"{codes.count(404)} x 404")  # fmt: skip
    for process in (one, two):
        await asyncio.to_thread(process.terminate)
        assert process.proc.returncode == 0


async def test_a_process_forgets_servers_another_process_stopped(tmp_path, fake_hub):
    """The process that started a server does not keep its Spawner once
    another process stopped it; no request for that server may reach it again"""
    from .conftest import outpost_config, start_outpost, stop_outpost

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    cfg_a = outpost_config(tmp_path / "a", spawner_class=NOOP, cleanup_interval=3600)
    cfg_b = outpost_config(
        tmp_path / "b",
        spawner_class=NOOP,
        cleanup_interval=3600,
        db_url=cfg_a.JupyterHubOutpost.db_url,
        crypt_keys=cfg_a.JupyterHubOutpost.crypt_keys,
    )
    a = await start_outpost(cfg_a)
    b = await start_outpost(cfg_b)
    try:
        bodies = [new_body(fake_hub, i, name=f"s{i}") for i in range(2)]
        for body in bodies:
            response = await start(a, body)
            assert response.code == 200, response.body
        keys = [("hub-a", *key_of(body)) for body in bodies]
        assert all(key in a.server_manager.active for key in keys)
        for body in bodies:
            response = await api_request(b, "services", *key_of(body), method="DELETE")
            assert response.code == 200, response.body

        # a stop sent to A afterwards is 404, and A lets go of that server
        response = await api_request(a, "services", *key_of(bodies[0]), method="DELETE")
        assert response.code == 404, response.body
        assert keys[0] not in a.server_manager.active
        # the other one, for which A gets no request: the background round
        await a.server_manager.drop_forgotten()
        assert a.server_manager.active == {}
    finally:
        await stop_outpost(b)
        await stop_outpost(a)


async def test_a_stop_sent_to_another_process_ends_a_pending_start(tmp_path, fake_hub, processes):
    """A start still running in one process is ended by a stop sent to the other:
    the stop answers once the server is gone, and its process was stopped"""
    one, two = await two_processes(tmp_path, processes, SLOW, cmd=["sleep", "600"])
    body = new_body(fake_hub, 1)
    body["misc"] = {"start_delay": 60, "delay_after_launch": True}
    processes.tokens.add(body["env"]["JUPYTERHUB_API_TOKEN"])
    response = await start(one, body, headers={"execution-type": "async"})
    assert response.code == 202, response.body
    [pid] = await wait_until(lambda: processes_of(body), timeout=20, message="the process")

    response = await stop(two, body)
    assert response.code == 200, response.body
    assert processes_of(body) == []
    for process in (one, two):
        assert (await poll(process, body)).code == 404
    await assert_nothing_left(tmp_path, one, two)
    assert_clean_logs(one, two)
