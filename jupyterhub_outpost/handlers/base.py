"""Base handler: hub authentication, JSON in and out, error bodies."""

import base64
import binascii
import json
import logging

from tornado import web
from tornado.log import app_log

from ..errors import OutpostError, start_failure_body

_REASONS = {419: "Start Failed"}


@web.stream_request_body
class OutpostAPIHandler(web.RequestHandler):
    """Base class of every API handler.

    ``prepare()`` authenticates the hub with HTTP Basic credentials (the user
    name names the hub); ``current_hub`` is its name afterwards. Errors are
    written as ``{"status": ..., "message": ...}``; failed starts keep the
    protocol's 419 shape.
    """

    auth_required = True
    current_hub = None

    @property
    def outpost(self):
        """The :class:`~jupyterhub_outpost.app.JupyterHubOutpost` application"""
        return self.settings["outpost"]

    @property
    def servers(self):
        """The :class:`~jupyterhub_outpost.servers.ServerManager`"""
        return self.settings["server_manager"]

    @property
    def log(self):
        return self.settings.get("log", app_log)

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def check_xsrf_cookie(self):
        # API only, no cookies
        pass

    async def prepare(self):
        self._body_chunks = []
        self._body_size = 0
        self._body_too_large = False
        length = self.request.headers.get("Content-Length")
        limit = self.outpost.max_body_size
        self.request.connection.set_max_body_size(max(limit, 1) * 4 + 65536)
        if length and length.isdigit() and int(length) > limit:
            raise web.HTTPError(413, f"The request body exceeds {limit} bytes")
        if self.auth_required:
            self.current_hub = self._authenticate()

    def _authenticate(self):
        header = self.request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() == "basic" and encoded:
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            name, sep, password = decoded.partition(":")
            if sep and self.outpost.check_hub_credentials(name, password):
                return name
        error = web.HTTPError(401, "Wrong or missing credentials")
        error.headers = {"WWW-Authenticate": 'Basic realm="jupyterhub-outpost"'}
        raise error

    def data_received(self, chunk):
        self._body_size += len(chunk)
        if self._body_size > self.outpost.max_body_size:
            self._body_too_large = True
            self._body_chunks = []
        else:
            self._body_chunks.append(chunk)

    def get_json_body(self):
        """The body as a JSON object; 400 if it is not one, 413 if too large"""
        if self._body_too_large:
            raise web.HTTPError(
                413, f"The request body exceeds {self.outpost.max_body_size} bytes"
            )
        body = b"".join(self._body_chunks)
        if not body:
            raise web.HTTPError(400, "The request needs a JSON object as body")
        try:
            model = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPError(400, "The request body is not valid JSON") from None
        if not isinstance(model, dict):
            raise web.HTTPError(400, "The request body must be a JSON object")
        return model

    def is_async(self):
        """True when the hub asked to run this request in the background"""
        return self.request.headers.get("execution-type", "").lower() == "async"

    def write_json(self, model, status=200):
        self.set_status(status, _REASONS.get(status))
        self.finish(json.dumps(model))

    def log_exception(self, typ, value, tb):
        if isinstance(value, (web.HTTPError, OutpostError)):
            status = getattr(value, "status_code", 500)
            level = logging.ERROR if status >= 500 else logging.DEBUG
            self.log.log(level, "%s %s: %s", status, self.request.method, _message(value))
        else:
            self.log.error(
                "Uncaught exception %s %s",
                self.request.method,
                self.request.path,
                exc_info=(typ, value, tb),
            )

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, OutpostError):
            status_code = exc.status_code
        if status_code == 419 and exc is not None:
            body = start_failure_body(exc)
        elif exc is None or isinstance(exc, (web.HTTPError, OutpostError)):
            message = _message(exc) if exc is not None else self._reason
            body = {"status": status_code, "message": message}
            for name, value in (getattr(exc, "headers", None) or {}).items():
                self.set_header(name, value)
        else:
            status_code = 500
            body = {"status": 500, "message": "Internal error; see the Outpost's log"}
        self.set_header("Content-Type", "application/json")
        self.set_status(status_code, _REASONS.get(status_code))
        self.finish(json.dumps(body))


def _message(exc):
    if isinstance(exc, OutpostError):
        return exc.message
    if isinstance(exc, web.HTTPError):
        return exc.log_message or exc.reason or web.httputil.responses.get(
            exc.status_code, "Error"
        )
    return str(exc)


class NotFoundAPIHandler(OutpostAPIHandler):
    """Every unknown path: a JSON 404 (after authentication)"""

    auth_required = False

    def prepare(self):
        raise web.HTTPError(404, "Not found")
