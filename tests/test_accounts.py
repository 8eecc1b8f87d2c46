"""What a hub can make the Outpost do, through the HTTP API with real processes:
which account a server runs as, which overrides and environment keys are
accepted, and where files are written."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import (
    api_request,
    json_of,
    pid_alive,
    pids_with_env,
    start_body,
    wait_until,
)

FAKE_CERTS = {"keyfile": "KEY", "certfile": "CERT", "cafile": "CA"}


@pytest.fixture(scope="module")
async def strict(tmp_path_factory):
    """An Outpost on the default policy (one cheap process per start)"""
    workdir = tmp_path_factory.mktemp("strict")
    cfg = outpost_config(workdir, spawner_cmd=["sleep", "600"], send_events=False)
    del cfg.JupyterHubOutpost["allowed_overrides"]
    outpost = await start_outpost(cfg)
    outpost.workdir = workdir
    yield outpost
    await stop_outpost(outpost)


async def start(app, body, **kwargs):
    return await api_request(app, "services", method="POST", body=body, **kwargs)


async def listing(app):
    return json_of(await api_request(app, "services"))


def token_of(body):
    return body["env"]["JUPYTERHUB_API_TOKEN"]


async def assert_refused(app, body, status, *words):
    """The start is refused with ``status`` naming ``words``; nothing recorded or running"""
    response = await start(app, body)
    assert response.code == status, response.body
    model = json_of(response)
    text = model["message"] if status == 400 else " ".join(model["args"])
    for word in words:
        assert word in text, text
    assert await listing(app) == []
    assert pids_with_env("JUPYTERHUB_API_TOKEN", token_of(body)) == []
    return model


async def stop_server(app, body):
    pids = await wait_until(
        lambda: pids_with_env("JUPYTERHUB_API_TOKEN", token_of(body)), timeout=20,
        message="the server's process",
    )  # fmt: skip
    response = await api_request(
        app, "services", body["name"], body["user_options"]["start_id"], method="DELETE"
    )
    assert response.code == 200, response.body
    await wait_until(lambda: not any(map(pid_alive, pids)), timeout=30, message="process ended")


# names that become paths


async def test_trust_bundle_names_cannot_leave_the_certificate_folder(strict, fake_hub, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for bad in (f"{outside}/ABSOLUTE", "../../../escape", "..", "a/b"):
        body = start_body(fake_hub.url, name="bundles")
        body["certs"] = dict(FAKE_CERTS)
        body["internal_trust_bundles"] = {"notebooks-ca": "CA", bad: "X"}
        model = await assert_refused(strict, body, 400, "internal_trust_bundles")
        assert model["status"] == 400
    assert os.listdir(outside) == []
    assert not os.path.exists(strict.workdir / "escape.crt")
    assert not os.path.exists(strict.workdir / "certs" / "hub-a")


async def test_user_names_cannot_name_folders_outside(strict, fake_hub):
    before = set(os.listdir(strict.workdir)), set(os.listdir(strict.workdir.parent))
    for bad in ("../../x", "../escaped", "/tmp/abs", "a\nINFO forged log line", "bob\n"):
        body = start_body(fake_hub.url, user=bad, name="named")
        await assert_refused(strict, body, 400, "JUPYTERHUB_USER")
    assert (set(os.listdir(strict.workdir)), set(os.listdir(strict.workdir.parent))) == before


async def test_a_start_id_is_no_bool(strict, fake_hub):
    for value in (True, False):
        body = start_body(fake_hub.url, name="boolean")
        body["user_options"]["start_id"] = value
        await assert_refused(strict, body, 400, "start_id")


async def test_a_planted_symlink_is_not_followed(strict, fake_hub, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    os.makedirs(strict.certs_dir, exist_ok=True)
    link = os.path.join(strict.certs_dir, "hub-b")
    os.symlink(target, link)
    try:
        body = start_body(fake_hub.url, name="linked")
        body["certs"] = dict(FAKE_CERTS)
        response = await start(strict, body, hub="hub-b")
        assert response.code == 419, response.body
        assert os.listdir(target) == []
        assert json_of(await api_request(strict, "services", hub="hub-b")) == []
    finally:
        os.unlink(link)


async def test_certificates_stay_in_the_servers_own_folder(strict, fake_hub):
    body = start_body(fake_hub.url, name="tls")
    body["certs"] = dict(FAKE_CERTS)
    body["internal_trust_bundles"] = {"notebooks-ca": "CA", "hub-ca": "HUB"}
    response = await start(strict, body)
    assert response.code == 200, response.body
    folder = os.path.join(strict.certs_dir, "hub-a", f"tls~{body['user_options']['start_id']}")
    assert sorted(os.listdir(folder)) == [
        "cafile.pem", "certfile.pem", "hub-ca.crt", "keyfile.pem", "notebooks-ca.crt",
    ]  # fmt: skip
    await stop_server(strict, body)
    assert not os.path.exists(folder)


def test_unsafe_hub_names_stop_the_outpost_at_startup(tmp_path):
    env = dict(os.environ, OUTPOST_HUB_CREDENTIALS=json.dumps({"../evil": "password-1"}))
    result = subprocess.run(
        [sys.executable, "-m", "jupyterhub_outpost", "--port=0", "--ip=127.0.0.1",
         f"--db=sqlite:///{tmp_path}/outpost.sqlite"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Hub names must" in result.stderr and "'../evil'" in result.stderr
    assert "password-1" not in result.stderr
    assert not os.path.exists(tmp_path / "outpost.sqlite")


# accounts


@pytest.mark.parametrize("account", ["root", "daemon", "nobody"])
async def test_system_accounts_run_no_servers(strict, fake_hub, account):
    body = start_body(fake_hub.url, user=account, name="system")
    model = await assert_refused(strict, body, 419, account)
    assert model["class"] == "AccountRefusedError"
    assert fake_hub.calls("event", account, "system") == []


async def test_an_account_that_does_not_exist_is_not_refused_by_the_policy(strict, fake_hub):
    body = start_body(fake_hub.url, user="no-such-account-here", name="unknown")
    response = await start(strict, body)
    assert response.code == 200, response.body
    await stop_server(strict, body)


async def hook_account(hub, user_name):
    return {"carol": "root"}.get(user_name, f"{hub}_{user_name}")


@pytest.fixture(scope="module")
async def mapped(tmp_path_factory):
    """An Outpost that maps hub users to accounts: a template, and a hook for hub-b"""
    workdir = tmp_path_factory.mktemp("mapped")
    cfg = outpost_config(
        workdir, spawner_cmd=["sleep", "600"], send_events=False,
        account_name_template={"hub-a": "{hub}-{username}"},
    )  # fmt: skip
    outpost = await start_outpost(cfg)
    outpost.workdir = workdir
    yield outpost
    await stop_outpost(outpost)


async def test_the_mapped_account_is_the_spawners_user(mapped, fake_hub):
    body = start_body(fake_hub.url, user="alice", name="mapped")
    response = await start(mapped, body)
    assert response.code == 200, response.body
    # the account names the home folder; the server still knows alice
    assert os.path.isdir(mapped.workdir / "home-hub-a-alice")
    pids = await wait_until(
        lambda: pids_with_env("JUPYTERHUB_API_TOKEN", token_of(body)), timeout=20,
        message="the server's process",
    )  # fmt: skip
    assert set(pids) <= set(pids_with_env("JUPYTERHUB_USER", "alice"))
    assert [s["user"] for s in await listing(mapped)] == ["alice"]
    await stop_server(mapped, body)


async def test_an_async_hook_maps_and_the_mapped_account_is_checked(mapped, fake_hub):
    mapped.policy.account_name_hook = hook_account
    try:
        body = start_body(fake_hub.url, user="dave", name="hooked")
        response = await start(mapped, body, hub="hub-b")
        assert response.code == 200, response.body
        assert os.path.isdir(mapped.workdir / "home-hub-b_dave")
        await stop_server_of(mapped, body, "hub-b")
        refused = start_body(fake_hub.url, user="carol", name="hooked")
        response = await start(mapped, refused, hub="hub-b")
        assert response.code == 419, response.body
        assert "'root'" in json_of(response)["args"][0]
    finally:
        mapped.policy.account_name_hook = None


async def stop_server_of(app, body, hub):
    response = await api_request(
        app, "services", body["name"], body["user_options"]["start_id"], method="DELETE", hub=hub
    )
    assert response.code == 200, response.body


# overrides and environment


@pytest.mark.parametrize(
    "misc, word",
    [
        ({"cmd": ["/bin/sh", "-c", "id > /tmp/outpost-owned"]}, "cmd"),
        ({"shell_cmd": ["/bin/sh", "-c"]}, "shell_cmd"),
        ({"args": ["--debug"]}, "args"),
        ({"home_dir_template": "/proc/{username}"}, "home_dir_template"),
        ({"port": -1}, "port"),
        ({"port": True}, "port"),
        ({"port": 70000}, "port"),
        ({"ip": "127.0.0.1", "environment": {"X": "1"}}, "environment"),
    ],
)
async def test_overrides_beyond_the_clients_are_refused_by_default(strict, fake_hub, misc, word):
    body = start_body(fake_hub.url, name="override", misc=misc)
    model = await assert_refused(strict, body, 419, word)
    assert model["class"] == "OverrideRefusedError"


async def test_the_clients_overrides_are_accepted(strict, fake_hub):
    misc = {"ip": "127.0.0.1", "port": 0, "internal_ssl": False, "services_enabled": True,
            "extra_labels": {"a": "b"}, "pod_name_template": "x", "dns_name_template": "y"}  # fmt: skip
    body = start_body(fake_hub.url, name="client", misc=misc)
    response = await start(strict, body)
    assert response.code == 200, response.body
    host, port = json_of(response)["service"].split(":")
    assert host == "127.0.0.1" and 0 < int(port) <= 65535
    await stop_server(strict, body)


@pytest.mark.parametrize("key", ["PATH", "LD_PRELOAD", "PYTHONPATH", "PYTHONSTARTUP", "BASH_ENV"])
async def test_program_environment_keys_are_refused(strict, fake_hub, key):
    body = start_body(fake_hub.url, name="env")
    body["env"][key] = "/tmp/hub-controlled"
    model = await assert_refused(strict, body, 419, key)
    assert "/tmp/hub-controlled" not in json.dumps(model)


async def test_the_operator_may_allow_overrides_and_env_keys(strict, fake_hub):
    strict.policy.allowed_overrides = frozenset({"cmd"})
    strict.policy.allowed_env_keys = frozenset({"PYTHONPATH"})
    try:
        body = start_body(fake_hub.url, name="allowed", misc={"cmd": ["sleep", "601"]})
        body["env"]["PYTHONPATH"] = "/opt/site"
        response = await start(strict, body)
        assert response.code == 200, response.body
        await stop_server(strict, body)
    finally:
        strict.policy.allowed_overrides = frozenset()
        strict.policy.allowed_env_keys = frozenset()


@pytest.mark.parametrize("missing", ["keyfile", "certfile", "cafile"])
async def test_incomplete_certificates_are_400_and_nothing_is_written(app, fake_hub, missing):
    body = start_body(fake_hub.url, user="certless")
    body["certs"] = {"keyfile": "KEY", "certfile": "CERT", "cafile": "CA"}
    del body["certs"][missing]
    body["internal_trust_bundles"] = {"hub-ca": "CA"}
    response = await api_request(app, "services", method="POST", body=body)
    assert response.code == 400, response.body
    assert missing in json_of(response)["message"]
    assert json_of(await api_request(app, "services")) == []
    start_id = body["user_options"]["start_id"]
    assert not os.path.exists(os.path.join(app.certs_dir, "hub-a", f"~{start_id}"))
