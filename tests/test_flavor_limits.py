"""Flavors as an operator's policy, through real HTTP against real Outposts.

Limits per flavor, per user and per user over all flavors; who may use
which flavor (hub rules, user rules, the ``update_user_authentication``
hook); ``GET /flavors`` and ``POST /userflavors``; the usage pushed to the
hub; ``apply_flavor_hook``; ``flavor_config_file``. Limits must hold under
concurrent starts, also when two Outpost processes share one database.

Servers are real processes (``sleep 600`` started by
SimpleLocalProcessSpawner), found by the API token in their environment.
"""

import asyncio
import itertools

import pytest
from cryptography.fernet import Fernet
from tornado.httpclient import AsyncHTTPClient

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import (
    key_of,
    processes_of,
    api_request,
    json_of,
    pid_alive,
    process_config,
    start_body,
    tokens_of,
    wait_until,
)

SLEEP = ["sleep", "600"]
ASYNC = {"execution-type": "async"}

FLAVORS = {
    "small": {"display_name": "Small", "description": "1 GB", "weight": 10, "max": 5,
              "maxPerUser": 2, "runtime": {"hours": 1},
              "resources": {"mem_limit": "1G", "no_such_trait": 1}},
    "gpu": {"display_name": "GPU", "weight": 20, "max": 1},
    "tiny": {"display_name": "Tiny", "weight": 1},
}
HUBS = {
    "hub-a": {"flavors": ["small", "gpu", "tiny"], "weight": 10},
    "hub-*": {"flavors": ["small"], "weight": 1},
}
USERS = {
    "banned": {"authentication": {"name": ["mallory"]}, "forbidden": True, "weight": 100},
    "students": {"authentication": {"groups": "students"}, "flavors": ["tiny"], "weight": 10},
}


async def lower_case_name(authentication):
    """An async update_user_authentication hook"""
    return dict(authentication, name=str(authentication.get("name", "")).lower())


@pytest.fixture(scope="module")
async def outpost(tmp_path_factory, fake_hub):
    """An in-process Outpost with flavors, hub and user rules"""
    workdir = tmp_path_factory.mktemp("limits")
    cfg = outpost_config(
        workdir, spawner_cmd=SLEEP, flavors=FLAVORS, hubs=HUBS, users=USERS,
        global_max_per_user=3, update_user_authentication=lower_case_name,
    )  # fmt: skip
    app = await start_outpost(cfg)
    yield app
    await stop_outpost(app)


_user_ids = itertools.count(1000)


def new_body(fake_hub, flavor=None, user=None, user_id=None, authentication=None, **kwargs):
    """A start body of a new user (unless given) whose tokens the fake hub accepts"""
    user_id = next(_user_ids) if user_id is None else user_id
    options = {"flavor": flavor} if flavor else None
    body = start_body(fake_hub.url, user=user or f"user{user_id}", user_id=user_id,
                      user_options=options, **kwargs)  # fmt: skip
    if authentication is not None:
        body["authentication"] = authentication
    fake_hub.tokens.update(tokens_of(body))
    return body


async def start(app, body, hub="hub-a", **kwargs):
    return await api_request(app, "services", method="POST", body=body, hub=hub, **kwargs)


async def stop(app, body, hub="hub-a", **kwargs):
    return await api_request(app, "services", *key_of(body), method="DELETE", hub=hub, **kwargs)


async def started(app, body, hub="hub-a"):
    """Start; assert success and exactly one process; return its pid"""
    response = await start(app, body, hub=hub)
    assert response.code == 200, response.body
    pids = processes_of(body)
    assert len(pids) == 1, pids
    return pids[0]


def refusal(response):
    """The message of a refused start (419 in the protocol's shape)"""
    assert response.code == 419, response.body
    model = json_of(response)
    assert set(model) == {"module", "class", "traceback", "args", "kwargs"}
    return model["args"][0]


async def flavors_of(app, hub="hub-a"):
    response = await api_request(app, "flavors", hub=hub)
    assert response.code == 200, response.body
    return json_of(response)


