"""Fixtures: a real Outpost on a random loopback port, a fake hub API."""

import ctypes
import os
import subprocess
import threading
import weakref

import pytest
from cryptography.fernet import Fernet
from traitlets.config import Config

from jupyterhub_outpost.app import JupyterHubOutpost

from .mocking import FakeHubAPI
from .utils import (
    HUB_CREDENTIALS,
    ON_POSTGRES,
    OutpostProcess,
    drop_databases,
    kill_servers_of,
    new_db_url,
    test_databases,
)


PR_SET_CHILD_SUBREAPER = 36


def _zombie_children(me):
    """Pids of this process's zombie children that are not Python processes"""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if fields[0] == "Z" and fields[1] == me and not comm.startswith("python"):
            pids.add(int(entry))
    return pids


# every Popen object of this process, as long as it exists (gc.get_objects()
# does not list what an in-process Outpost has frozen out of the collector's sight)
_POPENS = weakref.WeakSet()
_popen_init = subprocess.Popen.__init__


def _registered_popen_init(self, *args, **kwargs):
    _popen_init(self, *args, **kwargs)
    _POPENS.add(self)


subprocess.Popen.__init__ = _registered_popen_init


def _popen_pids():
    """Pids of this process's Popen objects not waited for yet (an in-process
    Outpost's spawners, a test's own processes): their owners reap them, and
    read the exit status.

    That includes the Popen objects dropped before their process ended:
    subprocess keeps them in its private ``_active`` list and waits for each
    pid whenever a new Popen is made. Reaping such a pid here would leave a
    stale entry, and once pids wrap (pid_max is 32,768 on the test machines)
    subprocess would reap an unrelated new child, whose owner then reads a
    made-up exit status.
    """
    live = {p.pid for p in list(_POPENS) if p.returncode is None}
    dropped = {p.pid for p in list(getattr(subprocess, "_active", None) or ())}
    return live | dropped


def _reap_orphans(stop):
    """Reap zombie children that are not ours to wait for"""
    me = str(os.getpid())
    owned = set()  # zombies a Popen object will reap
    earlier = set()  # zombies of the scan before
    while not stop.wait(0.2):
        zombies = _zombie_children(me)
        owned &= zombies
        if zombies - owned:
            owned |= zombies & _popen_pids()
        # a zombie seen twice: an owner (asyncio's child watcher thread, say)
        # has had a scan's time to reap it first
        ripe, earlier = (zombies & earlier) - owned, zombies
        for pid in ripe:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


