"""Schema upgrades with servers running: a database written by the first
schema revision, holding a real running server, is backed up and upgraded
by a real ``jupyterhub-outpost`` process, which then polls, lists, counts
and stops that server.
"""

import asyncio
import glob
import json
import signal
import sqlite3
import subprocess
from datetime import datetime, timezone

import pytest
from cryptography.fernet import Fernet

from jupyterhub_outpost import dbutil
from jupyterhub_outpost.crypto import CryptKeeper

from .utils import (
    OutpostProcess,
    api_request,
    json_of,
    pid_alive,
    pids_with_env,
    process_config,
    sqlite_only,
    start_body,
    tokens_of,
)

pytestmark = [
    pytest.mark.slow,
    sqlite_only("the upgrade backs up the SQLite file, and the test writes it with sqlite3"),
]

FIRST_REVISION = "a1b2c3d4e5f6"
SPAWNER_CLASS = "jupyterhub.spawner.SimpleLocalProcessSpawner"


def sqlite_time(dt):
    """A datetime as SQLAlchemy stores it in SQLite (UTC, no offset)"""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def insert_first_revision_server(db_path, crypt, body, pid, flavor):
    """Rows of one running server, in the columns of revision a1b2c3d4e5f6"""
    env = body["env"]
    now = sqlite_time(datetime.now(timezone.utc))
    seal = lambda obj: crypt.encrypt(json.dumps(obj).encode())  # noqa: E731
    request = {"env": env, "user_options": body["user_options"], "misc": {}}
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO hubs (id, name, created) VALUES (1, 'hub-a', ?)", (now,))
        conn.execute(
            "INSERT INTO users (id, hub_id, hub_user_id, name) VALUES (1, 1, ?, ?)",
            (env["JUPYTERHUB_USER_ID"], env["JUPYTERHUB_USER"]),
        )
        conn.execute(
            "INSERT INTO servers (id, hub_id, user_id, name, start_id, spawner_class, flavor,"
            " state, request, service, start_pending, stop_pending, started, last_update)"
            " VALUES (1, 1, 1, ?, ?, ?, ?, ?, ?, '127.0.0.1:40000', 0, 0, ?, ?)",
            (body["name"], body["user_options"]["start_id"], SPAWNER_CLASS, flavor,
             seal({"pid": pid}), seal(request), now, now),
        )  # fmt: skip
    conn.close()


def query(db_path, sql):
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def legacy_server(tmp_path, fake_hub):
    """A real process the test launched (so the test must reap it), as the
    server of a start request; killed at teardown if still running"""
    body = start_body(fake_hub.url, user="olga", user_id=42, name="legacy")
    fake_hub.tokens.update(tokens_of(body))
    (tmp_path / "home-olga").mkdir()
    proc = subprocess.Popen(
        ["sleep", "600"], env=body["env"], cwd=tmp_path / "home-olga",
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    yield body, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


async def test_first_revision_database_is_upgraded_and_its_server_managed(
    tmp_path, fake_hub, legacy_server
):
    body, proc = legacy_server
    name, start_id = body["name"], body["user_options"]["start_id"]
    db_path = str(tmp_path / "outpost.sqlite")
    key = Fernet.generate_key().decode()
    dbutil.upgrade(f"sqlite:///{db_path}", FIRST_REVISION)
    assert query(db_path, "SELECT version_num FROM alembic_version") == [(FIRST_REVISION,)]
    insert_first_revision_server(db_path, CryptKeeper([key]), body, proc.pid, "small")
    assert pids_with_env("JUPYTERHUB_API_TOKEN", body["env"]["JUPYTERHUB_API_TOKEN"]) == [proc.pid]

    config = process_config(tmp_path, db_path=db_path, cmd=["sleep", "600"],
                            flavors={"small": {"max": 1}})  # fmt: skip
    outpost = OutpostProcess(tmp_path, config, extra_env={"OUTPOST_CRYPT_KEY": key})
    try:
        await asyncio.to_thread(outpost.start)

        # backed up first, then upgraded
        [backup] = glob.glob(f"{db_path}.*.bak")
        assert query(backup, "SELECT version_num FROM alembic_version") == [(FIRST_REVISION,)]
        assert query(backup, "SELECT name, start_id FROM servers") == [(name, start_id)]
        head = dbutil.head_revision()
        assert head != FIRST_REVISION
        assert query(db_path, "SELECT version_num FROM alembic_version") == [(head,)]
        upgraded = f"Upgrading the database schema from {FIRST_REVISION} to {head}"
        assert upgraded in outpost.log_text()
        assert query(db_path, "SELECT end_date, end_warned FROM servers") == [(None, 0)]
        assert ("flavor-accounting",) in query(db_path, "SELECT name FROM leases")

        # the server of the old schema: running, listed, counted
        response = await api_request(outpost, "services", name, start_id)
        assert response.code == 200, response.body
        assert json_of(response) == {"status": None}
        response = await api_request(outpost, "services")
        [listed] = json_of(response)
        assert (listed["name"], listed["start_id"], listed["user"]) == (name, start_id, "olga")
        assert (listed["flavor"], listed["start_pending"], listed["stop_pending"]) == (
            "small", False, False
        )
        response = await api_request(outpost, "flavors")
        assert json_of(response)["small"]["current"] == 1
        refused = start_body(fake_hub.url, user="newcomer", user_id=43,
                             user_options={"flavor": "small"})  # fmt: skip
        response = await api_request(outpost, "services", method="POST", body=refused)
        assert response.code == 419 and json_of(response)["args"] == ["Flavor small: 1 of 1 in use"]

        # DELETE really ends it; the test reaps its child meanwhile
        stop, _ = await asyncio.gather(
            api_request(outpost, "services", name, start_id, method="DELETE"),
            asyncio.to_thread(proc.wait, 30),
        )
        assert stop.code == 200, stop.body
        assert not pid_alive(proc.pid)
        assert proc.returncode == -signal.SIGINT
        response = await api_request(outpost, "services", name, start_id)
        assert response.code == 404
        assert json_of(await api_request(outpost, "services")) == []
        assert json_of(await api_request(outpost, "flavors"))["small"]["current"] == 0
        assert "never died" not in outpost.log_text()

        await asyncio.to_thread(outpost.terminate)
        assert outpost.proc.returncode == 0
    finally:
        if outpost.proc is not None and outpost.proc.poll() is None:
            outpost.proc.kill()
            outpost.proc.wait(10)
