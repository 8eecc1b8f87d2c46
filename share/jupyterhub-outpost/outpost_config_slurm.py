# jupyterhub-outpost on an HPC login node: each server is a Slurm job.
#
#     pip install jupyterhub-outpost batchspawner
#     jupyterhub-outpost -f outpost_config_slurm.py
#
# The Outpost runs as root (or as a user allowed to `sudo -u` every user) on
# a host where sbatch, squeue and scancel work. The compute nodes need
# jupyterhub (for jupyterhub-singleuser) and must reach the hub's API.
from batchspawner import SlurmSpawner
from jupyterhub.utils import random_port

c = get_config()  # noqa: F821

c.JupyterHubOutpost.port = 8080
# Hub passwords: OUTPOST_HUB_CREDENTIALS='{"my-hub": "..."}' in the environment.


class OutpostSlurmSpawner(SlurmSpawner):
    """SlurmSpawner whose job listens on a port chosen before submission.

    batchspawner's job normally reports a random port to the hub's
    ``/batchspawner`` API; with an Outpost that report would go to the hub,
    not here. Instead the job serves on the port the hub sent (the ``port``
    override), or on a random one, and needs no report.
    """

    async def start(self):
        self._job_port = self.port or random_port()
        return await super().start()

    async def submit_batch_script(self):
        self.port = self._job_port  # start() reset it to 0
        return await super().submit_batch_script()


c.JupyterHubOutpost.spawner_class = OutpostSlurmSpawner
# run jupyterhub-singleuser itself, not the port-reporting wrapper
c.OutpostSlurmSpawner.batchspawner_singleuser_cmd = ""

# Resources of every job (the req_* values fill the batch script template).
c.SlurmSpawner.req_partition = "batch"
c.SlurmSpawner.req_account = "project-a"
c.SlurmSpawner.req_runtime = "08:00:00"
c.SlurmSpawner.req_memory = "8G"
c.SlurmSpawner.req_nprocs = "4"
c.SlurmSpawner.req_prologue = "module load jupyter"
# sbatch/squeue/scancel run as the user: `sudo -E -u {username}` by default
# c.SlurmSpawner.exec_prefix = "sudo -E -u {username}"
# They inherit only the variables in env_keep (JupyterHub 6 keeps almost none)
c.Spawner.env_keep = ["PATH", "LANG", "LC_ALL"]

# Jobs may wait in the queue: allow for it, and keep the Outpost's
# pending_timeout above start_timeout.
c.Spawner.start_timeout = 900
c.Spawner.http_timeout = 300
c.JupyterHubOutpost.pending_timeout = 1200

# A hub's per-start overrides may pick the partition or runtime too, e.g.
# c.OutpostSpawner.custom_misc = {"req_partition": "gpu", "req_ngpus": "1"}
# at the hub. Accept those besides the network settings the OutpostSpawner
# always sends (other traits, such as cmd, stay refused):
c.JupyterHubOutpost.allowed_overrides = ["req_partition", "req_runtime", "req_ngpus"]

# Jobs run as the account of the hub's user name; system accounts (uid below
# 1000, root, nobody) are refused. Users of a second hub get their own accounts:
# c.JupyterHubOutpost.account_name_template = {"hub-a": "{username}", "*": "{hub}-{username}"}
