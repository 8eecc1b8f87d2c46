"""What the KubeSpawner tests share: an Outpost process whose KubeSpawner
reaches a :class:`~tests.fake_kubernetes.FakeKubernetesAPI` through a
kubeconfig file, and helpers to start servers on it."""

import os
import sys

import pytest
import yaml

from .fake_kubernetes import FakeKubernetesAPI
from .utils import REPO, OutpostProcess, new_db_url, process_env

SHARE = os.path.join(REPO, "share", "jupyterhub-outpost")
MANIFEST = os.path.join(SHARE, "kubernetes.yaml")
CONFIG_FILE = os.path.join(SHARE, "outpost_config_kubespawner.py")

NAMESPACE = "outpost-test"
IMAGE = "quay.io/jupyter/base-notebook:2025-01-01"
ALLOWED_IMAGES = (IMAGE, "quay.io/jupyter/scipy-notebook:2025-01-01",
                  "example.org/crashes:1", "example.org/does-not-exist:1",
                  "example.org/slow-pull:1")  # fmt: skip
# images whose ENTRYPOINT the fake knows: this one exits at once
ENTRYPOINTS = {"example.org/crashes:1": ["sh", "-c", "echo 'no notebook here' >&2; exit 3"]}

KUBE_CONFIG = """
c = get_config()  # noqa
c.JupyterHubOutpost.db_url = "{db_url}"
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
c.JupyterHubOutpost.spawner_class = "kubespawner.KubeSpawner"
c.JupyterHubOutpost.pending_timeout = 30
c.JupyterHubOutpost.min_account_uid = 0
c.KubeSpawner.namespace = "{namespace}"
c.KubeSpawner.image = "{image}"
c.KubeSpawner.cmd = ["jupyterhub-singleuser"]
c.KubeSpawner.args = ["--ServerApp.allow_root=True"]
c.KubeSpawner.start_timeout = 60
c.KubeSpawner.delete_grace_period = 1
c.KubeSpawner.k8s_api_request_retry_timeout = 20
c.HubClient.retries = 0
c.HubClient.request_timeout = 5

# the hubs may pick one of these images
ALLOWED_IMAGES = {allowed_images!r}
c.JupyterHubOutpost.allowed_overrides = ["image"]


def allow_override(hub_name, misc):
    return misc.get("image", ALLOWED_IMAGES[0]) in ALLOWED_IMAGES


c.JupyterHubOutpost.allow_override = allow_override
"""


def kube_config_text(workdir, db_url=None, extra=""):
    return KUBE_CONFIG.format(
        db_url=db_url or new_db_url(workdir), workdir=workdir, namespace=NAMESPACE,
        image=IMAGE, allowed_images=ALLOWED_IMAGES,
    ) + extra  # fmt: skip


def kube_outpost(workdir, fake, db_url=None, extra=""):
    """An :class:`OutpostProcess` with KubeSpawner on ``fake`` (not started)"""
    env = process_env()
    env["KUBECONFIG"] = fake.kubeconfig
    # the container processes find jupyterhub-singleuser of this environment
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return OutpostProcess(workdir, kube_config_text(workdir, db_url, extra), extra_env=env)


def fake_base_env():
    return {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A FakeKubernetesAPI for one test module (import it into the module)"""
    api = FakeKubernetesAPI(tmp_path_factory.mktemp("fake-k8s"), base_env=fake_base_env(),
                            entrypoints=ENTRYPOINTS).start()  # fmt: skip
    yield api
    api.stop()


def manifest_objects():
    """The objects of share/jupyterhub-outpost/kubernetes.yaml"""
    with open(MANIFEST) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def manifest_role():
    [role] = [o for o in manifest_objects() if o["kind"] == "Role"]
    return role
