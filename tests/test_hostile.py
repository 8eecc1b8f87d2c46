"""More than a thousand hostile requests against one running Outpost.

A hub is another organisation's service: everything it sends may be wrong
or malicious. The requests below are all invalid or refused (bad JSON, deep
nesting, wrong types in every field of a start, wrong types for every trait
of the Spawner in ``misc``, unicode, NUL and path traversal in every
name-like field, huge headers and paths, lying Content-Length, chunked
bodies, unknown methods, bad credentials). They are sent with bounded
concurrency from a process of their own (as from another hub: the sender's
own work does not compete with the Outpost for the interpreter) while the
test's event loop serves the Outpost and pings it at a fixed rate.

For every request: no 5xx; where an answer arrives, a JSON error body
(``{"status", "message"}``, or the protocol's 419 shape); no start
accepted; each answer within a few seconds. During the run ``/ping`` stays
fast. After it: the Outpost answers, no server is recorded, no process of a
hostile start runs, and no file was written outside the work directory.

The request shapes come from a seeded ``random.Random``: runs are
reproducible (``OUTPOST_HOSTILE_SEED`` picks another seed).
"""

import asyncio
import glob
import json
import multiprocessing
import os
import random
import re
import shutil
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest
from jupyterhub.spawner import SimpleLocalProcessSpawner
from tornado.httpclient import AsyncHTTPClient
from jupyterhub.traitlets import Callable as HubCallable
from traitlets import Any, Bool, Callable, Dict, Float, Instance, Int, List, Unicode, Union

from jupyterhub_outpost.policy import PROTECTED_TRAITS

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import (
    ON_POSTGRES,
    api_request,
    basic_auth,
    database_independent,
    drop_databases,
    kill_servers_of,
    pids_with_env,
    start_body,
)

pytestmark = [pytest.mark.slow, database_independent]

SEED = int(os.environ.get("OUTPOST_HOSTILE_SEED", "20251201"))
CONCURRENCY = int(os.environ.get("OUTPOST_HOSTILE_CONCURRENCY", "16"))  # requests in flight
SEND_INTERVAL = 0.0167  # seconds between two requests: 60 a second, a busy set of hubs
ANSWER_LIMIT = 3.0  # seconds: no hostile request does enough work to take longer
CLIENT_TIMEOUT = 15.0  # seconds the client waits for an answer
LYING_WAIT = 1.5  # seconds to wait for an answer to a body that never completes
PING_INTERVAL = 0.02  # seconds between pings
IDLE_SECONDS = 3.0  # pings before the barrage: the floor of this machine
PING_P99_LIMIT = 0.050  # seconds, or IDLE_FACTOR times the p99 before the barrage if more
IDLE_FACTOR = 10  # on a slow or shared machine the idle floor itself is 10-20 ms; a freeze is seconds
MIN_REQUESTS = 1000
SLOWEST_SHOWN = int(os.environ.get("OUTPOST_HOSTILE_SLOWEST", "5"))  # in the summary

MARKER = f"outpost-hostile-{uuid.uuid4().hex[:12]}"
UP = "../" * 16  # from any directory of the Outpost up to /
SPAWNER = SimpleLocalProcessSpawner
FLAVORS = {
    "small": {"display_name": "Small", "weight": 10, "max": 1000, "maxPerUser": 100,
              "resources": {"cpu_limit": 1}},
    "gpu": {"display_name": "GPU", "weight": 20, "max": 1000},
}
USER_RULES = {
    "gpu-group": {"authentication": {"groups": "gpu-*"}, "flavors": ["small", "gpu"], "weight": 20},
    "banned": {"authentication": {"name": ["mallory"]}, "forbidden": True, "weight": 100},
}
VALID = {"hub-a": basic_auth("hub-a"), "hub-b": basic_auth("hub-b")}


@dataclass
class Probe:
    """One hostile request and what became of it"""

    label: str
    method: str = "POST"
    path: str = "services"  # below the base URL, sent as it is
    body: bytes = None
    headers: dict = field(default_factory=dict)
    auth: str = None  # Authorization header; None: none
    raw: bytes = None  # the whole request, for a raw socket ({base} is the base URL)
    http_layer: bool = False  # Tornado's HTTP layer may answer a bare 400 or close
    answer_needed: bool = True  # False: a body that never completes, the server may wait
    tokens: set = field(default_factory=set)
    status: int = None
    reason: str = ""
    answer: bytes = b""
    answer_headers: dict = field(default_factory=dict)
    elapsed: float = 0.0
    error: str = ""


