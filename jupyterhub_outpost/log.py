"""Logging: an access log without credentials, and a filter that keeps
secrets out of every log line (ours and the spawners')."""

import json
import logging
import re
import threading
import traceback
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from tornado.log import access_log

REDACTED = "[secret]"

# query arguments whose values never reach the log
_SECRET_QUERY_KEYS = {"token", "access_token", "auth", "password", "secret", "key"}

# PEM blocks (certificates, private keys)
_PEM_RE = re.compile(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", re.DOTALL)
# "SOMETHING_TOKEN': 'value'", "password=value", "Authorization: Basic ..."
_NAMED_SECRET_RE = re.compile(
    r"""(?P<name>[A-Za-z0-9_\-]*(?:TOKEN|token|SECRET|secret|PASSWORD|password|"""
    r"""KEYFILE|_KEY|Authorization|authorization)[A-Za-z0-9_\-]*['"]?\s*[:=]\s*)"""
    r"""(?P<quote>['"]?)(?P<value>(?:Basic |Bearer |token )?[^'"\s,}]+)"""
)
_WORD_RE = re.compile(r"[A-Za-z0-9_\-+/=.]{12,}")


class SecretRegistry:
    """The secrets currently known to this process (tokens, passwords).

    The log filter replaces every registered secret, wherever it appears.
    Lookups are by whole word, so the cost per log line does not grow with
    the number of registered secrets.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._words = set()
        self._phrases = set()

    def add(self, secret):
        if not secret or len(secret) < 4:
            return
        secret = str(secret)
        with self._lock:
            if _WORD_RE.fullmatch(secret):
                self._words.add(secret)
            else:
                self._phrases.add(secret)

    def discard(self, secret):
        with self._lock:
            self._words.discard(secret)
            self._phrases.discard(secret)

    def scrub(self, text):
        if not text:
            return text
        text = _PEM_RE.sub(REDACTED, text)
        text = _NAMED_SECRET_RE.sub(
            lambda m: f"{m.group('name')}{m.group('quote')}{REDACTED}", text
        )
        words = self._words
        if words:
            text = _WORD_RE.sub(
                lambda m: REDACTED if m.group(0) in words else m.group(0), text
            )
        for phrase in tuple(self._phrases):
            if phrase in text:
                text = text.replace(phrase, REDACTED)
        return text


secrets = SecretRegistry()


def scrub_record(record):
    """Format a log record's message now and remove secrets from it"""
    try:
        message = record.getMessage()
    except Exception:
        message = str(record.msg)
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info))
    record.msg = secrets.scrub(message)
    record.args = ()
    if record.exc_text:
        record.exc_text = secrets.scrub(record.exc_text)
    return record


_scrubbing_factory_installed = False


def install_scrubber():
    """Scrub every log record this process creates, whatever handler emits it.

    The record factory is wrapped rather than a handler filter added, so that
    spawner loggers, library loggers and handlers added later are covered too.
    Records are only created for enabled levels, so disabled debug logging
    costs nothing.
    """
    global _scrubbing_factory_installed
    if _scrubbing_factory_installed:
        return
    make_record = logging.getLogRecordFactory()

    def scrubbing_factory(*args, **kwargs):
        return scrub_record(make_record(*args, **kwargs))

    logging.setLogRecordFactory(scrubbing_factory)
    _scrubbing_factory_installed = True


def scrub_url(url):
    """Drop the values of secret-looking query arguments from a URL"""
    parsed = urlparse(url)
    if not parsed.query:
        return url
    query = [
        (k, REDACTED if k.lower() in _SECRET_QUERY_KEYS else v)
        for k, v in parse_qsl(parsed.query, keep_blank_values=True)
    ]
    return urlunparse(parsed._replace(query=urlencode(query, safe="[]")))


def log_request(handler):
    """Tornado ``log_function``: one line per request, level by status.

    Successful polls and pings are logged at debug level so that the
    steady stream of hub polls does not flood the log.
    """
    status = handler.get_status()
    request = handler.request
    if status < 300 and (request.method in ("GET", "HEAD")):
        level = logging.DEBUG
    elif status < 400:
        level = logging.INFO
    elif status < 500:
        level = logging.WARNING
    else:
        level = logging.ERROR
    if not access_log.isEnabledFor(level):
        return  # polls at the default level: nothing to format
    hub = getattr(handler, "current_hub", None) or "-"
    duration_ms = 1000.0 * request.request_time()
    access_log.log(
        level,
        "%s %s %s (%s@%s) %.2fms",
        status,
        request.method,
        scrub_url(request.uri),
        hub,
        request.remote_ip,
        duration_ms,
    )


def json_for_log(obj):
    """Compact JSON for a log line, with secrets scrubbed"""
    return secrets.scrub(json.dumps(obj, default=str, sort_keys=True))
