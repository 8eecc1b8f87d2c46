"""Base handler: hub authentication, JSON in and out, error bodies."""

import asyncio
import base64
import json
import logging
import re
import socket
import time

from tornado import httputil, web
from tornado.iostream import StreamClosedError
from tornado.log import app_log

from ..errors import OutpostError, start_failure_body

_REASONS = {419: "Start Failed"}

# Deepest nesting of arrays and objects a JSON body may have; real requests
# use a few levels
MAX_JSON_DEPTH = 32

# After answering a body announced too large before it arrived, the rest is
# read and dropped (so that the client, still sending, gets the answer rather
# than a reset) for at most body_timeout seconds, and while it keeps coming
LINGER_IDLE_SECONDS = 2

# how a JSON text writes half of a UTF-16 surrogate pair ("\ud83d")
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")


@web.stream_request_body
class OutpostAPIHandler(web.RequestHandler):
    """Base class of every API handler.

    ``prepare()`` runs :meth:`check_request`: it authenticates the hub with
    HTTP Basic credentials (the user name names the hub; ``current_hub`` is
    its name afterwards) and checks the announced body size. The body is
    streamed in: at most ``max_body_size`` bytes are kept. A rejected
    request is answered once its body has arrived. Errors are written as
    ``{"status": ..., "message": ...}``; failed starts keep the protocol's
    419 shape.
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
        self._rejection = None
        try:
            self.check_request()
        except web.HTTPError as error:
            if self._client_waits():
                raise
            if error.status_code == 413 or self._announced_length() > self.outpost.max_body_size:
                # a body that large is not waited for: answer now
                self._answer_and_linger(error)
                return
            self._reject(error)

    def _announced_length(self):
        length = self.request.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else 0

    def _answer_and_linger(self, error):
        """Answer ``error`` at once and close, reading what the client still
        sends for a while (as a web server's lingering close does)."""
        self.set_status(error.status_code)
        body = json.dumps({"status": error.status_code, "message": _message(error)}).encode()
        headers = {
            "Content-Type": "application/json",
            "Cache-Control": "no-store",
            "Content-Length": str(len(body)),
            "Connection": "close",
            **(getattr(error, "headers", None) or {}),
        }
        head = f"HTTP/1.1 {error.status_code} {httputil.responses.get(error.status_code, 'Error')}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        stream = self.detach()  # only while the headers are handled (prepare runs then)
        self.application.log_request(self)
        asyncio.ensure_future(
            _linger(stream, head.encode("latin1") + body, self.outpost.body_timeout)
        )

    def check_request(self):
        """Authenticate the hub, then check the size the body announces.

        Raises :class:`tornado.web.HTTPError`. Credentials come first: a hub
        with a wrong password learns nothing about the size limit.
        """
        if self.auth_required:
            self.current_hub = self._authenticate()
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.outpost.max_body_size:
            raise self._too_large()

    def _too_large(self):
        return web.HTTPError(413, f"The request body exceeds {self.outpost.max_body_size} bytes")

    def _client_waits(self):
        """True when the client waits for an answer before it sends its body
        (``Expect: 100-continue``): answered now, it never sends the body"""
        return self.request.headers.get("Expect", "").lower() == "100-continue"

    def _reject(self, error):
        """Answer ``error`` after the body, which is read and dropped.

        Tornado closes a connection answered before its body was read: the
        client, still sending, would see a reset instead of the answer, and
        a kept-alive connection would end. The HTTP server's ``body_timeout``
        bounds how long a body may take.
        """
        self._rejection = error
        self._body_chunks = []
        # the method Tornado calls after the body (get, post, ...) raises instead
        setattr(self, self.request.method.lower(), self._raise_rejection)

    def _raise_rejection(self, *args, **kwargs):
        raise self._rejection

    def _authenticate(self):
        header = self.request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() == "basic" and encoded:
            name, sep, password = _basic_credentials(encoded)
            if sep and self.outpost.check_hub_credentials(name, password):
                return name
        error = web.HTTPError(401, "Wrong or missing credentials")
        error.headers = {"WWW-Authenticate": 'Basic realm="jupyterhub-outpost"'}
        raise error

    def data_received(self, chunk):
        if self._rejection is not None:
            return
        self._body_size += len(chunk)
        if self._body_size > self.outpost.max_body_size:
            self._reject(self._too_large())
        else:
            self._body_chunks.append(chunk)

    def get_json_body(self):
        """The body as a JSON object; 400 if it is not one"""
        body = b"".join(self._body_chunks)
        if not body:
            raise web.HTTPError(400, "The request needs a JSON object as body")
        too_deep = web.HTTPError(
            400, f"The request body is nested deeper than {MAX_JSON_DEPTH} levels"
        )
        try:
            # JSON is UTF-8 (RFC 8259): no other encoding, no byte order mark,
            # and none of Python's extensions (NaN, Infinity, numbers too large)
            model = json.loads(
                body.decode("utf8"), parse_constant=_no_constant, parse_float=_finite_float
            )
        except RecursionError:  # deeper than the parser goes
            raise too_deep from None
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPError(400, "The request body is not valid JSON") from None
        if _nested_deeper_than(model, MAX_JSON_DEPTH):
            raise too_deep
        if not isinstance(model, dict):
            raise web.HTTPError(400, "The request body must be a JSON object")
        if _SURROGATE_ESCAPE_RE.search(body) and _has_lone_surrogate(model):
            raise web.HTTPError(400, "The request body holds an unpaired \\u surrogate escape")
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
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        self.set_header("Content-Type", "application/json")
        self.set_status(status_code, _REASONS.get(status_code))
        self.finish(json.dumps(body))

    def allowed_methods(self):
        """The HTTP methods this handler implements"""
        default = web.RequestHandler
        return [
            method
            for method in self.SUPPORTED_METHODS
            if getattr(type(self), method.lower()) is not getattr(default, method.lower())
        ]


def _basic_credentials(encoded):
    """(name, ":", password) from a Basic credential; ("", "", "") if unreadable"""
    try:
        decoded = base64.b64decode(encoded.strip().encode("ascii"), validate=True)
        return decoded.decode("utf8").partition(":")
    except (ValueError, UnicodeError):  # binascii.Error is a ValueError
        return "", "", ""


def _nested_deeper_than(model, limit):
    """True if arrays and objects in ``model`` nest more than ``limit`` levels.

    Walks one level at a time (no recursion), visiting each array and object once.
    """
    containers = (dict, list)
    level = [model] if type(model) in containers else []
    for _ in range(limit):
        inner = []
        for value in level:
            children = value.values() if type(value) is dict else value
            inner += [child for child in children if type(child) in containers]
        level = inner
    return bool(level)


def _has_lone_surrogate(model):
    """True if a string in ``model`` holds half of a surrogate pair: such text
    cannot be encoded (environment, database, logs)"""
    try:
        json.dumps(model, ensure_ascii=False).encode("utf8")
    except UnicodeEncodeError:
        return True
    return False


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value


async def _linger(stream, response, timeout):
    """Write ``response``, drop what arrives until the client is done (at most
    ``timeout`` seconds), close"""
    try:
        await stream.write(response)
        stream.socket.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.wait_for(stream.read_bytes(65536, partial=True), LINGER_IDLE_SECONDS)
    except (StreamClosedError, OSError, asyncio.TimeoutError):
        pass
    finally:
        stream.close()


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

    def check_request(self):
        raise web.HTTPError(404, "Not found")
