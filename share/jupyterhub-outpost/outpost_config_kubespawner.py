# jupyterhub-outpost in a Kubernetes cluster the hub cannot reach itself:
# each server is a pod started by KubeSpawner in the Outpost's namespace.
#
#     pip install 'jupyterhub-outpost[kubernetes]'
#     jupyterhub-outpost -f outpost_config_kubespawner.py
#
# kubernetes.yaml beside this file deploys it (service account, RBAC,
# database volume) with this file as its ConfigMap. Hub passwords and the
# encryption key come from the environment (OUTPOST_HUB_CREDENTIALS,
# OUTPOST_CRYPT_KEY, from the Secret outpost-secrets).
c = get_config()  # noqa: F821

c.JupyterHubOutpost.port = 8080
# the records survive pod restarts on the volume mounted at /srv/outpost;
# with several replicas use PostgreSQL instead:
# c.JupyterHubOutpost.db_url = "postgresql+psycopg://outpost@postgres/outpost"
c.JupyterHubOutpost.db_url = "sqlite:////srv/outpost/jupyterhub_outpost.sqlite"
c.JupyterHubOutpost.internal_certs_location = "/srv/outpost/internal-ssl"

c.JupyterHubOutpost.spawner_class = "kubespawner.KubeSpawner"
# namespace: the Outpost's own (read from its service account). Pods are
# named "<hub>--<pod_name_template>" (e.g. "hub-a--jupyter-alice--lab"):
# servers of two hubs never share a pod, whatever the hubs send.
c.KubeSpawner.image = "quay.io/jupyter/minimal-notebook:2025-03-10"
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
# internal_ssl); those are accepted. Every other trait (privileged,
# extra_pod_config, volumes, service_account, node_selector, tolerations,
# ...) is refused with 419 unless listed here. The hubs may pick an image,
# from this list only:
ALLOWED_IMAGES = [
    "quay.io/jupyter/minimal-notebook:2025-03-10",
    "quay.io/jupyter/scipy-notebook:2025-03-10",
]
c.JupyterHubOutpost.allowed_overrides = ["image"]


def allow_override(hub_name, misc):
    return misc.get("image", ALLOWED_IMAGES[0]) in ALLOWED_IMAGES


c.JupyterHubOutpost.allow_override = allow_override

# Pods do not run as local accounts of the Outpost's host: the uid check
# has nothing to check (root and nobody stay refused as user names).
c.JupyterHubOutpost.min_account_uid = 0
