"""The policy's pure decisions: overrides, environment keys, accounts, names."""

import pytest
from jupyterhub.spawner import LocalProcessSpawner, SimpleLocalProcessSpawner

from jupyterhub_outpost.errors import OverrideRefusedError
from jupyterhub_outpost.policy import (
    DEFAULT_OVERRIDES,
    account_refusal,
    account_template_for,
    is_valid_hub_name,
    override_allowed,
    refused_env_keys,
    select_overrides,
)
from jupyterhub_outpost.utils import (
    BUNDLE_NAME_RE,
    SERVER_NAME_RE,
    START_ID_RE,
    USER_NAME_RE,
)

TRAITS = LocalProcessSpawner.class_traits()

# what the OutpostSpawner sends by default, to every kind of Outpost
CLIENT_MISC = {
    "ip": "0.0.0.0",
    "port": 8888,
    "internal_ssl": False,
    "services_enabled": True,
    "extra_labels": {"hub": "a"},
    "pod_name_template": "jupyter-{username}",
    "dns_name_template": "{name}.svc",
}


def test_the_clients_own_keys_are_accepted_by_default():
    apply, ignored, refused = select_overrides(TRAITS, CLIENT_MISC)
    assert apply == {"ip": "0.0.0.0", "port": 8888, "internal_ssl": False}
    # KubeSpawner's keys are no traits of LocalProcessSpawner
    assert ignored == ["dns_name_template", "extra_labels", "pod_name_template", "services_enabled"]
    assert refused == []


@pytest.mark.parametrize(
    "key, value",
    [
        ("cmd", ["/bin/sh", "-c", "id > /tmp/owned"]),
        ("shell_cmd", ["/bin/sh", "-c"]),
        ("args", ["--ServerApp.allow_root=True"]),
        ("environment", {"LD_PRELOAD": "/tmp/x.so"}),
        ("pre_spawn_hook", None),
        ("popen_kwargs", {"preexec_fn": None}),
        ("notebook_dir", "/"),
    ],
)
def test_other_traits_are_refused_by_default(key, value):
    assert select_overrides(TRAITS, {key: value}) == ({}, [], [key])


def test_home_dir_template_is_refused_by_default():
    traits = SimpleLocalProcessSpawner.class_traits()
    assert select_overrides(traits, {"home_dir_template": "/proc/{username}"})[2] == [
        "home_dir_template"
    ]


def test_allowed_overrides_extend_the_defaults():
    misc = {"cmd": ["sleep", "600"], "mem_limit": "1G", "args": []}
    apply, _, refused = select_overrides(TRAITS, misc, allowed={"cmd", "mem_limit"})
    assert apply == {"cmd": ["sleep", "600"], "mem_limit": "1G"}
    assert refused == ["args"]


def test_star_allows_every_trait_but_the_protected_ones():
    misc = {"cmd": ["sleep"], "api_token": "stolen", "user": None, "_spawn_pending": True}
    apply, ignored, refused = select_overrides(TRAITS, misc, allowed={"*"})
    assert apply == {"cmd": ["sleep"]}
    assert ignored == ["_spawn_pending", "api_token", "user"]
    assert refused == []
    assert not override_allowed("api_token", {"*"})
    assert not override_allowed("internal_trust_bundles", {"*"})


@pytest.mark.parametrize("port", [-1, 65536, True, False, "8888", 8888.0])
def test_a_port_is_an_integer_from_0_to_65535(port):
    with pytest.raises(OverrideRefusedError, match="port"):
        select_overrides(TRAITS, {"port": port})


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_ports_in_range_are_accepted(port):
    assert select_overrides(TRAITS, {"port": port})[0] == {"port": port}


def test_a_bool_is_no_number():
    with pytest.raises(OverrideRefusedError, match="start_timeout"):
        select_overrides(TRAITS, {"start_timeout": True}, allowed={"start_timeout"})
    with pytest.raises(OverrideRefusedError, match="cpu_limit"):
        select_overrides(TRAITS, {"cpu_limit": False}, allowed={"cpu_limit"})
    assert select_overrides(TRAITS, {"start_timeout": 30}, allowed={"start_timeout"})[0]


