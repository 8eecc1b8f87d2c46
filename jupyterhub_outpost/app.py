"""The jupyterhub-outpost application: configuration, startup, shutdown."""

import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import sys
import uuid

import yaml

from jupyterhub.spawner import Spawner
from jupyterhub.traitlets import EntryPointType
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.log import LogFormatter, access_log
from tornado.netutil import bind_sockets
from traitlets import (
    Bool,
    Callable,
    Dict,
    Float,
    Integer,
    List,
    TraitError,
    Unicode,
    Union,
    default,
    validate,
)
from traitlets.config import Application, catch_config_error

from . import configfile, credits, crypto, dbutil, flavors, orm
from ._version import __version__
from .handlers import default_handlers
from .handlers.base import NotFoundAPIHandler
from .handlers.spec import load_spec
from .background import BackgroundWork
from .gcpolicy import CollectorPolicy
from .hubclient import HubClient
from .metrics import OutpostMetrics
from .status import StatusPage
from .log import JSONLogFormatter, install_scrubber, log_request, secrets
from .policy import DEFAULT_OVERRIDES, OutpostPolicy, is_valid_hub_name
from .servers import ServerManager
from .utils import json_from_env, url_path_join

HUB_CREDENTIALS_ENV = "OUTPOST_HUB_CREDENTIALS"
HUB_CREDENTIALS_FILE_ENV = "OUTPOST_HUB_CREDENTIALS_FILE"
SSH_AUTHORIZED_KEYS_ENV = "OUTPOST_SSH_AUTHORIZED_KEYS"
_DEFAULT_OVERRIDES_TEXT = ", ".join(f"``{key}``" for key in sorted(DEFAULT_OVERRIDES))

aliases = {
    "f": "JupyterHubOutpost.config_file",
    "config": "JupyterHubOutpost.config_file",
    "ip": "JupyterHubOutpost.ip",
    "port": "JupyterHubOutpost.port",
    "base-url": "JupyterHubOutpost.base_url",
    "db": "JupyterHubOutpost.db_url",
    "log-level": "Application.log_level",
}

flags = {
    "debug": (
        {"Application": {"log_level": logging.DEBUG}},
        "Set the log level to DEBUG (secrets stay hidden).",
    ),
    "generate-config": (
        {"JupyterHubOutpost": {"generate_config": True}},
        "Write a commented default configuration file (to -f) and exit.",
    ),
    "y": (
        {"JupyterHubOutpost": {"answer_yes": True}},
        "With --generate-config: overwrite an existing file.",
    ),
}


class UpgradeDB(Application):
    """Upgrade the database schema to this version's revision"""

    name = "jupyterhub-outpost-upgrade-db"
    version = __version__
    description = """Upgrade the Outpost's database schema.

    Back up the database first. For SQLite, a copy is made beside the file.
    """
    aliases = aliases
    flags = flags

    @property
    def classes(self):
        return [JupyterHubOutpost]

    def start(self):
        outpost = JupyterHubOutpost(parent=self)
        outpost.load_config_file(outpost.config_file)
        outpost.init_logging()
        dbutil.backup_sqlite(outpost.db_url, outpost.log)
        dbutil.upgrade(outpost.db_url)
        outpost.log.info("Database schema is at revision %s", dbutil.head_revision())


