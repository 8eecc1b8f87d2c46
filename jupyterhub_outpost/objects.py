"""Stand-ins for what a Spawner expects from a JupyterHub.

A Spawner is written to run inside JupyterHub: it reads ``self.user``,
``self.hub``, ``self.server`` (through ``self.orm_spawner``) and may call
``self.db.commit()``. The Outpost builds these from the hub's start request
(mostly the ``JUPYTERHUB_*`` environment the hub sent) so that any Spawner
runs here unchanged.
"""

import asyncio
from urllib.parse import urlparse

from jupyterhub import orm as hub_orm
from jupyterhub.utils import url_escape_path

from .utils import url_path_join


class OutpostHub:
    """What a Spawner reads of ``self.hub``: API and base URLs"""

    # the env keys it is built from
    ENV_KEYS = ("JUPYTERHUB_API_URL", "JUPYTERHUB_BASE_URL", "JUPYTERHUB_HOST")

    def __init__(self, env):
        self.api_url = env.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")
        base = env.get("JUPYTERHUB_BASE_URL") or "/"
        self.base_url = url_path_join(base, "hub/")
        parsed = urlparse(self.api_url)
        self.public_host = env.get("JUPYTERHUB_HOST", "")
        self.host = f"{parsed.scheme}://{parsed.netloc}" if parsed.netloc else ""
        self.url = url_path_join(self.host or "/", self.base_url)
        self.ip = parsed.hostname or ""
        self.port = parsed.port or 0


class OutpostUser:
    """What a Spawner reads of ``self.user``: name, id, URLs, auth state.

    Auth state arrives as ``auth-state-<key>`` headers with a start and is
    never stored; after a restart it is empty.
    """

    def __init__(self, name, user_id, hub, auth_state=None):
        self.name = name
        self.id = user_id
        self.escaped_name = url_escape_path(name)
        self.hub = hub
        self.url = url_path_join(hub.base_url[: -len("hub/")] or "/", "user", self.escaped_name, "/")
        self.groups = []
        self.settings = {}
        self._auth_state = dict(auth_state or {})

    async def get_auth_state(self):
        return dict(self._auth_state)

    def progress_url(self, server_name=""):
        return url_path_join(
            self.hub.base_url, "api/users", self.escaped_name, "server/progress"
        )

    def __repr__(self):
        return f"<OutpostUser {self.name} ({self.id})>"


class OutpostORMSpawner:
    """What a Spawner reads of ``self.orm_spawner``.

    ``server`` is a transient (never stored) JupyterHub ``orm.Server``, so that
    ``Spawner.server.base_url`` is the prefix the hub gave the server. It is
    built when first read after :meth:`spawner_built`; :meth:`release_server`
    drops it (with the Spawner's wrapper of it) while the server runs and
    nothing reads it.
    """

    def __init__(self, name, user_options, service_prefix, ip="", port=0):
        self.name = name
        self.display_name = name
        self.user_options = user_options
        self.state = None
        self.started = None
        self.last_activity = None
        self._server_values = {
            "proto": "http",
            "ip": ip,
            "port": port,
            "base_url": service_prefix or "/",
            "cookie_name": "",
        }
        self._server = None
        self._built = False

    @property
    def server(self):
        if self._server is None:
            if not self._built:
                return None
            self._server = hub_orm.Server(**self._server_values)
        return self._server

    def spawner_built(self):
        """The Spawner holding this exists: ``server`` is there from now on.

        Before, it is None, as in JupyterHub, where a Spawner is built before
        its server. So the Spawner's constructor does not build the ORM
        object and the wrapper of it that nothing may read (a sixth of a
        Spawner's construction).
        """
        self._built = True

    def release_server(self, spawner):
        """Forget the ``orm.Server`` and ``spawner``'s wrapper of it, keeping
        their values; the next read of ``spawner.server`` rebuilds both.

        Together they take about a third of an idle Spawner's memory.
        """
        if self._server is not None:
            server = self._server
            self._server_values = {key: getattr(server, key) for key in self._server_values}
            self._server = None
        # Spawner.server rebuilds its wrapper whenever it is missing or wraps
        # another orm.Server than orm_spawner.server
        spawner._server = None

class OutpostDB:
    """What a Spawner may call of ``self.db``.

    Spawners such as batchspawner call ``self.db.commit()`` as soon as they
    have something worth keeping (a job id). Here that stores the spawner's
    state at once, so that a crash right after leaves a stoppable record.
    """

    def __init__(self, on_commit=None):
        self._on_commit = on_commit
        self._pending = None

    def commit(self):
        if self._on_commit is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._pending = loop.create_task(self._on_commit())

    def rollback(self):
        pass

    def close(self):
        pass

    async def flush_pending(self):
        """Wait for a state write that ``commit()`` scheduled, if any"""
        if self._pending is not None:
            task, self._pending = self._pending, None
            await task