def test_values_are_checked_by_the_traits_type():
    with pytest.raises(OverrideRefusedError, match="cmd"):
        select_overrides(TRAITS, {"cmd": 42}, allowed={"cmd"})
    with pytest.raises(OverrideRefusedError, match="internal_ssl"):
        select_overrides(TRAITS, {"internal_ssl": "yes"})


def test_the_defaults_are_what_the_client_sends():
    assert DEFAULT_OVERRIDES == set(CLIENT_MISC)


@pytest.mark.parametrize(
    "key",
    ["PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
     "BASH_ENV", "ENV", "BASH_FUNC_ls%%", "JUPYTER_CONFIG_DIR", "HOME", "GLIBC_TUNABLES"],
)  # fmt: skip
def test_program_env_keys_are_refused(key):
    env = {"JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_USER": "alice", key: "x"}
    assert refused_env_keys(env) == [key]


def test_the_hubs_own_env_keys_pass():
    env = {k: "x" for k in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_USER", "JUPYTERHUB_API_URL",
                            "JUPYTERHUB_SERVICE_PREFIX", "JUPYTERHUB_FLAVORS_UPDATE_URL",
                            "JPY_API_TOKEN", "JUPYTERHUB_STAGE", "LANG")}  # fmt: skip
    assert refused_env_keys(env) == []


def test_the_operator_may_allow_env_keys():
    env = {"PATH": "/opt/bin", "LD_PRELOAD": "x"}
    assert refused_env_keys(env, {"PATH"}) == ["LD_PRELOAD"]
    assert refused_env_keys(env, {"*"}) == []


def test_account_templates_by_hub():
    assert account_template_for("{username}", "hub-a") == "{username}"
    templates = {"hub-a": "{username}", "*": "{hub}-{username}"}
    assert account_template_for(templates, "hub-a") == "{username}"
    assert account_template_for(templates, "hub-b") == "{hub}-{username}"
    assert account_template_for({"hub-a": "x"}, "hub-b") == "{username}"


@pytest.mark.parametrize(
    "account, uid",
    [("root", 0), ("root", None), ("nobody", 65534), ("daemon", 1), ("postgres", 101)],
)
def test_system_accounts_are_refused(account, uid):
    assert account_refusal(account, uid, 1000, {"root", "nobody"})


@pytest.mark.parametrize("account, uid", [("alice", 1001), ("alice", None), ("daemon", None)])
def test_user_accounts_and_unknown_accounts_pass(account, uid):
    assert account_refusal(account, uid, 1000, {"root", "nobody"}) is None


@pytest.mark.parametrize("account", ["", "../x", "-rf", "a b", "a\n", "x/y", ".hidden"])
def test_account_names_are_checked(account):
    assert account_refusal(account, None, 0, ())


def test_the_limits_can_be_switched_off():
    assert account_refusal("root", 0, 0, ()) is None


@pytest.mark.parametrize(
    "name, ok",
    [("hub-a", True), ("jupyter.example.org", True), ("hub_1@site", True),
     ("", False), ("..", False), ("../x", False), ("/abs", False), ("a/b", False),
     ("-x", False), (".x", False), ("a\n", False), ("a b", False), ("x" * 129, False)],
)  # fmt: skip
def test_hub_names(name, ok):
    assert is_valid_hub_name(name) is ok


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a\nb", "a\n", "-n", "a\x1b[31m", ""])
def test_user_names_are_safe_path_segments(name):
    assert USER_NAME_RE.match(name) is None


@pytest.mark.parametrize("name", ["/tmp/x/ABSOLUTE", "../escape", "..", ".x", "a/b", "a\n", ""])
def test_bundle_names_are_safe_file_names(name):
    assert BUNDLE_NAME_RE.match(name) is None
    assert BUNDLE_NAME_RE.match("notebooks-ca")


def test_server_names_and_start_ids_reject_a_trailing_newline():
    assert SERVER_NAME_RE.match("lab\n") is None
    assert START_ID_RE.match("1\n") is None
    assert SERVER_NAME_RE.match("") and START_ID_RE.match("1")
