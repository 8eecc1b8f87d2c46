"""The spawn history: each start's outcome, reason and events, kept after its
server is gone, readable by its own hub only, encrypted and pruned"""

import asyncio
import json

import pytest
from sqlalchemy import select

from jupyterhub_outpost.orm import StartRecord

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import api_request, json_of, start_body, wait_until

SLEEP = ["sh", "-c", "exec sleep 600"]


@pytest.fixture(scope="module")
async def kept(tmp_path_factory, fake_hub):
    outpost = await start_outpost(
        outpost_config(tmp_path_factory.mktemp("history"), history_per_user=3)
    )
    yield outpost
    await stop_outpost(outpost)


async def start(app, fake_hub, name, user="hal", cmd=SLEEP, hub="hub-a"):
    body = start_body(fake_hub.url, user=user, name=name, misc={"cmd": cmd})
    response = await api_request(app, "services", method="POST", body=body, hub=hub)
    return response, body


async def events_of(app, body, hub="hub-a"):
    return await api_request(app, "services", body["name"], body["user_options"]["start_id"], "events",
                             hub=hub)  # fmt: skip


async def test_a_start_is_kept_with_its_events_after_its_server_is_gone(kept, fake_hub):
    response, body = await start(kept, fake_hub, "kept")
    assert response.code == 200
    found = json_of(await events_of(kept, body))
    assert found["outcome"] == "ready" and found["stopped"] is None
    assert found["user"] == "hal" and found["name"] == "kept"
    assert any("Outpost: starting the server" in e.get("message", "") for e in found["events"])
    # another hub learns nothing of it
    assert (await events_of(kept, body, hub="hub-b")).code == 404
    assert json_of(await api_request(kept, "history", "hal", hub="hub-b")) == []

    start_id = body["user_options"]["start_id"]
    assert (await api_request(kept, "services", "kept", start_id, method="DELETE")).code == 200
    assert (await api_request(kept, "services", "kept", start_id)).code == 404
    found = json_of(await events_of(kept, body))
    assert found["outcome"] == "stopped" and found["stopped"] >= found["ended"]


async def test_a_failed_start_keeps_its_reason_scrubbed_and_encrypted(kept, fake_hub):
    token_path = "/nonexistent/program-for-history"
    response, body = await start(kept, fake_hub, "broken", cmd=[token_path])
    assert response.code == 419
    token = body["env"]["JUPYTERHUB_API_TOKEN"]
    failed, failed_body = await start(kept, fake_hub, "leaky", cmd=["/nonexistent/" + token])
    assert failed.code == 419

    found = json_of(await events_of(kept, body))
    assert found["outcome"] == "failed" and token_path in found["reason"]
    leaky = json_of(await events_of(kept, failed_body))
    assert leaky["outcome"] == "failed"
    assert failed_body["env"]["JUPYTERHUB_API_TOKEN"] not in json_of_text(leaky)

    def raw_rows():
        with kept.db.engine.connect() as connection:
            return connection.execute(select(StartRecord.name, StartRecord.data)).all()

    rows = dict(await asyncio.to_thread(raw_rows))
    assert b"program-for-history" not in rows["broken"]


def json_of_text(model):
    return json.dumps(model)


async def test_a_users_recent_starts_newest_first_and_only_so_many(kept, fake_hub):
    names = [f"run{i}" for i in range(5)]
    for name in names:
        response, body = await start(kept, fake_hub, name, user="ivy")
        assert response.code == 200
        start_id = body["user_options"]["start_id"]
        assert (await api_request(kept, "services", name, start_id, method="DELETE")).code == 200
    listed = json_of(await api_request(kept, "history", "ivy"))
    assert [s["name"] for s in listed] == names[::-1][:3]
    assert all("events" not in s and s["outcome"] == "stopped" for s in listed)

    await kept.background.prune_history()

    def rows_of_ivy():
        with kept.db.engine.connect() as connection:
            return connection.execute(select(StartRecord.name)).scalars().all()

    left = await asyncio.to_thread(rows_of_ivy)
    assert sorted(n for n in left if n.startswith("run")) == sorted(names[2:])


async def test_the_end_of_a_runtime_is_kept_as_expired(kept, fake_hub):
    response, body = await start(kept, fake_hub, "timed")
    assert response.code == 200
    await kept.server_manager.stop("hub-a", "timed", body["user_options"]["start_id"], outcome="expired")
    found = json_of(await events_of(kept, body))
    assert found["outcome"] == "expired"


async def test_retention_forgets_old_starts(tmp_path, fake_hub):
    outpost = await start_outpost(outpost_config(tmp_path, history_retention_days=7))
    try:
        response, body = await start(outpost, fake_hub, "brief")
        assert response.code == 200
        await api_request(outpost, "services", "brief", body["user_options"]["start_id"], method="DELETE")
        await outpost.background.prune_history()
        assert (await events_of(outpost, body)).code == 200
        # a week later, as far as the retention can tell
        outpost.server_manager.history.retention_days = 0
        await outpost.background.prune_history()
        await wait_until(lambda: _gone(outpost, body), timeout=10, message="the start forgotten")
    finally:
        await stop_outpost(outpost)


async def _gone(outpost, body):
    return (await events_of(outpost, body)).code == 404


async def test_a_server_that_ends_right_after_its_start_is_kept_as_failed_with_its_output(kept, fake_hub):
    dies = ["sh", "-c", "echo 'ModuleNotFoundError: No module named jupyterlab' >&2; exit 3"]
    body = start_body(fake_hub.url, user="hal", name="dies", misc={"cmd": dies})
    fake_hub.tokens.add(body["env"]["JUPYTERHUB_API_TOKEN"])  # the hub takes its events
    response = await api_request(kept, "services", method="POST", body=body)
    assert response.code == 200  # the process ran: the start itself succeeded

    async def failed():
        found = json_of(await events_of(kept, body))
        return found if found["outcome"] == "failed" else None

    found = await wait_until(failed, timeout=15, message="the early end in the history")
    assert "exited with status 3" in found["reason"]
    assert "No module named jupyterlab" in found["reason"]
    # the hub was told at once, in the server's own words
    told = [c for c in fake_hub.received if c["kind"] == "event" and "No module named jupyterlab" in str(c["body"])]
    assert told
    await api_request(kept, "services", "dies", body["user_options"]["start_id"], method="DELETE")
