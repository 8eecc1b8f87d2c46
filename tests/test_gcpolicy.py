"""Stopped servers are freed at once, and what runs is frozen out of the
collector's full collections"""

import asyncio
import gc
import weakref

from jupyterhub_outpost.gcpolicy import CollectorPolicy

from .utils import api_request, database_independent, start_body, wait_until

pytestmark = database_independent

SLEEP = ["sleep", "600"]


async def test_a_stopped_server_is_freed_without_the_cycle_collector(app, fake_hub):
    body = start_body(fake_hub.url, user="freed", name="freed", misc={"cmd": SLEEP})
    response = await api_request(app, "services", method="POST", body=body)
    assert response.code == 200, response.body
    key = ("hub-a", "freed", body["user_options"]["start_id"])
    managed = app.server_manager.active[key]
    spawner, managed = weakref.ref(managed.spawner), weakref.ref(managed)
    gc.disable()
    try:
        response = await api_request(app, "services", *key[1:], method="DELETE")
        assert response.code == 200, response.body
        await wait_until(lambda: spawner() is None and managed() is None, timeout=10,
                         message="the stopped server's Spawner to be freed")  # fmt: skip
    finally:
        gc.enable()


async def test_servers_are_frozen_after_their_start(app, fake_hub):
    frozen = gc.get_freeze_count()
    body = start_body(fake_hub.url, user="frozen", name="frozen", misc={"cmd": SLEEP})
    response = await api_request(app, "services", method="POST", body=body)
    assert response.code == 200, response.body
    interval = app.collector.freeze_interval
    await wait_until(lambda: gc.get_freeze_count() > frozen, timeout=interval * 5 + 5,
                     message="a freeze after the start")  # fmt: skip
    response = await api_request(app, "services", "frozen", body["user_options"]["start_id"], method="DELETE")
    assert response.code == 200


async def test_spawners_kept_alive_after_their_stop_are_handed_back(monkeypatch):
    from jupyterhub_outpost import gcpolicy

    policy = CollectorPolicy(freeze_interval=1, leak_threshold=2)
    monkeypatch.setattr(gcpolicy, "RELEASE_GRACE", 0.0)

    class Kept:
        pass

    kept = [Kept() for _ in range(3)]  # still referenced: "leaked"
    for obj in kept:
        policy.released(obj)
    gc.freeze()
    assert gc.get_freeze_count() > 0
    await asyncio.sleep(0.01)
    policy._check_released()
    assert policy.unfreezes == 1
    assert gc.get_freeze_count() == 0
    policy._check_released()  # handed back once, not again for the same ones
    assert policy.unfreezes == 1
