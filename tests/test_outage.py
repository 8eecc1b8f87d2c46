"""A PostgreSQL outage: the Outpost answers 503 while the database is down,
and serves again, without a restart, once it is back."""

import asyncio
import subprocess
import time

import pytest

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import (
    ON_POSTGRES,
    api_request,
    json_of,
    kill_servers_of,
    start_body,
    tokens_of,
    wait_until,
)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(not ON_POSTGRES, reason="needs a postgresql OUTPOST_TEST_DB_URL"),
]

CLUSTER = ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main"]


def cluster(*args):
    subprocess.run([*CLUSTER, *args], check=True, capture_output=True, timeout=120)


def cluster_answers():
    return subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"], timeout=30).returncode == 0


def ensure_cluster_running(timeout=60):
    """Start the cluster if it is down; wait until it answers"""
    if not cluster_answers():
        subprocess.run([*CLUSTER, "start"], capture_output=True, timeout=120)
    deadline = time.monotonic() + timeout
    while not cluster_answers():
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL does not answer {timeout}s after its start")
        time.sleep(0.25)


@pytest.fixture
async def outpost(tmp_path, fake_hub):
    outpost = await start_outpost(outpost_config(tmp_path, spawner_cmd=["sleep", "600"]))
    tokens = set()
    outpost.test_tokens = tokens
    yield outpost
    await asyncio.to_thread(ensure_cluster_running)
    await stop_outpost(outpost)
    kill_servers_of(tokens)


async def start(outpost, fake_hub, name):
    body = start_body(fake_hub.url, user="olga", name=name)
    fake_hub.tokens.update(tokens_of(body))
    outpost.test_tokens.add(body["env"]["JUPYTERHUB_API_TOKEN"])
    response = await api_request(outpost, "services", method="POST", body=body)
    return body, response


def key_of(body):
    return body["name"], body["user_options"]["start_id"]


async def listed(outpost):
    response = await api_request(outpost, "services")
    assert response.code == 200, response.body
    return [(s["name"], s["start_id"]) for s in json_of(response)]


def assert_unavailable(response):
    assert response.code == 503, (response.code, response.body)
    model = json_of(response)
    assert set(model) == {"status", "message"}, model
    assert model["status"] == 503 and model["message"], model


async def test_database_outage_answers_503_and_recovers(outpost, fake_hub):
    body, response = await start(outpost, fake_hub, "before")
    assert response.code == 200, response.body
    running = key_of(body)
    assert await listed(outpost) == [running]

    try:
        await asyncio.to_thread(cluster, "stop", "-m", "fast")
        assert not await asyncio.to_thread(cluster_answers)
        for _ in range(3):  # every pooled connection is broken, not only the first
            assert_unavailable(await api_request(outpost, "services", *running))
        assert_unavailable(await api_request(outpost, "services"))
        during, response = await start(outpost, fake_hub, "during")
        assert_unavailable(response)
    finally:
        await asyncio.to_thread(ensure_cluster_running)

    # no restart: the same Outpost serves again
    response = await wait_until(
        lambda: _poll_ok(outpost, running), timeout=30, message="a poll after the outage"
    )
    assert json_of(response) == {"status": None}
    after, response = await start(outpost, fake_hub, "after")
    assert response.code == 200, response.body
    assert sorted(await listed(outpost)) == sorted([running, key_of(after)])
    # the refused start left nothing behind
    response = await api_request(outpost, "services", *key_of(during))
    assert response.code == 404, response.body
    for key in (running, key_of(after)):
        response = await api_request(outpost, "services", *key, method="DELETE")
        assert response.code == 200, response.body
    assert await listed(outpost) == []


async def _poll_ok(outpost, key):
    response = await api_request(outpost, "services", *key)
    return response if response.code == 200 else None
