"""The API as a contract: the served OpenAPI description matches what the
service really answers, checked on real responses and by a bounded
property-based fuzz run (schemathesis) against a live Outpost process.
"""

import json
import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import checks as st_checks

from .utils import HUB_CREDENTIALS, OutpostProcess, database_independent, new_db_url, start_body

FUZZ_EXAMPLES = int(os.environ.get("OUTPOST_FUZZ_EXAMPLES", "60"))

# a cheap real process per start keeps the fuzz run fast
CONFIG = """
c = get_config()  # noqa
c.JupyterHubOutpost.db_url = "{db_url}"
c.JupyterHubOutpost.internal_certs_location = "{workdir}/certs"
c.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.JupyterHubOutpost.send_events = False
c.SimpleLocalProcessSpawner.home_dir_template = "{workdir}/home"
c.Spawner.cmd = ["sleep", "600"]
c.Spawner.ip = "127.0.0.1"
c.HubClient.retries = 0
c.HubClient.request_timeout = 1
c.JupyterHubOutpost.flavors = {{
    "small": {{"display_name": "Small", "weight": 10, "max": 1000, "maxPerUser": 500,
              "runtime": {{"hours": 1}}}},
    "gpu": {{"display_name": "GPU", "weight": 20, "max": 1}},
}}
c.JupyterHubOutpost.default_flavor = "small"
c.JupyterHubOutpost.allowed_overrides = ["cmd"]
"""


@pytest.fixture(scope="module")
def outpost(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("openapi")
    process = OutpostProcess(workdir, CONFIG.format(workdir=workdir, db_url=new_db_url(workdir)))
    process.start()
    yield process
    for hub in HUB_CREDENTIALS:
        for server in http(process, "GET", "services", hub=hub).json():
            http(process, "DELETE", f"services/{server['name']}/{server['start_id']}", hub=hub)
    process.terminate()


def url(process, path):
    return f"http://127.0.0.1:{process.port}/{path}"


def http(process, method, path, hub="hub-a", **kwargs):
    return requests.request(
        method, url(process, path), auth=(hub, HUB_CREDENTIALS[hub]), timeout=30, **kwargs
    )


@pytest.fixture(scope="module")
def schema(outpost):
    loaded = schemathesis.openapi.from_url(url(outpost, "openapi.json"))
    loaded.config.update(base_url=url(outpost, "").rstrip("/"))
    return loaded


def test_description_is_served_without_credentials(outpost):
    as_json = requests.get(url(outpost, "openapi.json"), timeout=10)
    assert as_json.status_code == 200
    spec = as_json.json()
    assert spec["openapi"].startswith("3.")
    assert {"/ping", "/services", "/services/{name}/{start_id}", "/flavors", "/userflavors"} <= set(
        spec["paths"]
    )
    as_yaml = requests.get(url(outpost, "openapi.yaml"), timeout=10)
    assert as_yaml.status_code == 200 and b"openapi: 3" in as_yaml.content


def test_real_responses_match_the_description(outpost, schema):
    def check(method, path, template, response):
        assert schema[template][method].validate_response(response) is not False

    body = start_body("http://127.0.0.1:9/hub/api", user="zoe", name="contract")
    start_id = body["user_options"]["start_id"]
    server = f"services/contract/{start_id}"
    responses = [
        ("GET", "/ping", requests.get(url(outpost, "ping"), timeout=10)),
        ("POST", "/services", http(outpost, "POST", "services", json=body)),
        ("POST", "/services", http(outpost, "POST", "services", json=body)),  # 409
        ("GET", "/services", http(outpost, "GET", "services")),
        ("GET", "/services/{name}/{start_id}", http(outpost, "GET", server + "?collect_logs=true")),
        ("GET", "/services/{name}/{start_id}", http(outpost, "GET", server, hub="hub-b")),  # 404
        ("POST", "/services", http(outpost, "POST", "services", data="{no json")),  # 400
        ("POST", "/services", http(outpost, "POST", "services",
                                   json=dict(body, misc={"cmd": ["/no/such/program"]},
                                             user_options={"start_id": "other"}))),  # 419
        ("GET", "/services", requests.get(url(outpost, "services"), timeout=10)),  # 401
        ("DELETE", "/services/{name}/{start_id}", http(outpost, "DELETE", server)),
        ("DELETE", "/services/{name}/{start_id}", http(outpost, "DELETE", server)),  # 404
        ("GET", "/flavors", http(outpost, "GET", "flavors")),
        ("POST", "/userflavors", http(outpost, "POST", "userflavors", json={"name": "zoe"})),
        ("POST", "/userflavors", http(outpost, "POST", "userflavors", json=[])),  # 400
    ]
    codes = [r.status_code for _, _, r in responses]
    assert codes == [200, 200, 409, 200, 200, 404, 400, 419, 401, 200, 404, 200, 200, 400]
    for method, template, response in responses:
        check(method, template, template, response)
    assert responses[1][2].json()["service"].startswith("127.0.0.1:")
    assert responses[7][2].json()["class"] == "FileNotFoundError"
    assert set(responses[11][2].json()) == {"small", "gpu"}


FUZZ_CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.response_headers_conformance,
]


@database_independent  # the HTTP layer's answers to generated input
def test_fuzz_no_server_errors_and_schema_conformance(outpost, schema):
    """Every generated request: no 5xx, and answered as described"""
    stats = {"requests": 0, "failures": []}
    fuzz_settings = settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )

    def run(case):
        kwargs = {}
        if case.path.startswith(("/services", "/flavors", "/userflavors", "/credits", "/usercredits",
                                 "/history")):
            kwargs["auth"] = ("hub-a", HUB_CREDENTIALS["hub-a"])
        response = case.call(timeout=30, **kwargs)
        stats["requests"] += 1
        try:
            case.validate_response(response, checks=FUZZ_CHECKS)
        except Exception as e:
            stats["failures"].append(f"{case.method} {case.formatted_path}: {e}")

    for result in schema.get_all_operations():
        operation = result.ok()
        fuzz_settings(given(operation.as_strategy())(run))()
    print(json.dumps({"fuzz_requests": stats["requests"], "failures": len(stats["failures"])}))
    assert stats["requests"] >= FUZZ_EXAMPLES
    assert stats["failures"] == [], "\n".join(stats["failures"][:10])
