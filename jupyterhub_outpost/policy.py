"""Policy: what a hub may make the Outpost do for one start.

Which flavor a start uses, which of the hub's spawner overrides and
environment keys are accepted, and which local account a hub user's server
runs as. The application holds the settings (traits of
:class:`~jupyterhub_outpost.app.JupyterHubOutpost`) and builds one
:class:`OutpostPolicy`; :class:`~jupyterhub_outpost.servers.ServerManager`
and the flavor handlers ask it. The module-level functions are pure (no
I/O) and decide; the class gathers their inputs (hooks, database counts,
the account database) and raises the errors.
"""

from dataclasses import dataclass

from jupyterhub.utils import maybe_future
from traitlets import Float, Integer, TraitError

from . import credits, flavors
from .accounts import AccountLookups
from .errors import AccountRefusedError, OverrideRefusedError
from .utils import ACCOUNT_NAME_RE, HUB_NAME_RE, utcnow

# how long an account's uid (or its absence) is taken as known, and for how many accounts
ACCOUNT_LOOKUP_SECONDS = 10
ACCOUNT_LOOKUPS_KEPT = 10000

# Spawner attributes a start request may never set: they connect the
# Spawner to the Outpost, or carry credentials. Overrides of them are
# ignored, as are overrides of names that are no traits of the Spawner.
PROTECTED_TRAITS = frozenset(
    {
        "user", "hub", "orm_spawner", "db", "config", "parent", "log",
        "authenticator", "api_token", "oauth_client_id", "cert_paths",
        "internal_trust_bundles", "internal_certs_location", "handler",
        "user_options", "server", "proxy_spec", "oauth_roles",
    }
)  # fmt: skip

# What the OutpostSpawner itself sends in ``misc``: accepted by default.
DEFAULT_OVERRIDES = frozenset(
    {
        "ip", "port", "internal_ssl", "services_enabled", "extra_labels",
        "pod_name_template", "dns_name_template",
    }
)  # fmt: skip

