"""Slurm jobs with the Outpost as a process: kill -9 and restart, and a real hub.

A real ``jupyterhub-outpost`` process runs OutpostSlurmSpawner against the
one-node cluster (tests/slurm.py); a real JupyterHub with the public
OutpostSpawner reaches a server that runs as a Slurm job through its proxy.
"""

import asyncio
import os
import re
import sys

import pytest

from .hub import JupyterHubProcess
from . import slurm
from .slurm import REPO, job_state, requires_slurm, run, slurm_process_config
from .utils import (
    needs_hub_proxy,
    HUB_CREDENTIALS,
    OutpostProcess,
    api_request,
    database_independent,
    json_of,
    new_db_url,
    process_env,
    server_answers,
    start_body,
    tokens_of,
    wait_until,
)

# the session's one-node cluster (a fixture of tests/slurm.py)
slurm_cluster = slurm.slurm_cluster

pytestmark = [requires_slurm, pytest.mark.slurm, pytest.mark.slow]

HOLD = "outpost-test-hold"


EXAMPLE = os.path.join(REPO, "share", "jupyterhub-outpost", "outpost_config_slurm.py")

# the example configuration, with what differs on the test machine
EXAMPLE_CONFIG = """
c = get_config()  # noqa
load_subconfig({example!r})
c.JupyterHubOutpost.db_url = {db_url!r}
# jobs run as root here
c.JupyterHubOutpost.min_account_uid = 0
c.JupyterHubOutpost.denied_accounts = []
c.JupyterHubOutpost.account_name_template = "root"
c.OutpostSlurmSpawner.req_homedir = {home!r}
c.Spawner.args = ["--ServerApp.allow_root=True"]
# loopback only, and quick queue reads
c.OutpostSlurmSpawner.ip = "127.0.0.1"
c.OutpostSlurmSpawner.squeue_interval = 1
c.OutpostSlurmSpawner.squeue_busy_interval = 0.2
"""


@pytest.fixture
def slurm_outposts(slurm_cluster):
    """OutpostProcess factory: the tests' Slurm config, or with ``example`` the
    one in share/ (jupyterhub-singleuser found on PATH, as an operator sets it up)"""
    made = []

    def make(workdir, example=False, **traits):
        os.makedirs(workdir, exist_ok=True)
        env = process_env()
        if example:
            home = os.path.join(str(workdir), "home")
            os.makedirs(home, exist_ok=True)
            config = EXAMPLE_CONFIG.format(example=EXAMPLE, db_url=new_db_url(workdir), home=home)
            env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
            env["OUTPOST_IP"] = "127.0.0.1"
        else:
            config = slurm_process_config(workdir, new_db_url(workdir), **traits)
        process = OutpostProcess(workdir, config, extra_env=env)
        made.append(process)
        return process

    yield make
    for process in made:
        process.end()


@pytest.fixture
def hold_node(slurm_cluster):
    """Call to hold the node for maintenance: new jobs wait, running jobs go on"""

    def hold():
        result = run("scontrol", "create", "reservation", f"ReservationName={HOLD}", "StartTime=now",
                     "Duration=10", "Nodes=localhost", "Users=root", "Flags=maint,ignore_jobs")  # fmt: skip
        assert result.returncode == 0, result.stderr

    yield hold
    run("scontrol", "delete", f"ReservationName={HOLD}")


def job_of(fake_hub, body):
    """The job id a start announced in its progress events"""
    token = body["env"]["JUPYTERHUB_API_TOKEN"]
    for call in fake_hub.calls("event"):
        found = re.match(r"Slurm: submitted batch job (\d+)", call["body"].get("message", ""))
        if call["token"] == token and found:
            return found.group(1)
    return None


def messages(fake_hub, body):
    token = body["env"]["JUPYTERHUB_API_TOKEN"]
    return [c["body"].get("message", "") for c in fake_hub.calls("event") if c["token"] == token]


