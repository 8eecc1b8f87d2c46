"""Helpers for the tests: real HTTP requests to a running Outpost."""

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import sqlalchemy
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyterhub_outpost.utils import wait_until  # noqa: F401

HUB_CREDENTIALS = {"hub-a": "password-of-hub-a", "hub-b": "password-of-hub-b"}

# a postgresql URL: every Outpost of the tests gets a fresh database on that server
TEST_DB_URL = os.environ.get("OUTPOST_TEST_DB_URL", "")
ON_POSTGRES = TEST_DB_URL.startswith("postgresql")


def sqlite_only(reason):
    """Mark a test whose behaviour exists for SQLite only (skipped on PostgreSQL)"""
    return pytest.mark.skipif(ON_POSTGRES, reason=f"SQLite only: {reason}")


# a test whose subject (the HTTP layer, pure policy) does not depend on the
# database: the suite's PostgreSQL run leaves it to the SQLite run
database_independent = pytest.mark.skipif(
    ON_POSTGRES, reason="does not depend on the database: runs on SQLite"
)

# a test that drives a real JupyterHub needs its proxy; ci/test.sh installs
# it, so only a developer without npm skips such tests
needs_hub_proxy = pytest.mark.skipif(
    shutil.which("configurable-http-proxy") is None and not os.environ.get("CI"),
    reason="configurable-http-proxy (npm) is not installed",
)

# databases made by new_db_url: path they stand for -> URL, in creation order
test_databases = {}


def _admin_connection():
    """An autocommit psycopg connection to the server of OUTPOST_TEST_DB_URL"""
    import psycopg

    url = sqlalchemy.make_url(TEST_DB_URL).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


def new_db_url(directory, filename="outpost.sqlite"):
    """The database of an Outpost whose SQLite file would be ``directory/filename``.

    SQLite (default): that file. With a postgresql ``OUTPOST_TEST_DB_URL``: a
    new, empty database on that server, the same one for the same path (two
    processes on one file share one database); :func:`drop_databases` ends it.
    Another ``OUTPOST_TEST_DB_URL`` is used as it is.
    """
    path = os.path.join(str(directory), filename)
    if not ON_POSTGRES:
        return TEST_DB_URL or f"sqlite:///{path}"
    if path not in test_databases:
        name = f"outpost_test_{uuid.uuid4().hex[:16]}"
        with _admin_connection() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = sqlalchemy.make_url(TEST_DB_URL).set(database=name)
        test_databases[path] = url.render_as_string(hide_password=False)
    return test_databases[path]


def drop_databases(urls):
    """Drop PostgreSQL databases made by :func:`new_db_url` (ending their connections)"""
    urls = set(urls)
    if not urls:
        return
    with _admin_connection() as conn:
        for url in urls:
            name = sqlalchemy.make_url(url).database
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()", (name,)
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    for path, url in list(test_databases.items()):
        if url in urls:
            del test_databases[path]


def query_db(db_url, sql):
    """Rows of one SQL statement on any test database (committed, engine disposed)"""
    engine = sqlalchemy.create_engine(db_url)
    try:
        with engine.begin() as conn:
            return [tuple(row) for row in conn.execute(sqlalchemy.text(sql))]
    finally:
        engine.dispose()


def stored_bytes(db_url):
    """What the database keeps on disk, as bytes, to look for secrets in.

    SQLite: the file with its -wal, -shm and -journal files. PostgreSQL: the
    stored server records (names, encrypted request and state) as the
    server returns them.
    """
    if db_url.startswith("sqlite:///"):
        path = db_url[len("sqlite:///"):].split("?", 1)[0]
        assert os.path.exists(path), path
        data = b""
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(path + suffix):
                with open(path + suffix, "rb") as f:
                    data += f.read()
        return data
    rows = query_db(db_url, "SELECT name, request, state FROM servers")
    rows += query_db(db_url, "SELECT name, hub_user_id, '' FROM users")
    return b"".join(
        value.encode() if isinstance(value, str) else bytes(value or b"")
        for row in rows for value in row
    )


def basic_auth(hub, password=None):
    password = HUB_CREDENTIALS.get(hub, "") if password is None else password
    return "Basic " + base64.b64encode(f"{hub}:{password}".encode()).decode()


