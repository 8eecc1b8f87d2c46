"""End to end with tunnelling on: a real JupyterHub whose OutpostSpawner reaches
its servers through OpenSSH port forwards to the Outpost's own SSH endpoint.

The hub runs ``ssh_during_startup = True``. For each start it makes the
forward with the real OpenSSH client (ControlMaster, ``-O check``,
``-O forward``), as uid 1000, and its proxy routes the user to the hub side
of that forward. The single-user server listens on a port of its own, so a
request that reaches it can only have come through the tunnel.

Two adaptations keep everything on this machine's loopback interface:
- the client binds the hub side of each forward on 0.0.0.0; a small ``ssh``
  first on the hub's PATH rewrites ``-L0.0.0.0:`` to ``-L127.0.0.1:``;
- the client wants a Kubernetes Service in front of each forward; its
  ``ssh_custom_svc`` hook returns the forward's own address instead.
"""

import asyncio
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import textwrap
import time

import pytest

from .hub import JupyterHubProcess
from .test_e2e import create_users, server_model, start_server, stop_server, wait_ready
from .utils import (
    needs_hub_proxy,
    HUB_CREDENTIALS,
    OutpostProcess,
    database_independent,
    free_port,
    new_db_url,
    pids_with_env,
    wait_until,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.ssh,
    # the SSH endpoint's records are the ones test_e2e and test_ssh run on both databases
    database_independent,
    needs_hub_proxy,
]

HUB_UID = 1000  # the client runs every ssh command after os.setuid(1000)

OUTPOST_CONFIG = """
c = get_config()  # noqa
c.JupyterHubOutpost.db_url = "{db_url}"
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
c.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = "{workdir}/home-{{username}}"
c.Spawner.ip = "127.0.0.1"
c.Spawner.args = ["--ServerApp.allow_root=True"]  # the test machines run as root
c.Spawner.start_timeout = 60

c.JupyterHubOutpost.enable_ssh = True
c.JupyterHubOutpost.ssh_ip = "127.0.0.1"
c.JupyterHubOutpost.ssh_port = {ssh_port}
c.JupyterHubOutpost.ssh_host_key_file = "{workdir}/ssh_host_ed25519_key"
c.JupyterHubOutpost.ssh_authorized_keys = {{"hub-a": [{public_key!r}]}}
"""

HUB_SSH_CONFIG = """
from jupyterhub.utils import random_port

c.OutpostSpawner.ssh_during_startup = True
c.OutpostSpawner.ssh_node = "127.0.0.1"
c.OutpostSpawner.ssh_port = {ssh_port}
c.OutpostSpawner.ssh_username = "hub-a"
c.OutpostSpawner.ssh_key = "{key}"
c.OutpostSpawner.ssh_forward_options = {{
    "ControlPath": "{sshdir}/control_%C",
    "UserKnownHostsFile": "{sshdir}/known_hosts",
}}
# the hub side of the forward is the server's address at the hub
c.OutpostSpawner.ssh_custom_svc = lambda spawner, info: ("127.0.0.1", spawner.port)
c.OutpostSpawner.ssh_custom_svc_remove = lambda spawner, info: None
# the server's own port, distinct from the hub side of the forward
c.OutpostSpawner.custom_misc = lambda spawner, user_options: {{"port": random_port()}}
"""

# Binds the hub side of each forward on loopback (the client asks for 0.0.0.0)
SSH_WRAPPER = """\
#!/bin/sh
for arg do
    shift
    case $arg in
        -L0.0.0.0:*) arg="-L127.0.0.1:${{arg#-L0.0.0.0:}}" ;;
    esac
    set -- "$@" "$arg"
done
exec {ssh} "$@"
"""


def hub_account():
    """uid 1000 must exist for the client's ssh commands; create it if missing"""
    try:
        pwd.getpwuid(HUB_UID)
    except KeyError:
        if os.geteuid() != 0:
            pytest.skip("no account with uid 1000, and not root to create one")
        subprocess.run(
            ["useradd", "--uid", str(HUB_UID), "--no-create-home", "--shell", "/usr/sbin/nologin",
             "outpost-e2e-hub"],
            check=True,
        )  # fmt: skip