async def user_flavors(app, body, hub="hub-a"):
    response = await api_request(app, "userflavors", method="POST", body=body, hub=hub)
    assert response.code == 200, response.body
    return json_of(response)


async def listing(app, hub="hub-a"):
    response = await api_request(app, "services", hub=hub)
    assert response.code == 200, response.body
    return {(s["name"], s["start_id"]): s for s in json_of(response)}


async def concurrent_starts(targets, bodies):
    """POST every body at once (each to its target); return the responses.

    A client of its own with enough connections: the shared one has 10,
    and an in-process Outpost needs it to call the hub meanwhile.
    """
    client = AsyncHTTPClient(force_instance=True, max_clients=len(bodies))
    try:
        return await asyncio.gather(
            *(start(target, body, client=client) for target, body in zip(targets, bodies))
        )
    finally:
        client.close()


def split(bodies, responses):
    succeeded = [b for b, r in zip(bodies, responses) if r.code == 200]
    refused = [r for r in responses if r.code != 200]
    return succeeded, refused


# limits under concurrency


async def test_twenty_concurrent_starts_get_exactly_max(outpost, fake_hub):
    bodies = [new_body(fake_hub, "small") for _ in range(20)]
    responses = await concurrent_starts([outpost] * 20, bodies)
    succeeded, refused = split(bodies, responses)
    print(f"\nflavor concurrency (one process): attempted=20 succeeded={len(succeeded)} limit=5")
    assert len(succeeded) == 5, [r.code for r in responses]
    assert {refusal(r) for r in refused} == {"Flavor Small: 5 of 5 in use"}
    assert {json_of(r)["class"] for r in refused} == {"FlavorError"}
    assert sorted(len(processes_of(b)) for b in bodies) == [0] * 15 + [1] * 5
    assert (await flavors_of(outpost))["small"]["current"] == 5
    assert set(await listing(outpost)) == {key_of(b) for b in succeeded}


@pytest.mark.slow
async def test_two_processes_on_one_database_share_the_limit(tmp_path, fake_hub, processes):
    db_path = tmp_path / "shared.sqlite"
    env = {"OUTPOST_CRYPT_KEY": Fernet.generate_key().decode()}
    config = process_config(tmp_path, db_path=db_path, cmd=SLEEP, flavors=FLAVORS)
    one = processes(tmp_path / "one", config_text=config, extra_env=env)
    two = processes(tmp_path / "two", config_text=config, extra_env=env)
    await asyncio.to_thread(one.start)  # creates the tables
    await asyncio.to_thread(two.start)

    bodies = [new_body(fake_hub, "small") for _ in range(20)]
    processes.tokens.update(b["env"]["JUPYTERHUB_API_TOKEN"] for b in bodies)
    targets = [one, two] * 10
    responses = await concurrent_starts(targets, bodies)
    succeeded, refused = split(bodies, responses)
    by_process = [sum(r.code == 200 for r in responses[i::2]) for i in (0, 1)]
    print(f"\nflavor concurrency (two processes, one database): attempted=20 "
          f"succeeded={len(succeeded)} limit=5 (by process: {by_process[0]}+{by_process[1]})")
    assert len(succeeded) == 5, [r.code for r in responses]
    assert {refusal(r) for r in refused} == {"Flavor Small: 5 of 5 in use"}
    assert sorted(len(processes_of(b)) for b in bodies) == [0] * 15 + [1] * 5
    for process in (one, two):
        assert (await flavors_of(process))["small"]["current"] == 5
        assert set(await listing(process)) == {key_of(b) for b in succeeded}

    # stopped (by the process that started them: a server is a child of
    # that process, a zombie the other cannot tell from a live one), the
    # places are free again for both
    starters = [t for t, r in zip(targets, responses) if r.code == 200]
    pids = [processes_of(b)[0] for b in succeeded]
    responses = await asyncio.gather(*(stop(t, b) for t, b in zip(starters, succeeded)))
    assert [r.code for r in responses] == [200] * 5
    await wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=20, message="processes")
    for process in (one, two):
        assert (await flavors_of(process))["small"]["current"] == 0
        assert await listing(process) == {}
    await asyncio.to_thread(one.terminate)
    await asyncio.to_thread(two.terminate)
    assert (one.proc.returncode, two.proc.returncode) == (0, 0)


