"""Fixtures: a real Outpost on a random loopback port, a fake hub API."""

import os

import pytest
from cryptography.fernet import Fernet
from traitlets.config import Config

from jupyterhub_outpost.app import JupyterHubOutpost

from .mocking import FakeHubAPI
from .utils import HUB_CREDENTIALS


@pytest.fixture(scope="module")
async def fake_hub():
    """A recording stand-in for the hub API (events, flavor usage)"""
    hub = FakeHubAPI()
    hub.start()
    yield hub
    hub.stop()


def outpost_config(workdir, **overrides):
    """Config for a test Outpost: SimpleLocalProcessSpawner on 127.0.0.1"""
    cfg = Config()
    cfg.JupyterHubOutpost.config_file = ""
    cfg.JupyterHubOutpost.db_url = os.environ.get(
        "OUTPOST_TEST_DB_URL", f"sqlite:///{workdir}/outpost.sqlite"
    )
    cfg.JupyterHubOutpost.ip = "127.0.0.1"
    cfg.JupyterHubOutpost.port = 0
    cfg.JupyterHubOutpost.hub_credentials = dict(HUB_CREDENTIALS)
    cfg.JupyterHubOutpost.crypt_keys = [Fernet.generate_key().decode()]
    cfg.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
    cfg.JupyterHubOutpost.internal_certs_location = str(workdir / "certs")
    cfg.SimpleLocalProcessSpawner.home_dir_template = str(workdir / "home-{username}")
    cfg.Spawner.ip = "127.0.0.1"
    cfg.Spawner.start_timeout = 60
    # the test machines run as root
    cfg.Spawner.args = ["--ServerApp.allow_root=True"]
    cfg.HubClient.retries = 0
    cfg.HubClient.request_timeout = 5
    for key, value in overrides.items():
        setattr(cfg.JupyterHubOutpost, key, value)
    return cfg


async def start_outpost(cfg):
    outpost = JupyterHubOutpost(config=cfg)
    outpost.initialize([])
    await outpost.start()
    return outpost


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
    await stop_all_servers(outpost)
    await outpost.shutdown()


@pytest.fixture(autouse=True)
async def _stop_leftover_servers(request):
    """Stop every server a test left running on the module's Outpost"""
    yield
    if "app" in request.fixturenames:
        await stop_all_servers(request.getfixturevalue("app"))