def base_url_of(app):
    return f"http://127.0.0.1:{app.bound_port}{app.base_url}"


async def api_request(app, *path, method="GET", hub="hub-a", body=None, headers=None,
                      password=None, auth=True, raw_body=None, timeout=60, client=None):
    """Send a real HTTP request to the Outpost; return the response (never raises).

    ``client``: an ``AsyncHTTPClient`` to use instead of the shared one (whose
    10 connections the in-process Outpost also uses to call the hub).
    """
    url = base_url_of(app) + "/".join(str(p) for p in path)
    all_headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if auth:
        all_headers["Authorization"] = basic_auth(hub, password)
    all_headers.update(headers or {})
    if raw_body is None and body is not None:
        raw_body = json.dumps(body)
    if raw_body is None and method in ("POST", "PUT", "PATCH"):
        raw_body = ""
    request = HTTPRequest(
        url, method=method, headers=all_headers, body=raw_body,
        allow_nonstandard_methods=True, request_timeout=timeout,
    )
    return await (client or AsyncHTTPClient()).fetch(request, raise_error=False)


def json_of(response):
    return json.loads(response.body or b"null")


def start_body(hub_api_url, user="alice", user_id=1, name="", start_id=None, misc=None,
               user_options=None, flavors_update=True):
    """A start request shaped like the one OutpostSpawner sends"""
    start_id = start_id or uuid.uuid4().hex
    token = secrets.token_hex(16)
    prefix = f"/user/{user}/{name}/" if name else f"/user/{user}/"
    server_part = f"/{name}" if name else ""
    env = {
        "JUPYTERHUB_API_TOKEN": token,
        "JPY_API_TOKEN": token,
        "JUPYTERHUB_CLIENT_ID": f"jupyterhub-user-{user}{'-' + name if name else ''}",
        "JUPYTERHUB_API_URL": hub_api_url,
        "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_USER": user,
        "JUPYTERHUB_USER_ID": str(user_id),
        "JUPYTERHUB_SERVER_NAME": name,
        "JUPYTERHUB_SERVICE_PREFIX": prefix,
        "JUPYTERHUB_ACTIVITY_URL": f"{hub_api_url}/users/{user}/activity",
        "JUPYTERHUB_EVENTS_URL": f"{hub_api_url}/users/progress/events/{user}{server_part}",
        "JUPYTERHUB_SETUPTUNNEL_URL": f"{hub_api_url}/users/setuptunnel/{user}{server_part}",
        "JUPYTERHUB_SERVICE_URL": f"http://0.0.0.0:8888{prefix}",
    }
    if flavors_update:
        env["JUPYTERHUB_FLAVORS_UPDATE_URL"] = f"{hub_api_url}/outpostflavors/outpost-test"
        env["JUPYTERHUB_FLAVORS_UPDATE_TOKEN"] = secrets.token_hex(16)
    options = {"start_id": start_id}
    options.update(user_options or {})
    return {
        "name": name,
        "env": env,
        "user_options": options,
        "misc": misc or {},
        "certs": {},
        "internal_trust_bundles": {},
    }


