"""KubeSpawner (jupyterhub-kubespawner, kubernetes_asyncio) in a real Outpost
process, against FakeKubernetesAPI reached through a kubeconfig file.

What a hub sees (start, progress, failures, poll, stop), what the cluster
receives (pods, secrets, services: their images, limits, names), and what it
costs (API requests per poll).
"""

import asyncio
import base64
import time

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .fake_kubernetes import KINDS
from . import kube_utils
from .kube_utils import IMAGE, NAMESPACE, kube_outpost, manifest_role
from . import test_secrets
from .utils import OutpostProcess, api_request, database_independent, json_of, start_body, tokens_of, wait_until

pytest.importorskip("kubespawner", reason="jupyterhub-kubespawner is installed by '.[test]'")

pytestmark = [database_independent]

tls = test_secrets.tls  # real certificates of a hub with internal_ssl (a fixture)
with_certs = test_secrets.with_certs
fake = kube_utils.fake  # the module's FakeKubernetesAPI (a fixture)

FLAVORS = """
c.JupyterHubOutpost.flavors = {
    "small": {"display_name": "1 CPU, 1 GB", "resources": {"cpu_limit": 1, "mem_limit": "1G"}},
    "gpu": {"display_name": "1 GPU", "max": 2, "resources": {
        "cpu_limit": 4, "mem_limit": "8G", "extra_resource_limits": {"nvidia.com/gpu": "1"}}},
}
c.JupyterHubOutpost.default_flavor = "small"
"""


@pytest.fixture(scope="module")
def outpost(tmp_path_factory, fake):
    process = kube_outpost(tmp_path_factory.mktemp("kube-outpost"), fake, extra=FLAVORS)
    process.start("--log-level=DEBUG")
    yield process
    process.end()


async def start(outpost, fake_hub, user="alice", name="lab", hub="hub-a", misc=None,
                flavor=None, body=None, expect=200):  # fmt: skip
    body = body or start_body(fake_hub.url, user=user, name=name, misc=misc,
                              user_options={"flavor": flavor} if flavor else None)  # fmt: skip
    fake_hub.tokens.update(tokens_of(body))
    response = await api_request(outpost, "services", method="POST", body=body, hub=hub, timeout=90)
    assert response.code == expect, response.body
    return body, json_of(response)


async def poll(outpost, body, hub="hub-a"):
    response = await api_request(outpost, "services", body["name"], body["user_options"]["start_id"], hub=hub)
    return response.code, json_of(response)


async def stop(outpost, body, hub="hub-a"):
    response = await api_request(outpost, "services", body["name"], body["user_options"]["start_id"],
                                 method="DELETE", hub=hub, timeout=90)  # fmt: skip
    assert response.code == 200, response.body


def beyond_watches(fake, since):
    """Requests after the ``since``-th that are not the shared watches' list+watch"""
    return [(method, path) for method, path, query in fake.requests[since:]
            if not (method == "GET" and path.rstrip("/").endswith(("/pods", "/events")))]  # fmt: skip


def notebook(pod):
    return next(c for c in pod["spec"]["containers"] if c["name"] == "notebook")


def received_pod(fake, name):
    return next(p for p in reversed(fake.received["pods"]) if p["metadata"]["name"] == name)


async def test_start_poll_stop_as_a_pod_and_polls_cost_no_requests(outpost, fake, fake_hub):
    body, answer = await start(outpost, fake_hub, user="alice", name="lab")
    [pod_name] = fake.pod_names()
    assert pod_name == "hub-a--jupyter-alice--lab"
    pod = fake.pod(pod_name, NAMESPACE)
    assert answer["service"] == f"http://{pod['status']['podIP']}:8888"
    assert notebook(pod)["image"] == IMAGE
    assert {"name": "JUPYTERHUB_USER", "value": "alice"} in notebook(pod)["env"]
    assert await poll(outpost, body) == (200, {"status": None})

    # one list+watch of pods and one of events for everything; polls read the cache
    assert fake.open_watches == 2
    before = fake.request_count()
    for _ in range(30):
        assert await poll(outpost, body) == (200, {"status": None})
    assert beyond_watches(fake, before) == []

    await stop(outpost, body)
    assert fake.pod(pod_name) is None
    assert pod_name in fake.deleted["pods"]
    assert (await poll(outpost, body))[0] == 404