# limits per user


async def test_max_per_user_and_global_max_per_user(outpost, fake_hub):
    def pats(flavor, name):
        return new_body(fake_hub, flavor, user="pat", user_id=7, name=name)

    first, second, third = pats("small", "s1"), pats("small", "s2"), pats("small", "s3")
    first_pid = await started(outpost, first)
    await started(outpost, second)
    response = await start(outpost, third)
    assert refusal(response) == "Flavor Small: you use 2 of 2 allowed per user"
    assert not processes_of(third)
    # another user of the same flavor is not affected
    await started(outpost, new_body(fake_hub, "small"))
    # a flavor without a per-user limit brings pat to the global 3 of 3
    await started(outpost, pats("tiny", "t1"))
    response = await start(outpost, pats("tiny", "t2"))
    assert refusal(response) == "You run 3 of 3 servers allowed per user"
    # the same user id on another hub is another user
    await started(outpost, new_body(fake_hub, "small", user="pat", user_id=7), hub="hub-b")

    # a stopped server frees its place
    assert (await stop(outpost, first)).code == 200
    assert not pid_alive(first_pid)
    await started(outpost, third)
    assert refusal(await start(outpost, pats("small", "s4"))) == (
        "Flavor Small: you use 2 of 2 allowed per user"
    )


async def test_failed_start_frees_its_place_at_once(outpost, fake_hub):
    broken = new_body(fake_hub, "gpu", misc={"cmd": ["/no/such/program-for-outpost-tests"]})
    response = await start(outpost, broken)
    assert response.code == 419
    model = json_of(response)
    assert model["class"] == "FileNotFoundError", model
    # no waiting: the place is free when the answer arrives
    assert (await flavors_of(outpost))["gpu"]["current"] == 0
    assert key_of(broken) not in await listing(outpost)
    await started(outpost, new_body(fake_hub, "gpu"))
    assert refusal(await start(outpost, new_body(fake_hub, "gpu"))) == "Flavor GPU: 1 of 1 in use"


async def test_stopping_servers_are_not_counted(outpost, fake_hub):
    # ignores SIGINT: its stop lasts interrupt_timeout, then SIGTERM ends it
    stubborn = new_body(fake_hub, "gpu", misc={
        "cmd": ["sh", "-c", "trap '' INT; exec sleep 600"], "interrupt_timeout": 6,
    })  # fmt: skip
    pid = await started(outpost, stubborn)
    response = await stop(outpost, stubborn, headers=ASYNC)
    assert response.code == 202, response.body

    async def stopping():
        server = (await listing(outpost)).get(key_of(stubborn))
        return server is not None and server["stop_pending"]

    await wait_until(stopping, timeout=10, message="stop_pending")
    assert pid_alive(pid)
    usage = await flavors_of(outpost)
    assert usage["gpu"]["current"] == 0
    await started(outpost, new_body(fake_hub, "gpu"))
    assert pid_alive(pid), "the stop ended before the test could observe it"
    await wait_until(lambda: not pid_alive(pid), timeout=30, message="the stubborn process")

    async def forgotten():
        return key_of(stubborn) not in await listing(outpost)

    await wait_until(forgotten, timeout=10, message="the record to go")


# who may use which flavor


