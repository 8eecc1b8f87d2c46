"""End to end with KubeSpawner: a real JupyterHub with the OutpostSpawner
starts a pod through a real Outpost process; the pod (a jupyterhub-singleuser
run by FakeKubernetesAPI's kubelet) answers the user through the hub's proxy.
"""


import pytest

from . import kube_utils
from .hub import JupyterHubProcess
from .kube_utils import kube_outpost
from .test_e2e import create_users, start_server, wait_gone, wait_ready
from .utils import HUB_CREDENTIALS, database_independent, needs_hub_proxy

pytest.importorskip("kubespawner", reason="jupyterhub-kubespawner is installed by '.[test]'")

fake = kube_utils.fake  # the module's FakeKubernetesAPI (a fixture)

pytestmark = [
    pytest.mark.e2e,
    database_independent,
    needs_hub_proxy,
]


@pytest.fixture(scope="module")
def outpost(tmp_path_factory, fake):
    process = kube_outpost(tmp_path_factory.mktemp("kube-outpost"), fake)
    process.start("--log-level=DEBUG")
    yield process
    process.end()


@pytest.fixture(scope="module")
def hub(tmp_path_factory, outpost):
    process = JupyterHubProcess(tmp_path_factory.mktemp("kube-hub"),
                                f"http://127.0.0.1:{outpost.port}/services/", "hub-a",
                                HUB_CREDENTIALS["hub-a"])  # fmt: skip
    process.start()
    yield process
    process.stop()
    process.kill_proxy()


async def test_a_users_request_through_the_hub_reaches_the_pod(hub, outpost, fake):
    await create_users(hub, "kara")
    code, _ = await start_server(hub, "kara", "lab")
    assert code in (201, 202)
    events = await hub.progress("kara", "lab")
    assert events and events[-1].get("ready") is True, events
    messages = " ".join(str(e.get("message", "")) for e in events)
    assert "Pulling image" in messages and "Started container notebook" in messages, events
    await wait_ready(hub, "kara", "lab")

    pod = fake.pod("hub-a--jupyter-kara--lab")
    assert pod["status"]["phase"] == "Running"
    token = await hub.user_token("kara")
    response = await hub.proxied("/user/kara/lab/api/me", token)
    assert response.code == 200 and b'"kara"' in response.body, response.body

    code, _ = await hub.api("users/kara/servers/lab", method="DELETE")
    assert code in (202, 204)
    await wait_gone(hub, "kara", "lab")
    assert fake.pod("hub-a--jupyter-kara--lab") is None


async def test_a_failing_pod_shows_kubernetes_reason_to_the_user(hub, outpost, fake):
    await create_users(hub, "lena")
    code, _ = await start_server(hub, "lena", "broken", {"misc": {"image": "example.org/does-not-exist:1"}})
    assert code in (201, 202)
    events = await hub.progress("lena", "broken", timeout=60)
    assert events and events[-1].get("failed") is True, events
    messages = " ".join(str(e.get("message", "")) for e in events)
    assert "Kubernetes: pod hub-a--jupyter-lena--broken: ImagePullBackOff" in messages, events
    await wait_gone(hub, "lena", "broken")
    assert not [n for n in fake.pod_names() if "lena" in n]
