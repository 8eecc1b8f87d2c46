"""What a hub operator sees when a request is wrong: JSON errors, never a 500.

Every error from the Outpost's own code is ``{"status": N, "message": ...}``
with the status N; failed starts keep the protocol's 419 shape.
"""

import asyncio
import base64
import json

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyterhub_outpost.orm import ServerRecord

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import (
    api_request,
    base_url_of,
    basic_auth,
    database_independent,
    json_of,
    pid_alive,
    pids_with_env,
    start_body,
    wait_until,
)

START_FAILURE_KEYS = {"module", "class", "traceback", "args", "kwargs"}


def assert_error(response, status):
    """The response is a JSON error body with ``status``; return its message"""
    assert response.code == status, (response.code, response.body)
    assert response.headers["Content-Type"].startswith("application/json")
    model = json_of(response)
    assert set(model) == {"status", "message"}, model
    assert model["status"] == status
    assert isinstance(model["message"], str) and model["message"].strip()
    return model["message"]


async def listing(app, hub="hub-a"):
    response = await api_request(app, "services", hub=hub)
    assert response.code == 200, response.body
    return json_of(response)


def token_of(body):
    return body["env"]["JUPYTERHUB_API_TOKEN"]


# requests that work without a server


async def test_ping_needs_no_credentials(app):
    response = await api_request(app, "ping", auth=False)
    assert response.code == 200
    assert json_of(response) == {"status": "ok"}


@pytest.mark.parametrize("path", ["services", "services/"])
async def test_listing_with_and_without_trailing_slash(app, path):
    response = await api_request(app, path)
    assert response.code == 200, response.body
    assert json_of(response) == []


# bad start bodies: 400, nothing recorded


_DROP = object()


def _body(fake_url, **changes):
    """A start body with some keys changed (``start_id`` in user_options) or dropped"""
    body = start_body(fake_url, name="bad")
    for key, value in changes.items():
        if key == "start_id":
            body["user_options"]["start_id"] = value
        elif value is _DROP:
            del body[key]
        else:
            body[key] = value
    return body


def _without_start_id(fake_url):
    body = _body(fake_url)
    del body["user_options"]["start_id"]
    return json.dumps(body)