async def test_flavor_choice_is_checked(outpost, fake_hub):
    cases = [
        (new_body(fake_hub, "nope"), "hub-a",
         "Flavor 'nope' is not available to you; you may use: gpu, small, tiny"),
        (new_body(fake_hub, None), "hub-a", "Choose a flavor; you may use: gpu, small, tiny"),
        (new_body(fake_hub, "gpu"), "hub-b",
         "Flavor 'gpu' is not available to you; you may use: small"),
        (new_body(fake_hub, "small", authentication={"name": "eve", "groups": ["students"]}),
         "hub-a", "Flavor 'small' is not available to you; you may use: tiny"),
        # the hook lower-cases the name before the rules see it
        (new_body(fake_hub, "tiny", authentication={"name": "MalLory", "groups": ["students"]}),
         "hub-a", "You are not allowed to start servers on this system"),
    ]  # fmt: skip
    for body, hub, message in cases:
        assert refusal(await start(outpost, body, hub=hub)) == message
        assert not processes_of(body)
    student = new_body(fake_hub, "tiny", authentication={"name": "eve", "groups": ["students"]})
    await started(outpost, student)
    assert set(await listing(outpost)) == {key_of(student)}
    assert await listing(outpost, "hub-b") == {}


async def test_get_flavors_and_userflavors(outpost, fake_hub):
    await started(outpost, new_body(fake_hub, "small"))
    await started(outpost, new_body(fake_hub, "gpu"))
    await started(outpost, new_body(fake_hub, "small"), hub="hub-b")
    usage = await flavors_of(outpost)
    assert list(usage) == ["gpu", "small", "tiny"]  # by weight
    assert usage == {
        "gpu": {"display_name": "GPU", "description": "", "weight": 20, "max": 1,
                "maxPerUser": -1, "runtime": {}, "current": 1},
        "small": {"display_name": "Small", "description": "1 GB", "weight": 10, "max": 5,
                  "maxPerUser": 2, "runtime": {"hours": 1}, "current": 2},
        "tiny": {"display_name": "Tiny", "description": "", "weight": 1, "max": -1,
                 "maxPerUser": -1, "runtime": {}, "current": 0},
    }  # fmt: skip
    # hub-b may use "small" only; its limit and usage are over all hubs
    assert await flavors_of(outpost, "hub-b") == {"small": usage["small"]}

    student = {"name": "eve", "groups": ["students"]}
    assert await user_flavors(outpost, student) == {"tiny": usage["tiny"]}
    assert await user_flavors(outpost, {"authentication": student}) == {"tiny": usage["tiny"]}
    assert await user_flavors(outpost, {"name": "sam", "groups": []}) == usage
    assert await user_flavors(outpost, {"name": "sam"}, hub="hub-b") == {"small": usage["small"]}
    assert await user_flavors(outpost, {"name": "MALLORY"}) == {}
    response = await api_request(outpost, "userflavors", method="POST",
                                 body={"authentication": [1]})  # fmt: skip
    assert response.code == 400


async def test_no_flavors_configured(app, fake_hub):
    assert await flavors_of(app) == {}
    assert await user_flavors(app, {"name": "anyone", "groups": ["students"]}) == {}
    # and a start needs no flavor
    body = new_body(fake_hub, None)
    await started(app, body)
    updates = await wait_until(lambda: updates_of(fake_hub, body), timeout=15, message="update")
    assert updates[-1]["body"] == {}


# what the hub is told


def updates_of(fake_hub, body):
    token = body["env"]["JUPYTERHUB_FLAVORS_UPDATE_TOKEN"]
    return [c for c in fake_hub.calls("flavors") if c["token"] == token]


async def pushed_usage(app, fake_hub, body, count, hub="hub-a"):
    """Wait for ``body``'s ``count``-th flavor update; assert it is what
    ``GET /flavors`` says now; return it"""
    updates = await wait_until(lambda: updates_of(fake_hub, body)[count - 1:], timeout=15,
                               message=f"flavor update {count}")  # fmt: skip
    assert len(updates_of(fake_hub, body)) == count
    pushed = updates[0]["body"]
    assert pushed == await flavors_of(app, hub)
    return pushed


