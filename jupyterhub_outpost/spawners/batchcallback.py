"""The port report of batch jobs, received by the Outpost itself.

batchspawner's job reports the port its server listens on to
``$JUPYTERHUB_API_URL/batchspawner``, where JupyterHub's own process sets
it on the Spawner. Under the Outpost that Spawner lives here, so the job
reports to the Outpost instead (:mod:`.slurmjob` does, then runs the
server, which keeps talking to the real hub). The report is authenticated
by the server's own API token: only the job that carries it can report,
and only while its start waits.
"""

import asyncio
import hashlib

from tornado import web

from ..handlers.base import OutpostAPIHandler

# sha256 of a server's API token -> Future of the port, while its start waits
_waiting = {}


def _key(token):
    return hashlib.sha256(token.encode()).hexdigest()


def expect_port(token):
    """A Future that the job carrying ``token`` resolves with its port"""
    future = asyncio.get_running_loop().create_future()
    _waiting[_key(token)] = future
    return future


def forget(token, future):
    """Stop waiting for the report of ``token`` (the start ended)"""
    key = _key(token)
    if _waiting.get(key) is future:
        del _waiting[key]


def waiting_count():
    return len(_waiting)


class BatchPortAPIHandler(OutpostAPIHandler):
    """``POST /batchspawner``: a job reports ``{"port": N}``.

    ``Authorization: token <the server's JUPYTERHUB_API_TOKEN>``. 201 when
    a start waited for it; 404 for a token no start waits for (unknown,
    already reported, or the start ended); 400 for a bad port.
    """

    auth_required = False

    def post(self):
        token = _token_of(self.request.headers.get("Authorization", ""))
        body = self.get_json_body()
        port = body.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise web.HTTPError(400, "The body must be {\"port\": <1-65535>}")
        future = _waiting.get(_key(token)) if token else None
        if future is None or future.done():
            raise web.HTTPError(404, "No start waits for a port report with this token")
        future.set_result(port)
        self.write_json({"message": "Port received"}, status=201)


def _token_of(header):
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    return ""


default_handlers = [(r"/batchspawner/?", BatchPortAPIHandler)]
