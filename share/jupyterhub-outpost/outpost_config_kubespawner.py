# jupyterhub-outpost in a Kubernetes cluster the hub cannot reach itself:
# each server is a pod started by KubeSpawner in the Outpost's namespace.
#
#     pip install jupyterhub-outpost jupyterhub-kubespawner
#     jupyterhub-outpost -f outpost_config_kubespawner.py
#
# kubernetes.yaml beside this file deploys it (service account, RBAC,
# database volume). Hub passwords and the encryption key come from the
# environment (OUTPOST_HUB_CREDENTIALS, OUTPOST_CRYPT_KEY).
c = get_config()  # noqa: F821

c.JupyterHubOutpost.port = 8080
# the records survive pod restarts on the volume mounted at /srv/outpost;
# for PostgreSQL: "postgresql+psycopg://outpost@db/outpost"
c.JupyterHubOutpost.db_url = "sqlite:////srv/outpost/jupyterhub_outpost.sqlite"

c.JupyterHubOutpost.spawner_class = "kubespawner.KubeSpawner"
# namespace: the Outpost's own by default (read from the service account)
c.KubeSpawner.image = "quay.io/jupyter/minimal-notebook:latest  # pin a tag in production"
c.KubeSpawner.cpu_limit = 2.0
c.KubeSpawner.mem_limit = "4G"
c.KubeSpawner.cpu_guarantee = 0.5
c.KubeSpawner.mem_guarantee = "1G"
c.KubeSpawner.start_timeout = 600
c.KubeSpawner.http_timeout = 120
# One Service per server: the hub (through its tunnel, or directly when the
# clusters are connected) reaches the server by that Service's name.
c.KubeSpawner.services_enabled = True

# The OutpostSpawner sends KubeSpawner-style overrides by default (port, ip,
# pod_name_template, dns_name_template, extra_labels, services_enabled,
# internal_ssl); those are accepted by default. Let one trusted hub choose
# the image as well:
c.JupyterHubOutpost.allowed_overrides = ["image"]


def allow_override(hub_name, misc):
    return hub_name == "trusted-hub" or "image" not in misc


c.JupyterHubOutpost.allow_override = allow_override

# Pods do not run as local accounts of the Outpost's host: the uid check
# has nothing to check (root and nobody stay refused as user names).
c.JupyterHubOutpost.min_account_uid = 0
