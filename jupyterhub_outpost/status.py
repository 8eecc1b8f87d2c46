"""The operators' status page: who may see it, and what it shows.

``GET /`` (under ``base_url``) shows per hub the running and pending
servers, flavor usage against limits, starts and failures of the last hour,
the most recent failed starts with their reasons, and this process' role.
It changes nothing. Operators sign in with credentials of their own (HTTP
Basic from ``operator_credentials``, or ``Authorization: Bearer`` with
``operator_token``), never a hub's.
"""

import hmac
import os
import time
from datetime import timedelta

from traitlets import Dict, Integer, Unicode, default
from traitlets.config import LoggingConfigurable

from . import flavors
from ._version import __version__
from .log import secrets
from .utils import json_from_env, utcnow

OPERATOR_CREDENTIALS_ENV = "OUTPOST_OPERATOR_CREDENTIALS"
OPERATOR_TOKEN_ENV = "OUTPOST_OPERATOR_TOKEN"


class StatusPage(LoggingConfigurable):
    """Who may read the status page, and how much it shows"""

    operator_credentials = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        help=f"""Operator name to password: HTTP Basic credentials that open the
        status page (not a hub's: a hub's credential is refused there).
        Default: the JSON object in ``{OPERATOR_CREDENTIALS_ENV}``; without
        it and without ``operator_token`` the page answers 401 to everyone.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    @default("operator_credentials")
    def _operator_credentials_default(self):
        return json_from_env(OPERATOR_CREDENTIALS_ENV)

    operator_token = Unicode(
        help=f"""A token that opens the status page as ``Authorization: Bearer
        <token>`` (for a monitoring probe). Default: ``{OPERATOR_TOKEN_ENV}``.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    @default("operator_token")
    def _operator_token_default(self):
        return os.environ.get(OPERATOR_TOKEN_ENV, "")

    recent_failures = Integer(
        20,
        help="""How many of the most recent failed starts the page lists.
        Default: 20.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    refresh_seconds = Integer(
        30,
        help="""Seconds after which the page reloads itself (0: never). Default: 30.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    def __init__(self, app, **kwargs):
        super().__init__(parent=app, **kwargs)
        self.app = app
        # hub name -> its HubOAuth for the hub admins' sign-in, or None (handlers/hubstatus.py)
        self.hub_oauth = {}
        for password in self.operator_credentials.values():
            secrets.add(password)
        secrets.add(self.operator_token)

    @property
    def enabled(self):
        return bool(self.operator_credentials or self.operator_token)

    def allows(self, name, password, token):
        """Whether Basic ``name``/``password`` or a bearer ``token`` is an operator's"""
        if token is not None:
            return bool(self.operator_token) and hmac.compare_digest(
                token.encode(), self.operator_token.encode()
            )
        expected = self.operator_credentials.get(name or "")
        if expected is None:
            hmac.compare_digest((password or "").encode(), b"\0" * 32)
            return False
        return hmac.compare_digest((password or "").encode(), expected.encode())

    async def model(self, hub=None):
        """What the page shows, read now (of one hub only, for its admins)"""
        app = self.app
        began = time.perf_counter()
        try:
            summary = await app.db.server_summary()
            history = app.server_manager.history
            last_hour = await history.counts_since(utcnow() - timedelta(hours=1))
            failures = await history.of_hubs(hub=hub, outcome="failed", limit=self.recent_failures)
            database = {"reachable": True, "seconds": time.perf_counter() - began, "error": ""}
        except Exception as e:
            summary, last_hour, failures = {}, {}, []
            database = {"reachable": False, "seconds": time.perf_counter() - began,
                        "error": secrets.scrub(str(e))[:300]}  # fmt: skip
        hub_names = sorted(set(app.hub_credentials) | {name for name, _, _ in summary})
        if hub is not None:
            hub_names = [hub]
        counts = {}
        for (_hub, flavor, state), count in summary.items():
            if state != "stopping":
                counts[flavor] = counts.get(flavor, 0) + count
        hubs = []
        for one in hub_names:
            states = {"pending": 0, "running": 0, "stopping": 0}
            for (name, _flavor, state), count in summary.items():
                if name == one:
                    states[state] += count
            allowed = app.policy.hub_flavors(one) if app.flavors else {}
            usage = flavors.usage_model(allowed, counts) if allowed else {}
            hubs.append({
                "name": one, **states,
                "flavors": [dict(entry, name=name) for name, entry in usage.items()],
                "starts": sum(c for (h, _), c in last_hour.items() if h == one),
                "failures": sum(c for (h, o), c in last_hour.items() if h == one and o == "failed"),
            })  # fmt: skip
        background = app.background
        return {
            "version": __version__,
            # a hub's admins see their hub, not the Outpost's processes
            "process": app.process_owner if hub is None else "",
            "lease": bool(background is not None and background.holds_lease),
            "database": database,
            "spawner": f"{app.spawner_class.__module__}.{app.spawner_class.__name__}",
            "hubs": hubs,
            "failures": failures,
            "refresh": self.refresh_seconds,
            "now": utcnow().strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