async def test_progress_comes_from_the_pods_events(outpost, fake, fake_hub):
    body, _ = await start(outpost, fake_hub, user="petra", name="events")
    messages = [c["body"].get("message", "") for c in fake_hub.calls("event", "petra", "events")]
    for text in ("Successfully assigned", "Pulling image", "Successfully pulled", "Created container",
                 "Started container"):
        assert any(text in m for m in messages), (text, messages)
    await stop(outpost, body)


@pytest.mark.parametrize(
    "image, reason, detail",
    [
        ("example.org/does-not-exist:1", "ImagePullBackOff", "Back-off pulling image"),
        ("example.org/crashes:1", "CrashLoopBackOff", "exit code 3"),
    ],
)
async def test_a_failing_pod_fails_the_start_at_once_with_its_reason(outpost, fake, fake_hub, image, reason, detail):
    began = time.monotonic()
    body, answer = await start(outpost, fake_hub, user="frank", name="fails", misc={"image": image}, expect=419)
    assert time.monotonic() - began < 15  # start_timeout is 60
    assert reason in str(answer) and detail in str(answer), answer
    # the hub saw Kubernetes' events on the way
    messages = [c["body"].get("message", "") for c in fake_hub.calls("event", "frank", "fails")]
    assert any("Back-off" in m for m in messages), messages
    # the failed pod was deleted, and the Outpost forgot the start
    await wait_until(lambda: not [n for n in fake.pod_names() if "frank" in n], timeout=20,
                     message="failed pod deleted")  # fmt: skip
    assert (await poll(outpost, body))[0] == 404


async def test_allowed_image_and_flavor_resources_reach_the_pod(outpost, fake, fake_hub):
    image = "quay.io/jupyter/scipy-notebook:2025-01-01"
    body, _ = await start(outpost, fake_hub, user="gina", name="gpu", misc={"image": image}, flavor="gpu")
    container = notebook(received_pod(fake, "hub-a--jupyter-gina--gpu"))
    assert container["image"] == image
    limits = container["resources"]["limits"]
    assert limits["cpu"] in (4, "4", 4.0)
    assert int(limits["memory"]) == 8 * 1024**3
    assert limits["nvidia.com/gpu"] == "1"
    await stop(outpost, body)

    # the default flavor's limits apply without a flavor; an image not allowed is refused
    body, _ = await start(outpost, fake_hub, user="gina", name="small")
    limits = notebook(received_pod(fake, "hub-a--jupyter-gina--small"))["resources"]["limits"]
    assert int(limits["memory"]) == 1024**3
    await stop(outpost, body)
    created = len(fake.received["pods"])
    _, answer = await start(outpost, fake_hub, user="gina", name="other",
                            misc={"image": "evil.example.org/miner:1"}, expect=419)  # fmt: skip
    assert "image" in str(answer)
    assert len(fake.received["pods"]) == created


HOST_PATH = [{"name": "root", "hostPath": {"path": "/"}}]
PRIVILEGED = {"securityContext": {"privileged": True}}
PRIVILEGE_ATTEMPTS = {
    "privileged": {"privileged": True},
    "extra_container_config": {"extra_container_config": PRIVILEGED},
    "container_security_context": {"container_security_context": {"privileged": True}},
    "allow_privilege_escalation": {"allow_privilege_escalation": True},
    "uid": {"uid": 0},
    "extra_pod_config": {"extra_pod_config": {"hostNetwork": True, "hostPID": True}},
    "volumes": {"volumes": HOST_PATH, "volume_mounts": [{"name": "root", "mountPath": "/host"}]},
    "service_account": {"service_account": "outpost"},
    "automount_service_account_token": {"automount_service_account_token": True},
    "node_selector": {"node_selector": {"kubernetes.io/hostname": "control-plane"}},
    "tolerations": {"tolerations": [{"operator": "Exists"}]},
    "extra_containers": {"extra_containers": [{"name": "x", "image": "busybox", **PRIVILEGED}]},
    "init_containers": {"init_containers": [{"name": "x", "image": "busybox", **PRIVILEGED}]},
    "pod_security_context": {"pod_security_context": {"runAsUser": 0}},
    "namespace": {"namespace": "kube-system"},
    "profile_list": {"profile_list": [{"display_name": "x", "kubespawner_override": PRIVILEGED}]},
}