def short(value, limit=60):
    text = ascii(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else f"{text[:limit - 12]}...({len(text)} chars)"


# start bodies


class Bodies:
    """Start bodies for one Outpost: valid-looking, then broken one part at a time.

    ``failing()`` bodies carry a ``misc.cmd`` that cannot run, so that a
    body an Outpost might legitimately accept still fails to start: what is
    tested there is what happens before (files written, crashes), not
    whether the start is refused.
    """

    def __init__(self, hub_url, workdir, rng):
        self.hub_url = hub_url
        self.fail_cmd = [str(workdir / f"no-such-command-{MARKER}")]
        self.rng = rng

    def plain(self, **kwargs):
        kwargs.setdefault("name", self.rng.choice(["", "srv", "lab-1"]))
        kwargs.setdefault("start_id", f"s{self.rng.randrange(10**9)}")
        return start_body(self.hub_url, **kwargs)

    def failing(self, **kwargs):
        kwargs["misc"] = dict(kwargs.get("misc") or {}, cmd=self.fail_cmd)
        return self.plain(**kwargs)

    def with_certs(self, certs=None, bundles=None):
        body = self.failing()
        body["certs"] = certs if certs is not None else {
            "keyfile": "KEY", "certfile": "CERT", "cafile": "CA"}
        body["internal_trust_bundles"] = bundles if bundles is not None else {"hub-ca": "CA"}
        return body


def tokens_in(body):
    """The API tokens of a start body that can find its processes"""
    env = body.get("env") if isinstance(body, dict) else None
    if not isinstance(env, dict):
        return set()
    values = (env.get("JUPYTERHUB_API_TOKEN"), env.get("JUPYTERHUB_FLAVORS_UPDATE_TOKEN"))
    return {v for v in values if isinstance(v, str)}


def post(label, body, hub="hub-a", **kwargs):
    """A start request for a body (dict, or bytes/str sent as they are)"""
    tokens = kwargs.pop("tokens", set())
    if isinstance(body, dict):
        tokens = tokens_in(body)
        raw = json.dumps(body).encode()
    else:
        raw = body.encode("utf8", "surrogatepass") if isinstance(body, str) else body
    return Probe(label, body=raw, auth=VALID.get(hub, hub), tokens=tokens, **kwargs)


# what is wrong for each JSON type

WRONG = {
    "bool": [True, False],
    "int": [7, -1],
    "float": [1.5],
    "string": ["x", "8888", "true"],
    "list": [[], ["x"], [1]],
    "object": [{}, {"a": "b"}],
    "null": [None],
}
NUMBER = {"int", "float"}


def kinds_of(trait):
    """The JSON types a trait declares (empty: no JSON value fits), or None: any"""
    if isinstance(trait, Union):
        kinds = set()
        for member in trait.trait_types:
            more = kinds_of(member)
            if more is None:
                return None
            kinds |= more
    elif isinstance(trait, Bool):
        kinds = {"bool"}
    elif isinstance(trait, Float):
        kinds = set(NUMBER)
    elif isinstance(trait, Int):
        # a ByteSpecification takes a number of bytes (int or float) or "2G"
        kinds = NUMBER | {"string"} if type(trait).__name__ == "ByteSpecification" else {"int"}
    elif isinstance(trait, Unicode):
        kinds = {"string"}
    elif isinstance(trait, List):
        # a Command may be given as one string
        kinds = {"list", "string"} if type(trait).__name__ == "Command" else {"list"}
    elif isinstance(trait, Dict):
        kinds = {"object"}
    elif isinstance(trait, (Callable, HubCallable, Instance)):
        kinds = set()
    elif isinstance(trait, Any):
        # hooks are callables; another Any accepts everything
        return {"null"} if trait.name.endswith("_hook") else None
    else:
        return None
    if getattr(trait, "allow_none", False):
        kinds.add("null")
    return kinds


def spawner_traits():
    """Traits of the configured Spawner a start's ``misc`` can reach"""
    return {
        name: trait for name, trait in sorted(SPAWNER.class_traits().items())
        if not name.startswith("_") and name not in PROTECTED_TRAITS
    }


# generators: each returns a list of Probes


def gen_bad_json(bodies, rng):
    deep = {}
    for depth in (100, 999, 1000, 5000, 100_000):
        deep[f"[ x{depth}"] = "[" * depth + "]" * depth
        deep[f"{{ x{depth}"] = '{"a":' * depth + "1" + "}" * depth
    deep["[ x100000 unclosed"] = "[" * 100_000
    deep["[{ mixed x3000"] = '[{"a":' * 1500 + "1" + "}]" * 1500
    texts = {
        "empty": b"", "space": b" \r\n\t", "open brace": b"{", "close brace": b"}",
        "truncated": b'{"name": "x", ', "single quotes": b"{'name': 'x'}",
        "trailing comma": b'{"name": "x",}', "list": b"[]", "list of body": b"[{}]",
        "null": b"null", "true": b"true", "number": b"1", "string": b'"start"',
        "NaN": b'{"name": NaN}', "Infinity": b'{"misc": {"cpu_limit": Infinity}}',
        "-Infinity": b'{"user_options": {"start_id": -Infinity}}',
        "bad utf8": b'{"name": "\xc3\x28"}', "latin1": b'{"name": "\xe4"}',
        "utf8 BOM": b"\xef\xbb\xbf{}", "utf16": '{"name": 1}'.encode("utf16"),
        "NUL": b"\x00", "NUL inside": b'{"name"\x00: "x"}',
        "lone surrogate": b'{"name": "\\ud800"}', "bad escape": b'{"name": "\\x41"}',
        "4300+ digit int": b'{"name": 1' + b"0" * 5000 + b"}",
        "1e999": b'{"misc": {"start_timeout": 1e999}}',
        "comment": b'{"name": "x" /* c */}', "two objects": b"{}{}",
        "binary": bytes(rng.randrange(256) for _ in range(512)),
    }
    texts.update((k, v.encode()) for k, v in deep.items())
    probes = []
    for name, text in texts.items():
        probes.append(post(f"bad json {name}", text, hub=rng.choice(list(VALID))))
        probes.append(Probe(f"bad json /userflavors {name}", path="userflavors", body=text,
                            auth=VALID["hub-b"]))
    for name in rng.sample(sorted(texts), 8):
        probes.append(post(f"bad json {name} no credentials", texts[name], hub=None))
    return probes


def _nested(depth, kind="list"):
    """JSON text of a string nested ``depth`` lists or objects deep"""
    if kind == "list":
        return "[" * depth + '"x"' + "]" * depth
    return '{"a":' * depth + '"x"' + "}" * depth


DEEP = "@@deep@@"


def _set_path(body, path, value):
    target = body
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def gen_deep_fields(bodies, rng):
    probes = []
    places = {
        "misc.args": (("misc", "args"), "plain"), "misc.environment": (("misc", "environment"), "plain"),
        "misc.unknown": (("misc", "no_such_trait"), "failing"), "env.JUPYTERHUB_USER": (("env", "JUPYTERHUB_USER"), "plain"),
        "user_options.deep": (("user_options", "deep"), "failing"), "authentication.groups": (("authentication", "groups"), "failing"),
        "authentication.name": (("authentication", "name"), "failing"), "certs.keyfile": (("certs", "keyfile"), "plain"),
        "name": (("name",), "plain"), "user_options.start_id": (("user_options", "start_id"), "plain"),
    }
    for label, (path, flavor) in places.items():
        for depth in (100, 950, 990, 1000, 5000):
            for kind in ("list", "object"):
                body = getattr(bodies, flavor)()
                _set_path(body, path, DEEP)
                text = json.dumps(body).replace(f'"{DEEP}"', _nested(depth, kind))
                probes.append(post(f"deep {label} {kind} x{depth}", text,
                                   hub=rng.choice(list(VALID)), tokens=tokens_in(body)))
    for depth in (900, 950, 990):
        text = '{"name": "alice", "groups": %s}' % _nested(depth)
        probes.append(Probe(f"deep /userflavors groups x{depth}", path="userflavors",
                            body=text.encode(), auth=VALID["hub-a"]))
    return probes


def gen_field_types(bodies, rng):
    """A value of every wrong JSON type in every field of the start body"""
    declared = {
        "name": {"string"}, "env": {"object"}, "user_options": {"object"},
        "misc": {"object"}, "certs": {"object"}, "internal_trust_bundles": {"object"},
        "authentication": {"object"},
    }
    probes = []
    for key, kinds in declared.items():
        for kind, values in WRONG.items():
            if kind in kinds or (kind == "null" and key not in ("name",)):
                continue  # an absent optional part may be null
            for value in values:
                body = bodies.plain()
                body[key] = value
                probes.append(post(f"type {key}={short(value)}", body, hub=rng.choice(list(VALID))))
    for key, kinds in {"start_id": {"string"}, "flavor": {"string", "null"}}.items():
        for kind, values in WRONG.items():
            if kind in kinds or (key == "start_id" and kind == "int"):
                continue  # an integer start_id is taken as its text
            for value in values:
                body = bodies.plain()
                body["user_options"][key] = value
                probes.append(post(f"type user_options.{key}={short(value)}", body))
    for value in (1.5, True, None, [1], {"a": 1}):
        for key in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_USER", "JUPYTERHUB_API_URL",
                    "JUPYTERHUB_SERVICE_PREFIX", "JUPYTERHUB_EVENTS_URL"):
            body = bodies.plain()
            body["env"][key] = value
            probes.append(post(f"type env.{key}={short(value)}", body))
        for key in ("keyfile", "certfile", "cafile"):
            body = bodies.with_certs()
            body["certs"][key] = value
            probes.append(post(f"type certs.{key}={short(value)}", body))
        body = bodies.with_certs()
        body["internal_trust_bundles"]["hub-ca"] = value
        probes.append(post(f"type internal_trust_bundles.hub-ca={short(value)}", body))
        for key in ("name", "groups", "access_token"):
            body = bodies.failing()
            body["authentication"] = {"name": "alice", "groups": [], key: value}
            probes.append(post(f"type authentication.{key}={short(value)}", body))
    for missing in ("name", "user_options", "env"):
        body = bodies.failing()
        del body[missing]
        probes.append(post(f"missing {missing}", body))
    return probes


