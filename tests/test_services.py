"""The core journey: start a real jupyterhub-singleuser, poll it, stop it."""

from .utils import api_request, json_of, pid_alive, server_answers, start_body, wait_until


async def test_start_poll_stop_real_singleuser(app, fake_hub):
    body = start_body(fake_hub.url, user="alice", user_id=11, name="journey")
    fake_hub.tokens.add(body["env"]["JUPYTERHUB_API_TOKEN"])
    fake_hub.tokens.add(body["env"]["JUPYTERHUB_FLAVORS_UPDATE_TOKEN"])
    start_id = body["user_options"]["start_id"]

    response = await api_request(app, "services", method="POST", body=body)
    assert response.code == 200, response.body
    address = json_of(response)["service"]
    host, port = address.split(":")
    assert host == "127.0.0.1" and int(port) > 0

    prefix = body["env"]["JUPYTERHUB_SERVICE_PREFIX"]
    await wait_until(lambda: server_answers(address, prefix), timeout=60, message="singleuser up")

    response = await api_request(app, "services", "journey", start_id)
    assert response.code == 200
    assert json_of(response) == {"status": None}

    listing = json_of(await api_request(app, "services"))
    assert [(s["name"], s["start_id"]) for s in listing] == [("journey", start_id)]

    pid = app.server_manager.active[("hub-a", "journey", start_id)].spawner.pid
    assert pid_alive(pid)

    response = await api_request(app, "services", "journey", start_id, method="DELETE")
    assert response.code == 200, response.body
    assert json_of(response) == {"logs": []}
    await wait_until(lambda: not pid_alive(pid), timeout=20, message="process gone")

    response = await api_request(app, "services", "journey", start_id)
    assert response.code == 404
    assert json_of(await api_request(app, "services")) == []

    # the hub got at least one progress event and a flavor update per change
    events = fake_hub.calls("event", "alice", "journey")
    assert events and all("ready" not in e["body"] for e in events)
    await wait_until(lambda: len(fake_hub.calls("flavors")) >= 2, timeout=10, message="flavor updates")
    assert all(c["body"] == {} for c in fake_hub.calls("flavors"))
