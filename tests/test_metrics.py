"""GET /metrics: who may read it, and what a scraper sees after starts,
polls, stops and refusals"""

import base64
import json
import os
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import api_request, json_of, start_body, wait_until

TOKEN = "metrics-token-for-tests-0123456789"
SLEEP = ["sleep", "600"]
FLAVORS = {
    "small": {"max": 5, "display_name": "Small"},
    "big": {"display_name": "Big"},
}
HUBS = {"*": {"flavors": ["small", "big"]}}


def metrics_config(workdir, **metrics):
    cfg = outpost_config(workdir, spawner_cmd=SLEEP, flavors=FLAVORS, hubs=HUBS)
    cfg.OutpostMetrics.token = TOKEN
    cfg.OutpostMetrics.refresh_interval = 0.1
    for key, value in metrics.items():
        setattr(cfg.OutpostMetrics, key, value)
    return cfg


@pytest.fixture(scope="module")
async def metered(tmp_path_factory, fake_hub):
    outpost = await start_outpost(metrics_config(tmp_path_factory.mktemp("metrics")))
    yield outpost
    await stop_outpost(outpost)


async def scrape(app, **headers):
    return await api_request(app, "metrics", auth=False, headers=headers)


def bearer(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def samples(response):
    """{(name, frozenset(labels)): value} of a scrape"""
    found = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found, name, **labels):
    return found.get((name, frozenset(labels.items())), 0)


async def test_metrics_need_the_metrics_token(metered):
    response = await scrape(metered)
    assert response.code == 401
    assert json_of(response)["status"] == 401
    assert "Bearer" in response.headers["WWW-Authenticate"]
    assert (await scrape(metered, **bearer("wrong"))).code == 401
    # a hub's own credential is not the metrics credential
    hub = await api_request(metered, "metrics")
    assert hub.code == 401

    response = await scrape(metered, **bearer())
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    basic = base64.b64encode(f"prometheus:{TOKEN}".encode()).decode()
    assert (await scrape(metered, Authorization=f"Basic {basic}")).code == 200


@pytest.mark.parametrize(
    "settings, code",
    [
        ({"open_networks": ["127.0.0.0/8"]}, 200),
        ({"open_networks": ["10.0.0.0/8"]}, 401),
        ({"authenticate": False, "token": ""}, 200),
        ({"enabled": False}, 404),
    ],
)
async def test_who_reads_the_metrics_without_a_token(tmp_path, fake_hub, settings, code):
    outpost = await start_outpost(metrics_config(tmp_path, **settings))
    try:
        assert (await scrape(outpost)).code == code
    finally:
        await stop_outpost(outpost)


async def start(app, fake_hub, name, flavor="small", misc=None, hub="hub-a"):
    body = start_body(fake_hub.url, user="mia", name=name, misc=misc,
                      user_options={"flavor": flavor})  # fmt: skip
    body["user_options"]["start_id"] = body["user_options"].get("start_id") or "s-" + name
    response = await api_request(app, "services", method="POST", body=body, hub=hub)
    return response, body