@pytest.fixture(scope="module")
def sshdir():
    """A folder uid 1000 owns (pytest's are root's, mode 0700): key, wrapper, control sockets"""
    hub_account()
    path = tempfile.mkdtemp(prefix="outpost-e2e-ssh-")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hub-a",
                    "-f", os.path.join(path, "hub-a")], check=True)  # fmt: skip
    os.mkdir(os.path.join(path, "bin"))
    wrapper = os.path.join(path, "bin", "ssh")
    with open(wrapper, "w") as f:
        f.write(SSH_WRAPPER.format(ssh=shutil.which("ssh")))
    os.chmod(wrapper, 0o755)
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, HUB_UID, -1)
    yield path
    # ControlPersist masters (and the losers of concurrent connects) outlive the hub
    subprocess.run(["pkill", "-f", f"ControlPath={path}"], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
async def outpost(tmp_path_factory, sshdir):
    workdir = tmp_path_factory.mktemp("e2e-ssh-outpost")
    with open(os.path.join(sshdir, "hub-a.pub")) as f:
        public_key = f.read().strip()
    ssh_port = free_port()
    process = OutpostProcess(
        workdir,
        OUTPOST_CONFIG.format(
            workdir=workdir, db_url=new_db_url(workdir), ssh_port=ssh_port, public_key=public_key
        ),
    )
    process.ssh_port = ssh_port  # the same after a restart: the hubs' ssh_port
    process.start("--log-level=DEBUG")
    yield process
    process.terminate()


@pytest.fixture(scope="module")
async def hub(tmp_path_factory, outpost, sshdir):
    workdir = tmp_path_factory.mktemp("e2e-ssh-hub")
    process = JupyterHubProcess(
        workdir, f"http://127.0.0.1:{outpost.port}/services/", "hub-a", HUB_CREDENTIALS["hub-a"]
    )
    with open(process.config_path, "a") as f:
        f.write(textwrap.dedent(HUB_SSH_CONFIG).format(
            ssh_port=outpost.ssh_port, key=os.path.join(sshdir, "hub-a"), sshdir=sshdir,
        ))  # fmt: skip
    process.env["PATH"] = os.path.join(sshdir, "bin") + os.pathsep + process.env["PATH"]
    process.start()
    yield process
    process.stop()
    process.kill_proxy()


def forward_of(hub, user):
    """(hub port, server port) of the user's forward, as the hub's ssh commands name them"""
    found = re.findall(
        r"-O forward -L0\.0\.0\.0:(\d+):127\.0\.0\.1:(\d+) hub-a@127\.0\.0\.1", hub.log_text()
    )
    assert found, "the hub made no forward"
    return tuple(int(p) for p in found[-1])


async def reachable(hub, path, token):
    response = await hub.proxied(path, token)
    return response.code == 200


async def unreachable(hub, path, token):
    return not await reachable(hub, path, token)


async def test_users_reach_their_server_through_the_tunnel(hub, outpost):
    await create_users(hub, "tia")
    code, data = await start_server(hub, "tia", "lab")
    assert code in (201, 202), (code, data)
    await wait_ready(hub, "tia", "lab")

    hub_port, server_port = forward_of(hub, "tia")
    assert hub_port != server_port
    # the hub routes the user to its side of the forward, not to the server
    model = await server_model(hub, "tia", "lab")
    assert model["url"] == "/user/tia/lab/"
    assert f"127.0.0.1:{hub_port}" in hub.log_text()
    # the forward is the ssh client's: nothing else listens there
    assert pids_with_env("JUPYTERHUB_SERVICE_PREFIX", "/user/tia/lab/"), "no server at the Outpost"
    token = await hub.user_token("tia")
    response = await hub.proxied("/user/tia/lab/api/status", token)
    assert response.code == 200, response.body
    assert "SSH: hub hub-a logged in" in outpost.log_text()

    await stop_server(hub, "tia", "lab")
    await wait_until(
        lambda: pids_with_env("JUPYTERHUB_SERVICE_PREFIX", "/user/tia/lab/") == [],
        timeout=30, message="the server process ended",
    )  # fmt: skip


async def test_tunnels_come_back_after_the_outpost_is_killed(hub, outpost):
    users = ["uma", "vic", "wes"]
    await create_users(hub, *users)
    await asyncio.gather(*(start_server(hub, user, "lab") for user in users))
    await asyncio.gather(*(wait_ready(hub, user, "lab") for user in users))
    tokens = {user: await hub.user_token(user) for user in users}
    paths = {user: f"/user/{user}/lab/api/status" for user in users}
    for user in users:
        assert await reachable(hub, paths[user], tokens[user]), user
    setups = hub.log_text().count("APICall: SetupTunnel")

    outpost.kill9()
    # the hub's ssh master loses its connection, and the forwards with it
    for user in users:
        await wait_until(
            lambda: unreachable(hub, paths[user], tokens[user]),
            timeout=30, message=f"the tunnel of {user} down with the Outpost",
        )  # fmt: skip
    restarted = time.monotonic()
    outpost.start("--log-level=DEBUG")
    # the restarted Outpost asks the hub to rebuild each forward; the users do nothing
    back = {}
    while len(back) < len(users):
        assert time.monotonic() - restarted < 60, f"unreachable 60 s after the restart: {users}"
        for user in set(users) - set(back):
            if await reachable(hub, paths[user], tokens[user]):
                back[user] = time.monotonic() - restarted
        await asyncio.sleep(0.1)
    print(f"\nrestart of the Outpost -> every tunnel works again: {max(back.values()):.2f} s "
          f"({', '.join(f'{u} {t:.2f} s' for u, t in sorted(back.items()))})")
    assert hub.log_text().count("APICall: SetupTunnel") >= setups + len(users)
    for user in users:
        assert (await server_model(hub, user, "lab"))["ready"], user

    await asyncio.gather(*(stop_server(hub, user, "lab") for user in users))
    await wait_until(
        lambda: not any(pids_with_env("JUPYTERHUB_SERVICE_PREFIX", f"/user/{u}/lab/") for u in users),
        timeout=30, message="the server processes ended",
    )  # fmt: skip