def tokens_of(body):
    env = body["env"]
    return {env["JUPYTERHUB_API_TOKEN"], env.get("JUPYTERHUB_FLAVORS_UPDATE_TOKEN")} - {None}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_for_port(port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


PROCESS_CONFIG = """
c = get_config()  # noqa
c.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.JupyterHubOutpost.db_url = {db_url!r}
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
c.SimpleLocalProcessSpawner.home_dir_template = "{workdir}/home-{{username}}"
c.Spawner.ip = "127.0.0.1"
c.Spawner.cmd = {cmd!r}
c.Spawner.args = {args!r}
c.Spawner.start_timeout = 60
c.HubClient.retries = 0
c.HubClient.request_timeout = 5
# the traits tests set per start through misc
c.JupyterHubOutpost.allowed_overrides = ["cmd", "start_delay", "delay_after_launch", "start_timeout"]
"""


def process_config(workdir, db_path=None, cmd=None, **traits):
    """``outpost_config.py`` text for an :class:`OutpostProcess`.

    SimpleLocalProcessSpawner on 127.0.0.1 with the SQLite file ``db_path``
    (default: ``outpost.sqlite`` in ``workdir``), or the PostgreSQL database
    :func:`new_db_url` makes for that path; ``cmd`` replaces
    jupyterhub-singleuser (``["sleep", "600"]`` when a real process is all
    a test needs); ``traits`` are more ``JupyterHubOutpost`` settings.
    """
    db_path = str(db_path or os.path.join(str(workdir), "outpost.sqlite"))
    db_url = new_db_url(os.path.dirname(db_path), os.path.basename(db_path))
    if cmd is None:
        cmd, args = ["jupyterhub-singleuser"], ["--ServerApp.allow_root=True"]
    else:
        args = []
    text = PROCESS_CONFIG.format(workdir=workdir, db_url=db_url, cmd=cmd, args=args)
    for name, value in traits.items():
        text += f"c.JupyterHubOutpost.{name} = {value!r}\n"
    return text


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_env():
    """Environment of an :class:`OutpostProcess` whose spawner classes live in
    this repository (tests.mocking, benchmarks), with a fresh encryption key"""
    from cryptography.fernet import Fernet

    return {
        "OUTPOST_CRYPT_KEY": Fernet.generate_key().decode(),
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    }


class OutpostProcess:
    """A real ``jupyterhub-outpost`` process (console script) for CLI and crash tests"""

    def __init__(self, workdir, config_text, hub_credentials=None, extra_env=None):
        self.workdir = str(workdir)
        self.port = free_port()
        self.config_path = os.path.join(self.workdir, "outpost_config.py")
        with open(self.config_path, "w") as f:
            f.write(config_text)
        self.env = dict(os.environ)
        self.env["OUTPOST_HUB_CREDENTIALS"] = json.dumps(hub_credentials or HUB_CREDENTIALS)
        self.env.update(extra_env or {})
        self.proc = None
        self.log_path = os.path.join(self.workdir, "outpost.log")

    def start(self, *args):
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub_outpost", "-f", self.config_path,
             "--ip", "127.0.0.1", "--port", str(self.port), *args],
            cwd=self.workdir, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,  # no tty: jupyter-server would ask before stopping on SIGINT
        )
        self.wait_listening()

    def wait_listening(self, timeout=30):
        """Wait until the port accepts connections; fail at once if the process ended"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"jupyterhub-outpost exited with {self.proc.returncode}:\n"
                    + self.log_text()[-3000:]
                )
            try:
                return wait_for_port(self.port, timeout=0.25)
            except TimeoutError:
                pass
        raise TimeoutError(f"jupyterhub-outpost does not listen on {self.port} after {timeout}s")

    def end(self):
        """Kill the process if it still runs (test teardown)"""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if getattr(self, "log_file", None):
            self.log_file.close()

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log_file.close()

    def terminate(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.log_file.close()

    @property
    def bound_port(self):
        return self.port

    base_url = "/"

    def log_text(self):
        with open(self.log_path, encoding="utf8", errors="replace") as f:
            return f.read()


def pids_with_env(key, value):
    """Pids of live processes whose environment has ``key=value`` (Linux /proc)"""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if needle in environ and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


async def server_answers(address, prefix):
    """True when a jupyter server answers ``/api`` at ``address`` + ``prefix``"""
    url = f"http://{address}{prefix}api"
    try:
        response = await AsyncHTTPClient().fetch(url, raise_error=False, request_timeout=2)
    except OSError:
        return False
    return response.code == 200 and b"version" in response.body


def kill_servers_of(tokens):
    """SIGKILL every process whose JUPYTERHUB_API_TOKEN is one of ``tokens``"""
    for token in tokens:
        for pid in pids_with_env("JUPYTERHUB_API_TOKEN", token):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def key_of(body):
    """(name, start_id) of a start body: the path of its server"""
    return body["name"], body["user_options"]["start_id"]


def processes_of(body):
    """Pids of the live processes started for a start body"""
    return pids_with_env("JUPYTERHUB_API_TOKEN", body["env"]["JUPYTERHUB_API_TOKEN"])