@database_independent
async def test_kill9_and_restart_keep_pending_and_running_jobs_tracked(
    tmp_path, fake_hub, slurm_outposts, hold_node
):
    outpost = slurm_outposts(tmp_path)
    await asyncio.to_thread(outpost.start)
    running = start_body(fake_hub.url, name="running")
    waiting = start_body(fake_hub.url, name="waiting")
    for body in (running, waiting):
        fake_hub.tokens.update(tokens_of(body))
    response = await api_request(outpost, "services", method="POST", body=running)
    assert response.code == 200, response.body
    address = json_of(response)["service"]
    prefix = running["env"]["JUPYTERHUB_SERVICE_PREFIX"]
    await wait_until(lambda: server_answers(address, prefix), timeout=30, message="server answers")
    running_job = job_of(fake_hub, running)
    # the other one waits in the queue, held by a maintenance reservation
    hold_node()
    response = await api_request(outpost, "services", method="POST", body=waiting,
                                 headers={"execution-type": "async"})  # fmt: skip
    assert response.code == 202, response.body
    await wait_until(lambda: any("Reserved for maintenance" in m for m in messages(fake_hub, waiting)),
                     timeout=20, message="pending for the reservation")  # fmt: skip
    waiting_job = job_of(fake_hub, waiting)
    assert job_state(waiting_job) == "PENDING" and job_state(running_job) == "RUNNING"

    await asyncio.to_thread(outpost.kill9)
    assert job_state(waiting_job) == "PENDING" and job_state(running_job) == "RUNNING"
    await asyncio.to_thread(outpost.start)

    # the start that was waiting was interrupted: its saved job id lets the
    # new process cancel the job, instead of leaving it in the queue
    await wait_until(lambda: job_state(waiting_job) in ("CANCELLED", ""), timeout=30,
                     message="interrupted start's job cancelled")  # fmt: skip
    path = ["services", waiting["name"], waiting["user_options"]["start_id"]]
    await wait_until(lambda: code_is(outpost, path, 404), timeout=15, message="forgotten")
    # the running one is polled and stopped as before
    path = ["services", running["name"], running["user_options"]["start_id"]]
    response = await api_request(outpost, *path)
    assert response.code == 200 and json_of(response) == {"status": None}, response.body
    assert await server_answers(address, prefix)
    response = await api_request(outpost, *path, method="DELETE")
    assert response.code == 200, response.body
    assert job_state(running_job) in ("CANCELLED", "")
    await asyncio.to_thread(outpost.terminate)


async def code_is(outpost, path, code):
    return (await api_request(outpost, *path)).code == code


@pytest.mark.e2e
@database_independent
@needs_hub_proxy
async def test_hub_journey_to_a_slurm_job_with_the_example_config(tmp_path, slurm_outposts):
    outpost = slurm_outposts(tmp_path / "outpost", example=True)
    await asyncio.to_thread(outpost.start)
    hub = JupyterHubProcess(tmp_path / "hub", f"http://127.0.0.1:{outpost.port}/services/",
                            "hub-a", HUB_CREDENTIALS["hub-a"], poll_interval_ms=1000)  # fmt: skip
    await asyncio.to_thread(hub.start)
    try:
        code, _ = await hub.api("users", method="POST", body={"usernames": ["hpcuser"]})
        assert code in (201, 409)
        code, _ = await hub.api("users/hpcuser/servers/lab", method="POST", body={})
        assert code in (201, 202), code
        events = await hub.progress("hpcuser", "lab", timeout=90)
        shown = [e.get("message", "") for e in events]
        assert any(m.startswith("Slurm: submitted batch job ") for m in shown), shown
        assert any(" runs on node localhost" in m for m in shown), shown
        assert events[-1].get("ready"), events[-1]
        token = await hub.user_token("hpcuser")
        response = await hub.proxied("/user/hpcuser/lab/api", token)
        assert response.code == 200, (response.code, response.body[:300])
        assert b"version" in response.body
        job = next(m.split()[-1] for m in shown if m.startswith("Slurm: submitted batch job "))
        assert job_state(job) == "RUNNING"
        code, _ = await hub.api("users/hpcuser/servers/lab", method="DELETE")
        assert code in (202, 204), code
        await wait_until(lambda: job_state(job) in ("CANCELLED", "COMPLETED", ""), timeout=30,
                         message="job ended after the hub's stop")  # fmt: skip
    finally:
        await asyncio.to_thread(hub.stop)
        hub.kill_proxy()