async def test_a_scrape_counts_starts_polls_stops_and_refusals(metered, fake_hub):
    running, body = await start(metered, fake_hub, "counted")
    assert running.code == 200, running.body
    start_id = body["user_options"]["start_id"]
    for _ in range(3):
        assert (await api_request(metered, "services", "counted", start_id)).code == 200
    assert (await api_request(metered, "services", "nosuch", "x")).code == 404
    failed, _ = await start(metered, fake_hub, "broken", misc={"cmd": ["/no/such/program-for-metrics"]})
    assert failed.code == 419
    refused, _ = await start(metered, fake_hub, "refused", misc={"privileged": True, "cmd": 1})
    assert refused.code == 419
    other, other_body = await start(metered, fake_hub, "other", flavor="big", hub="hub-b")
    assert other.code == 200

    async def summary_shows_both():
        found = samples(await scrape(metered, **bearer()))
        return found if value(found, "jupyterhub_outpost_servers", hub="hub-b", flavor="big",
                              state="running") == 1 else None  # fmt: skip

    found = await wait_until(summary_shows_both, timeout=10, message="the server gauges")
    assert value(found, "jupyterhub_outpost_servers", hub="hub-a", flavor="small", state="running") == 1
    assert value(found, "jupyterhub_outpost_starts_total", hub="hub-a", outcome="success") == 1
    assert value(found, "jupyterhub_outpost_starts_total", hub="hub-a", outcome="failure") == 1
    assert value(found, "jupyterhub_outpost_starts_total", hub="hub-b", outcome="success") == 1
    assert value(found, "jupyterhub_outpost_refused_starts_total", hub="hub-a", reason="override") == 1
    assert value(found, "jupyterhub_outpost_polls_total", hub="hub-a", outcome="running") == 3
    assert value(found, "jupyterhub_outpost_polls_total", hub="hub-a", outcome="not_found") == 1
    assert value(found, "jupyterhub_outpost_poll_duration_seconds_count", hub="hub-a") == 3
    assert value(found, "jupyterhub_outpost_start_duration_seconds_count", hub="hub-a") == 2
    assert value(found, "jupyterhub_outpost_flavor_servers", flavor="small") == 1
    assert value(found, "jupyterhub_outpost_flavor_servers", flavor="big") == 1
    assert value(found, "jupyterhub_outpost_flavor_limit", flavor="small") == 5
    assert ("jupyterhub_outpost_flavor_limit", frozenset({("flavor", "big")})) not in found
    assert value(found, "jupyterhub_outpost_db_call_duration_seconds_count", kind="poll") >= 4
    assert value(found, "jupyterhub_outpost_db_call_duration_seconds_count", kind="write") >= 1
    # the fake hub refuses the progress events of these tokens (403)
    assert value(found, "jupyterhub_outpost_hub_callback_failures_total", kind="event") >= 1
    assert value(found, "process_resident_memory_bytes") > 0

    stopped = await api_request(metered, "services", "counted", start_id, method="DELETE")
    assert stopped.code == 200
    await api_request(metered, "services", "other", other_body["user_options"]["start_id"],
                      method="DELETE", hub="hub-b")  # fmt: skip
    found = samples(await scrape(metered, **bearer()))
    assert value(found, "jupyterhub_outpost_stops_total", hub="hub-a", outcome="success") == 1
    assert value(found, "jupyterhub_outpost_stop_duration_seconds_count", hub="hub-a") == 1


async def test_labels_name_hubs_and_flavors_never_users_or_servers(metered, fake_hub):
    response, body = await start(metered, fake_hub, "private-server-name")
    assert response.code == 200
    text = (await scrape(metered, **bearer())).body.decode()
    assert "private-server-name" not in text
    assert "mia" not in text
    assert body["env"]["JUPYTERHUB_API_TOKEN"] not in text
    await api_request(metered, "services", "private-server-name", body["user_options"]["start_id"],
                      method="DELETE")  # fmt: skip


async def test_the_lease_holder_says_so(metered):
    async def held():
        found = samples(await scrape(metered, **bearer()))
        return value(found, "jupyterhub_outpost_background_lease_held") == 1

    await wait_until(held, timeout=10, message="the lease gauge")


DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "share", "jupyterhub-outpost", "grafana-dashboard.json")


async def test_the_dashboard_shows_metrics_that_exist(metered, fake_hub):
    response, body = await start(metered, fake_hub, "dashboard")
    assert response.code == 200
    await api_request(metered, "services", "dashboard", body["user_options"]["start_id"])
    text = (await scrape(metered, **bearer())).body.decode()
    # names with samples, and the families a scrape declares (a gauge of
    # servers has no sample while none runs)
    served = {name for name, _ in samples(await scrape(metered, **bearer()))}
    for family in text_string_to_metric_families(text):
        served |= {family.name, f"{family.name}_total", f"{family.name}_bucket"}
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 14
    used = {name for expr in exprs for name in re.findall(r"\b(?:jupyterhub_outpost|process)_[a-z_]+", expr)}
    assert used - served == set()
    await api_request(metered, "services", "dashboard", body["user_options"]["start_id"], method="DELETE")


async def test_a_scrape_counts_freezes_without_walking_the_frozen_objects(metered, monkeypatch):
    import gc

    def walk():  # what gc.get_freeze_count() does: 65 ms with 10,000 servers
        raise AssertionError("the scrape walked every frozen object")

    monkeypatch.setattr(gc, "get_freeze_count", walk)
    found = samples(await scrape(metered, **bearer()))
    assert value(found, "jupyterhub_outpost_gc_freezes_total") >= 1  # the one at startup
    assert value(found, "jupyterhub_outpost_gc_unfreezes_total") == 0
