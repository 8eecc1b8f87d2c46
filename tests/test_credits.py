"""Credits: which budgets a hub and one of its users may use
(``GET /credits``, ``POST /usercredits``), resolved from the rules"""

import pytest
from traitlets import TraitError

from jupyterhub_outpost import credits
from jupyterhub_outpost.app import JupyterHubOutpost

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import api_request, database_independent, json_of

CREDITS = {
    "credits": {
        "cpu-hours": {"budget": 1000, "unit": "core-hours", "reset": "monthly"},
        "gpu-hours": {"budget": 50, "unit": "gpu-hours"},
        "storage": {"budget": 10, "unit": "TB"},
    },
    "hubs": {
        "main": {"hub": "hub-a", "credits": ["cpu-hours", "gpu-hours"], "weight": 1},
        "others": {"hub": "hub-*", "credits": ["storage"],
                   "creditsOverride": {"storage": {"budget": 1}}},
        "main-big": {"hub": "hub-a", "weight": 5, "credits": ["cpu-hours", "gpu-hours", "storage"],
                     "creditsOverride": {"cpu-hours": {"budget": 5000}}},
    },
    "users": {
        "students": {"authentication": {"groups": "students"}, "weight": 1,
                     "credits": ["cpu-hours"], "creditsOverride": {"cpu-hours": {"budget": 100}}},
        "banned": {"authentication": {"name": "mallory"}, "weight": 10, "forbidden": True},
        "staff": {"hub": "hub-a", "authentication": {"groups": ["staff", "admins"]}, "weight": 5,
                  "creditsOverride": {"gpu-hours": {"budget": 500}}},
    },
}  # fmt: skip

pytestmark = database_independent  # rules only: no database involved


def test_a_hub_gets_the_credits_of_its_heaviest_rule_with_overrides():
    assert credits.hub_credits(CREDITS, "hub-a") == {
        "cpu-hours": {"budget": 5000, "unit": "core-hours", "reset": "monthly"},
        "gpu-hours": {"budget": 50, "unit": "gpu-hours"},
        "storage": {"budget": 10, "unit": "TB"},
    }
    assert credits.hub_credits(CREDITS, "hub-b") == {"storage": {"budget": 1, "unit": "TB"}}
    # with hub rules, a hub that none matches gets nothing; without, everything
    assert credits.hub_credits(CREDITS, "elsewhere") == {}
    assert set(credits.hub_credits({"credits": CREDITS["credits"]}, "elsewhere")) == {
        "cpu-hours", "gpu-hours", "storage"}  # fmt: skip
    assert credits.hub_credits({}, "hub-a") == {}


def test_user_rules_narrow_change_or_forbid():
    students = credits.user_credits(CREDITS, "hub-a", {"name": "sam", "groups": ["students"]})
    assert students == {"cpu-hours": {"budget": 100, "unit": "core-hours", "reset": "monthly"}}
    staff = credits.user_credits(CREDITS, "hub-a", {"name": "ada", "groups": ["admins"]})
    assert staff["gpu-hours"]["budget"] == 500 and set(staff) == {"cpu-hours", "gpu-hours", "storage"}
    # the staff rule is hub-a's only
    assert credits.user_credits(CREDITS, "hub-b", {"groups": ["staff"]}) == {
        "storage": {"budget": 1, "unit": "TB"}}  # fmt: skip
    assert credits.user_credits(CREDITS, "hub-a", {"name": "mallory", "groups": ["staff"]}) == {}
    # no rule matches: the hub's credits
    assert credits.user_credits(CREDITS, "hub-a", {"name": "zoe"}) == credits.hub_credits(CREDITS, "hub-a")
    # resolving never changes the configuration
    assert CREDITS["credits"]["cpu-hours"]["budget"] == 1000


@pytest.mark.parametrize(
    "config, message",
    [
        ([], "dict"),
        ({"credit": {}}, "unknown keys"),
        ({"credits": {"a": 1}}, "map names to objects"),
        ({"credits": {"a": {}}, "hubs": {"r": {"hub": "x", "credits": ["b"]}}}, "unknown credit 'b'"),
        ({"credits": {"a": {}}, "users": {"r": {"creditsOverride": {"a": 5}}}}, "creditsOverride"),
    ],
)
def test_a_malformed_setting_is_refused_at_configuration(config, message):
    with pytest.raises(TraitError, match=message):
        JupyterHubOutpost(credits=config)


@pytest.fixture(scope="module")
async def credited(tmp_path_factory, fake_hub):
    outpost = await start_outpost(outpost_config(tmp_path_factory.mktemp("credits"), credits=CREDITS))
    yield outpost
    await stop_outpost(outpost)


async def test_the_endpoints_answer_each_hub_and_user_its_credits(credited):
    for path in ("credits", "credits/"):
        response = await api_request(credited, path)
        assert response.code == 200
        assert json_of(response) == credits.hub_credits(CREDITS, "hub-a")
    response = await api_request(credited, "credits", hub="hub-b")
    assert json_of(response) == {"storage": {"budget": 1, "unit": "TB"}}

    for body in ({"name": "sam", "groups": ["students"]},
                 {"authentication": {"name": "sam", "groups": ["students"]}}):  # fmt: skip
        response = await api_request(credited, "usercredits", method="POST", body=body)
        assert response.code == 200
        assert json_of(response) == {"cpu-hours": {"budget": 100, "unit": "core-hours", "reset": "monthly"}}
    response = await api_request(credited, "usercredits", method="POST", body={"name": "mallory"})
    assert json_of(response) == {}

    assert (await api_request(credited, "credits", auth=False)).code == 401
    assert (await api_request(credited, "usercredits", method="POST", raw_body="[]")).code == 400
    bad = await api_request(credited, "usercredits", method="POST", body={"authentication": 3})
    assert bad.code == 400


async def test_without_credits_both_answer_empty(app):
    assert json_of(await api_request(app, "credits")) == {}
    assert json_of(await api_request(app, "usercredits", method="POST", body={"name": "x"})) == {}