def gen_misc_traits(bodies, rng):
    """For every trait of the Spawner a ``misc`` value of a wrong JSON type"""
    probes = []
    for name, trait in spawner_traits().items():
        kinds = kinds_of(trait)
        if kinds is None:
            continue
        for kind, values in WRONG.items():
            if kind in kinds or (kind == "int" and "float" in kinds):
                continue
            value = rng.choice(values)
            probes.append(post(f"misc.{name}={short(value)}", bodies.plain(misc={name: value}),
                               hub=rng.choice(list(VALID))))
    for port in (-1, 65536, 99999, 2**31, 2**64, 10**30):
        probes.append(post(f"misc.port={port}", bodies.plain(misc={"port": port})))
    long_word = "a" * 8000  # long enough to show superlinear work on it, short enough to end
    for name in ("port", "ip", "args", "mem_limit"):
        value = [long_word] if name != "args" else {long_word: 1}
        probes.append(post(f"misc.{name}=[8000 chars]", bodies.plain(misc={name: value})))
    for value in ("x", [], 1, True):
        body = bodies.plain()
        body["misc"] = value  # start_body would take a falsy one as none
        probes.append(post(f"misc={short(value)}", body))
    return probes


def traversals(tag):
    """Name-like values that climb out of a directory or name an absolute path"""
    return [
        f"{UP}tmp/{MARKER}-{tag}", f"/tmp/{MARKER}-{tag}", f"..%2F..%2F..%2Ftmp%2F{MARKER}-{tag}",
        f"%2e%2e/%2e%2e/%2e%2e/tmp/{MARKER}-{tag}", f"..\\..\\..\\tmp\\{MARKER}-{tag}",
        f"....//....//tmp/{MARKER}-{tag}", f"{UP}tmp/{MARKER}-{tag}/x", "..", ".", "../", "/",
        f"a/{UP}tmp/{MARKER}-{tag}", f"~/{MARKER}-{tag}", f"file:///tmp/{MARKER}-{tag}",
        f"{UP}tmp/{MARKER}-{tag}\x00.crt",
    ]


ODD_NAMES = [
    "\u00e4", "\u540d\u524d", "\x00", "a\x00b", "\ud800", "\u202egnp.exe", "\U0001f4a5",
    "a\nb", "\r\n", " ", "\t", "\u00a0", "\uff21", "\uff0e\uff0e\u2215tmp", "a b", "a;b",
    "$(id)", "`id`", "a" * 300, "%00", "%2F",
]


def gen_names(bodies, rng):
    probes = []
    for i, value in enumerate(traversals("name") + ODD_NAMES):
        probes.append(post(f"name={short(value)}", bodies.plain(name=value), hub=rng.choice(list(VALID))))
        probes.append(post(f"start_id={short(value)}", bodies.plain(start_id=value or "..")))
        body = bodies.failing()
        body["env"]["JUPYTERHUB_USER"] = value
        probes.append(post(f"env.JUPYTERHUB_USER={short(value)}", body))
    for value in traversals("user") + [f"{UP}tmp/{MARKER}-user-plain"]:
        body = bodies.plain()  # without a failing command: a working start
        body["env"]["JUPYTERHUB_USER"] = value
        probes.append(post(f"env.JUPYTERHUB_USER={short(value)} (sleep)", body))
    for value in traversals("bundle") + ODD_NAMES[:8]:
        body = bodies.with_certs(bundles={"hub-ca": "CA", value: "PEM"})
        probes.append(post(f"internal_trust_bundles[{short(value)}]", body))
    for value in traversals("cert") + ODD_NAMES[:8]:
        body = bodies.with_certs(certs={"keyfile": "K", "certfile": "C", value: "PEM"})
        probes.append(post(f"certs[{short(value)}]", body))
    for value in traversals("misc")[:6]:
        probes.append(post(f"misc[{short(value)}]", bodies.failing(misc={value: "x"})))
        probes.append(post(f"misc.home_dir={short(value)}", bodies.failing(misc={"home_dir": value})))
        probes.append(post(f"flavor={short(value)}", bodies.failing(user_options={"flavor": value})))
    return probes