BAD_BODIES = {
    "malformed JSON": (lambda url: '{"name": "x", ', "JSON"),
    "empty body": (lambda url: "", "JSON object"),
    "body is a list": (lambda url: json.dumps([_body(url)]), "object"),
    "body is a string": (lambda url: json.dumps("start please"), "object"),
    "name missing": (lambda url: json.dumps(_body(url, name=_DROP)), "name"),
    "start_id missing": (_without_start_id, "start_id"),
    "env values not strings": (
        lambda url: json.dumps(_body(url, env={"JUPYTERHUB_USER": "alice", "X": 1})),
        "env",
    ),
    "env is a list": (lambda url: json.dumps(_body(url, env=["JUPYTERHUB_USER=alice"])), "env"),
    "name climbs up": (lambda url: json.dumps(_body(url, name="../x")), "name"),
    "name with slash": (lambda url: json.dumps(_body(url, name="a/b")), "name"),
    "name of 300 chars": (lambda url: json.dumps(_body(url, name="n" * 300)), "name"),
    "start_id empty": (lambda url: json.dumps(_body(url, start_id="")), "start_id"),
    "start_id with slash": (lambda url: json.dumps(_body(url, start_id="../../etc")), "start_id"),
    "user_options a list": (lambda url: json.dumps(_body(url, user_options=["x"])), "user_options"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_bad_start_body_is_400(app, fake_hub, case):
    make, hint = BAD_BODIES[case]
    response = await api_request(app, "services", method="POST", raw_body=make(fake_hub.url))
    message = assert_error(response, 400)
    assert hint.lower() in message.lower(), message
    assert await listing(app) == []


@pytest.mark.parametrize("padding", [1, 20 << 20], ids=["just-over", "20MiB-over"])
async def test_body_over_max_body_size_is_413(app, fake_hub, padding):
    body = start_body(fake_hub.url, name="huge")
    body["env"]["PADDING"] = "x" * (app.max_body_size + padding)
    raw = json.dumps(body)
    assert len(raw) > app.max_body_size
    response = await api_request(app, "services", method="POST", raw_body=raw)
    message = assert_error(response, 413)
    assert str(app.max_body_size) in message
    assert await listing(app) == []


async def test_streamed_body_over_max_body_size_is_413(app, fake_hub):
    """Without Content-Length (chunked) the limit holds as well"""
    chunk = b"x" * 65536
    chunks = app.max_body_size // len(chunk) + 2

    async def producer(write):
        await write(b'{"name": "huge", "pad": "')
        for _ in range(chunks):
            await write(chunk)
        await write(b'"}')

    request = HTTPRequest(
        base_url_of(app) + "services",
        method="POST",
        headers={"Authorization": basic_auth("hub-a"), "Content-Type": "application/json"},
        body_producer=producer,
        request_timeout=60,
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    assert "Content-Length" not in request.headers
    assert_error(response, 413)
    assert await listing(app) == []


# credentials


def _garbage(header):
    return {"Authorization": header}


BAD_CREDENTIALS = {
    "wrong password": dict(hub="hub-a", password="not-the-password"),
    "unknown hub": dict(hub="hub-zz", password="password-of-hub-a"),
    "password of another hub": dict(hub="hub-a", password="password-of-hub-b"),
    "no Authorization": dict(auth=False),
    "Basic, not base64": dict(auth=False, headers=_garbage("Basic !!!not-base64!!!")),
    "Basic without colon": dict(
        auth=False, headers=_garbage("Basic " + base64.b64encode(b"hub-a").decode())
    ),
    "Basic, not UTF-8": dict(
        auth=False, headers=_garbage("Basic " + base64.b64encode(b"hub-a:\xff\xfe").decode())
    ),
    "Bearer token": dict(auth=False, headers=_garbage("Bearer password-of-hub-a")),
    "empty Basic": dict(auth=False, headers=_garbage("Basic ")),
}


@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
async def test_bad_credentials_are_401_with_basic_challenge(app, fake_hub, case):
    kwargs = BAD_CREDENTIALS[case]
    for method, path, body in [
        ("GET", ("services",), None),
        ("POST", ("services",), start_body(fake_hub.url, name="intruder")),
        ("GET", ("services", "intruder", "1"), None),
        ("DELETE", ("services", "intruder", "1"), None),
    ]:
        response = await api_request(app, *path, method=method, body=body, **kwargs)
        assert_error(response, 401)
        assert response.headers.get("WWW-Authenticate", "").startswith("Basic"), (
            method,
            path,
            dict(response.headers),
        )
    assert await listing(app) == []


async def test_unknown_path_is_json_404(app):
    for kwargs in ({}, {"auth": False}):
        response = await api_request(app, "no", "such", "endpoint", **kwargs)
        assert_error(response, 404)
    response = await api_request(app, "services", "a", "b", "c", "d")
    assert_error(response, 404)


@pytest.mark.parametrize(
    "method, path",
    [
        ("PUT", ("services",)),
        ("PATCH", ("services",)),
        ("PUT", ("services", "x", "1")),
        ("POST", ("services", "x", "1")),
        ("DELETE", ("services",)),
    ],
)
async def test_unsupported_method_is_json_405(app, method, path):
    response = await api_request(app, *path, method=method, body={})
    assert_error(response, 405)


async def test_unknown_server_poll_and_stop_are_404(app):
    for method in ("GET", "DELETE"):
        response = await api_request(app, "services", "ghost", "123", method=method)
        assert_error(response, 404)
    # after a 404 poll the hub sends DELETE with an empty start_id
    for path in (("services", "ghost", ""), ("services", "", "")):
        response = await api_request(app, *path, method="DELETE")
        assert_error(response, 404)
    # names that can never exist are 404 too, not 400 or 500
    response = await api_request(app, "services", "..", "1")
    assert_error(response, 404)
    response = await api_request(app, "services", "n" * 300, "1", method="DELETE")
    assert_error(response, 404)


async def test_clients_without_start_id_reach_the_only_server_of_a_name(app, fake_hub):
    assert_error(await api_request(app, "services", "legacy"), 404)
    first = start_body(fake_hub.url, name="legacy", misc={"cmd": ["sh", "-c", "exec sleep 600"]})
    assert (await api_request(app, "services", method="POST", body=first)).code == 200
    response = await api_request(app, "services", "legacy")
    assert response.code == 200 and json_of(response) == {"status": None}
    # another hub's server of that name is not there for hub-b
    assert_error(await api_request(app, "services", "legacy", hub="hub-b"), 404)
    assert_error(await api_request(app, "services", "legacy", hub="hub-b", method="DELETE"), 404)

    second = start_body(fake_hub.url, name="legacy", misc={"cmd": ["sh", "-c", "exec sleep 600"]})
    assert (await api_request(app, "services", method="POST", body=second)).code == 200
    for method in ("GET", "DELETE"):
        assert "start id" in assert_error(await api_request(app, "services", "legacy", method=method), 409)
    response = await api_request(app, "services", "legacy", second["user_options"]["start_id"],
                                 method="DELETE")  # fmt: skip
    assert response.code == 200
    response = await api_request(app, "services", "legacy/", method="DELETE")
    assert response.code == 200, response.body
    assert await listing(app) == []
    assert_error(await api_request(app, "services", "legacy", method="DELETE"), 404)


async def test_second_start_of_same_server_is_409_without_second_process(app, fake_hub):
    body = start_body(fake_hub.url, name="twice")
    start_id = body["user_options"]["start_id"]
    response = await api_request(app, "services", method="POST", body=body)
    assert response.code == 200, response.body
    pids = await wait_until(
        lambda: pids_with_env("JUPYTERHUB_API_TOKEN", token_of(body)),
        timeout=20,
        message="the server's process",
    )
    assert len(pids) == 1

    for headers in ({}, {"execution-type": "async"}):
        again = await api_request(app, "services", method="POST", body=body, headers=headers)
        message = assert_error(again, 409)
        assert "twice" in message and start_id in message

    assert pids_with_env("JUPYTERHUB_API_TOKEN", token_of(body)) == pids
    servers = await listing(app)
    assert [(s["name"], s["start_id"]) for s in servers] == [("twice", start_id)]
    # the first server is unharmed: it still polls as running, and stops
    response = await api_request(app, "services", "twice", start_id)
    assert json_of(response) == {"status": None}
    response = await api_request(app, "services", "twice", start_id, method="DELETE")
    assert response.code == 200, response.body
    await wait_until(lambda: not pid_alive(pids[0]), timeout=30, message="process ended")
    assert await listing(app) == []


async def test_concurrent_duplicate_starts_run_one_server(app, fake_hub):
    body = start_body(fake_hub.url, name="race")
    responses = await asyncio.gather(
        *(api_request(app, "services", method="POST", body=body) for _ in range(3))
    )
    codes = sorted(r.code for r in responses)
    assert codes == [200, 409, 409], [(r.code, r.body) for r in responses]
    for response in responses:
        if response.code == 409:
            assert_error(response, 409)
    pids = await wait_until(
        lambda: pids_with_env("JUPYTERHUB_API_TOKEN", token_of(body)),
        timeout=20,
        message="the server's process",
    )
    assert len(pids) == 1 and len(await listing(app)) == 1
    start_id = body["user_options"]["start_id"]
    response = await api_request(app, "services", "race", start_id, method="DELETE")
    assert response.code == 200, response.body
    await wait_until(lambda: not pid_alive(pids[0]), timeout=30, message="process ended")


# the operator's allow_override hook


def refuse_cmd(hub_name, misc):
    return "cmd" not in misc


@pytest.fixture(scope="module")
async def guarded_app(tmp_path_factory, fake_hub):
    """An Outpost whose allow_override hook refuses overrides of ``cmd``"""
    workdir = tmp_path_factory.mktemp("guarded")
    outpost = await start_outpost(outpost_config(workdir, allow_override=refuse_cmd))
    outpost.workdir = workdir
    yield outpost
    await stop_outpost(outpost)


async def test_refused_override_fails_start_with_419(guarded_app, fake_hub):
    body = start_body(fake_hub.url, name="refused", misc={"cmd": ["/bin/sleep", "600"]})
    fake_hub.tokens.update({token_of(body), body["env"]["JUPYTERHUB_FLAVORS_UPDATE_TOKEN"]})
    for headers in ({}, {"execution-type": "async"}):
        response = await api_request(guarded_app, "services", method="POST", body=body, headers=headers)
        assert response.code == 419, response.body
        model = json_of(response)
        assert set(model) == START_FAILURE_KEYS
        assert model["class"] == "OverrideRefusedError"
        text = " ".join(str(a) for a in model["args"])
        assert "refused" in text and "cmd" in text, model["args"]
    assert await listing(guarded_app) == []
    assert pids_with_env("JUPYTERHUB_API_TOKEN", token_of(body)) == []
    assert fake_hub.calls("event", "alice", "refused") == []


async def test_invalid_override_value_fails_start_with_419(guarded_app, fake_hub):
    body = start_body(fake_hub.url, name="badport", misc={"port": "not-a-port"})
    response = await api_request(guarded_app, "services", method="POST", body=body)
    assert response.code == 419, response.body
    model = json_of(response)
    assert set(model) == START_FAILURE_KEYS
    assert "port" in " ".join(str(a) for a in model["args"])
    assert await listing(guarded_app) == []


async def test_unknown_and_protected_overrides_are_ignored(guarded_app, fake_hub):
    body = start_body(
        fake_hub.url,
        name="kubeish",
        misc={
            "pod_name_template": "jupyter-{username}",
            "extra_labels": {"a": "b"},
            "no_such_trait": 1,
            "api_token": "not-the-real-token",
            "_private": True,
        },
    )
    start_id = body["user_options"]["start_id"]
    response = await api_request(guarded_app, "services", method="POST", body=body)
    assert response.code == 200, response.body
    # the server runs with the hub's token, not the one in misc
    pids = await wait_until(
        lambda: pids_with_env("JUPYTERHUB_API_TOKEN", token_of(body)),
        timeout=20,
        message="the server's process",
    )
    servers = await listing(guarded_app)
    assert [(s["name"], s["start_id"]) for s in servers] == [("kubeish", start_id)]
    response = await api_request(guarded_app, "services", "kubeish", start_id, method="DELETE")
    assert response.code == 200, response.body
    await wait_until(lambda: not any(map(pid_alive, pids)), timeout=30, message="process ended")
    assert await listing(guarded_app) == []


@database_independent
async def test_the_env_names_of_all_servers_are_kept_once(app):
    # a running server keeps its env: its names, the same in every start
    # (or restored record), are shared
    envs = []
    for user in ("ann", "bob"):
        request = json.loads(json.dumps({"env": start_body("http://127.0.0.1:9", user=user)["env"]}))
        record = ServerRecord.new("hub-a", "lab", user, user, "1", "x.Spawner")
        envs.append(app.server_manager.build_spawner(record, request, register_secrets=False).env)
    first, second = envs
    assert first.keys() == second.keys() and first != second
    assert all(a is b for a, b in zip(first, second))