@pytest.mark.parametrize("trait", sorted(PRIVILEGE_ATTEMPTS))
async def test_no_privilege_through_overrides(outpost, fake, fake_hub, trait):
    created = len(fake.received["pods"])
    _, answer = await start(outpost, fake_hub, user="mallory", name=trait.replace("_", "-"),
                            misc=PRIVILEGE_ATTEMPTS[trait], expect=419)  # fmt: skip
    assert trait in str(answer), answer
    assert len(fake.received["pods"]) == created
    assert not [n for n in fake.pod_names() if "mallory" in n]


async def test_no_privilege_through_a_flavor_the_hub_names(outpost, fake, fake_hub):
    created = len(fake.received["pods"])
    _, answer = await start(outpost, fake_hub, user="mallory", name="flavor", flavor="privileged",
                            expect=419)  # fmt: skip
    assert "privileged" in str(answer)
    assert len(fake.received["pods"]) == created


async def test_internal_ssl_secret_is_created_mounted_and_removed(outpost, fake, fake_hub, tls):
    body = with_certs(start_body(fake_hub.url, user="sam", name="tls", misc={"internal_ssl": True}), tls)
    body, answer = await start(outpost, fake_hub, body=body)
    pod_name = "hub-a--jupyter-sam--tls"
    assert answer["service"].startswith(f"https://{pod_name}.{NAMESPACE}.svc")
    [secret] = [s for s in fake.received["secrets"] if s["metadata"]["name"] == pod_name]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["ssl.key"] == tls["certs"]["keyfile"]
    assert data["ssl.crt"] == tls["certs"]["certfile"]
    assert tls["internal_trust_bundles"]["hub-ca"] in data["notebooks-ca_trust.crt"]
    pod = received_pod(fake, pod_name)
    volume = next(v for v in pod["spec"]["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == pod_name
    mount = next(m for m in notebook(pod)["volumeMounts"] if m["name"] == volume["name"])
    env = {e["name"]: e.get("value") for e in notebook(pod)["env"]}
    assert env["JUPYTERHUB_SSL_KEYFILE"] == mount["mountPath"] + "ssl.key"
    assert pod_name in fake.names("services")
    assert await poll(outpost, body) == (200, {"status": None})

    # the server in the pod serves HTTPS with the mounted certificates (the
    # Service name does not resolve here: reach it at the pod's IP)
    url = f"https://{fake.pod(pod_name)['status']['podIP']}:8888{body['env']['JUPYTERHUB_SERVICE_PREFIX']}api"

    async def answers_https():
        request = HTTPRequest(url, validate_cert=False, client_cert=tls["client_cert"],
                              client_key=tls["client_key"], request_timeout=3)  # fmt: skip
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except OSError:
            return False
        return response.code == 200 and b"version" in response.body

    await wait_until(answers_https, timeout=60, message="the pod's server answers HTTPS")

    await stop(outpost, body)
    assert pod_name not in fake.names("secrets")
    assert pod_name not in fake.names("services")



async def test_the_outpostspawners_own_overrides_are_accepted(outpost, fake, fake_hub):
    """What an OutpostSpawner sends in ``misc`` unless told otherwise"""
    misc = {
        "dns_name_template": "{name}.{namespace}.svc.cluster.local",
        "pod_name_template": "jupyter-{username}--{servername}",
        "internal_ssl": False, "port": 8080, "ip": "0.0.0.0", "services_enabled": True,
        "extra_labels": {"hub.jupyter.org/outpost-hub": "a", "component": "not-a-server"},
    }  # fmt: skip
    body, answer = await start(outpost, fake_hub, user="olga", name="defaults", misc=misc)
    pod_name = "hub-a--jupyter-olga--defaults"
    assert answer["service"] == f"http://{pod_name}.{NAMESPACE}.svc.cluster.local:8080"
    pod = received_pod(fake, pod_name)
    labels = pod["metadata"]["labels"]
    # the hub's labels are added; KubeSpawner's own (the watch selects by them) stay
    assert labels["hub.jupyter.org/outpost-hub"] == "a" and labels["component"] == "singleuser-server"
    assert pod_name in fake.names("services")
    assert await poll(outpost, body) == (200, {"status": None})
    await stop(outpost, body)
    assert pod_name not in fake.names("services")

async def test_hubs_never_share_pods(outpost, fake, fake_hub):
    a, _ = await start(outpost, fake_hub, user="alice", name="same", hub="hub-a")
    # hub-b's alice/same, once with a template that copies hub-a's pod name
    b, _ = await start(outpost, fake_hub, user="alice", name="same", hub="hub-b")
    b2, _ = await start(outpost, fake_hub, user="alice", name="copy", hub="hub-b",
                        misc={"pod_name_template": "hub-a--jupyter-alice--same"})  # fmt: skip
    names = fake.pod_names()
    assert {"hub-a--jupyter-alice--same", "hub-b--jupyter-alice--same",
            "hub-b--hub-a--jupyter-alice--same"} <= set(names)  # fmt: skip
    assert fake.open_watches == 2  # still one watch of pods and one of events
    uid = fake.pod("hub-a--jupyter-alice--same")["metadata"]["uid"]
    for body, hub in ((a, "hub-a"), (b, "hub-b"), (b2, "hub-b")):
        assert await poll(outpost, body, hub=hub) == (200, {"status": None})
    await stop(outpost, b, hub="hub-b")
    await stop(outpost, b2, hub="hub-b")
    assert fake.pod("hub-a--jupyter-alice--same")["metadata"]["uid"] == uid
    await stop(outpost, a)


async def test_pods_outlive_the_outpost(tmp_path, fake, fake_hub):
    """kill -9, restart: every pod is found again from the saved state"""
    process = kube_outpost(tmp_path, fake)
    process.start()
    try:
        bodies = [(await start(process, fake_hub, user=f"rita{i}", name="keep"))[0] for i in range(3)]
        names = [f"hub-a--jupyter-rita{i}--keep" for i in range(3)]
        uids = [fake.pod(n)["metadata"]["uid"] for n in names]
        process.kill9()

        again = OutpostProcess(tmp_path, open(process.config_path).read(), extra_env={
            k: process.env[k] for k in ("KUBECONFIG", "PATH", "PYTHONPATH", "OUTPOST_CRYPT_KEY")})  # fmt: skip
        again.start()
        process = again
        for body in bodies:
            assert await poll(again, body) == (200, {"status": None})
        # the new process watches once, and polls read its cache
        before = fake.request_count()
        for _ in range(5):
            for body in bodies:
                assert await poll(again, body) == (200, {"status": None})
        assert beyond_watches(fake, before) == []
        assert [fake.pod(n)["metadata"]["uid"] for n in names] == uids

        # deleted behind the Outpost's back: ended
        fake.delete_behind(names[0], NAMESPACE)
        await wait_until(lambda: fake.pod(names[0]) is None, timeout=20, message="pod deleted")

        async def ended():
            code, model = await poll(again, bodies[0])
            return code == 200 and model["status"] is not None

        await wait_until(ended, timeout=20, message="poll of the deleted pod gives a status")
        for body, name in zip(bodies[1:], names[1:]):
            await stop(again, body)
            assert fake.pod(name) is None
        await stop(again, bodies[0])
    finally:
        process.end()


async def test_the_role_grants_exactly_what_kubespawner_used(outpost, fake, fake_hub, tls):
    """share/jupyterhub-outpost/kubernetes.yaml's Role against the requests the
    fake received in this module (all of what a server's life needs: this
    test makes one with a Service and an internal_ssl secret itself, whose
    leftovers from an earlier start KubeSpawner removes first)"""
    for kind in ("secrets", "services"):
        fake.call(fake.create, NAMESPACE, kind, {"metadata": {"name": "hub-a--jupyter-rolf--rbac"}})
    body = with_certs(start_body(fake_hub.url, user="rolf", name="rbac",
                                 misc={"internal_ssl": True, "services_enabled": True}), tls)  # fmt: skip
    body, _ = await start(outpost, fake_hub, body=body)
    await poll(outpost, body)
    await stop(outpost, body)

    used = fake.calls()
    assert all(isinstance(verb, str) and resource in KINDS for verb, resource in used), used
    assert fake.unknown == []
    granted = set()
    for rule in manifest_role()["rules"]:
        assert rule["apiGroups"] == [""]
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        granted |= {(verb, resource) for verb in rule["verbs"] for resource in rule["resources"]}
    assert granted == used


def test_object_names_of_two_hubs_never_meet():
    from jupyterhub_outpost.spawners.kube import hub_object_name, hub_slug

    assert hub_slug("hub-a") == "hub-a"
    # names that are no short lowercase DNS label without "--" are hashed
    for name in ("Hub-A", "hub_a", "a", "hub--a", "hub-a-", "x" * 25, "hub.example.org"):
        slug = hub_slug(name)
        assert slug.startswith("hub-") and len(slug) == 26 and "--" not in slug, (name, slug)
    assert hub_slug("Hub-A") != hub_slug("hub-A")
    # what could be ambiguous when joined is not
    pairs = [("hub-a", "b--c"), ("hub-a--b", "c"), ("hub-a-b", "c"), ("hub-a", "b-c"),
             ("Hub-A", "x"), ("hub-a", hub_slug("Hub-A")[6:] + "--x")]  # fmt: skip
    names = [hub_object_name(hub, name) for hub, name in pairs]
    assert len(set(names)) == len(names), names
    long = hub_object_name("hub-a", "jupyter-" + "x" * 80)
    assert len(long) <= 63 and long.startswith("hub-a--") and long[-1] != "-"
    assert long != hub_object_name("hub-a", "jupyter-" + "x" * 81)


async def test_a_start_interrupted_by_kill_9_leaves_no_pod(tmp_path, fake, fake_hub):
    """The Outpost dies while a pod is pulling its image: the next process
    finds the interrupted start and deletes the pod it created"""
    process = kube_outpost(tmp_path, fake)
    process.start()
    try:
        body = start_body(fake_hub.url, user="ivan", name="cut", misc={"image": "example.org/slow-pull:1"})
        fake_hub.tokens.update(tokens_of(body))
        request = asyncio.ensure_future(api_request(process, "services", method="POST", body=body, timeout=60))
        pod_name = "hub-a--jupyter-ivan--cut"
        await wait_until(lambda: fake.pod(pod_name) is not None, timeout=20, message="pod created")
        process.kill9()
        await asyncio.wait([request])

        again = OutpostProcess(tmp_path, open(process.config_path).read(), extra_env={
            k: process.env[k] for k in ("KUBECONFIG", "PATH", "PYTHONPATH", "OUTPOST_CRYPT_KEY")})  # fmt: skip
        again.start()
        process = again
        await wait_until(lambda: fake.pod(pod_name) is None, timeout=60, message="interrupted start's pod deleted")

        async def forgotten():
            return (await poll(again, body))[0] == 404

        await wait_until(forgotten, timeout=30, message="interrupted start forgotten")
    finally:
        process.end()


async def test_polls_cannot_tell_while_the_api_server_is_away(tmp_path, fake, fake_hub):
    """A restarted Outpost whose first list of pods fails answers 503 (the hub
    keeps the server), never "stopped"; once the API server is back, it watches again"""
    process = kube_outpost(tmp_path, fake)
    process.start()
    try:
        body, _ = await start(process, fake_hub, user="una", name="away")
        process.kill9()
        fake.unavailable = True
        again = OutpostProcess(tmp_path, open(process.config_path).read(), extra_env={
            k: process.env[k] for k in ("KUBECONFIG", "PATH", "PYTHONPATH", "OUTPOST_CRYPT_KEY")})  # fmt: skip
        again.start()
        process = again
        for _ in range(3):
            code, model = await poll(again, body)
            assert code == 503 and "cannot be determined" in model["message"], (code, model)
        fake.unavailable = False

        async def answers_running():
            return await poll(again, body) == (200, {"status": None})

        await wait_until(answers_running, timeout=30, message="poll answers once the API is back")
        await stop(again, body)
        assert fake.pod("hub-a--jupyter-una--away") is None
    finally:
        fake.unavailable = False
        process.end()