def gen_url_names(bodies, rng):
    """Hostile names in the poll and stop URLs, percent-encoded and raw"""
    probes = []
    for value in traversals("url") + ODD_NAMES:
        encoded = quote(value.encode("utf8", "surrogatepass"), safe="")
        for method in ("GET", "DELETE"):
            hub = rng.choice(list(VALID))
            probes.append(Probe(f"{method} /services/{short(encoded, 40)}/x", method=method,
                                path=f"services/{encoded}/x", auth=VALID[hub]))
            probes.append(Probe(f"{method} /services/s/{short(encoded, 40)}", method=method,
                                path=f"services/s/{encoded}?collect_logs=true", auth=VALID[hub]))
        raw_path = value.encode("utf8", "surrogatepass")
        layer = bool(re.search(rb"[\x00-\x20\x7f]", raw_path))
        probes.append(Probe(f"raw GET /services/{short(raw_path, 40)}/x", raw=_raw(
            "GET", b"services/" + raw_path + b"/x", auth=VALID["hub-a"]), http_layer=layer))
    for path in ("services/%FF/x", "services/x/%C3", "services/x/y?collect_logs=%FF",
                 "services/x/y?collect_logs=true&collect_logs=%00", "services/x/",
                 "services//", "services/x/y/z", "services/../../etc/passwd", "%2e%2e/%2e%2e/etc",
                 "services/%2e%2e/%2e%2e", "../../../etc/passwd", "services/x/y/%2e%2e/%2e%2e/z"):
        for method in ("GET", "DELETE"):
            probes.append(Probe(f"{method} /{short(path, 50)}", method=method, path=path,
                                auth=VALID["hub-b"]))
    return probes


def gen_credentials(bodies, rng):
    import base64

    def b64(raw):
        return "Basic " + base64.b64encode(raw).decode()

    bad = {
        "none": None, "wrong password": basic_auth("hub-a", "nope"),
        "other hub's password": basic_auth("hub-b", "password-of-hub-a"),
        "unknown hub": basic_auth("hub-z", "password-of-hub-a"), "empty user": basic_auth("", "x"),
        "empty password": basic_auth("hub-a", ""), "no colon": b64(b"hub-a"),
        "not base64": "Basic !!!notbase64!!!", "bad utf8": b64(b"hub-a:\xff\xfe"),
        "Bearer": "Bearer password-of-hub-a", "token": "token password-of-hub-a",
        "Basic only": "Basic", "Basic spaces": "Basic    ", "Digest": 'Digest username="hub-a"',
        "NUL in name": b64(b"hub-a\x00:password-of-hub-a"),
        "NUL in password": b64(b"hub-a:password-of-hub-a\x00"),
        "password prefix": basic_auth("hub-a", "password-of-hub"),
        "upper case hub": basic_auth("HUB-A", "password-of-hub-a"),
        "trailing newline": b64(b"hub-a:password-of-hub-a\n"),
        "huge": b64(b"hub-a:" + b"p" * 30000), "unicode hub": basic_auth("h\u00fcb-a", "x"),
        "padding garbage": basic_auth("hub-a") + "====",
    }
    for value in traversals("hub")[:8]:
        bad[f"hub {short(value)}"] = basic_auth(value, "password-of-hub-a")
    bad["hub ../hub-a"] = basic_auth("../hub-a", "password-of-hub-a")
    routes = [("GET", "services", None), ("POST", "services", "body"), ("GET", "services/x/y", None),
              ("DELETE", "services/x/y", None), ("GET", "flavors", None),
              ("POST", "userflavors", b'{"name": "alice"}')]
    probes = []
    for label, auth in bad.items():
        for method, path, body in routes:
            if body == "body":
                body = json.dumps(bodies.failing()).encode()
            probes.append(Probe(f"credentials {label}: {method} /{path}", method=method,
                                path=path, body=body, auth=auth))
    probes.append(Probe("credentials twice", raw=_raw("GET", b"services", extra=(
        b"Authorization: " + VALID["hub-a"].encode() + b"\r\nAuthorization: "
        + VALID["hub-b"].encode()))))
    return probes


