# jupyterhub-outpost on an HPC login node: each server is a Slurm job.
#
#     pip install 'jupyterhub-outpost[slurm]'     # batchspawner 1.3
#     jupyterhub-outpost -f outpost_config_slurm.py
#
# The Outpost runs where sbatch, squeue and scancel work (a login node), as
# root or as a service account that may `sudo -u` the users (see
# docs/source/howto/hpc-login-node.md). The compute nodes need Python with
# jupyterhub and jupyter_server, must reach the hub's API (OAuth, activity),
# and must reach this Outpost's port (each job reports its server's port).
import os

c = get_config()  # noqa: F821

c.JupyterHubOutpost.ip = os.environ.get("OUTPOST_IP", "")  # all addresses
c.JupyterHubOutpost.port = int(os.environ.get("OUTPOST_PORT", "8080"))
# Hub passwords: OUTPOST_HUB_CREDENTIALS='{"my-hub": "..."}' in the environment.

c.JupyterHubOutpost.spawner_class = "jupyterhub_outpost.spawners.slurm.OutpostSlurmSpawner"

# Where the jobs report their ports: this process, as compute nodes reach it.
# Default: http://<this host's FQDN>:<port>/batchspawner
# c.OutpostSlurmSpawner.port_report_url = "http://login01.cluster:8080/batchspawner"

# sbatch and scancel run as the user. As root, runuser needs no sudoers rule;
# a service account uses sudo: "sudo -E -u {username}" (batchspawner's default).
c.SlurmSpawner.exec_prefix = os.environ.get("OUTPOST_EXEC_PREFIX", "runuser -u {username} --")

# Resources of every job (they fill batchspawner's batch script template).
# Site specific: uncomment and adapt.
# c.SlurmSpawner.req_partition = "interactive"
# c.SlurmSpawner.req_account = "project-a"
# c.SlurmSpawner.req_runtime = "08:00:00"
# c.SlurmSpawner.req_memory = "8G"
# c.SlurmSpawner.req_nprocs = "4"
# c.SlurmSpawner.req_prologue = "module load jupyter"

# The command in the job: jupyterhub-singleuser as the compute nodes find it
# (PATH is kept from the Outpost's environment; an absolute path is safer).
# c.SlurmSpawner.cmd = ["/opt/jupyter/bin/jupyterhub-singleuser"]
# The job's port reporter runs with the Outpost's Python by default; with
# another Python on the nodes (it needs the standard library only):
# c.SlurmSpawner.batchspawner_singleuser_cmd = "/usr/bin/python3 -m jupyterhub_outpost.spawners.slurmjob"

# One squeue for all jobs every 10 s (every second while a start waits).
c.OutpostSlurmSpawner.squeue_interval = 10
c.OutpostSlurmSpawner.squeue_busy_interval = 1

# Jobs may wait in the queue: allow for it, and keep the Outpost's
# pending_timeout above start_timeout.
c.Spawner.start_timeout = 900
c.Spawner.http_timeout = 300
c.JupyterHubOutpost.pending_timeout = 1200

# A hub's per-start overrides may pick the partition or the runtime, e.g.
# c.OutpostSpawner.custom_misc = {"req_partition": "gpu", "req_runtime": "02:00:00"}
# at the hub. Every value is checked for its place in the batch script
# (no newline, quote, $(, backtick or ;); other traits stay refused.
c.JupyterHubOutpost.allowed_overrides = ["req_partition", "req_runtime", "req_memory", "req_ngpus"]

# Jobs run as the account of the hub's user name; system accounts (uid below
# 1000, root, nobody) are refused. Users of a second hub get their own accounts:
# c.JupyterHubOutpost.account_name_template = {"hub-a": "{username}", "*": "{hub}-{username}"}
