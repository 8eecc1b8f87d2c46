"""The command line: ``jupyterhub-outpost`` run as an operator runs it.

Each test runs the real console script (or ``python -m jupyterhub_outpost``)
in a subprocess, in its own temporary working directory, bound to
127.0.0.1. The schema tests build a database with the application itself
and then drive :mod:`jupyterhub_outpost.dbutil` and ``upgrade-db``.
"""

import glob
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import inspect
from traitlets import TraitError
from traitlets.config import Config, PyFileConfigLoader

from jupyterhub_outpost import crypto, dbutil, orm
from jupyterhub_outpost._version import __version__
from jupyterhub_outpost.app import JupyterHubOutpost

from .utils import (
    HUB_CREDENTIALS,
    OutpostProcess,
    api_request,
    free_port,
    json_of,
    new_db_url,
    sqlite_only,
    start_body,
)

SCHEMA_FILE_TESTS = sqlite_only("copies a SQLite file and checks the backup made before upgrades")

SCRIPT = shutil.which("jupyterhub-outpost", path=os.path.dirname(sys.executable)) or shutil.which(
    "jupyterhub-outpost"
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRYPT_KEY = Fernet.generate_key().decode()
STORED_TOKEN = "token-of-the-kept-server-0123456789"
HEAD_REVISION = dbutil.head_revision()


def clean_env(**extra):
    """This process's environment without any OUTPOST_* setting, plus ``extra``"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    env.update(extra)
    return env


def run_cli(*args, cwd, env=None, timeout=60):
    """Run the console script to completion; return the CompletedProcess"""
    return subprocess.run(
        [SCRIPT, *args], cwd=str(cwd), env=env or clean_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


class CLIOutpost(OutpostProcess):
    """The console script with exactly the arguments a test gives (no -f, --ip, --port added)"""

    def __init__(self, workdir, port, env, base_url="/"):
        self.workdir = str(workdir)
        self.port = port
        self.env = env
        self.base_url = base_url
        self.proc = None
        self.log_path = os.path.join(self.workdir, "outpost.log")

    def start(self, *args, wait=True):
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [SCRIPT, *args], cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
            stdout=self.log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if wait:
            self.wait_listening()


@pytest.fixture
def launch():
    """``launch(workdir, *args, port=, env=, base_url=, wait=)``: a running console script.

    Every process still running at teardown is killed.
    """
    launched = []

    def _launch(workdir, *args, port, env=None, base_url="/", wait=True):
        process = CLIOutpost(workdir, port, env or clean_env(), base_url=base_url)
        launched.append(process)
        process.start(*args, wait=wait)
        return process

    yield _launch
    for process in launched:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(10)
        process.log_file.close()


def stop(process):
    """SIGTERM, as systemd or Kubernetes would send it; return the exit code"""
    process.terminate()
    return process.proc.returncode


def write_config(path, text):
    with open(path, "w") as f:
        f.write("c = get_config()  # noqa\n" + text)
    return str(path)


# help, version, generated config


def test_help_all_lists_the_traits(tmp_path):
    secret_env = clean_env(
        OUTPOST_HUB_CREDENTIALS=json.dumps({"hub-x": "never-shown-password"}),
        OUTPOST_CRYPT_KEY=CRYPT_KEY,
    )
    result = run_cli("--help-all", cwd=tmp_path, env=secret_env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for option in (
        "--JupyterHubOutpost.db_url=",
        "--JupyterHubOutpost.hub_credentials=",
        "--JupyterHubOutpost.spawner_class=",
        "--JupyterHubOutpost.crypt_keys=",
        "--JupyterHubOutpost.base_url=",
        "--HubClient.request_timeout=",
        "--Spawner.start_timeout=",
        "--LocalProcessSpawner.shell_cmd=",
        "--SimpleLocalProcessSpawner.home_dir_template=",
        "upgrade-db",
    ):
        assert option in out, option
    # the help names where secrets come from, and never echoes them
    assert "OUTPOST_HUB_CREDENTIALS" in out and "OUTPOST_CRYPT_KEY" in out
    assert "never-shown-password" not in out and CRYPT_KEY not in out
    assert not os.listdir(tmp_path), "--help-all must not create files"


def test_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == __version__
    result = subprocess.run(
        [sys.executable, "-m", "jupyterhub_outpost", "--version"], cwd=str(tmp_path),
        env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == __version__


def test_generate_config_writes_commented_file_and_never_overwrites(tmp_path):
    path = tmp_path / "cfg.py"
    env = clean_env(OUTPOST_HUB_CREDENTIALS=json.dumps({"hub-x": "never-written-password"}))
    result = run_cli("--generate-config", "-f", str(path), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    for setting in (
        "# c.JupyterHubOutpost.port = 8080",
        "c.JupyterHubOutpost.db_url",
        "c.JupyterHubOutpost.hub_credentials",
        "c.JupyterHubOutpost.spawner_class",
        "c.Spawner.start_timeout",
        "c.LocalProcessSpawner.",
        "c.SimpleLocalProcessSpawner.home_dir_template",
        "c.HubClient.retries",
    ):
        assert setting in text, setting
    # every setting is commented out: loading the file configures nothing
    assert [line for line in text.splitlines() if line.startswith("c.")] == []
    assert PyFileConfigLoader(path.name, path=str(tmp_path)).load_config() == Config()
    assert "never-written-password" not in text
    # only the file was written: no database, no key
    assert sorted(os.listdir(tmp_path)) == ["cfg.py"]

    path.write_text("# the operator's own settings\n")
    result = run_cli("--generate-config", "-f", str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert "exists" in result.stderr and "-y" in result.stderr
    assert path.read_text() == "# the operator's own settings\n"
    result = run_cli("--generate-config", "-y", "-f", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert path.read_text() == text


OWN_SECTIONS = ("JupyterHubOutpost", "HubClient", "OutpostMetrics", "StatusPage")


def test_every_generated_line_of_the_outposts_settings_runs_once_uncommented(tmp_path):
    path = tmp_path / "cfg.py"
    result = run_cli("--generate-config", "-f", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert "Undefined" not in "\n".join(
        line for line in text.splitlines() if line.split(".")[1:2] and line.split(".")[1] in OWN_SECTIONS
    )
    lines = [line[2:] for line in text.splitlines()
             if line.startswith(tuple(f"# c.{name}." for name in OWN_SECTIONS))]  # fmt: skip
    assert len(lines) > 60
    config = Config()
    for line in lines:
        exec(line, {"c": config})  # a NameError or SyntaxError fails the test
    # and each value is one its setting accepts
    outpost = JupyterHubOutpost(config=config)
    for name in config.JupyterHubOutpost:
        getattr(outpost, name)
    # the placeholders say where a computed default comes from
    assert "#  Default: 45.0 (computed when the Outpost starts" in text
    assert "#  Default: from OUTPOST_HUB_CREDENTIALS_FILE, else OUTPOST_HUB_CREDENTIALS" in text


# running


async def test_defaults_in_an_empty_working_directory(tmp_path, launch):
    port = free_port()
    outpost = launch(tmp_path, "--ip", "127.0.0.1", "--port", str(port), port=port)
    response = await api_request(outpost, "ping", auth=False)
    assert response.code == 200 and json_of(response) == {"status": "ok"}
    # no credentials configured: every hub is refused
    response = await api_request(outpost, "services")
    assert response.code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")

    assert stop(outpost) == 0
    log = outpost.log_text()
    key_file = tmp_path / "jupyterhub_outpost_crypt_key"
    for line in (
        "No config file outpost_config.py: running on the defaults",
        "No hub credentials configured",
        f"Generated the encryption key in {key_file}",
        "Database: sqlite:///jupyterhub_outpost.sqlite",
        "Spawner: jupyterhub.spawner.LocalProcessSpawner",
        f"listening on http://127.0.0.1:{port}/",
        "Shutting down",
    ):
        assert line in log, line
    assert "[D " not in log  # INFO by default
    assert (tmp_path / "jupyterhub_outpost.sqlite").exists()
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    key = key_file.read_bytes()
    crypto.CryptKeeper([key.strip()])  # a valid key

    # a second start keeps the key and the database
    outpost = launch(tmp_path, "--ip", "127.0.0.1", "--port", str(port), port=port)
    assert (await api_request(outpost, "ping", auth=False)).code == 200
    assert stop(outpost) == 0
    assert f"Using the encryption key in {key_file}" in outpost.log_text()
    assert key_file.read_bytes() == key


async def test_port_ip_log_level_and_config_options(tmp_path, launch):
    port, config_port = free_port(), free_port()
    config = write_config(tmp_path / "my_config.py", f"""
c.JupyterHubOutpost.ip = "localhost"
c.JupyterHubOutpost.port = {config_port}
c.JupyterHubOutpost.db_url = "sqlite:///{tmp_path}/my.sqlite"
c.JupyterHubOutpost.hub_credentials = {{"cli-hub": "cli-hub-password"}}
""")  # fmt: skip
    outpost = launch(
        tmp_path, f"--config={config}", "--ip=127.0.0.1", f"--port={port}", "--log-level=DEBUG",
        port=port,
    )  # fmt: skip
    # the config file was read...
    response = await api_request(outpost, "services", hub="cli-hub", password="cli-hub-password")
    assert response.code == 200, response.body
    assert json_of(response) == []
    assert (tmp_path / "my.sqlite").exists()
    assert stop(outpost) == 0
    log = outpost.log_text()
    # ...and the command line overrides it
    assert f"listening on http://127.0.0.1:{port}/" in log
    assert f":{config_port}" not in log
    assert "[D " in log
    assert "cli-hub-password" not in log


def test_base_url_is_normalized():
    assert JupyterHubOutpost(base_url="outpost").base_url == "/outpost/"
    assert JupyterHubOutpost(base_url="/outpost").base_url == "/outpost/"
    assert JupyterHubOutpost(base_url="").base_url == "/"


async def test_base_url_prefixes_every_endpoint(tmp_path, launch):
    port = free_port()
    config = write_config(tmp_path / "outpost_config.py", f"""
c.JupyterHubOutpost.base_url = "/outpost/"
c.JupyterHubOutpost.db_url = "{new_db_url(tmp_path)}"
""")  # fmt: skip
    env = clean_env(OUTPOST_HUB_CREDENTIALS=json.dumps(HUB_CREDENTIALS))
    outpost = launch(tmp_path, "-f", config, "--ip=127.0.0.1", f"--port={port}",
                     port=port, env=env, base_url="/outpost/")  # fmt: skip
    response = await api_request(outpost, "ping", auth=False)
    assert response.code == 200
    for path in ("services/", "services"):
        response = await api_request(outpost, path)
        assert response.code == 200, (path, response.body)
        assert json_of(response) == []
    response = await api_request(outpost, "services", "nothing", "here")
    assert response.code == 404

    outpost.base_url = "/"
    for path in ("ping", "services/", "services"):
        response = await api_request(outpost, path)
        assert response.code == 404, path
        assert json_of(response)["status"] == 404
    assert stop(outpost) == 0
    assert f"listening on http://127.0.0.1:{port}/outpost/" in outpost.log_text()


async def test_json_log_is_one_scrubbed_object_per_line(tmp_path, launch):
    port = free_port()
    config = write_config(tmp_path / "outpost_config.py", f"""
c.JupyterHubOutpost.enable_json_log = True
c.JupyterHubOutpost.db_url = "{new_db_url(tmp_path)}"
c.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = "{tmp_path}/home-{{username}}"
c.Spawner.cmd = ["sleep", "600"]
c.Spawner.args = []
""")  # fmt: skip
    env = clean_env(OUTPOST_HUB_CREDENTIALS=json.dumps(HUB_CREDENTIALS))
    outpost = launch(tmp_path, "-f", config, "--ip=127.0.0.1", f"--port={port}", port=port, env=env)
    body = start_body("http://127.0.0.1:9/hub/api", name="logged")
    token = body["env"]["JUPYTERHUB_API_TOKEN"]
    assert (await api_request(outpost, "services", method="POST", body=body)).code == 200
    response = await api_request(outpost, "services", "logged", body["user_options"]["start_id"],
                                 method="DELETE")  # fmt: skip
    assert response.code == 200
    assert (await api_request(outpost, "services", password="wrong")).code == 401
    assert stop(outpost) == 0

    entries = [json.loads(line) for line in outpost.log_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert all(e["time"].endswith("Z") for e in entries)
    started = [e for e in entries if " - started at " in e["message"]]
    assert started and started[0]["hub"] == "hub-a" and started[0]["server"] == "logged"
    assert started[0]["start_id"] == body["user_options"]["start_id"]
    assert any(e["level"] == "WARNING" and "401" in e["message"] for e in entries)
    text = outpost.log_text()
    assert token not in text and HUB_CREDENTIALS["hub-a"] not in text


async def test_hub_credentials_from_environment_and_file(tmp_path, launch):
    env_dir, file_dir = tmp_path / "env", tmp_path / "file"
    env_dir.mkdir()
    file_dir.mkdir()
    creds_file = file_dir / "credentials.json"
    creds_file.write_text(json.dumps({"file-hub": "file-hub-password"}))
    creds_file.chmod(0o600)
    db_config = 'c.JupyterHubOutpost.db_url = "{}"\n'
    env_port, file_port = free_port(), free_port()
    # both start at once; then wait for both
    from_env = launch(
        env_dir, "-f", write_config(env_dir / "cfg.py", db_config.format(new_db_url(env_dir))),
        "--ip=127.0.0.1", f"--port={env_port}", port=env_port, wait=False,
        env=clean_env(OUTPOST_HUB_CREDENTIALS=json.dumps({"env-hub": "env-hub-password"})),
    )  # fmt: skip
    from_file = launch(
        file_dir, "-f", write_config(file_dir / "cfg.py", db_config.format(new_db_url(file_dir))),
        "--ip=127.0.0.1", f"--port={file_port}", port=file_port, wait=False,
        env=clean_env(OUTPOST_HUB_CREDENTIALS_FILE=str(creds_file)),
    )  # fmt: skip
    from_env.wait_listening()
    from_file.wait_listening()

    async def code(process, hub, password=None, auth=True):
        response = await api_request(process, "services", hub=hub, password=password, auth=auth)
        if response.code == 401:
            assert response.headers["WWW-Authenticate"].startswith("Basic")
            assert json_of(response)["status"] == 401
        return response.code

    assert await code(from_env, "env-hub", "env-hub-password") == 200
    assert await code(from_env, "env-hub", "wrong-password") == 401
    assert await code(from_env, "env-hub", "") == 401
    assert await code(from_env, "other-hub", "env-hub-password") == 401
    assert await code(from_env, "file-hub", "file-hub-password") == 401
    assert await code(from_env, "env-hub", auth=False) == 401
    assert await code(from_file, "file-hub", "file-hub-password") == 200
    assert await code(from_file, "file-hub", "env-hub-password") == 401
    assert await code(from_file, "env-hub", "env-hub-password") == 401
    response = await api_request(from_env, "services", headers={"Authorization": "Basic !!!"},
                                 auth=False)  # fmt: skip
    assert response.code == 401

    for process, password in ((from_env, "env-hub-password"), (from_file, "file-hub-password")):
        assert stop(process) == 0
        assert password not in process.log_text()


async def test_example_config_starts_as_is(tmp_path, launch):
    shutil.copy(os.path.join(REPO_ROOT, "share", "jupyterhub-outpost", "outpost_config.py"),
                tmp_path / "outpost_config.py")  # fmt: skip
    port = free_port()
    outpost = launch(tmp_path, "-f", "outpost_config.py", "--port", str(port), port=port)
    assert (await api_request(outpost, "ping", auth=False)).code == 200
    response = await api_request(outpost, "services", hub="demo-hub", password="change-me")
    assert response.code == 200, response.body
    assert json_of(response) == []
    response = await api_request(outpost, "services", hub="demo-hub", password="wrong")
    assert response.code == 401
    assert stop(outpost) == 0
    log = outpost.log_text()
    assert f"listening on http://127.0.0.1:{port}/" in log
    assert "Spawner: jupyterhub.spawner.SimpleLocalProcessSpawner" in log
    assert (tmp_path / "jupyterhub_outpost.sqlite").exists()


# the database schema


@pytest.fixture(scope="module")
async def populated_db(tmp_path_factory):
    """A database made by the application, holding one server record"""
    workdir = tmp_path_factory.mktemp("populated")
    cfg = Config()
    cfg.JupyterHubOutpost.config_file = ""
    cfg.JupyterHubOutpost.db_url = f"sqlite:///{workdir}/outpost.sqlite"
    cfg.JupyterHubOutpost.crypt_keys = [CRYPT_KEY]
    cfg.JupyterHubOutpost.hub_credentials = dict(HUB_CREDENTIALS)
    outpost = JupyterHubOutpost(config=cfg)
    outpost.initialize([])
    request = {
        "env": {"JUPYTERHUB_API_TOKEN": STORED_TOKEN},
        "user_options": {"start_id": "sid-1"},
        "misc": {},
    }
    record = await outpost.db.add_server(
        orm.ServerRecord.new("hub-a", "kept", "sid-1", "alice", "7",
                         spawner_class="jupyterhub.spawner.SimpleLocalProcessSpawner"),
        request,
    )  # fmt: skip
    await outpost.db.save_state(record.id, {"pid": 0}, service="127.0.0.1:1", start_done=True)
    outpost.db.close()
    return workdir / "outpost.sqlite"


@pytest.fixture
def db_copy(populated_db, tmp_path):
    """A copy of the populated database in this test's directory: (path, url)"""
    path = tmp_path / "outpost.sqlite"
    shutil.copy(populated_db, path)
    return path, f"sqlite:///{path}"


def query(path, sql):
    """Run one SQL statement on a SQLite file (committed, connection closed)"""
    conn = sqlite3.connect(path)
    try:
        with conn:
            return conn.execute(sql).fetchall()
    finally:
        conn.close()


def revision_of(path):
    return query(path, "SELECT version_num FROM alembic_version")[0][0]


def backups(path):
    return glob.glob(f"{path}.*.bak")


async def assert_record_readable(url):
    db = orm.Database(url, crypto.CryptKeeper([CRYPT_KEY]))
    try:
        record = await db.get_server("hub-a", "kept", "sid-1", secrets=True)
    finally:
        db.close()
    assert record is not None
    assert record.service == "127.0.0.1:1" and not record.start_pending
    assert record.request["env"]["JUPYTERHUB_API_TOKEN"] == STORED_TOKEN
    assert record.state == {"pid": 0}


@SCHEMA_FILE_TESTS
async def test_database_at_head_is_left_alone(db_copy):
    path, url = db_copy
    assert revision_of(path) == dbutil.head_revision() == HEAD_REVISION
    before = path.read_bytes()
    dbutil.prepare_database(url, logging.getLogger("test"))
    assert revision_of(path) == HEAD_REVISION
    assert backups(path) == []
    assert path.read_bytes() == before
    await assert_record_readable(url)
    # secrets are stored encrypted
    assert STORED_TOKEN.encode() not in before


@SCHEMA_FILE_TESTS
async def test_upgrade_db_command_on_an_existing_database(db_copy, tmp_path):
    path, url = db_copy
    config = write_config(tmp_path / "cfg.py", f'c.JupyterHubOutpost.db_url = "{url}"\n')
    # a committed change that is still in the -wal file must reach the backup
    writer = sqlite3.connect(path)
    try:
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("UPDATE servers SET flavor = 'in-the-wal'")
        writer.commit()
        result = run_cli("upgrade-db", "-f", config, cwd=tmp_path,
                         env=clean_env(OUTPOST_CRYPT_KEY=CRYPT_KEY))  # fmt: skip
    finally:
        writer.close()
    assert result.returncode == 0, result.stderr
    assert f"Database schema is at revision {HEAD_REVISION}" in result.stderr
    (backup,) = backups(path)
    assert revision_of(backup) == HEAD_REVISION
    assert query(backup, "SELECT name, flavor FROM servers") == [("kept", "in-the-wal")]
    assert revision_of(path) == HEAD_REVISION
    await assert_record_readable(url)


@SCHEMA_FILE_TESTS
@pytest.mark.parametrize(
    "damage, message",
    [
        ("UPDATE alembic_version SET version_num = 'f00dcafe0000'",
         "revision f00dcafe0000, which this version does not know"),
        ("DROP TABLE alembic_version", "no schema revision"),
    ],
)  # fmt: skip
def test_unknown_or_missing_revision_is_refused(db_copy, tmp_path, damage, message):
    path, url = db_copy
    query(path, damage)
    before = path.read_bytes()
    with pytest.raises(dbutil.DatabaseSchemaMismatch, match=message):
        dbutil.prepare_database(url, logging.getLogger("test"))

    config = write_config(tmp_path / "cfg.py", f'c.JupyterHubOutpost.db_url = "{url}"\n')
    result = run_cli("-f", config, "--ip=127.0.0.1", f"--port={free_port()}", cwd=tmp_path,
                     env=clean_env(OUTPOST_CRYPT_KEY=CRYPT_KEY))  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr  # a message, not a crash
    assert backups(path) == []
    assert path.read_bytes() == before


NEXT_REVISION = f'''"""test only: an index on servers.flavor"""
revision = "b7e57e57e57e"
down_revision = "{HEAD_REVISION}"
branch_labels = None
depends_on = None

from alembic import op


def upgrade():
    op.create_index("ix_servers_flavor_test", "servers", ["flavor"])


def downgrade():
    op.drop_index("ix_servers_flavor_test", "servers")
'''


@pytest.fixture
def newer_alembic(tmp_path, monkeypatch):
    """The migrations plus one newer revision, as the next version would ship them"""
    scripts = tmp_path / "alembic"
    shutil.copytree(dbutil.ALEMBIC_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "b7e57e57e57e_test_index.py").write_text(NEXT_REVISION)
    monkeypatch.setattr(dbutil, "ALEMBIC_DIR", str(scripts))
    assert dbutil.head_revision() == "b7e57e57e57e"
    return "b7e57e57e57e"


@SCHEMA_FILE_TESTS
async def test_older_revision_is_upgraded_after_a_backup(db_copy, newer_alembic, caplog):
    path, url = db_copy
    log = logging.getLogger("test-dbutil")
    # without automatic upgrades (the default for PostgreSQL): refuse, name the command
    with pytest.raises(dbutil.DatabaseSchemaMismatch, match="jupyterhub-outpost upgrade-db"):
        dbutil.prepare_database(url, log, auto_upgrade=False)
    assert revision_of(path) == HEAD_REVISION and backups(path) == []

    with caplog.at_level(logging.INFO, logger="test-dbutil"):
        dbutil.prepare_database(url, log)
    assert f"Upgrading the database schema from {HEAD_REVISION} to {newer_alembic}" in caplog.text
    assert revision_of(path) == newer_alembic
    engine = orm.new_engine(url)
    try:
        indexes = {ix["name"] for ix in inspect(engine).get_indexes("servers")}
    finally:
        engine.dispose()
    assert "ix_servers_flavor_test" in indexes
    (backup,) = backups(path)
    assert revision_of(backup) == HEAD_REVISION
    await assert_record_readable(url)


def test_the_migrations_build_exactly_the_tables_the_models_describe(tmp_path):
    """An empty database upgraded to the head revision has the schema of
    orm.meta: no table, column, index or constraint more or less"""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    url = new_db_url(tmp_path)
    dbutil.upgrade(url)
    engine = orm.new_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, orm.meta)
    finally:
        engine.dispose()
    # the alembic bookkeeping table is not a model
    assert [d for d in differences if "alembic_version" not in repr(d)] == []


