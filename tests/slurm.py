"""Helpers for the tests that run real Slurm jobs on a one-node cluster.

``ci/slurm-localhost.sh up`` starts munged, slurmctld and slurmd on this
machine (idempotent; ci/test.sh installs the packages). Jobs run as root
here, so ``exec_prefix`` is empty and the account of every hub user is root.
"""

import os
import shutil
import subprocess
import sys

import pytest
from traitlets.config import Config

from .conftest import outpost_config
from .utils import REPO

SPAWNER = "jupyterhub_outpost.spawners.slurm.OutpostSlurmSpawner"
SETUP = os.path.join(REPO, "ci", "slurm-localhost.sh")
SINGLEUSER = os.path.join(os.path.dirname(sys.executable), "jupyterhub-singleuser")

# what hubs may set per start in these tests
OVERRIDES = [
    "req_partition", "req_runtime", "req_memory", "req_nprocs", "req_options",
    "req_reservation", "req_account", "req_qos", "req_srun", "batchspawner_singleuser_cmd", "cmd",
]  # fmt: skip


def slurm_available():
    return os.geteuid() == 0 and shutil.which("slurmctld") and shutil.which("sbatch")


requires_slurm = pytest.mark.skipif(
    not slurm_available() and not os.environ.get("CI"),
    reason="Slurm (slurmctld, sbatch) is not installed, or not root: ci/test.sh installs it",
)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node cluster (started once per session, left running)"""
    result = subprocess.run(["bash", SETUP, "up"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    yield
    cancel_all_jobs()


def spawner_settings(workdir, **traits):
    """``OutpostSlurmSpawner`` settings: jobs as root, loopback, quick queue reads"""
    home = os.path.join(str(workdir), "home")
    os.makedirs(home, exist_ok=True)
    settings = {
        "exec_prefix": "",
        "req_homedir": home,
        "ip": "127.0.0.1",
        "cmd": [SINGLEUSER],
        "args": ["--ServerApp.allow_root=True"],
        "squeue_interval": 1.0,
        "squeue_busy_interval": 0.2,
        "slurm_command_timeout": 3.0,
        "start_timeout": 60,
    }
    settings.update(traits)
    return {name: value for name, value in settings.items() if value is not None}


def slurm_outpost_config(workdir, **spawner_traits):
    """In-process Outpost config (tests.conftest.outpost_config) with Slurm jobs"""
    cfg = outpost_config(
        workdir,
        spawner_class=SPAWNER,
        min_account_uid=0,
        denied_accounts=[],
        account_name_template="root",
        allowed_overrides=OVERRIDES,
    )
    cfg.merge(Config({"OutpostSlurmSpawner": spawner_settings(workdir, **spawner_traits)}))
    return cfg


def slurm_process_config(workdir, db_url, **spawner_traits):
    """``outpost_config.py`` text for an OutpostProcess with Slurm jobs"""
    lines = [
        "c = get_config()  # noqa",
        f"c.JupyterHubOutpost.spawner_class = {SPAWNER!r}",
        f"c.JupyterHubOutpost.db_url = {db_url!r}",
        f"c.JupyterHubOutpost.internal_certs_location = {str(workdir) + '/certs'!r}",
        "c.JupyterHubOutpost.min_account_uid = 0",
        "c.JupyterHubOutpost.denied_accounts = []",
        "c.JupyterHubOutpost.account_name_template = 'root'",
        f"c.JupyterHubOutpost.allowed_overrides = {OVERRIDES!r}",
        "c.HubClient.retries = 0",
        "c.HubClient.request_timeout = 5",
    ]
    for name, value in spawner_settings(workdir, **spawner_traits).items():
        lines.append(f"c.OutpostSlurmSpawner.{name} = {value!r}")
    return "\n".join(lines) + "\n"


def ensure_user(name):
    """A local account (uid >= 1000, with a home) that jobs can run as"""
    if run("id", "-u", name).returncode != 0:
        result = run("useradd", "--create-home", "--shell", "/bin/bash", name)
        assert result.returncode == 0, result.stderr
    return name


def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def job_state(job_id):
    """squeue's state of a job, "" once squeue no longer knows it"""
    result = run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T")
    return result.stdout.strip() if result.returncode == 0 else ""


def job_script(job_id):
    """The batch script Slurm keeps for a job"""
    result = run("scontrol", "write", "batch_script", str(job_id), "-")
    assert result.returncode == 0, result.stderr
    return result.stdout


def submit_blocker(minutes=2):
    """A job holding the node (``--exclusive``): jobs submitted after it wait"""
    result = run("sbatch", "--parsable", "--exclusive", f"--time={minutes}",
                 "--job-name=blocker", "--output=/dev/null", "--wrap", "sleep 300")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def cancel(job_id):
    run("scancel", str(job_id))


def cancel_all_jobs():
    run("scancel", "--user=root")