@pytest.fixture(scope="session", autouse=True)
def _act_as_init():
    """Reap single-user servers orphaned by a killed Outpost, as init does.

    When an Outpost process is killed, its servers are re-parented. On a
    normal host init (systemd) reaps them once they exit; the test machines'
    PID 1 does not, and a zombie looks alive to LocalProcessSpawner.poll().
    The test process becomes the subreaper of everything it starts and
    reaps exited servers (never its own Popen children, which tests wait for).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    stop = threading.Event()
    reaper = threading.Thread(target=_reap_orphans, args=(stop,), daemon=True)
    reaper.start()
    yield
    stop.set()


@pytest.fixture(scope="module")
async def fake_hub():
    """A recording stand-in for the hub API (events, flavor usage)"""
    hub = FakeHubAPI()
    hub.start()
    yield hub
    hub.stop()


TEST_OVERRIDES = (
    "cmd", "start_delay", "delay_after_launch", "start_timeout", "mem_limit", "cpu_limit",
    "interrupt_timeout", "term_timeout", "kill_timeout",
)


def outpost_config(workdir, spawner_cmd=None, **overrides):
    """Config for a test Outpost: SimpleLocalProcessSpawner on 127.0.0.1.

    ``spawner_cmd`` replaces jupyterhub-singleuser (``["sleep", "600"]``
    when a real process is all a test needs); ``overrides`` are
    ``JupyterHubOutpost`` settings.
    """
    cfg = Config()
    cfg.JupyterHubOutpost.config_file = ""
    cfg.JupyterHubOutpost.db_url = new_db_url(workdir)
    cfg.JupyterHubOutpost.ip = "127.0.0.1"
    cfg.JupyterHubOutpost.port = 0
    cfg.JupyterHubOutpost.hub_credentials = dict(HUB_CREDENTIALS)
    cfg.JupyterHubOutpost.crypt_keys = [Fernet.generate_key().decode()]
    cfg.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
    cfg.JupyterHubOutpost.internal_certs_location = str(workdir / "certs")
    cfg.JupyterHubOutpost.server_output_dir = str(workdir / "output")
    cfg.SimpleLocalProcessSpawner.home_dir_template = str(workdir / "home-{username}")
    cfg.Spawner.ip = "127.0.0.1"
    cfg.Spawner.start_timeout = 60
    # the test machines run as root
    cfg.Spawner.args = ["--ServerApp.allow_root=True"]
    # no terminal: a server would ask for confirmation on SIGINT
    cfg.Spawner.popen_kwargs = {"stdin": subprocess.DEVNULL}
    cfg.HubClient.retries = 0
    cfg.HubClient.request_timeout = 5
    # the traits tests set per start through misc
    cfg.JupyterHubOutpost.allowed_overrides = list(TEST_OVERRIDES)
    if spawner_cmd is not None:
        cfg.Spawner.cmd = spawner_cmd
        cfg.Spawner.args = []
    for key, value in overrides.items():
        setattr(cfg.JupyterHubOutpost, key, value)
    return cfg


# in-process Outposts running now; servers a test leaves on them are stopped
_running_outposts = []


async def start_outpost(cfg):
    outpost = JupyterHubOutpost(config=cfg)
    outpost.initialize([])
    await outpost.start()
    _running_outposts.append(outpost)
    return outpost


async def stop_outpost(outpost):
    """Stop every server of an in-process Outpost, then the Outpost"""
    await stop_all_servers(outpost)
    await outpost.shutdown()
    _running_outposts.remove(outpost)


async def stop_all_servers(outpost):
    manager = outpost.server_manager
    for record in await outpost.db.list_servers():
        try:
            await manager.stop(*record.key)
        except Exception:
            pass


@pytest.fixture(scope="module")
async def app(tmp_path_factory, fake_hub):
    """A running JupyterHubOutpost (module-scoped), talking real HTTP"""
    workdir = tmp_path_factory.mktemp("outpost")
    outpost = await start_outpost(outpost_config(workdir))
    outpost.workdir = workdir
    yield outpost
    await stop_outpost(outpost)
    if ON_POSTGRES:
        drop_databases([outpost.db_url])


@pytest.fixture(scope="session", autouse=True)
def _drop_leftover_databases():
    """Drop the PostgreSQL databases module fixtures made"""
    yield
    if ON_POSTGRES:
        drop_databases(test_databases.values())


@pytest.fixture(autouse=True)
def _drop_test_databases():
    """Drop the PostgreSQL databases a test made (after its processes ended)"""
    before = set(test_databases.values())
    yield
    if ON_POSTGRES:
        drop_databases(set(test_databases.values()) - before)


@pytest.fixture(autouse=True)
async def _stop_leftover_servers():
    """Stop every server a test left running on the in-process Outposts"""
    yield
    for outpost in list(_running_outposts):
        await stop_all_servers(outpost)


@pytest.fixture
def processes():
    """OutpostProcess factory; processes and the servers they started end at teardown.

    Add the API tokens of servers started through them to ``processes.tokens``.
    """
    made, tokens = [], set()

    def make(workdir, **kwargs):
        os.makedirs(workdir, exist_ok=True)
        process = OutpostProcess(workdir, **kwargs)
        made.append(process)
        return process

    make.tokens = tokens
    yield make
    for process in made:
        process.end()
    kill_servers_of(tokens)

