"""The servers of one hub: start, list, poll, stop (``/services``)."""

from tornado import web

from ..utils import BUNDLE_NAME_RE, SERVER_NAME_RE, START_ID_RE, USER_NAME_RE
from .base import OutpostAPIHandler

_LIMITS = {"env": 4096, "user_options": 1024, "misc": 1024}


def _bad(message):
    return web.HTTPError(400, message)


def _check_string_map(body, key):
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _bad(f"'{key}' must be an object of strings")
    return value


def _check_object(body, key):
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"'{key}' must be a JSON object")
    if len(value) > _LIMITS.get(key, 1024):
        raise _bad(f"'{key}' has too many entries")
    return value


def check_name(name):
    if not isinstance(name, str) or not SERVER_NAME_RE.match(name):
        raise _bad(
            "'name' must be a string of at most 255 letters, digits or '_.@+-'"
        )
    return name


def check_start_id(start_id):
    # bool is an int to Python; true is no start id
    if isinstance(start_id, bool) or not isinstance(start_id, (str, int)) or not START_ID_RE.match(str(start_id)):
        raise _bad(
            "'start_id' must be 1 to 128 letters, digits or '_.@+-'"
        )
    return str(start_id)


def check_user_name(env):
    """``JUPYTERHUB_USER`` names folders and reaches log lines: safe characters only"""
    user = env.get("JUPYTERHUB_USER")
    if user is not None and not USER_NAME_RE.match(user):
        raise _bad(
            "'env.JUPYTERHUB_USER' must be 1 to 128 letters, digits or '_.@+-', "
            "beginning with a letter, digit or '_'"
        )


def check_trust_bundles(bundles):
    """Bundle names become file names: safe characters only"""
    for name in bundles:
        if not BUNDLE_NAME_RE.match(name):
            raise _bad(
                "'internal_trust_bundles' names must be 1 to 64 letters, digits or '_.-', "
                "beginning with a letter, digit or '_'"
            )
    return bundles


def parse_start_request(body):
    """Validate a start body; return the parts ServerManager.start takes"""
    if "name" not in body:
        raise _bad("'name' is missing")
    env = _check_string_map(body, "env")
    if len(env) > _LIMITS["env"]:
        raise _bad("'env' has too many entries")
    check_user_name(env)
    user_options = _check_object(body, "user_options")
    if "start_id" not in user_options:
        raise _bad("'user_options.start_id' is missing")
    flavor = user_options.get("flavor")
    if flavor is not None and (not isinstance(flavor, str) or not flavor.isprintable()):
        raise _bad("'user_options.flavor' must be a string of printable characters")
    authentication = _check_object(body, "authentication")
    return {
        "request": {
            "name": check_name(body["name"]),
            "start_id": check_start_id(user_options["start_id"]),
            "env": env,
            "user_options": user_options,
            "misc": _check_object(body, "misc"),
            "flavor": flavor,
            "authentication": authentication,
        },
        **check_certs(
            _check_string_map(body, "certs"),
            check_trust_bundles(_check_string_map(body, "internal_trust_bundles")),
        ),
    }


def check_certs(certs, trust_bundles):
    """``internal_ssl`` certificates come complete: key, certificate and a CA
    (``cafile``, or the ``notebooks-ca`` bundle), or not at all"""
    if certs:
        missing = [key for key in ("keyfile", "certfile") if not certs.get(key)]
        if not certs.get("cafile") and not trust_bundles.get("notebooks-ca"):
            missing.append("cafile")
        if missing:
            raise _bad(f"'certs' lacks {', '.join(missing)}")
    return {"certs": certs, "trust_bundles": trust_bundles}


class ServicesAPIHandler(OutpostAPIHandler):
    """``GET /services``: list; ``POST /services``: start"""

    async def get(self):
        self.write_json(await self.servers.list(self.current_hub))

    async def post(self):
        parsed = parse_start_request(self.get_json_body())
        run_async = self.is_async()
        answer = await self.servers.start(
            self.current_hub,
            parsed["request"],
            certs=parsed["certs"],
            trust_bundles=parsed["trust_bundles"],
            auth_state=self.auth_state(),
            run_async=run_async,
        )
        self.write_json(answer, status=202 if run_async else 200)

    def auth_state(self):
        """``auth-state-<key>`` headers as a dict (used for this start only)"""
        prefix = "auth-state-"
        return {
            name[len(prefix) :]: value
            for name, value in self.request.headers.get_all()
            if name.lower().startswith(prefix)
        }


class ServerAPIHandler(OutpostAPIHandler):
    """``GET /services/{name}/{start_id}``: poll; ``DELETE``: stop"""

    def _key(self, name, start_id):
        if not SERVER_NAME_RE.match(name) or not START_ID_RE.match(start_id):
            raise web.HTTPError(404, "No such server")
        return self.current_hub, name, start_id

    async def get(self, name, start_id):
        collect_logs = self.get_query_argument("collect_logs", "false").lower() == "true"
        model = await self.servers.poll(*self._key(name, start_id), collect_logs=collect_logs)
        self.write_json(model)

    async def delete(self, name, start_id):
        collect_logs = self.get_query_argument("collect_logs", "false").lower() == "true"
        run_async = self.is_async()
        model = await self.servers.stop(
            *self._key(name, start_id), collect_logs=collect_logs, run_async=run_async
        )
        self.write_json(model, status=202 if run_async else 200)


class ServerByNameAPIHandler(ServerAPIHandler):
    """``GET /services/{name}`` and ``DELETE``, for clients that send no
    start id: they act on this hub's only server of that name (404 when it
    has none, 409 when it has several)"""

    async def _only_start_id(self, name):
        if not SERVER_NAME_RE.match(name):
            raise web.HTTPError(404, "No such server")
        start_ids = await self.outpost.db.start_ids_of(self.current_hub, name)
        if not start_ids:
            raise web.HTTPError(404, "No such server")
        if len(start_ids) > 1:
            raise web.HTTPError(409, "Several servers have this name: give the start id")
        return start_ids[0]

    async def get(self, name):
        await super().get(name, await self._only_start_id(name))

    async def delete(self, name):
        await super().delete(name, await self._only_start_id(name))


default_handlers = [
    (r"/services/?", ServicesAPIHandler),
    (r"/services/([^/]+)/?", ServerByNameAPIHandler),
    (r"/services/([^/]*)/([^/]*)/?", ServerAPIHandler),
]
