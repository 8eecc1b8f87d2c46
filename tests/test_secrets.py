"""Secrets a hub hands over (tokens, its password, certificates, the user's
access token) stay out of logs, error bodies, listings and the database;
internal_ssl certificates live in a private directory only while the
server runs.
"""

import json
import logging
import os
import stat

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyterhub_outpost import dbutil

from .utils import (
    HUB_CREDENTIALS,
    api_request,
    json_of,
    pid_alive,
    pids_with_env,
    start_body,
    stored_bytes,
    wait_until,
)


class CapturingHandler(logging.Handler):
    """Keeps every record it sees, once"""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = {}
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record):
        self.records.setdefault(id(record), self.format(record))

    def text(self):
        return "\n".join(self.records.values())


@pytest.fixture
def captured_logs(app):
    """Everything logged at any level while the test runs"""
    handler = CapturingHandler()
    loggers = [
        app.log,
        logging.getLogger("tornado.access"),
        logging.getLogger("tornado"),
        logging.getLogger("jupyterhub"),
        logging.getLogger(),
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    yield handler
    for logger, level in zip(loggers, levels):
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """Real certificates, as a hub with internal_ssl makes them (certipy)"""
    from certipy import Certipy

    certipy = Certipy(store_dir=str(tmp_path_factory.mktemp("hub-certs")))
    certipy.create_ca("notebooks-ca")
    server = certipy.create_signed_pair(
        "user-sam", "notebooks-ca", alt_names=["IP:127.0.0.1", "DNS:localhost"]
    )
    client = certipy.create_signed_pair("hub-internal", "notebooks-ca")

    def read(path):
        with open(path) as f:
            return f.read()

    files = server["files"]
    return {
        "certs": {
            "keyfile": read(files["key"]),
            "certfile": read(files["cert"]),
            "cafile": read(files["ca"]),
        },
        "internal_trust_bundles": {
            "hub-ca": read(files["ca"]),
            "notebooks-ca": read(files["ca"]),
        },
        "ca_path": files["ca"],
        "client_cert": client["files"]["cert"],
        "client_key": client["files"]["key"],
    }


def with_certs(body, tls):
    body["certs"] = dict(tls["certs"])
    body["internal_trust_bundles"] = dict(tls["internal_trust_bundles"])
    return body


def secret_texts(body, *extra):
    """The secrets of one start body, and distinctive pieces of them"""
    env = body["env"]
    found = [env["JUPYTERHUB_API_TOKEN"], env["JUPYTERHUB_FLAVORS_UPDATE_TOKEN"], *extra]
    key = body["certs"].get("keyfile", "")
    if key:
        found.append(key)
        # each base64 line of the private key on its own
        found += [line for line in key.splitlines() if len(line) >= 40 and "-----" not in line]
    return found


def leaked(secrets, *texts):
    """Which of ``secrets`` appear in any of ``texts`` (str or bytes)"""
    result = set()
    for text in texts:
        for secret in secrets:
            needle = secret.encode() if isinstance(text, bytes) else secret
            if needle in text:
                result.add(secret[:12] + "...")
    return result


def db_files(app):
    """The database files' bytes (SQLite), or the stored records (PostgreSQL)"""
    path = dbutil.sqlite_path(app.db_url)
    if not path:
        return [stored_bytes(app.db_url)]
    contents = []
    for suffix in ("", "-wal", "-journal"):
        if os.path.exists(path + suffix):
            with open(path + suffix, "rb") as f:
                contents.append(f.read())
    return contents


def files_under(directory):
    result = {}
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path) as f:
                result[path] = f.read()
    return result


def environ_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in pairs}