# Environment keys that decide which program runs, what it loads, or as
# whom it thinks it runs: refused in a hub's ``env`` unless allowed.
PROGRAM_ENV_KEYS = frozenset(
    {
        "PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
        "PYTHONINSPECT", "PYTHONEXECUTABLE", "PYTHONPLATLIBDIR", "PYTHONSAFEPATH",
        "PYTHONNOUSERSITE", "BASH_ENV", "ENV", "SHELL", "SHELLOPTS", "IFS",
        "HOME", "USER", "LOGNAME", "GLIBC_TUNABLES", "GCONV_PATH", "LOCPATH",
        "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF", "TMPDIR",
        "PERL5LIB", "PERL5OPT", "PERLLIB", "RUBYLIB", "RUBYOPT",
        "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS", "CLASSPATH", "R_PROFILE", "R_PROFILE_USER",
        "R_ENVIRON", "R_ENVIRON_USER", "R_LIBS", "R_LIBS_USER",
        "JUPYTER_PATH", "JUPYTER_CONFIG_DIR", "JUPYTER_CONFIG_PATH",
        "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_PREFER_ENV_PATH",
        "IPYTHONDIR",
        "CONDA_PREFIX", "VIRTUAL_ENV", "SSL_CERT_FILE", "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    }
)  # fmt: skip
PROGRAM_ENV_PREFIXES = ("LD_", "DYLD_", "BASH_FUNC_", "MALLOC_")


def is_valid_hub_name(name):
    """True if a hub name (a credential's user name) is safe as a path segment"""
    return isinstance(name, str) and HUB_NAME_RE.match(name) is not None


def refused_env_keys(env, allowed=()):
    """The keys of a hub's ``env`` that would change what runs (sorted)"""
    if "*" in allowed:
        return []
    return sorted(
        key
        for key in env
        if (key in PROGRAM_ENV_KEYS or key.startswith(PROGRAM_ENV_PREFIXES))
        and key not in allowed
    )


def override_allowed(key, allowed=()):
    """True if the trait ``key`` of the Spawner may be set by a start's ``misc``"""
    if key in PROTECTED_TRAITS or key.startswith("_"):
        return False
    return key in DEFAULT_OVERRIDES or key in allowed or "*" in allowed


def override_value_problem(key, trait, value):
    """Why ``value`` does not fit the trait ``key`` (text), or None.

    Checked before anything is recorded; the trait checks again when set.
    """
    if isinstance(value, bool) and isinstance(trait, (Integer, Float)):
        return f"expected a number, not {value!r}"
    if key == "port" or key.endswith("_port"):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            return f"a port is an integer from 0 to 65535, not {value!r}"
    if value is None and trait.allow_none:
        return None
    try:
        trait.validate(None, value)
    except TraitError as e:
        return str(e)
    except Exception:
        # the trait's check needs a Spawner: it runs when the value is set
        return None
    return None


def select_overrides(traits, misc, allowed=()):
    """Split a start's ``misc`` into (overrides to apply, ignored keys, refused keys).

    ``traits``: the Spawner class's traits by name. Keys that are no trait
    and protected ones are ignored; traits not allowed are refused.
    Raises :class:`OverrideRefusedError` for a value that does not fit.
    """
    apply, ignored, refused = {}, [], []
    for key, value in misc.items():
        trait = traits.get(key)
        if trait is None or key in PROTECTED_TRAITS or key.startswith("_"):
            ignored.append(key)
        elif not override_allowed(key, allowed):
            refused.append(key)
        else:
            problem = override_value_problem(key, trait, value)
            if problem:
                raise OverrideRefusedError(f"Invalid value for {key}: {problem}")
            apply[key] = value
    return apply, sorted(ignored), sorted(refused)


def account_template_for(template, hub):
    """The account-name template that applies to hub ``hub``"""
    if isinstance(template, dict):
        return template.get(hub, template.get("*", "{username}"))
    return template or "{username}"


def account_refusal(account, uid, min_uid, denied=()):
    """Why ``account`` (uid ``uid``, None if it does not exist) may not run servers, or None"""
    if not ACCOUNT_NAME_RE.match(account or ""):
        return f"The account name {account!r} is not allowed (letters, digits, '_.@+-')"
    if account in denied:
        return f"The account {account!r} may not run servers on this system"
    if uid is not None and uid < min_uid:
        return f"The account {account!r} is a system account and may not run servers"
    return None


@dataclass
class StartPlan:
    """What a start may do: the overrides to apply and the account to run as"""

    overrides: dict
    account: str


class OutpostPolicy:
    """The decisions about starts, configured by the application.

    Parameters:
        db: the :class:`~jupyterhub_outpost.orm.Database` (flavor usage counts)
        spawner_class: the configured Spawner class (its traits decide which
            overrides exist)
        log: the logger
        settings: the application's policy traits by name (``flavors``,
            ``hubs``, ``users``, ``global_max_per_user``, ``default_flavor``, ``credits``,
            ``update_user_authentication``, ``send_events``, ``allow_override``,
            ``allowed_overrides``, ``allowed_env_keys``, ``account_name_template``,
            ``account_name_hook``, ``min_account_uid``, ``denied_accounts``)
    """

    SETTINGS = (
        "flavors", "hubs", "users", "global_max_per_user", "default_flavor", "credits",
        "update_user_authentication", "send_events", "allow_override",
        "allowed_overrides", "allowed_env_keys", "account_name_template",
        "account_name_hook", "min_account_uid", "denied_accounts",
    )  # fmt: skip

    def __init__(self, db, spawner_class, log, **settings):
        unknown = set(settings) - set(self.SETTINGS)
        if unknown:
            raise TypeError(f"Unknown policy settings: {', '.join(sorted(unknown))}")
        self.db = db
        self.spawner_class = spawner_class
        self.log = log
        for name in self.SETTINGS:
            setattr(self, name, settings.get(name))
        self.allowed_overrides = frozenset(self.allowed_overrides or ())
        self.allowed_env_keys = frozenset(self.allowed_env_keys or ())
        self.denied_accounts = frozenset(self.denied_accounts or ())
        self.min_account_uid = self.min_account_uid or 0
        self.accounts = AccountLookups(ACCOUNT_LOOKUP_SECONDS, ACCOUNT_LOOKUPS_KEPT)
        self._class_traits = None

    @classmethod
    def from_app(cls, app):
        """The policy of a configured application"""
        settings = {name: getattr(app, name) for name in cls.SETTINGS}
        return cls(app.db, app.spawner_class, app.log, **settings)

    def events_enabled(self, hub):
        """Whether progress events are posted to hub ``hub``"""
        if callable(self.send_events):
            return bool(self.send_events(hub))
        return bool(self.send_events)

    # starts

    async def check_start(self, hub, request):
        """Decide what a start may do before anything is recorded or runs.

        Returns a :class:`StartPlan`; raises :class:`OverrideRefusedError`
        (refused ``env`` keys or overrides) or :class:`AccountRefusedError`.
        """
        overrides = self.check_request(hub, request)
        return await self.plan_start(hub, request, overrides)

    def check_request(self, hub, request):
        """The checks of :meth:`check_start` that ask no hook and no account
        database: refused ``env`` keys and overrides. Returns the overrides
        to apply."""
        env = request.get("env") or {}
        refused = refused_env_keys(env, self.allowed_env_keys)
        if refused:
            raise OverrideRefusedError(
                "The Outpost does not accept these environment variables: " + ", ".join(refused)
            )
        misc = request.get("misc") or {}
        if self._class_traits is None:  # a class's traits stay; reading them is slow
            self._class_traits = self.spawner_class.class_traits()
        overrides, ignored, refused = select_overrides(self._class_traits, misc, self.allowed_overrides)
        if refused:
            raise OverrideRefusedError(
                "The Outpost refused the requested configuration overrides: " + ", ".join(refused)
            )
        if ignored:
            self.log.debug("%s/%s/%s - ignoring overrides: %s", hub, request.get("name"),
                           request.get("start_id"), ", ".join(ignored))  # fmt: skip
        return overrides

    async def plan_start(self, hub, request, overrides):
        """The rest of :meth:`check_start`: the override hook and the account"""
        await self._ask_override_hook(hub, request.get("misc") or {})
        account = await self.account_for(hub, (request.get("env") or {}).get("JUPYTERHUB_USER", ""))
        return StartPlan(overrides=overrides, account=account)

    async def _ask_override_hook(self, hub, misc):
        if not misc or self.allow_override is None:
            return
        if not await maybe_future(self.allow_override(hub, misc)):
            raise OverrideRefusedError(
                "The Outpost refused the requested configuration overrides: "
                + ", ".join(sorted(misc))
            )

    async def account_for(self, hub, user_name):
        """The local account a server of hub user ``user_name`` runs as.

        Raises :class:`AccountRefusedError` for a name that is not allowed,
        in the deny list, or an existing account below ``min_account_uid``.
        An account that does not exist is not refused here.
        """
        if self.account_name_hook is not None:
            account = await maybe_future(self.account_name_hook(hub, user_name))
        else:
            template = account_template_for(self.account_name_template, hub)
            account = template.format(hub=hub, username=user_name)
        if not isinstance(account, str):
            raise AccountRefusedError(f"No account for user {user_name!r}")
        uid = None
        if self.min_account_uid > 0 and ACCOUNT_NAME_RE.match(account):
            uid = await self.accounts.uid(account)
        reason = account_refusal(account, uid, self.min_account_uid, self.denied_accounts)
        if reason:
            raise AccountRefusedError(reason)
        return account

    # flavors

    def hub_flavors(self, hub):
        """The flavor definitions hub ``hub`` may use"""
        names = flavors.hub_flavor_names(self.flavors, self.hubs, hub)
        return {name: self.flavors[name] for name in names}

    async def flavor_usage(self, hub):
        """This hub's flavors with limits and usage ({} without flavors)"""
        if not self.flavors:
            return {}
        return flavors.usage_model(self.hub_flavors(hub), await self.db.flavor_counts())

    async def user_flavor_decision(self, hub, authentication):
        """The :class:`~jupyterhub_outpost.flavors.FlavorDecision` for one user"""
        if self.update_user_authentication is not None:
            authentication = await maybe_future(
                self.update_user_authentication(dict(authentication or {}))
            )
        return flavors.decide(self.flavors, self.hubs, self.users, hub, authentication or {})

    async def user_flavors(self, hub, authentication):
        """One user's flavors with limits and usage"""
        decision = await self.user_flavor_decision(hub, authentication)
        if decision.forbidden or not self.flavors:
            return {}
        return flavors.usage_model(decision.allowed, await self.db.flavor_counts())

    # credits

    def hub_credits(self, hub):
        """The credits hub ``hub`` may use ({} without credits)"""
        return credits.hub_credits(self.credits, hub)

    async def user_credits(self, hub, authentication):
        """The credits one user of hub ``hub`` may use"""
        if self.update_user_authentication is not None:
            authentication = await maybe_future(
                self.update_user_authentication(dict(authentication or {}))
            )
        return credits.user_credits(self.credits, hub, authentication or {})

    async def flavor_for_start(self, hub, request):
        """Check a start's flavor before anything runs.

        Returns ``(name, definition, check_limits, end_date)``; all None
        without flavors. ``check_limits(current, user_current, user_total)``
        raises :class:`~jupyterhub_outpost.flavors.FlavorError` when a limit
        is reached; the database calls it where it counts.
        """
        if not self.flavors:
            return None, None, None, None
        decision = await self.user_flavor_decision(hub, request.get("authentication"))
        name, flavor = flavors.check_start(
            request.get("flavor"), self.flavors, decision, self.default_flavor
        )
        global_max = self.global_max_per_user

        def check_limits(current, user_current, user_total):
            message = flavors.limit_error(name, flavor, current, user_current, user_total, global_max)
            if message:
                raise flavors.FlavorError(message)

        runtime = flavors.runtime_delta(flavor)
        end_date = utcnow() + runtime if runtime else None
        return name, flavor, check_limits, end_date
