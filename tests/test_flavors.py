"""Table tests of the flavor rules (pure functions, no service)."""

from datetime import timedelta

import pytest

from jupyterhub_outpost import flavors as fl

FLAVORS = {
    "small": {"display_name": "Small", "weight": 10, "max": 10, "maxPerUser": 2,
              "runtime": {"hours": 2}, "resources": {"mem_limit": "2G"}},
    "gpu": {"display_name": "GPU", "weight": 20, "max": 4, "runtime": {"minutes": 30}},
    "huge": {"weight": 5, "max": -1},
}


@pytest.mark.parametrize(
    "pattern, value, expected",
    [
        ("^ali.*$", "alice", True),  # regular expression
        ("ali.*", "bob", False),
        ("gpu-*", "gpu-users", True),  # not a full regex match, but a glob
        ("*@example.org", "ann@example.org", True),  # invalid regex, valid glob
        ("*@example.org", "ann@example.com", False),
        ("[", "[", True),  # neither regex nor glob: literal
        ("alice", "alice", True),
        ("alice", "alice2", False),
        (["alice", "bob"], "bob", True),  # list of literals
        (["alice", "bob"], "bo", False),
        (["a.c"], "abc", False),  # list entries are literals, not patterns
        ("gpu", ["users", "gpu"], True),  # list value: any element
        ("gpu", [], False),
        ("x", None, False),
    ],
)
def test_match_pattern(pattern, value, expected):
    assert fl.match_pattern(pattern, value) is expected


USERS = {
    "admins": {"authentication": {"name": "^admin-.*$"}, "flavors": ["small", "gpu", "huge"],
               "weight": 30},
    "gpu-group": {"authentication": {"groups": "gpu-*"}, "flavors": ["small", "gpu"], "weight": 20},
    "banned": {"authentication": {"name": ["mallory", "trudy"]}, "forbidden": True, "weight": 100},
    "outsiders": {"authentication": {"groups": "staff"}, "negate_authentication": True,
                  "flavors": ["small"], "weight": 10},
    "hub-b-only": {"hub": "hub-b", "authentication": {}, "flavors": ["huge"], "weight": 5},
}
HUBS = {
    "hub-a": {"flavors": ["small", "gpu", "huge"], "weight": 10},
    "hub-*": {"flavors": ["small", "huge"], "weight": 1},
}


@pytest.mark.parametrize(
    "hub, authentication, allowed, forbidden",
    [
        ("hub-a", {"name": "admin-jo", "groups": ["staff"]}, {"small", "gpu", "huge"}, False),
        ("hub-a", {"name": "ann", "groups": ["staff", "gpu-users"]}, {"small", "gpu"}, False),
        ("hub-a", {"name": "mallory", "groups": ["gpu-users"]}, set(), True),  # weight 100 wins
        ("hub-a", {"name": "eve", "groups": ["students"]}, {"small"}, False),  # negate
        ("hub-a", {"name": "sam", "groups": ["staff"]}, {"small", "gpu", "huge"}, False),  # no rule
        ("hub-b", {"name": "admin-jo", "groups": ["staff"]}, {"small", "huge"}, False),  # hub rule caps
        ("hub-b", {"name": "sam", "groups": ["staff"]}, {"huge"}, False),  # hub-scoped user rule
        ("other", {"name": "admin-jo"}, set(), False),  # no hub rule matches
        ("hub-a", {}, {"small"}, False),  # nothing sent: only the negated rule matches
    ],
)
def test_decide(hub, authentication, allowed, forbidden):
    decision = fl.decide(FLAVORS, HUBS, USERS, hub, authentication)
    assert set(decision.allowed) == allowed
    assert decision.forbidden is forbidden


def test_no_hub_rules_allow_every_flavor():
    assert set(fl.decide(FLAVORS, {}, {}, "any-hub", {}).allowed) == set(FLAVORS)


def test_rules_as_a_list():
    users = [{"authentication": {"name": "bob"}, "flavors": ["gpu"]}]
    assert set(fl.decide(FLAVORS, [], users, "hub", {"name": "bob"}).allowed) == {"gpu"}


def test_check_start_messages():
    decision = fl.decide(FLAVORS, HUBS, USERS, "hub-a", {"name": "eve", "groups": []})
    assert fl.check_start("small", FLAVORS, decision)[0] == "small"
    with pytest.raises(fl.FlavorError, match="'gpu' is not available to you; you may use: small"):
        fl.check_start("gpu", FLAVORS, decision)
    with pytest.raises(fl.FlavorError, match="Choose a flavor; you may use: small"):
        fl.check_start(None, FLAVORS, decision)
    assert fl.check_start(None, FLAVORS, decision, default_flavor="small")[0] == "small"
    with pytest.raises(fl.FlavorError, match="not allowed to start"):
        fl.check_start("small", FLAVORS, fl.FlavorDecision(forbidden=True))
    # without flavors, anything goes
    assert fl.check_start("whatever", {}, fl.FlavorDecision()) == (None, None)


@pytest.mark.parametrize(
    "name, current, user_current, user_total, global_max, message",
    [
        ("gpu", 3, 0, 0, None, None),
        ("gpu", 4, 0, 0, None, "Flavor GPU: 4 of 4 in use"),
        ("small", 1, 2, 2, None, "Flavor Small: you use 2 of 2 allowed per user"),
        ("huge", 1000, 1000, 1000, None, None),  # -1: unlimited
        ("huge", 0, 0, 3, 3, "You run 3 of 3 servers allowed per user"),
        ("huge", 0, 0, 2, 3, None),
    ],
)
def test_limit_error(name, current, user_current, user_total, global_max, message):
    assert fl.limit_error(name, FLAVORS[name], current, user_current, user_total, global_max) == message


def test_runtime_and_usage_model():
    assert fl.runtime_delta(FLAVORS["small"]) == timedelta(hours=2)
    assert fl.runtime_delta(FLAVORS["huge"]) is None
    model = fl.usage_model(FLAVORS, {"gpu": 3})
    assert list(model) == ["gpu", "small", "huge"]  # by weight
    assert model["gpu"] == {"display_name": "GPU", "description": "", "weight": 20, "max": 4,
                            "maxPerUser": -1, "runtime": {"minutes": 30}, "current": 3}
    assert model["huge"]["max"] == -1 and model["huge"]["current"] == 0
    assert "resources" not in model["small"]
    assert fl.usage_model({}, {}) == {}