async def test_secrets_stay_out_of_logs_bodies_listings_and_db(app, fake_hub, tls, captured_logs):
    hub_password = HUB_CREDENTIALS["hub-a"]
    access_token = "user-access-token-0123456789abcdef"
    auth_state_secret = "auth-state-refresh-token-fedcba9876543210"
    typo_password = hub_password + "-typo"
    body = with_certs(start_body(fake_hub.url, user="sam", name="secretive"), tls)
    body["authentication"] = {"name": "sam", "groups": ["g"], "access_token": access_token}
    start_id = body["user_options"]["start_id"]
    failing = with_certs(
        start_body(fake_hub.url, user="sam", name="failing", misc={"cmd": ["/nonexistent/x"]}), tls
    )
    for b in (body, failing):
        fake_hub.tokens.update(secret_texts(b)[:2])
    secrets = (
        secret_texts(body, hub_password, access_token, auth_state_secret, typo_password)
        + secret_texts(failing)
    )
    answers = []

    async def call(*path, **kwargs):
        response = await api_request(app, *path, **kwargs)
        answers.append(response.body or b"")
        return response

    response = await call(
        "services", method="POST", body=body,
        headers={"auth-state-refresh_token": auth_state_secret},
    )  # fmt: skip
    assert response.code == 200, response.body
    [pid] = await wait_until(
        lambda: pids_with_env("JUPYTERHUB_API_TOKEN", body["env"]["JUPYTERHUB_API_TOKEN"]),
        timeout=20,
        message="the server's process",
    )
    # while it runs, the database holds its record, encrypted
    database = db_files(app)
    assert database and leaked(secrets, *database) == set()

    response = await call("services", "secretive", f"{start_id}?collect_logs=true")
    assert response.code == 200 and json_of(response)["status"] is None, response.body
    assert isinstance(json_of(response)["logs"], list)
    for path in ("services", "services/"):
        response = await call(path)
        assert [s["name"] for s in json_of(response)] == ["secretive"]

    # error answers do not echo what was sent
    response = await call("services", method="POST", raw_body=json.dumps(body)[:-3])
    assert response.code == 400
    broken_env = dict(body, env=dict(body["env"], NUMBER=1))
    response = await call("services", method="POST", body=broken_env)
    assert response.code == 400
    response = await call("services", method="POST", body=body)
    assert response.code == 409
    response = await call("services", password=typo_password)
    assert response.code == 401

    # a failed start (plain, then async: the hub gets a failed event)
    response = await call("services", method="POST", body=failing)
    assert response.code == 419 and json_of(response)["class"] == "FileNotFoundError"
    failing["user_options"]["start_id"] += "-async"
    response = await call("services", method="POST", body=failing, headers={"execution-type": "async"})
    assert response.code == 202

    def failed_events():
        return [e for e in fake_hub.calls("event", "sam", "failing") if e["body"].get("failed")]

    await wait_until(failed_events, timeout=20, message="the failed event")

    response = await call("services", "secretive", f"{start_id}?collect_logs=true", method="DELETE")
    assert response.code == 200, response.body
    await wait_until(lambda: not pid_alive(pid), timeout=30, message="process ended")
    await wait_until(
        lambda: len([c for c in fake_hub.calls("flavors") if c["token"] in secrets]) >= 4,
        timeout=20,
        message="flavor updates",
    )

    logs = captured_logs.text()
    # the capture works: it saw the start, the access log and debug lines
    assert "secretive" in logs and "POST /services" in logs and "DEBUG" in logs
    assert leaked(secrets, logs) == set()
    assert leaked(secrets, *answers) == set()
    assert leaked(secrets, *(json.dumps(e["body"]) for e in fake_hub.received)) == set()
    assert leaked(secrets, *db_files(app)) == set()


async def test_internal_ssl_certs_are_private_and_removed_after_stop(app, fake_hub, tls):
    body = with_certs(start_body(fake_hub.url, user="sam", name="tls"), tls)
    start_id = body["user_options"]["start_id"]
    certs_dir = os.path.abspath(app.internal_certs_location)
    response = await api_request(app, "services", method="POST", body=body)
    assert response.code == 200, response.body
    address = json_of(response)["service"]

    # the PEM texts were written to one private directory under the location
    written = files_under(certs_dir)
    sent = {**body["certs"], **body["internal_trust_bundles"]}
    [key_path] = [p for p, text in written.items() if text == sent["keyfile"]]
    directory = os.path.dirname(key_path)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    ours = {p: t for p, t in written.items() if os.path.dirname(p) == directory}
    assert sorted(ours.values()) == sorted(sent.values())
    for path in ours:
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path

    # the server got their paths and serves HTTPS with them
    [pid] = await wait_until(
        lambda: pids_with_env("JUPYTERHUB_API_TOKEN", body["env"]["JUPYTERHUB_API_TOKEN"]),
        timeout=20,
        message="the server's process",
    )
    env = environ_of(pid)
    assert env["JUPYTERHUB_SSL_KEYFILE"] == key_path
    assert os.path.dirname(env["JUPYTERHUB_SSL_CERTFILE"]) == directory
    assert os.path.dirname(env["JUPYTERHUB_SSL_CLIENT_CA"]) == directory
    assert env["JUPYTERHUB_SERVICE_URL"].startswith("https://")

    url = f"https://{address}{body['env']['JUPYTERHUB_SERVICE_PREFIX']}api"

    async def answers_https():
        request = HTTPRequest(
            url, ca_certs=tls["ca_path"], client_cert=tls["client_cert"],
            client_key=tls["client_key"], request_timeout=3,
        )  # fmt: skip
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except OSError:
            return False
        return response.code == 200 and b"version" in response.body

    await wait_until(answers_https, timeout=60, message="the server answers HTTPS")
    assert json_of(await api_request(app, "services", "tls", start_id)) == {"status": None}

    response = await api_request(app, "services", "tls", start_id, method="DELETE")
    assert response.code == 200, response.body
    assert not os.path.exists(directory)
    assert sent["keyfile"] not in files_under(certs_dir).values()
    await wait_until(lambda: not pid_alive(pid), timeout=30, message="process ended")


async def test_certs_of_failed_start_are_removed(app, fake_hub, tls):
    body = with_certs(
        start_body(fake_hub.url, user="sam", name="tls-broken", misc={"cmd": ["/nonexistent/x"]}),
        tls,
    )
    response = await api_request(app, "services", method="POST", body=body)
    assert response.code == 419, response.body
    assert body["certs"]["keyfile"] not in files_under(app.internal_certs_location).values()
    assert json_of(await api_request(app, "services")) == []
