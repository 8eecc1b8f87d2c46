"""share/jupyterhub-outpost/kubernetes.yaml, checked offline: what Kubernetes
serves, what refers to what, and that it matches outpost_config_kubespawner.py.

(The Role's verbs are compared with KubeSpawner's requests in test_kube.py.)
"""

import re

from .kube_utils import CONFIG_FILE, manifest_objects
from .utils import database_independent

pytestmark = [database_independent]

# (apiVersion, kind) -> namespaced: the stable APIs a cluster serves
SERVED = {
    ("v1", "Namespace"): False,
    ("v1", "Secret"): True,
    ("v1", "ConfigMap"): True,
    ("v1", "ServiceAccount"): True,
    ("v1", "Service"): True,
    ("v1", "PersistentVolumeClaim"): True,
    ("apps/v1", "Deployment"): True,
    ("rbac.authorization.k8s.io/v1", "Role"): True,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): True,
}
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def by_kind():
    found = {}
    for obj in manifest_objects():
        found.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    return found


def deployment():
    [obj] = by_kind()["Deployment"].values()
    return obj


def outpost_container():
    [container] = deployment()["spec"]["template"]["spec"]["containers"]
    return container


def test_every_object_is_served_and_named():
    objects = manifest_objects()
    [namespace] = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        assert key in SERVED, key
        assert DNS_LABEL.match(obj["metadata"]["name"]), obj["metadata"]
        if SERVED[key]:
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names))


def test_references_point_to_objects_of_the_manifest():
    kinds = by_kind()
    pod = deployment()["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in kinds["Service"].values():
        assert service["spec"]["selector"].items() <= labels.items()
        ports = {p["name"] for p in outpost_container()["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert pod["spec"]["serviceAccountName"] in kinds["ServiceAccount"]
    [binding] = kinds["RoleBinding"].values()
    assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in kinds["Role"]
    assert {s["name"] for s in binding["subjects"]} == {pod["spec"]["serviceAccountName"]}
    for volume in pod["spec"]["volumes"]:
        if "configMap" in volume:
            assert volume["configMap"]["name"] in kinds["ConfigMap"]
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in kinds["PersistentVolumeClaim"]
    mounted = {m["name"] for m in outpost_container()["volumeMounts"]}
    assert mounted == {v["name"] for v in pod["spec"]["volumes"]}


def test_the_deployment_gives_what_the_config_file_expects():
    kinds = by_kind()
    container = outpost_container()
    pod = deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"].rstrip("/"): m for m in container["volumeMounts"]}

    # the config file is the ConfigMap's, at the path the command reads
    command = container["command"]
    config_path = command[command.index("-f") + 1]
    directory, file_name = config_path.rsplit("/", 1)
    config_map = kinds["ConfigMap"][volumes[mounts[directory]["name"]]["configMap"]["name"]]
    with open(CONFIG_FILE) as f:
        assert config_map["data"][file_name] == f.read()
    config = config_map["data"][file_name]

    # the port it listens on is the container's
    port = int(re.search(r"c\.JupyterHubOutpost\.port = (\d+)", config).group(1))
    assert port in {p["containerPort"] for p in container["ports"]}

    # the database and the certificates live on the persistent volume
    for pattern in (r'db_url = "sqlite:///(/[^"]+)"', r'internal_certs_location = "(/[^"]+)"'):
        path = re.search(pattern, config).group(1)
        [mount] = [m for p, m in mounts.items() if path.startswith(p + "/")]
        assert "persistentVolumeClaim" in volumes[mount["name"]], path
        assert not mount.get("readOnly")

    # the secrets the config file leaves to the environment come from the Secret
    [source] = container["envFrom"]
    secret = kinds["Secret"][source["secretRef"]["name"]]
    assert {"OUTPOST_HUB_CREDENTIALS", "OUTPOST_CRYPT_KEY"} <= set(secret["stringData"])
    assert "OUTPOST_HUB_CREDENTIALS" in config and "OUTPOST_CRYPT_KEY" in config
    assert "hub_credentials" not in config and "crypt_key" not in config

    # KubeSpawner finds the cluster through the pod's own service account
    assert pod.get("automountServiceAccountToken", True) is True
    assert 'spawner_class = "kubespawner.KubeSpawner"' in config