async def test_operators_list_servers_and_a_users_history_from_the_command_line(tmp_path, launch):
    port = free_port()
    key = Fernet.generate_key().decode()
    config = write_config(tmp_path / "outpost_config.py", f"""
c.JupyterHubOutpost.db_url = "{new_db_url(tmp_path)}"
c.JupyterHubOutpost.crypt_keys = ["{key}"]
c.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = "{tmp_path}/home-{{username}}"
c.JupyterHubOutpost.allowed_overrides = ["cmd"]
c.Spawner.cmd = ["sleep", "600"]
c.Spawner.args = []
""")  # fmt: skip
    env = clean_env(OUTPOST_HUB_CREDENTIALS=json.dumps(HUB_CREDENTIALS))
    outpost = launch(tmp_path, "-f", config, "--ip=127.0.0.1", f"--port={port}", port=port, env=env)
    running = start_body("http://127.0.0.1:9/hub/api", user="olga", name="lab")
    assert (await api_request(outpost, "services", method="POST", body=running)).code == 200
    broken = start_body("http://127.0.0.1:9/hub/api", user="olga", name="broken",
                        misc={"cmd": ["/no/such/program-for-the-cli"]})  # fmt: skip
    assert (await api_request(outpost, "services", method="POST", body=broken)).code == 419

    listed = run_cli("servers", "-f", config, cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "hub-a" in listed.stdout and "olga" in listed.stdout and "running" in listed.stdout
    assert running["user_options"]["start_id"] in listed.stdout
    assert "1 server(s)" in listed.stdout

    history = run_cli("history", "olga", "-f", config, cwd=tmp_path, env=env)
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    assert lines[0].split()[:2] == ["HUB", "SERVER"]
    assert any("broken" in line and "failed" in line and "program-for-the-cli" in line for line in lines)
    assert any(" lab " in line and "ready" in line for line in lines)
    assert "2 start(s) of olga" in history.stdout
    nobody = run_cli("history", "nobody-here", "-f", config, cwd=tmp_path, env=env)
    assert "0 start(s) of nobody-here" in nobody.stdout

    response = await api_request(outpost, "services", "lab", running["user_options"]["start_id"],
                                 method="DELETE")  # fmt: skip
    assert response.code == 200
    assert stop(outpost) == 0


def test_a_hubs_api_access_is_one_setting_and_the_older_spellings_fold_into_it():
    outpost = JupyterHubOutpost(
        hub_api={
            "hub-a": {"url": "https://a/hub/api", "token": "ta", "housekeeping": True, "system": "c1"},
            "hub-b": {"url": "https://b/hub/api", "token": "tb", "housekeeping": {"grace": 5}},
            "hub-c": {"url": "https://c/hub/api", "token": "tc"},
        },
        hub_housekeeping={"hub-d": {"url": "https://d/hub/api", "token": "td", "interval": 9}},
        ssh_recreate_forward={"hub-d": {"url": "https://d/hub/api", "token": "td", "system": "c2"}},
    )
    assert outpost.housekeeping_settings() == {
        "hub-a": {"url": "https://a/hub/api", "token": "ta"},
        "hub-b": {"url": "https://b/hub/api", "token": "tb", "grace": 5},
        "hub-d": {"url": "https://d/hub/api", "token": "td", "interval": 9},
    }
    assert outpost.recreate_forward_settings() == {
        "hub-a": {"url": "https://a/hub/api", "token": "ta", "system": "c1"},
        "hub-d": {"url": "https://d/hub/api", "token": "td", "system": "c2"},
    }
    for bad in ({"hub-a": {"url": "https://a"}}, {"hub-a": {"url": "u", "token": "t", "tokn": 1}},
                {"hub-a": {"url": "u", "token": "t", "housekeeping": "yes"}}):  # fmt: skip
        with pytest.raises(TraitError):
            JupyterHubOutpost(hub_api=bad)