async def test_usage_pushed_to_the_hub_after_each_change(outpost, fake_hub):
    gpu = new_body(fake_hub, "gpu")
    await started(outpost, gpu)
    assert (await pushed_usage(outpost, fake_hub, gpu, 1))["gpu"]["current"] == 1

    refused = new_body(fake_hub, "gpu")
    assert refusal(await start(outpost, refused)) == "Flavor GPU: 1 of 1 in use"
    assert (await pushed_usage(outpost, fake_hub, refused, 1))["gpu"]["current"] == 1

    failed = new_body(fake_hub, "small", misc={"cmd": ["/no/such/program-for-outpost-tests"]})
    assert (await start(outpost, failed)).code == 419
    assert (await pushed_usage(outpost, fake_hub, failed, 1))["small"]["current"] == 0

    assert (await stop(outpost, gpu)).code == 200
    assert (await pushed_usage(outpost, fake_hub, gpu, 2))["gpu"]["current"] == 0

    other = new_body(fake_hub, "small")
    await started(outpost, other, hub="hub-b")
    pushed = await pushed_usage(outpost, fake_hub, other, 1, hub="hub-b")
    assert list(pushed) == ["small"] and pushed["small"]["current"] == 1


# the flavor reaches the Spawner


async def test_default_apply_flavor_hook_sets_spawner_traits(outpost, fake_hub):
    # the hook runs after the hub's overrides: the flavor's resources win
    small = new_body(fake_hub, "small", misc={"mem_limit": "8G", "cpu_limit": 2})
    gpu = new_body(fake_hub, "gpu")
    small_pid, gpu_pid = await started(outpost, small), await started(outpost, gpu)
    spawner = outpost.server_manager.active[("hub-a", *key_of(small))].spawner
    assert spawner.mem_limit == 1024**3
    assert spawner.cpu_limit == 2
    assert not hasattr(spawner, "no_such_trait")
    assert "MEM_LIMIT=1073741824" in environ_of(small_pid)
    assert not any(v.startswith("MEM_LIMIT=") for v in environ_of(gpu_pid))


def environ_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read().decode().split("\0")


# the same policy from a YAML file

FLAVOR_YAML = """
flavors:
  standard: {display_name: Standard, weight: 5, max: 2, runtime: {minutes: 30}}
  big: {display_name: Big, weight: 9, max: 1}
hubs:
  hub-a: {flavors: [standard, big]}
  hub-b: {flavors: [standard]}
users:
  banned: {authentication: {name: [mallory]}, forbidden: true, weight: 100}
global_max_per_user: 1
default_flavor: standard
"""


async def test_flavor_config_file(tmp_path, fake_hub):
    path = tmp_path / "flavors.yaml"
    path.write_text(FLAVOR_YAML)
    # the file's values replace those of the config
    cfg = outpost_config(tmp_path, spawner_cmd=SLEEP, flavors=FLAVORS, global_max_per_user=5,
                         flavor_config_file=str(path))  # fmt: skip
    app = await start_outpost(cfg)
    try:
        assert list(await flavors_of(app)) == ["big", "standard"]
        assert (await flavors_of(app))["standard"]["runtime"] == {"minutes": 30}
        assert list(await flavors_of(app, "hub-b")) == ["standard"]

        first = new_body(fake_hub, None)  # default_flavor
        await started(app, first)
        assert (await listing(app))[key_of(first)]["flavor"] == "standard"
        record = await app.db.get_server("hub-a", *key_of(first))
        assert 29 * 60 < (record.end_date - record.started).total_seconds() <= 30 * 60
        again = new_body(fake_hub, "big", user_id=int(first["env"]["JUPYTERHUB_USER_ID"]))
        assert refusal(await start(app, again)) == "You run 1 of 1 servers allowed per user"
        await started(app, new_body(fake_hub, None, authentication={"name": "Mallory"}))
        assert refusal(await start(app, new_body(fake_hub, None))) == (
            "Flavor Standard: 2 of 2 in use"
        )
        # no update_user_authentication hook here: only the exact name is banned
        body = new_body(fake_hub, "big", authentication={"name": "mallory"})
        assert refusal(await start(app, body)) == (
            "You are not allowed to start servers on this system"
        )
        assert refusal(await start(app, new_body(fake_hub, "big"), hub="hub-b")) == (
            "Flavor 'big' is not available to you; you may use: standard"
        )
    finally:
        await stop_outpost(app)