class JupyterHubOutpost(Application):
    """Runs JupyterHub Spawners on behalf of one or several JupyterHubs."""

    name = "jupyterhub-outpost"
    version = __version__
    description = """Start, poll and stop JupyterHub single-user servers for hubs
    that use the OutpostSpawner.

    The Outpost runs the Spawner you configure (LocalProcessSpawner by default)
    exactly as JupyterHub would, and serves the OutpostSpawner's HTTP API.
    """
    examples = """
    jupyterhub-outpost -f outpost_config.py
    jupyterhub-outpost --generate-config -f outpost_config.py
    jupyterhub-outpost upgrade-db -f outpost_config.py
    """
    aliases = aliases
    flags = flags
    subcommands = {
        "upgrade-db": (UpgradeDB, "Upgrade the database schema to this version."),
        "servers": ("jupyterhub_outpost.cli.ServersCommand", "List the recorded servers, per hub."),
        "history": ("jupyterhub_outpost.cli.HistoryCommand", "The recent starts of one user."),
    }
    _log_formatter_cls = LogFormatter

    @property
    def classes(self):
        from jupyterhub.spawner import LocalProcessSpawner, SimpleLocalProcessSpawner

        return [JupyterHubOutpost, HubClient, OutpostMetrics, StatusPage, CollectorPolicy, Spawner,
                LocalProcessSpawner, SimpleLocalProcessSpawner]

    instance_name = Unicode(
        help="""A name for this process in logs and leases (default: host name and pid).""",
    ).tag(config=True)

    @default("instance_name")
    def _instance_name_default(self):
        return f"{socket.gethostname()}-{os.getpid()}"

    config_file = Unicode(
        "outpost_config.py",
        help="The configuration file to load (``-f``); with ``--generate-config`` the file to write.",
    ).tag(config=True)

    generate_config = Bool(False, help="Write a commented configuration file and exit.").tag(
        config=True
    )

    answer_yes = Bool(
        False,
        help="""With ``--generate-config``: overwrite the file if it exists (``-y``).

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    ip = Unicode(
        "",
        help="""The IP address the API listens on. Empty (the default) means all interfaces.""",
    ).tag(config=True)

    port = Integer(8080, help="The TCP port the API listens on.").tag(config=True)

    base_url = Unicode(
        "/",
        help="""Path prefix of every endpoint.

        With ``c.JupyterHubOutpost.base_url = "/outpost/"`` the hub's
        ``request_url`` is ``http://host:8080/outpost/services/``.
        """,
    ).tag(config=True)

    @validate("base_url")
    def _validate_base_url(self, proposal):
        return url_path_join("/", proposal.value, "/")

    db_url = Unicode(
        "sqlite:///jupyterhub_outpost.sqlite",
        help="""SQLAlchemy URL of the database that holds the servers' records.

        Default: the SQLite file ``jupyterhub_outpost.sqlite`` in the working
        directory. PostgreSQL: ``postgresql+psycopg://user@host/dbname``.
        """,
    ).tag(config=True)

    db_workers = Integer(
        0,
        help="""Threads that write to the database. 0 (default): 1 for SQLite, 4 otherwise.

        The writes that queue up meanwhile share a transaction. One writer
        works while its transactions are short; another begins only when
        writes have waited 50 ms behind the busy ones (a slow database
        server, a long statement).
        """,
    ).tag(config=True)

    db_read_workers = Integer(
        2,
        help="""Threads that read from the database (polls, listings).

        Separate from the writers, so that polls do not wait behind starts
        and stops. Each keeps one database connection open.
        """,
    ).tag(config=True)

    spawner_class = EntryPointType(
        default_value="jupyterhub.spawner.LocalProcessSpawner",
        klass=Spawner,
        entry_point_group="jupyterhub.spawners",
        help="""The Spawner class that starts the servers, as in JupyterHub.

        A class or an import string; its traits are configured as in
        ``jupyterhub_config.py``, for example::

            c.JupyterHubOutpost.spawner_class = "batchspawner.SlurmSpawner"
            c.SlurmSpawner.req_partition = "batch"

        Default: JupyterHub's LocalProcessSpawner, which starts each server as
        the system user of the hub's user name (run the Outpost as root).
        """,
    ).tag(config=True)

    hub_credentials = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        help=f"""The hubs allowed to use this Outpost: hub name to password.

        Each hub sends its name and password with HTTP Basic authentication
        (``c.OutpostSpawner.request_headers`` at the hub). Keep passwords out
        of the config file: by default they are read from the environment
        variable ``{HUB_CREDENTIALS_ENV}`` (a JSON object), or from the JSON
        file named by ``{HUB_CREDENTIALS_FILE_ENV}`` (a systemd credential or a
        mounted Kubernetes secret)::

            {HUB_CREDENTIALS_ENV}='{{"hub-a": "secret-a", "hub-b": "secret-b"}}'
        """,
    ).tag(config=True)

    @default("hub_credentials")
    def _hub_credentials_default(self):
        path = os.environ.get(HUB_CREDENTIALS_FILE_ENV)
        if path:
            with open(path) as f:
                return json.load(f)
        return json_from_env(HUB_CREDENTIALS_ENV)

    crypt_keys = List(
        Unicode(),
        help=f"""Keys that encrypt the records at rest (Fernet keys or 64 hex digits).

        The first key encrypts, every key decrypts: add a new key in front to
        rotate. Default: the environment variable ``{crypto.KEY_ENV}``
        (keys separated by ``;``). Without any key, one is generated once and
        kept in ``crypt_key_file`` (mode 0600). Generate a key with
        ``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``.
        """,
    ).tag(config=True)

    @default("crypt_keys")
    def _crypt_keys_default(self):
        return crypto.parse_keys(os.environ.get(crypto.KEY_ENV, ""))

    crypt_key_file = Unicode(
        help="""Where the generated key is kept when ``crypt_keys`` is empty.

        Default: ``jupyterhub_outpost_crypt_key`` beside the SQLite database,
        or in the working directory for other databases.
        """,
    ).tag(config=True)

    @default("crypt_key_file")
    def _crypt_key_file_default(self):
        path = dbutil.sqlite_path(self.db_url)
        directory = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        return os.path.join(directory, "jupyterhub_outpost_crypt_key")

    allowed_overrides = List(
        Unicode(),
        help=f"""Spawner traits a hub may set per start (its ``misc``), besides
        those the OutpostSpawner itself sends ({_DEFAULT_OVERRIDES_TEXT}).

        Default: none. A start that sets another trait of the Spawner is
        refused (status 419, naming the trait); keys that are no traits of
        the configured Spawner are ignored, as are the traits that connect the
        Spawner to the Outpost (``api_token``, ``user``, ...). ``["*"]``
        allows every other trait, including ``cmd``: a hub may then run any
        program as the server's account. Example::

            c.JupyterHubOutpost.allowed_overrides = ["image", "mem_limit", "req_partition"]

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    allow_override = Callable(
        None,
        allow_none=True,
        help="""Decide whether a start's ``misc`` overrides are applied.

        Called as ``allow_override(hub_name, misc)`` (may be async) with the
        whole ``misc`` the hub sent, after the ``allowed_overrides`` check and
        before the server is recorded; a false answer fails the start with a
        message naming the refused keys. Default: no further check. Example::

            def allow_override(hub_name, misc):
                return hub_name == "trusted-hub" or "image" not in misc

            c.JupyterHubOutpost.allow_override = allow_override
        """,
    ).tag(config=True)

    allowed_env_keys = List(
        Unicode(),
        help="""Environment variables a hub may set although they decide which
        program runs or what it loads.

        By default a start whose ``env`` holds ``PATH``, ``LD_*``,
        ``PYTHONPATH``, ``PYTHONHOME``, ``PYTHONSTARTUP``, ``BASH_ENV``,
        ``ENV``, ``HOME``, ``JUPYTER_CONFIG_DIR`` and similar keys is refused
        (status 419, naming them). List the keys to accept, or ``["*"]`` for
        all::

            c.JupyterHubOutpost.allowed_env_keys = ["JUPYTER_CONFIG_DIR"]

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    account_name_template = Union(
        [Unicode(), Dict(value_trait=Unicode())],
        default_value="{username}",
        help="""The local account a hub user's server runs as.

        A template with the fields ``{hub}`` (hub name) and ``{username}``
        (``JUPYTERHUB_USER`` of the start), or a dict of templates by hub
        name (key ``"*"`` for the other hubs). The account is what the
        Spawner sees as ``spawner.user.name`` (LocalProcessSpawner's system
        user, home directory); the server's ``JUPYTERHUB_USER`` stays the
        hub's name of the user. Default: ``"{username}"``. Example::

            c.JupyterHubOutpost.account_name_template = {
                "hub-a": "{username}",
                "*": "{hub}-{username}",
            }

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    account_name_hook = Callable(
        None,
        allow_none=True,
        help="""Map a hub user to a local account (instead of ``account_name_template``).

        Called as ``account_name_hook(hub_name, user_name)`` (may be async);
        returns the account name. Example::

            def account_name_hook(hub_name, user_name):
                return ACCOUNTS[hub_name][user_name]

            c.JupyterHubOutpost.account_name_hook = account_name_hook

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    min_account_uid = Integer(
        1000,
        help="""The lowest uid of an existing local account that may run servers.

        A start whose account exists on this host with a lower uid (root,
        daemon, postgres, ...) is refused with status 419. Accounts that do
        not exist here are not refused by this check. 0 switches it off.
        Default: 1000.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    denied_accounts = List(
        Unicode(),
        default_value=["root", "nobody"],
        help="""Account names that never run servers, whatever their uid.

        Default: ``["root", "nobody"]``.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    sanitize_start_response = Callable(
        help="""Turn what ``Spawner.start()`` returned into the address sent to the hub.

        Called as ``sanitize_start_response(spawner, response)`` (may be
        async). The result is sent as ``host:port`` (tuples) or
        ``scheme://host:port`` (URLs, without path). Default: unchanged.
        Example, for hubs that reach servers through a login node::

            def sanitize_start_response(spawner, response):
                return ("login01.cluster", spawner.port)

            c.JupyterHubOutpost.sanitize_start_response = sanitize_start_response
        """,
    ).tag(config=True)

    @default("sanitize_start_response")
    def _sanitize_start_response_default(self):
        return lambda spawner, response: response

    send_events = Union(
        [Bool(), Callable()],
        default_value=True,
        help="""Whether progress events are posted to the hub during starts.

        A bool, or a callable ``send_events(hub_name) -> bool``. Default: True.
        """,
    ).tag(config=True)

    max_body_size = Integer(
        1024 * 1024,
        help="""Largest request body accepted, in bytes (default 1 MiB). Larger: 413.""",
    ).tag(config=True)

    idle_connection_timeout = Float(
        300,
        help="""Seconds a client's connection may stay open without sending a
        complete request head, between the requests of a kept-alive connection
        or while the request line and headers arrive, before the Outpost closes
        it. Default: 300. A hub whose kept-alive connection was closed opens a
        new one.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    body_timeout = Float(
        60,
        help="""Seconds a request may take to send its body, counted from the
        end of its headers, before the Outpost closes the connection. Default:
        60; hubs give up on a request after 30 seconds.

        This also bounds the work for a body larger than ``max_body_size``,
        which is read to its end and dropped before the 413 answer.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    @validate(
        "idle_connection_timeout", "body_timeout",
        "ssh_login_grace_time", "ssh_connect_timeout", "ssh_sweep_interval",
    )  # fmt: skip
    def _validate_positive_timeout(self, proposal):
        from traitlets import TraitError

        if proposal.value <= 0:
            raise TraitError(f"{proposal.trait.name} must be a positive number of seconds")
        return proposal.value

    internal_certs_location = Unicode(
        "outpost-internal-ssl",
        help="""Directory for the certificates a hub sends with ``internal_ssl``.

        Each start gets a private (0700) subdirectory, removed when the server
        stops. Certificates are never written to the database.
        """,
    ).tag(config=True)

    server_output_dir = Unicode(
        "outpost-server-output",
        help="""Directory where the output of LocalProcessSpawner servers is kept,
        one file per start (``<hub>/<name>~<start_id>.log``, 0600, in 0700
        folders), removed when the server stops. Its last lines tell the user
        why a server ended right after its start (``early_exit_window``).
        Not used when ``c.Spawner.popen_kwargs`` sets ``stdout`` or ``stderr``.
        Default: ``outpost-server-output`` in the working directory.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    early_exit_window = Float(
        20,
        help="""Seconds after a start during which the Outpost polls the new
        server (each second at first, then less often), when it keeps the
        server's output (LocalProcessSpawner and its subclasses, see
        ``server_output_dir``). If the server ends meanwhile, the hub is sent
        a progress event with its exit status and last output lines, so the
        user sees why at once instead of waiting for the hub's timeout.
        0 turns the watch off. Default: 20.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    concurrent_bookkeeping = Integer(
        8,
        help="""How many slices of the Outpost's own work for starts (checking
        a request, building its Spawner, saving its end) run per turn of the
        event loop, and how many stops at a time do their bookkeeping. Others
        wait their turn; the Spawners' own ``start()`` and ``stop()`` calls,
        the configured hooks and the database writes are not limited.

        This keeps polls answered promptly while a burst of starts arrives
        (a course begins): without a limit, each turn of the event loop would
        first do that work for every start of the burst.
        """,
    ).tag(config=True)

    pending_timeout = Float(
        600,
        help="""Seconds after which a start or stop still marked pending is taken
        as interrupted and cleaned up when nothing tells whether the process
        that ran it still lives.

        A start or stop whose process is known to be gone (its lease in the
        database expired, or it ran on this host and its pid ended, as after
        a crash and restart) is finished at once, without waiting this long.
        Keep it above the spawner's ``start_timeout``.
        """,
    ).tag(config=True)

    poll_timeout = Float(
        10,
        help="""Seconds a poll waits for the Spawner's ``poll()`` (and ``get_logs()``).

        A poll that takes longer is answered 503 (the status cannot be told),
        so that the hub keeps the server and asks again; it is never taken
        as a status. Keep it below the hub's request timeout (30 s by default
        in the OutpostSpawner).

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    stop_timeout = Float(
        90,
        help="""Seconds a stop waits for the Spawner's ``stop()`` (and again for
        ``post_stop_hook``).

        A stop that takes longer fails with 503: the server stays recorded,
        polls ask the Spawner, and it can be stopped again. How long a stop
        takes is the Spawner's business: LocalProcessSpawner sends SIGINT,
        SIGTERM and SIGKILL, waiting ``interrupt_timeout``, ``term_timeout``
        and ``kill_timeout`` (JupyterHub 6: 30 + 30 + 5 s) in between; keep
        their sum below this, and below the hub's request timeout (30 s).

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    spawner_threads = Integer(
        16,
        help="""Threads for Spawner methods and hooks that are plain functions.

        Coroutine methods (``async def``, as in JupyterHub's own Spawners) run
        on the event loop; a plain function may block (a synchronous
        subprocess or HTTP call), so it runs in one of these threads and
        other requests go on meanwhile.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    cleanup_interval = Float(
        15,
        help="""Seconds between rounds of background work: stopping servers whose
        runtime ended, runtime warnings, housekeeping, interrupted starts and stops.

        With several processes on one database, one of them does this work (a
        lease in the database decides which).
        """,
    ).tag(config=True)

    lease_ttl = Float(
        help="""Seconds the background-work lease lasts without renewal.

        The process doing the background work renews its lease every
        ``cleanup_interval``; when it dies, another process takes over once
        the lease has expired. The lease is renewed between rounds only:
        keep it above ``cleanup_interval`` and above the time one round's
        stops may take. Default: ``max(3 * cleanup_interval, 30)``.
        """,
    ).tag(config=True)

    @default("lease_ttl")
    def _lease_ttl_default(self):
        return max(3 * self.cleanup_interval, 30)

    flavors = Dict(
        help="""Flavors: resource templates with limits, by name.

        Each flavor is a dict with ``display_name``, ``description``,
        ``weight`` (order in listings, highest first), ``max`` (servers of this
        flavor at once, over all hubs and users; absent or -1: unlimited),
        ``maxPerUser`` (per user of a hub), ``runtime`` (``{"days": 0,
        "hours": 8, "minutes": 0}``: each server's lifetime) and
        ``resources`` (what ``apply_flavor_hook`` sets on the Spawner).
        Without flavors there are no limits and a start needs none. Example::

            c.JupyterHubOutpost.flavors = {
                "small": {"display_name": "2 GB, 1 CPU", "weight": 10, "max": 50,
                          "maxPerUser": 2, "runtime": {"hours": 8},
                          "resources": {"mem_limit": "2G", "cpu_limit": 1}},
                "gpu": {"display_name": "1 GPU", "weight": 20, "max": 4,
                        "runtime": {"hours": 2},
                        "resources": {"req_gpus": "1"}},
            }
        """,
    ).tag(config=True)

    hubs = Union(
        [Dict(), List()],
        help="""Which flavors each hub may use.

        Rules by hub name pattern (a regular expression, a glob or a literal,
        tried in that order), each ``{"flavors": [...], "weight": N}``; of the
        matching rules the highest weight applies. Without rules every hub may
        use every flavor; with rules, a hub no rule matches may use none::

            c.JupyterHubOutpost.hubs = {
                "hub-a": {"flavors": ["small", "gpu"], "weight": 10},
                "hub-*": {"flavors": ["small"], "weight": 1},
            }
        """,
    ).tag(config=True)

    users = Union(
        [Dict(), List()],
        help="""Per-user flavor rules, matched against the ``authentication``
        object a hub sends with a start (``name``, ``groups``, ...).

        Each rule (a dict of named rules, or a list) has ``authentication``:
        field -> pattern (regular expression, glob, literal, or a list of
        literals; a list-valued field such as ``groups`` matches if any element
        does); optional ``hub`` (hub name pattern); ``negate_authentication``;
        ``forbidden`` (the user may start nothing); ``flavors`` (allowed, within
        the hub's); ``weight`` (the highest-weight matching rule applies)::

            c.JupyterHubOutpost.users = {
                "gpu-group": {"authentication": {"groups": "gpu-*"},
                              "flavors": ["small", "gpu"], "weight": 20},
                "banned": {"authentication": {"name": ["mallory"]},
                           "forbidden": True, "weight": 100},
            }
        """,
    ).tag(config=True)

    global_max_per_user = Integer(
        -1,
        help="Servers one user of a hub may run at once, over all flavors (-1: unlimited).",
    ).tag(config=True)

    default_flavor = Unicode(
        "",
        help="""The flavor of a start that names none, when flavors are configured.
        Empty (default): such a start is refused with the list of flavors.""",
    ).tag(config=True)

    credits = Dict(
        help="""Credits: the budgets the hubs' credit services may charge,
        answered at ``GET /credits`` (the hub's) and ``POST /usercredits``
        (one user's, by the authentication object, after
        ``update_user_authentication``). Three keys: ``credits`` (name to an
        object, the budget as the credit service reads it), ``hubs`` (rules by
        hub name pattern: ``credits``, the names the hub may use, and
        ``creditsOverride``, keys to change per credit) and ``users`` (rules
        as the flavors' ``users``: ``authentication``, ``weight``,
        ``forbidden``, ``credits``, ``creditsOverride``)::

            c.JupyterHubOutpost.credits = {
                "credits": {"cpu-hours": {"budget": 1000, "unit": "core-hours"}},
                "hubs": {"main": {"hub": "hub-main", "credits": ["cpu-hours"]}},
                "users": {
                    "students": {"authentication": {"groups": "students"},
                                 "creditsOverride": {"cpu-hours": {"budget": 100}}},
                },
            }

        Default: none (both endpoints answer ``{}``).

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    @validate("credits")
    def _credits_valid(self, proposal):
        try:
            credits.check(proposal.value)
        except ValueError as e:
            raise TraitError(str(e)) from None
        return proposal.value

    history_retention_days = Float(
        7,
        help="""Days the spawn history keeps a start (its events, outcome and
        failure reason) after it began. Default: 7.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    history_per_user = Integer(
        20,
        help="""Most starts the spawn history keeps per user of a hub (the
        newest). Default: 20.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    flavor_config_file = Unicode(
        "",
        help="""A YAML file with the keys ``flavors``, ``hubs``, ``users``,
        ``global_max_per_user``, ``default_flavor`` and ``credits``, read at
        startup; its values replace the settings of the same names.""",
    ).tag(config=True)

    update_user_authentication = Callable(
        None,
        allow_none=True,
        help="""Normalise the ``authentication`` object of a start before the user
        rules see it. Called as ``update_user_authentication(authentication)``
        (may be async); returns the object to use::

            def lower_case(authentication):
                return dict(authentication, name=authentication.get("name", "").lower())

            c.JupyterHubOutpost.update_user_authentication = lower_case
        """,
    ).tag(config=True)

    apply_flavor_hook = Callable(
        help="""Apply a start's flavor to its Spawner, after the hub's overrides.

        Called as ``apply_flavor_hook(spawner, flavor_name, flavor)`` (may be
        async). Default: each key of the flavor's ``resources`` that is a trait
        of the Spawner is set (``mem_limit``, ``cpu_limit``, ``cpu_guarantee``,
        ``mem_guarantee``, batchspawner's ``req_*``, ...); other keys are
        ignored.
        """,
    ).tag(config=True)

    @default("apply_flavor_hook")
    def _apply_flavor_hook_default(self):
        return flavors.apply_resources

    runtime_warning = Float(
        900,
        help="""Seconds before a server's runtime ends at which the hub is sent a
        warning event (0: no warning).""",
    ).tag(config=True)

    runtime_warning_message = Unicode(
        "Outpost: this server will be stopped in {remaining}, at {end_date} "
        "(runtime limit of flavor {flavor}).",
        help="""The runtime warning's text; ``{remaining}`` ("15 minutes"),
        ``{minutes}`` (15), ``{end_date}`` and ``{flavor}`` are filled in.""",
    ).tag(config=True)

    # tunnels

    ssh_recreate_at_start = Union(
        [Bool(), Callable()],
        help="""Whether the hubs are asked to rebuild their SSH port forwards
        after this Outpost starts.

        A restart ends the SSH connections through which hubs reach their
        servers. With this on, once after each start, the Outpost POSTs
        ``{"service": "<start answer>"}`` for every running server to that
        server's ``JUPYTERHUB_SETUPTUNNEL_URL`` (with the server's API token),
        and the hub rebuilds the forward (see ``ssh_recreate_forward`` for
        hubs that rebuild them all with one call). This runs in the
        background, in the process that holds the background-work lease, the
        first time it holds it after its start: right away, or once the lease
        of a process that died has expired (``lease_ttl``).

        True, False, or a callable ``ssh_recreate_at_start(hub_name)`` (may be
        async) returning whether to do it for that hub. Default: True when the
        Outpost's own SSH endpoint is enabled, else False (with a separate
        sshd, or without tunnels, a restart of the Outpost breaks no
        forward)::

            def ssh_recreate_at_start(hub_name):
                return hub_name != "hub-with-direct-access"

            c.JupyterHubOutpost.ssh_recreate_at_start = ssh_recreate_at_start

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    @default("ssh_recreate_at_start")
    def _ssh_recreate_at_start_default(self):
        from .tunnels import endpoint_enabled

        return endpoint_enabled(self)

    ssh_recreate_forward = Dict(
        help="""Per hub: rebuild all its forwards with one call instead of one
        per server (an older spelling of ``hub_api``'s ``system``).

        For each hub name: ``url`` (the hub's API, ``https://hub/hub/api``),
        ``token`` (an API token with the scope ``custom:sshnode:restart``) and
        ``system`` (the name the hub's OutpostSpawner gives this Outpost in
        ``user_options["system"]``). After a start the Outpost then sends
        ``GET {url}/recreateforward/{system}`` to that hub (which answers 202
        and rebuilds them in the background) instead of the setuptunnel
        POSTs::

            c.JupyterHubOutpost.ssh_recreate_forward = {
                "hub-a": {"url": "https://hub-a.example.org/hub/api",
                          "token": os.environ["HUB_A_RECREATE_TOKEN"],
                          "system": "cluster-1"},
            }

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    @validate("ssh_recreate_forward")
    def _validate_ssh_recreate_forward(self, proposal):
        for hub, settings in proposal.value.items():
            if not isinstance(settings, dict) or not settings.get("url") or not settings.get("token"):
                raise ValueError(f"ssh_recreate_forward[{hub!r}] needs a url and a token")
        return proposal.value

    ssh_recreate_retries = Integer(
        5,
        help="""How many times a request to rebuild a tunnel is retried when the
        hub does not answer or answers 429, 502, 503 or 504. Other error
        answers (the hub does not know the server, or could not build the
        forward) are not retried. Default: 5.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_recreate_backoff = Float(
        2,
        help="""Seconds to wait before the first retry of a tunnel request;
        the wait doubles with each retry (at most 60 s, plus up to a quarter
        at random). Default: 2.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_recreate_timeout = Float(
        30,
        help="""Seconds one tunnel request may take, until the hub answers (it
        runs its ssh commands before it does). Default: 30.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_recreate_concurrency = Integer(
        4,
        help="""How many tunnel requests are in flight at once, over all hubs.
        Default: 4.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    hub_api = Dict(
        help="""Per hub: the Outpost's own access to that hub's API, as a service
        registered at the hub (see the how-to "Register the Outpost at a hub").
        One place for everything the Outpost asks a hub on its own behalf.

        For each hub name: ``url`` (the hub's API, ``https://hub/hub/api``) and
        ``token`` (the service's API token), and what to use them for:

        - ``housekeeping``: True, or ``{"interval": s, "grace": s}`` (defaults
          300 and 600): periodically stop servers the hub no longer knows
          (the token needs the scope ``custom:servers:list``);
        - ``system``: the name the hub's OutpostSpawner gives this Outpost
          (``user_options["system"]``): after a start of the Outpost, rebuild
          all the hub's SSH forwards with one ``GET {url}/recreateforward/{system}``
          instead of one setuptunnel call per server (scope
          ``custom:sshnode:restart``)::

            c.JupyterHubOutpost.hub_api = {
                "hub-a": {"url": "https://hub-a.example.org/hub/api",
                          "token": os.environ["HUB_A_OUTPOST_TOKEN"],
                          "housekeeping": {"grace": 900}, "system": "cluster-1"},
            }

        - ``oauth_client_id`` and ``oauth_redirect_uri`` (and ``hub_url``, the
          hub as browsers reach it, default: ``url`` without ``/hub/api``):
          the hub's admins sign in at ``/hub-status/<hub>/`` with their hub
          accounts (OAuth, as JupyterHub's services do) and see that hub's
          part of the status page. The redirect URI is
          ``https://<outpost>/hub-status/<hub>/oauth_callback``.

        ``hub_housekeeping`` and ``ssh_recreate_forward`` are older spellings of
        the same, read as entries of this setting.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    @validate("hub_api")
    def _validate_hub_api(self, proposal):
        for hub, settings in proposal.value.items():
            if not isinstance(settings, dict) or not settings.get("url") or not settings.get("token"):
                raise TraitError(f"hub_api[{hub!r}] needs a url and a token")
            unknown = set(settings) - {"url", "token", "housekeeping", "system", "oauth_client_id",
                                       "oauth_redirect_uri", "hub_url"}
            if unknown:
                raise TraitError(f"hub_api[{hub!r}] has unknown keys: {', '.join(sorted(unknown))}")
            if not isinstance(settings.get("housekeeping", False), (bool, dict)):
                raise TraitError(f"hub_api[{hub!r}]['housekeeping'] must be true, false or an object")
        return proposal.value

    def housekeeping_settings(self):
        """``{hub: {url, token, interval, grace}}`` of the hubs to keep house for"""
        found = {hub: dict(settings) for hub, settings in self.hub_housekeeping.items()}
        for hub, settings in self.hub_api.items():
            wanted = settings.get("housekeeping", False)
            if wanted:
                found[hub] = {"url": settings["url"], "token": settings["token"],
                              **(wanted if isinstance(wanted, dict) else {})}  # fmt: skip
        return found

    def recreate_forward_settings(self):
        """``{hub: {url, token, system}}`` of the hubs that rebuild forwards with one call"""
        found = {hub: dict(settings) for hub, settings in self.ssh_recreate_forward.items()}
        for hub, settings in self.hub_api.items():
            if settings.get("system"):
                found[hub] = {"url": settings["url"], "token": settings["token"], "system": settings["system"]}
        return found

    hub_housekeeping = Dict(
        help="""Per hub: periodically stop servers the hub no longer knows
        (an older spelling of ``hub_api``'s ``housekeeping``).

        For each hub name: ``url`` (the hub's API, ``https://hub/hub/api``),
        ``token`` (an API token with the scope ``custom:servers:list``, for the
        OutpostSpawner's ``GET /servers``), ``interval`` (seconds between
        checks, default 300) and ``grace`` (servers younger than this many
        seconds are left alone, default 600). Nothing is stopped while the hub
        cannot be reached::

            c.JupyterHubOutpost.hub_housekeeping = {
                "hub-a": {"url": "https://hub-a.example.org/hub/api",
                          "token": os.environ["HUB_A_LIST_TOKEN"], "grace": 900},
            }
        """,
    ).tag(config=True)

    # SSH endpoint: hubs forward to their own servers through the Outpost

    enable_ssh = Bool(
        False,
        help="""Run an SSH server in the Outpost through which hubs reach their servers.

        A hub logs in with its name as the user name and one of its keys
        (``ssh_authorized_keys``), and may then open local forwards (``ssh -L``)
        to the address of each of its running servers, and nowhere else. No
        shell, commands, sftp or remote forwarding. Default: off.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_ip = Unicode(
        "",
        help="""The address the SSH endpoint listens on. Default: all addresses.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_port = Integer(
        2222,
        help="""The TCP port the SSH endpoint listens on (0: a random free port).
        Default: 2222. The hubs' ``c.OutpostSpawner.ssh_port``.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_host_key_file = Unicode(
        help="""The endpoint's ed25519 host key (OpenSSH private key file).

        Generated once (mode 0600) when the file is missing, and never
        replaced: hubs trust the first key they see (``accept-new``) and refuse
        a changed one. Keep it across restarts and share it between processes.
        Default: ``jupyterhub_outpost_ssh_host_key`` beside the SQLite
        database, or in the working directory for other databases. Its
        fingerprint is logged at start.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    @default("ssh_host_key_file")
    def _ssh_host_key_file_default(self):
        return os.path.join(os.path.dirname(self.crypt_key_file), "jupyterhub_outpost_ssh_host_key")

    ssh_authorized_keys = Dict(
        key_trait=Unicode(),
        value_trait=Union([Unicode(), List(Unicode())]),
        help=f"""Per hub name, the public keys it may log in with.

        Each value holds lines in ``authorized_keys`` format (a text or a list
        of lines; options such as ``restrict`` are ignored). Default: the
        environment variable ``{SSH_AUTHORIZED_KEYS_ENV}`` (a JSON object of
        the same shape)::

            c.JupyterHubOutpost.ssh_authorized_keys = {{
                "hub-a": ["ssh-ed25519 AAAAC3Nza... hub-a"],
            }}

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    @default("ssh_authorized_keys")
    def _ssh_authorized_keys_default(self):
        return json_from_env(SSH_AUTHORIZED_KEYS_ENV)

    ssh_authorized_keys_files = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        help="""Per hub name, a file in ``authorized_keys`` format with more keys
        it may log in with (a mounted secret, for example). Read at start.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_login_grace_time = Float(
        30,
        help="""Seconds a connection has to log in before it is closed. Default: 30.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_max_unauthenticated = Integer(
        64,
        help="""Most connections that have not logged in yet, from all sources
        (as sshd's ``MaxStartups``); more are closed at once. Default: 64.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_max_unauthenticated_per_source = Integer(
        8,
        help="""Most connections that have not logged in yet from one address;
        more are closed at once. Default: 8.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_failed_login_delay = Float(
        1.0,
        help="""Seconds each refused login attempt waits before its answer, to
        slow down guessing. A connection is closed after 6 refusals. Default: 1.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_max_channels_per_connection = Integer(
        1024,
        help="""Most forwarded connections open at once over one hub connection;
        more are refused. Default: 1024.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_max_channels_per_hub = Integer(
        2048,
        help="""Most forwarded connections one hub may have open at once, over
        all its SSH connections; more are refused. Default: 2048.

        With ``ssh_channel_window``, this bounds the memory one hub can make
        the Outpost hold: each open forward buffers at most its window of data
        from the hub, and 0.5 MiB on its way to the hub (2048 forwards with
        the default window: at most 5 GiB, when every server stops reading).

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_channel_window = Integer(
        2 * 1024 * 1024,
        help="""Bytes a hub may send into one forward before the Outpost has
        passed them on to the server (the SSH channel window). Larger windows
        carry more over links with a long round trip; smaller ones bound the
        memory of many forwards (see ``ssh_max_channels_per_hub``).
        Default: 2 MiB, as OpenSSH's sshd.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    @validate("ssh_channel_window")
    def _ssh_channel_window_valid(self, proposal):
        if not 32 * 1024 <= proposal.value <= 2**31 - 1:
            raise TraitError("ssh_channel_window must lie between 32 KiB and 2 GiB")
        return proposal.value

    ssh_connect_timeout = Float(
        10,
        help="""Seconds to wait for a server to accept a forwarded connection.
        Default: 10.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    ssh_sweep_interval = Float(
        5,
        help="""Seconds between checks that close forwards to servers another
        Outpost process stopped (this process closes its own at once). Default: 5.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    # runtime state, not configuration
    db = None
    process_owner = ""
    hub_client = None
    server_manager = None
    http_server = None
    bound_port = None
    ssh_endpoint = None
    background = None
    metrics = None
    status_page = None

    policy = None

    @property
    def certs_dir(self):
        return os.path.abspath(self.internal_certs_location)

    def check_hub_credentials(self, name, password):
        """True if ``password`` is the configured password of hub ``name``"""
        expected = self.hub_credentials.get(name)
        if expected is None:
            hmac.compare_digest(password.encode(), b"\0" * 32)
            return False
        return hmac.compare_digest(password.encode(), expected.encode())

    def init_flavors(self):
        if self.flavor_config_file:
            with open(self.flavor_config_file) as f:
                settings = yaml.safe_load(f) or {}
            for key in ("flavors", "hubs", "users", "global_max_per_user", "default_flavor", "credits"):
                if key in settings:
                    setattr(self, key, settings[key])
            self.log.info("Flavor configuration read from %s", self.flavor_config_file)
        for settings in [*self.hub_housekeeping.values(), *self.hub_api.values(),
                         *self.ssh_recreate_forward.values()]:  # fmt: skip
            secrets.add(settings.get("token"))
        if self.flavors:
            self.log.info("Flavors: %s", ", ".join(flavors.sorted_names(self.flavors)))

    # initialization, in the order initialize() calls it

    def init_logging(self):
        self.log.propagate = False
        if self.enable_json_log:
            formatter = JSONLogFormatter()
        else:
            formatter = self._log_formatter_cls(fmt=self.log_format, datefmt=self.log_datefmt)
        for handler in self.log.handlers:
            handler.setFormatter(formatter)
        # traitlets keeps self.log at DEBUG and filters in the handlers. Give the
        # loggers the lowest level a handler writes, so that records nobody
        # writes (a debug access line per poll) are never built and scrubbed.
        level = min((h.level for h in self.log.handlers), default=self.log_level) or logging.DEBUG
        self.log.setLevel(level)
        for name in ("tornado", "alembic", "jupyterhub", "batchspawner", "kubespawner"):
            logger = logging.getLogger(name)
            logger.propagate = True
            logger.parent = self.log
            logger.setLevel(level)
        access_log.setLevel(level)
        install_scrubber()

    enable_json_log = Bool(
        False,
        help="""Write the log as one JSON object per line, for shipping to Loki,
        Elasticsearch and the like: ``time`` (UTC), ``level``, ``logger``,
        ``message``, and ``hub``, ``server`` and ``start_id`` on the lines about
        one server. Secrets are removed as from the text log. Default: False
        (the text format of ``log_format``).

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    @default("log_level")
    def _log_level_default(self):
        # a service says where it listens and what it chose (as JupyterHub does)
        return logging.INFO

    @default("log_format")
    def _log_format_default(self):
        return "%(color)s[%(levelname)1.1s %(asctime)s.%(msecs).03d %(name)s %(module)s:%(lineno)d]%(end_color)s %(message)s"

    @default("log_datefmt")
    def _log_datefmt_default(self):
        return "%Y-%m-%d %H:%M:%S"

    def init_secrets(self):
        bad = sorted(repr(name) for name in self.hub_credentials if not is_valid_hub_name(name))
        if bad:
            self.log.critical(
                "Hub names must be 1 to 128 letters, digits or '_.@+-', beginning with a "
                "letter, digit or '_' (they name folders); not allowed: %s",
                ", ".join(bad),
            )
            self.exit(1)
        for password in self.hub_credentials.values():
            secrets.add(password)
        if not self.hub_credentials:
            self.log.warning(
                "No hub credentials configured: every request will be refused. "
                "Set c.JupyterHubOutpost.hub_credentials or %s.",
                HUB_CREDENTIALS_ENV,
            )
        keys = list(self.crypt_keys)
        if not keys:
            key, created = crypto.load_or_create_key_file(self.crypt_key_file)
            self.log.log(
                logging.WARNING if created else logging.INFO,
                "%s the encryption key in %s (set %s to manage keys yourself)",
                "Generated" if created else "Using",
                self.crypt_key_file,
                crypto.KEY_ENV,
            )
            keys = [key.decode()]
        for key in keys:
            secrets.add(key)
        try:
            self.crypt = crypto.CryptKeeper(keys)
        except ValueError as e:
            self.log.critical("Cannot use the keys of crypt_keys or %s (%s)", crypto.KEY_ENV, e)
            self.exit(1)

    def init_db(self):
        self.log.info("Database: %s", _safe_db_url(self.db_url))
        try:
            dbutil.prepare_database(self.db_url, self.log)
        except dbutil.DatabaseSchemaMismatch as e:
            self.log.critical("%s", e)
            self.exit(1)
        self.db = orm.Database(
            self.db_url,
            self.crypt,
            workers=self.db_workers or None,
            read_workers=self.db_read_workers or None,
        )

    def init_policy(self):
        self.policy = OutpostPolicy.from_app(self)
        if self.min_account_uid <= 0 and not self.denied_accounts:
            self.log.warning("Servers may run as any account, including root")
        if "*" in self.allowed_overrides:
            self.log.warning("Hubs may override every trait of %s", self.spawner_class.__name__)

    def init_servers(self):
        self.hub_client = HubClient(parent=self)
        self.process_owner = f"{self.instance_name}-{uuid.uuid4().hex[:8]}"
        self.db.owner = self.process_owner
        self.server_manager = ServerManager(self, policy=self.policy)
        self.log.info("Spawner: %s.%s", self.spawner_class.__module__, self.spawner_class.__name__)

    def init_gc(self):
        self.collector = CollectorPolicy(parent=self)
        self.server_manager.collector = self.collector

    def init_metrics(self):
        metrics = OutpostMetrics(self)
        if not metrics.enabled:
            return
        self.metrics = metrics
        self.db.observer = metrics.db_call
        self.hub_client.on_failure = metrics.callback_failed
        if metrics.authenticate and not metrics.token and not metrics.open_networks:
            self.log.info(
                "Metrics at %s need c.OutpostMetrics.token (or OUTPOST_METRICS_TOKEN) to be read",
                url_path_join(self.base_url, "metrics"),
            )

    def init_status_page(self):
        self.status_page = StatusPage(self)
        if not self.status_page.enabled:
            self.log.info(
                "The status page at %s needs c.StatusPage.operator_credentials (or %s)",
                self.base_url, "OUTPOST_OPERATOR_CREDENTIALS",
            )

    def init_ssh(self):
        if not self.enable_ssh:
            return
        # paramiko is loaded only where the endpoint runs
        from paramiko import SSHException

        from .ssh import SSHEndpoint

        # paramiko logs every stranger's failed handshake with a traceback;
        # the endpoint logs what matters itself
        paramiko_log = logging.getLogger("paramiko")
        paramiko_log.parent, paramiko_log.propagate = self.log, True
        paramiko_log.setLevel(logging.DEBUG if self.log_level <= logging.DEBUG else logging.CRITICAL)
        keys = {}
        for hub in sorted(set(self.ssh_authorized_keys) | set(self.ssh_authorized_keys_files)):
            keys[hub] = self._read_ssh_keys(hub)
            if hub not in self.hub_credentials:
                self.log.warning("SSH keys for hub %s, which has no credential: ignored", hub)
                del keys[hub]
        if not any(keys.values()):
            self.log.warning("SSH endpoint enabled, but no hub has a key in ssh_authorized_keys")
        self.ssh_endpoint = SSHEndpoint(self, keys)
        try:
            self.ssh_endpoint.load_host_key()
        except (OSError, ValueError, SSHException) as e:
            self.log.critical("Cannot use the SSH host key %s: %s", self.ssh_host_key_file, e)
            self.exit(1)
        self.server_manager.forget_callbacks.append(self.ssh_endpoint.server_forgotten)

    def _read_ssh_keys(self, hub):
        """The key blobs of one hub, from the config and its file"""
        from .ssh import parse_authorized_keys

        value = self.ssh_authorized_keys.get(hub, "")
        texts = [value] if isinstance(value, str) else list(value)
        sources = ["ssh_authorized_keys"] * len(texts)
        path = self.ssh_authorized_keys_files.get(hub)
        if path:
            try:
                with open(path) as f:
                    texts.append(f.read())
            except OSError as e:
                self.log.critical("Cannot read the SSH keys of hub %s: %s", hub, e)
                self.exit(1)
            sources.append(path)
        blobs = set()
        for text, source in zip(texts, sources):
            found, errors = parse_authorized_keys(text)
            if errors:
                self.log.warning("SSH keys of hub %s in %s: no key on line(s) %s", hub, source, errors)
            blobs |= found
        return blobs

    def init_tornado_application(self):
        handlers = [(url_path_join(self.base_url, pattern), cls) for pattern, cls in default_handlers]
        self.tornado_application = web.Application(
            handlers,
            default_handler_class=NotFoundAPIHandler,
            log_function=log_request,
            outpost=self,
            server_manager=self.server_manager,
            policy=self.policy,
            log=self.log,
            openapi=load_spec(),
            # signs the cookies of the hub admins' sign-in (/hub-status/<hub>/)
            cookie_secret=self.crypt.derived_secret("cookies"),
        )

    @catch_config_error
    def initialize(self, argv=None):
        super().initialize(argv)
        if self.subapp:
            return
        if self.generate_config:
            return
        self.load_config_file(self.config_file)
        self.init_logging()
        if self.config_file and not os.path.exists(self.config_file):
            self.log.info("No config file %s: running on the defaults", self.config_file)
        elif self.config_file:
            self.log.info("Loaded config file %s", os.path.abspath(self.config_file))
        self.init_secrets()
        self.init_flavors()
        self.init_db()
        self.init_policy()
        self.init_servers()
        self.init_gc()
        self.init_metrics()
        self.init_status_page()
        self.init_ssh()
        self.init_tornado_application()

    def load_config_file(self, filename, path=None):
        if filename and os.path.exists(filename):
            super().load_config_file(filename, path=path)

    def write_config_file(self):
        if os.path.exists(self.config_file) and not self.answer_yes:
            print(f"{self.config_file} exists; not overwriting it (-y overwrites).", file=sys.stderr)
            self.exit(1)
        text = self.generate_config_file()
        with open(self.config_file, "w") as f:
            f.write(text)
        print(f"Wrote configuration to {self.config_file}")

    def generate_config_file(self, classes=None):
        """The commented configuration file, with the computed defaults of
        the Outpost's own settings written as they are computed"""
        from functools import lru_cache

        text = super().generate_config_file(classes)
        fresh = lru_cache(maxsize=None)(lambda cls: cls())
        return configfile.generated(
            text,
            {
                JupyterHubOutpost: lambda: fresh(JupyterHubOutpost),
                HubClient: lambda: fresh(HubClient),
                CollectorPolicy: lambda: fresh(CollectorPolicy),
                OutpostMetrics: lambda: None,  # its computed default comes from the environment
                StatusPage: lambda: None,  # so do its own
            },
        )

    # running

    async def start(self):
        """Listen and begin background work; returns once the port is open"""
        self.background = BackgroundWork(self)
        # before the port opens: the records of this process' starts name it
        await self.background.register_process()
        self.http_server = HTTPServer(
            self.tornado_application,
            # the handlers answer bodies over max_body_size with 413 after
            # reading and dropping them; at Tornado's own limit the client
            # would see its connection reset instead
            max_body_size=sys.maxsize,
            idle_connection_timeout=self.idle_connection_timeout,
            body_timeout=self.body_timeout,
        )
        sockets = bind_sockets(self.port, address=self.ip or None)
        self.http_server.add_sockets(sockets)
        self.bound_port = sockets[0].getsockname()[1]
        self.log.info(
            "jupyterhub-outpost %s listening on http://%s:%i%s",
            __version__, self.ip or "*", self.bound_port, self.base_url,
        )  # fmt: skip
        if self.ssh_endpoint is not None:
            self.ssh_endpoint.start()
        self._stopped = asyncio.Event()
        self.background.start()
        if self.metrics is not None:
            self.metrics.start()
        # what exists now lives as long as the process: out of the full
        # collections' way (each scanned ~100,000 objects before a single
        # server ran), and so, periodically, are the running servers
        self.collector.start()

    async def launch(self):
        """Run until SIGTERM or SIGINT (the console script's main loop)"""
        if self.subapp:
            started = self.subapp.start()
            if asyncio.iscoroutine(started):  # the commands that read the database
                await started
            return
        if self.generate_config:
            self.write_config_file()
            return
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        await self._stopped.wait()
        await self.shutdown()

    async def shutdown(self):
        """Stop listening, cancel starts in flight; running servers keep running"""
        self.log.info("Shutting down; running servers keep running")
        await self.background.stop()
        await self.collector.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        if self.http_server is not None:
            self.http_server.stop()
        if self.ssh_endpoint is not None:
            await self.ssh_endpoint.stop()
        await self.server_manager.shutdown()
        await asyncio.get_running_loop().run_in_executor(None, self.db.close)

    def stop(self):
        """Ask a running Outpost to shut down (thread-safe for the loop's thread)"""
        self._stopped.set()

    @classmethod
    def launch_instance(cls, argv=None, **kwargs):
        self = cls.instance(**kwargs)
        # initialization is synchronous and may exit (bad config, schema
        # mismatch): do it before the event loop runs
        self.initialize(argv)
        asyncio.run(self.launch())


def _safe_db_url(url):
    """The database URL without its password"""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable URL)"


main = JupyterHubOutpost.launch_instance

if __name__ == "__main__":
    main()