def gen_methods(bodies, rng):
    probes = []
    methods = ["PUT", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO", "PROPFIND", "get", "M-SEARCH"]
    paths = ["services", "services/x/y", "ping", "flavors", "userflavors", "openapi.json", "nowhere"]
    for method in methods:
        for path in paths:
            if (method, path) == ("HEAD", "ping"):
                continue  # a health check, answered as GET is
            auth = rng.choice([None, VALID["hub-a"]])
            probes.append(Probe(f"method {method} /{path}", method=method, path=path,
                                body=b"{}" if method in ("PUT", "PATCH") else None, auth=auth))
    for method, path in (("DELETE", "services"), ("POST", "services/x/y"), ("POST", "ping"),
                         ("POST", "flavors"), ("GET", "userflavors"), ("DELETE", "ping")):
        for auth in (None, VALID["hub-b"]):
            probes.append(Probe(f"method {method} /{path}", method=method, path=path,
                                body=b"{}" if method == "POST" else None, auth=auth))
    return probes


def _raw(method, path, auth=None, body=b"", extra=b"", length=None, version=b"HTTP/1.1"):
    """A complete HTTP request as bytes; ``length``: the Content-Length to claim"""
    head = [method.encode() + b" {base}" + path + b" " + version, b"Host: 127.0.0.1",
            b"Connection: close", b"Content-Type: application/json"]
    if auth:
        head.append(b"Authorization: " + auth.encode())
    if extra:
        head.append(extra)
    if length is None and b"chunked" not in extra and (body or method in ("POST", "PUT")):
        length = len(body)
    if length is not None:
        head.append(b"Content-Length: " + str(length).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _chunked(chunks, tail=b"0\r\n\r\n"):
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + tail


def gen_raw_protocol(bodies, rng):
    auth = VALID["hub-a"]
    te = b"Transfer-Encoding: chunked"
    bad = json.dumps(bodies.plain(name="../x")).encode()
    probes = [
        Probe("CL longer than body", raw=_raw("POST", b"services", auth, b'{"name"', length=500),
              answer_needed=False),
        Probe("CL longer, no credentials", raw=_raw("POST", b"services", None, b"{", length=50),
              answer_needed=False),
        Probe("CL shorter than body", raw=_raw("POST", b"services", auth, bad + b"GARBAGE", length=len(bad))),
        Probe("CL shorter, cuts the JSON", raw=_raw("POST", b"services", auth, bad, length=10)),
        Probe("CL over the limit, short body", raw=_raw("POST", b"services", auth, b"{}", length=10**9)),
        Probe("CL over the limit, no credentials", raw=_raw("POST", b"services", None, b"{}", length=2**21)),
        Probe("CL zero with body", raw=_raw("POST", b"services", auth, b"{}", length=0)),
        Probe("chunked bad JSON", raw=_raw("POST", b"services", auth, _chunked([b'{"na', b'me": '])
                                           , extra=te)),
        Probe("chunked start body with ../ name", raw=_raw(
            "POST", b"services", auth, _chunked([bad[i:i + 7] for i in range(0, len(bad), 7)]), extra=te)),
        Probe("chunked 5000 one-byte chunks", raw=_raw(
            "POST", b"services", auth, _chunked([b"[" for _ in range(5000)]), extra=te)),
        Probe("chunked 1.5 MiB", raw=_raw(
            "POST", b"services", auth, _chunked([b"[" * 65536] * 24), extra=te)),
        Probe("chunked 6 MiB", raw=_raw(
            "POST", b"services", auth, _chunked([b" " * 65536] * 96), extra=te)),
        Probe("chunked no credentials", raw=_raw("POST", b"services", None, _chunked([b"{}"]), extra=te)),
        Probe("chunked size ffffffff", raw=_raw("POST", b"services", auth, b"ffffffff\r\n{}", extra=te),
              http_layer=True, answer_needed=False),
        Probe("chunked size not hex", raw=_raw("POST", b"services", auth, b"zz\r\n{}\r\n0\r\n\r\n", extra=te),
              http_layer=True),
        Probe("chunked never ends", raw=_raw("POST", b"services", auth, b"2\r\n{}\r\n", extra=te),
              answer_needed=False),
        Probe("chunked and CL", raw=_raw("POST", b"services", auth, _chunked([b"{}"]), extra=te, length=7),
              http_layer=True),
        Probe("Transfer-Encoding gzip", raw=_raw(
            "POST", b"services", auth, b"{}", extra=b"Transfer-Encoding: gzip"), http_layer=True),
        Probe("CL not a number", raw=_raw("POST", b"services", auth, b"{}", length="two"), http_layer=True),
        Probe("CL negative", raw=_raw("POST", b"services", auth, b"{}", length=-2), http_layer=True),
        Probe("CL twice, differing", raw=_raw("POST", b"services", auth, b"{}", extra=b"Content-Length: 9"),
              http_layer=True),
        Probe("CL with plus sign", raw=_raw("POST", b"services", auth, b"{}", length="+2"), http_layer=True),
        Probe("HTTP/1.0 without Host", raw=b"GET {base}services/x/y HTTP/1.0\r\nAuthorization: "
              + auth.encode() + b"\r\n\r\n"),
        Probe("HTTP/1.1 without Host", raw=b"GET {base}nowhere HTTP/1.1\r\nConnection: close\r\n\r\n",
              http_layer=True),
        Probe("HTTP/2.0 request line", raw=_raw("GET", b"nowhere", version=b"HTTP/2.0"), http_layer=True),
        Probe("HTTP/9.9 request line", raw=_raw("GET", b"nowhere", version=b"HTTP/9.9"), http_layer=True),
        Probe("garbage request line", raw=b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
              http_layer=True),
        Probe("absolute-form URI", raw=b"GET http://evil.example{base}services/x/y HTTP/1.1\r\nHost: x\r\n"
              b"Connection: close\r\nAuthorization: " + auth.encode() + b"\r\n\r\n"),
        Probe("CONNECT", raw=b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
              http_layer=True),
        Probe("OPTIONS *", raw=b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
              http_layer=True),
        Probe("header without colon", raw=_raw("GET", b"ping", extra=b"NoColonHere"), http_layer=True),
        Probe("header with NUL", raw=_raw("GET", b"services", auth, extra=b"X-A: a\x00b"), http_layer=True),
        Probe("obsolete folded header", raw=_raw("GET", b"services", extra=b"Authorization: Basic\r\n "
                                                 + auth.encode()[6:]), http_layer=True),
        Probe("request line with tabs", raw=b"GET\t{base}services\tHTTP/1.1\r\nHost: x\r\n\r\n",
              http_layer=True),
        Probe("bare LF line ends", raw=b"GET {base}nowhere HTTP/1.1\nHost: x\nConnection: close\n\n"),
        Probe("only headers, then close", raw=b"GET {base}services HTTP/1.1\r\nHost: x\r\n",
              answer_needed=False),
    ]
    return probes


def gen_huge(bodies, rng):
    """Big paths, headers and bodies (up to Tornado's 64 KB header limit and past the body limit)"""
    auth = VALID["hub-a"]
    probes = []
    for length in (1000, 2000, 8000):
        run = "a" * length  # one long word: what secret scrubbing looks at
        probes.append(Probe(f"path /services/[{length} letters]/x", method="GET",
                            path=f"services/{run}/x", auth=auth))
        probes.append(Probe(f"path /[{length} letters] no credentials", method="GET", path=run))
    for length in (8000, 32000, 60000):
        segments = "ab/" * (length // 3)
        probes.append(Probe(f"path /services/[{length} chars of ab/]", method="GET",
                            path=f"services/{segments}", auth=auth))
        probes.append(Probe(f"path /[{length} chars of %2F]", method="GET",
                            path="%2F" * (length // 3)))
        # more query arguments than Tornado parses: its HTTP layer answers
        probes.append(Probe(f"path /nowhere?[{length} chars of x=1&]", method="GET",
                            path="nowhere?" + "x=1&" * (length // 4), auth=auth, http_layer=True))
    probes.append(Probe("path /nowhere?token=[2000 letters]", method="GET",
                        path="nowhere?token=" + "t" * 2000, auth=auth))
    for name, value in (("X-Junk", "j" * 60000), ("Authorization", "Basic " + "QUJD" * 15000),
                        ("auth-state-access_token", "t" * 60000), ("Content-Type", "a/" + "b" * 60000),
                        ("execution-type", "async" * 12000), ("Accept", "*/*," * 15000)):
        probes.append(post(f"header {name} 60 KB", bodies.plain(name="../x"),
                           headers={name: value}))
    many = {f"X-H{i}": "v" * 20 for i in range(2000)}
    probes.append(post("2000 headers", bodies.plain(name="../x"), headers=many))
    states = {f"auth-state-k{i}": "v" * 20 for i in range(2000)}
    # over Tornado's 64 KB limit of a request head: it closes the connection
    probes.append(post("2000 auth-state headers", bodies.failing(), headers=states))
    probes[-1].http_layer = True
    for name, size in (("header 70 KB", 70000), ("header 200 KB", 200000)):
        probes.append(Probe(name, raw=_raw("GET", b"ping", extra=b"X-Junk: " + b"j" * size),
                            http_layer=True))
    probes.append(Probe("path 70 KB", raw=_raw("GET", b"a" * 70000), http_layer=True))
    for label, size in (("1 MiB + 1", 2**20 + 1), ("2 MiB", 2**21), ("3.9 MiB", 4_089_000),
                        ("4.5 MiB", 4_718_592), ("8 MiB", 2**23)):
        filler = json.dumps(bodies.plain(name="../x"))[:-1] + ', "pad": "'
        text = filler + "p" * (size - len(filler) - 2) + '"}'
        probes.append(post(f"body {label}", text.encode()))
    probes.append(Probe("body 2 MiB on /userflavors", path="userflavors", body=b" " * 2**21,
                        auth=VALID["hub-b"]))
    return probes


def _junk_string(rng):
    pieces = ["a", "Z", "/", ".", "..", "\x00", "\n", "\u00e9", "\u540d", "\ud800", "\U0001f4a5",
              "%2e", "../", "\\", " ", '"', "{", "$", "'", "\u202e"]
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12))) + "/"


def _junk(rng, depth=0):
    kind = rng.choice(["bool", "int", "float", "string", "list", "object", "null"])
    if kind == "list" and depth < 4:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == "object" and depth < 4:
        return {_junk_string(rng): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {"bool": rng.random() < 0.5, "int": rng.randrange(-2**70, 2**70),
            "float": rng.uniform(-1e300, 1e300), "null": None}.get(kind, _junk_string(rng))


def gen_random(bodies, rng, count=260):
    """Start bodies with 1-3 parts replaced by random junk that cannot be valid"""
    declared = {"name": str, "env": dict, "user_options": dict, "misc": dict,
                "certs": dict, "internal_trust_bundles": dict}
    probes = []
    for i in range(count):
        body = bodies.plain()
        changed = rng.sample(sorted(declared) + ["start_id", "env.JUPYTERHUB_USER"], rng.randrange(1, 4))
        for key in changed:
            value = _junk(rng)
            if key == "start_id":
                if isinstance(body["user_options"], dict):
                    body["user_options"]["start_id"] = (
                        value if not isinstance(value, int) else _junk_string(rng))
            elif key == "env.JUPYTERHUB_USER":
                if isinstance(body["env"], dict):
                    body["env"]["JUPYTERHUB_USER"] = value if not isinstance(value, str) else value + "/"

            elif isinstance(value, declared[key]) or value is None:
                body[key] = _junk_string(rng) if declared[key] is dict else [value]
            else:
                body[key] = value
        probes.append(post(f"random #{i} {'+'.join(changed)}", body, hub=rng.choice(list(VALID))))
    return probes


GENERATORS = [gen_bad_json, gen_deep_fields, gen_field_types, gen_misc_traits, gen_names,
              gen_url_names, gen_credentials, gen_methods, gen_raw_protocol, gen_huge, gen_random]


# sending


async def _send_http(outpost, probe, client):
    headers = dict(probe.headers)
    if probe.auth is not None:
        headers.setdefault("Authorization", probe.auth)
    response = await api_request(
        outpost, probe.path, method=probe.method, raw_body=probe.body, headers=headers,
        auth=False, timeout=CLIENT_TIMEOUT, client=client,
    )
    if response.code == 599:
        probe.error = f"no answer: {type(response.error).__name__}: {response.error}"[:160]
        return
    probe.status, probe.answer = response.code, response.body or b""
    probe.answer_headers = {k.lower(): v for k, v in response.headers.get_all()}


def _parse_answer(probe, data):
    head, sep, rest = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if not match:
        probe.error = f"no answer: {short(data[:80])}" if data else "no answer: connection closed"
        return False
    lines = head.split(b"\r\n")[1:]
    headers = dict(
        (k.strip().lower().decode("latin1"), v.strip().decode("latin1"))
        for k, _, v in (line.partition(b":") for line in lines)
    )
    length = int(headers.get("content-length", "0") or 0)
    if not sep or len(rest) < length:
        return False
    probe.status, probe.answer, probe.answer_headers = int(match.group(1)), rest[:length], headers
    return True


async def _send_raw(outpost, probe):
    request = probe.raw.replace(b"{base}", outpost.base_url.encode())
    wait = CLIENT_TIMEOUT if probe.answer_needed else LYING_WAIT
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", outpost.bound_port), CLIENT_TIMEOUT)
    data = b""
    deadline = time.monotonic() + wait
    try:
        writer.write(request)
        try:
            await asyncio.wait_for(writer.drain(), wait)
        except ConnectionError:
            pass  # closed while sending: an answer may have come first
        while not _parse_answer(probe, data):
            left = deadline - time.monotonic()
            chunk = await asyncio.wait_for(reader.read(65536), left) if left > 0 else b""
            if not chunk:
                _parse_answer(probe, data)
                break
            data += chunk
    except (asyncio.TimeoutError, ConnectionError) as e:
        if probe.status is None:
            probe.error = f"no answer: {type(e).__name__}"
    finally:
        writer.close()


@dataclass
class Target:
    """Where the sender process finds the Outpost"""

    bound_port: int
    base_url: str


def _attack(target, probes):
    """In the sender process: send every probe; return them with their answers"""
    asyncio.run(_send_all(target, probes))
    return probes


async def _send_all(outpost, probes):
    client = AsyncHTTPClient(force_instance=True, max_clients=CONCURRENCY)
    slots = asyncio.Semaphore(CONCURRENCY)

    async def send(probe):
        started = time.monotonic()
        try:
            if probe.raw is not None:
                await _send_raw(outpost, probe)
            else:
                await _send_http(outpost, probe, client)
        except Exception as e:
            probe.error = f"no answer: {type(e).__name__}: {e}"[:160]
        finally:
            slots.release()
        probe.elapsed = time.monotonic() - started
        if probe.status is not None:
            probe.error = ""

    # at a fixed rate, at most CONCURRENCY in flight
    loop = asyncio.get_running_loop()
    start, sent = loop.time(), []
    for i, probe in enumerate(probes):
        await asyncio.sleep(max(0.0, start + i * SEND_INTERVAL - loop.time()))
        await slots.acquire()
        sent.append(asyncio.ensure_future(send(probe)))
    await asyncio.gather(*sent)
    client.close()


async def _ping_at_fixed_rate(outpost, done, latencies):
    """Ping every PING_INTERVAL; a ping's latency counts from when it was due"""
    client = AsyncHTTPClient(force_instance=True, max_clients=100)
    url = f"http://127.0.0.1:{outpost.bound_port}{outpost.base_url}ping"
    loop = asyncio.get_running_loop()

    async def ping(due):
        response = await client.fetch(url, raise_error=False, request_timeout=CLIENT_TIMEOUT)
        latencies.append(loop.time() - due if response.code == 200 else float("inf"))

    pings, due = [], loop.time()
    while not done.done():
        pings.append(asyncio.ensure_future(ping(due)))
        due += PING_INTERVAL
        await asyncio.wait([done], timeout=max(0.0, due - loop.time()))
    await asyncio.gather(*pings)
    client.close()


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("inf")


def marker_paths(workdir):
    """Paths named after this run's marker outside the work directory"""
    found = set()
    roots = ["/tmp", "/", os.getcwd(), str(workdir.parent), os.path.expanduser("~")]
    for root in roots:
        found.update(glob.glob(os.path.join(glob.escape(root), f"**/*{MARKER}*"), recursive=True)
                     if root in (os.getcwd(), str(workdir.parent)) else
                     glob.glob(os.path.join(glob.escape(root), f"*{MARKER}*")))
    inside = os.path.realpath(workdir) + os.sep  # pytest links "<name>current" to it
    return sorted(p for p in found if not os.path.realpath(p).startswith(inside))


@pytest.fixture(scope="module")
async def barrage(tmp_path_factory, fake_hub):
    """Send every hostile request once; record answers, pings and what was left behind"""
    workdir = tmp_path_factory.mktemp("hostile")
    cfg = outpost_config(workdir, spawner_cmd=["sleep", "600"], flavors=FLAVORS,
                         users=USER_RULES, default_flavor="small")
    outpost = await start_outpost(cfg)
    rng = random.Random(SEED)
    bodies = Bodies(fake_hub.url, workdir, rng)
    probes = [p for generate in GENERATORS for p in generate(bodies, rng)]
    rng.shuffle(probes)
    tokens = set().union(*(p.tokens for p in probes))
    latencies = []
    try:
        started = time.monotonic()
        # the same pings without the barrage first: this machine's own floor
        idle = []
        quiet = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(IDLE_SECONDS, quiet.set_result, None)
        await _ping_at_fixed_rate(outpost, quiet, idle)
        target = Target(outpost.bound_port, outpost.base_url)
        sender = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        # the sender's interpreter starts before the clock does
        await asyncio.get_running_loop().run_in_executor(sender, int, 0)
        attack = asyncio.ensure_future(
            asyncio.get_running_loop().run_in_executor(sender, _attack, target, probes)
        )
        await _ping_at_fixed_rate(outpost, attack, latencies)
        probes = await attack
        sender.shutdown()
        duration = time.monotonic() - started
        after = await _state_after(outpost, probes, workdir)
        _print_summary(probes, latencies, duration, after)
        yield {"probes": probes, "latencies": latencies, "idle": idle, "after": after}
    finally:
        await stop_outpost(outpost)
        kill_servers_of(tokens)
        for path in marker_paths(workdir):
            _remove(path)
        if ON_POSTGRES:
            drop_databases([outpost.db_url])


def _remove(path):
    """Remove what a traversal made; below the current directory, from its top"""
    relative = os.path.relpath(path, os.getcwd())
    if not relative.startswith(".."):
        path = os.path.join(os.getcwd(), relative.split(os.sep)[0])
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


async def _state_after(outpost, probes, workdir):
    ping = await api_request(outpost, "ping", auth=False, timeout=10)
    listings = {}
    for hub in VALID:
        response = await api_request(outpost, "services", hub=hub, timeout=10)
        listings[hub] = (response.code, response.body)
    processes = {}
    for probe in probes:
        pids = [pid for token in probe.tokens for pid in pids_with_env("JUPYTERHUB_API_TOKEN", token)]
        if pids:
            processes[probe.label] = pids
    return {"ping": (ping.code, ping.body), "listings": listings, "processes": processes,
            "files": marker_paths(workdir)}


def _print_summary(probes, latencies, duration, after):
    statuses = Counter(p.status if p.status is not None else "no answer" for p in probes)
    print(f"\nhostile requests: {len(probes)} in {duration:.1f}s (seed {SEED}, {CONCURRENCY} in flight)")
    print("  by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)))
    print(f"  5xx: {sum(1 for p in probes if (p.status or 0) >= 500)}")
    slowest = sorted(probes, key=lambda p: -p.elapsed)[:SLOWEST_SHOWN]
    print("  slowest: " + ", ".join(f"{p.label} {p.elapsed:.2f}s" for p in slowest))
    print(f"  pings: {len(latencies)}, p50 {percentile(latencies, .5) * 1000:.1f}ms,"
          f" p99 {percentile(latencies, .99) * 1000:.1f}ms, max {max(latencies) * 1000:.1f}ms")
    print(f"  left behind: {sum(len(json.loads(b or b'[]')) for c, b in after['listings'].values() if c == 200)}"
          f" servers, {len(after['processes'])} starts with processes, {len(after['files'])} files")


# checks


def failures_of(check, probes):
    """``check(probe)`` gives a symptom (text) or None; the failing ones, listed compactly"""
    failed = [(p, s) for p in probes for s in [check(p)] if s]
    lines = [f"{len(failed)} of {len(probes)} hostile requests:"]
    for symptom, count in Counter(s.split(":")[0] for _, s in failed).most_common():
        lines.append(f"  [{count}x] {symptom}")
    lines += [f"  {p.label} -> {s}" for p, s in failed[:80]]
    if len(failed) > 80:
        lines.append(f"  ... and {len(failed) - 80} more")
    return failed, "\n".join(lines)


def assert_none(check, probes):
    failed, text = failures_of(check, probes)
    if failed:
        pytest.fail(text, pytrace=False)


def _bare_http_layer_400(probe):
    return probe.http_layer and probe.status == 400 and not probe.answer


def _error_shape(probe):
    status = probe.status
    if status is None or status < 400 or probe.method == "HEAD" or _bare_http_layer_400(probe):
        return None
    if not probe.answer_headers.get("content-type", "").startswith("application/json"):
        return f"{status} not JSON: {probe.answer_headers.get('content-type')!r} {short(probe.answer)}"
    try:
        model = json.loads(probe.answer)
    except ValueError:
        return f"{status} body is not JSON: {short(probe.answer)}"
    if status == 419:
        keys = {"module", "class", "traceback", "args", "kwargs"}
        if not isinstance(model, dict) or not keys <= set(model):
            return f"419 without the start-failure shape: {short(model)}"
        return None
    if (not isinstance(model, dict) or set(model) != {"status", "message"}
            or model["status"] != status or not isinstance(model["message"], str)
            or not model["message"].strip()):
        return f"{status} error body of the wrong shape: {short(model)}"
    if status == 401 and "www-authenticate" not in probe.answer_headers:
        return "401 without WWW-Authenticate"
    return None


def test_enough_hostile_requests(barrage):
    probes = barrage["probes"]
    families = Counter(p.label.split(" ")[0].split("=")[0].split(".")[0] for p in probes)
    assert len(probes) >= MIN_REQUESTS, families
    assert sum(1 for p in probes if p.raw is not None) >= 40, families


def test_no_5xx(barrage):
    assert_none(lambda p: f"{p.status}: {short(p.answer, 120)}"
                if (p.status or 0) >= 500 else None, barrage["probes"])


def test_every_request_is_answered(barrage):
    """Tornado's HTTP layer may close on a malformed message; everything else is answered"""
    assert_none(lambda p: p.error if p.status is None and p.answer_needed and not p.http_layer
                else None, barrage["probes"])


def test_errors_are_json(barrage):
    assert_none(_error_shape, barrage["probes"])


def test_every_hostile_request_is_refused(barrage):
    assert_none(lambda p: f"accepted with {p.status}: {short(p.answer, 80)}"
                if p.status is not None and p.status < 400 else None, barrage["probes"])


def test_answers_come_quickly(barrage):
    assert_none(lambda p: f"slow answer: {p.elapsed:.2f}s"
                if p.status is not None and p.elapsed > ANSWER_LIMIT else None, barrage["probes"])


def test_ping_stays_fast(barrage):
    latencies = barrage["latencies"]
    p99 = percentile(latencies, 0.99)
    idle_p99 = percentile(barrage["idle"], 0.99)
    limit = max(PING_P99_LIMIT, IDLE_FACTOR * idle_p99)
    slow = sum(1 for t in latencies if t > limit)
    assert p99 < limit, (
        f"/ping p99 {p99 * 1000:.0f}ms over {len(latencies)} pings ({slow} over"
        f" {limit * 1000:.0f}ms, max {max(latencies) * 1000:.0f}ms; before the barrage"
        f" p99 {idle_p99 * 1000:.0f}ms)"
    )


def test_outpost_still_answers(barrage):
    code, body = barrage["after"]["ping"]
    assert code == 200, (code, body)
    for hub, (code, body) in barrage["after"]["listings"].items():
        assert code == 200, (hub, code, body)


def test_no_server_is_recorded(barrage):
    left = {}
    for hub, (code, body) in barrage["after"]["listings"].items():
        servers = json.loads(body or b"[]") if code == 200 else []
        if servers:
            left[hub] = [f"{s.get('name')!r}/{s.get('start_id')!r}" for s in servers]
    assert not left, "\n".join(f"{hub}: {len(names)} servers: {', '.join(names[:40])}"
                               for hub, names in left.items())


def test_no_process_was_started(barrage):
    processes = barrage["after"]["processes"]
    assert not processes, f"{len(processes)} hostile starts run processes:\n" + "\n".join(
        f"  {label}: pids {pids}" for label, pids in list(processes.items())[:60])


def test_no_file_outside_the_work_directory(barrage):
    files = barrage["after"]["files"]
    assert not files, f"{len(files)} paths written outside the work directory:\n" + "\n".join(
        f"  {path}" for path in files[:60])
