"""Logging: an access log without credentials, and a filter that keeps
secrets out of every log line (ours and the spawners')."""

import datetime
import json
import logging
import re
import threading
import traceback
from urllib.parse import unquote_plus

from tornado.log import access_log

REDACTED = "[secret]"

# Longest message one log record carries, in characters; longer ones are
# cut (see shorten). Tracebacks may be longer, up to MAX_TRACEBACK_LENGTH.
MAX_MESSAGE_LENGTH = 16384
MAX_TRACEBACK_LENGTH = 65536
# Longest request URI the access log shows
MAX_URI_LENGTH = 2048

# query arguments whose values never reach the log
_SECRET_QUERY_KEYS = {"token", "access_token", "auth", "password", "secret", "key"}

# Every pattern below matches in time linear in the length of the text: no
# pattern can retry a long run of characters from each of its positions.

# PEM blocks (certificates, private keys); a block without its END line
# (cut short) is a secret up to the end of the text
_PEM_RE = re.compile(
    r"-----BEGIN [A-Z ]{1,80}-----(?:.*?-----END [A-Z ]{1,80}-----|.*)", re.DOTALL
)
# "SOMETHING_TOKEN': 'value'", "password=value", "Authorization: Basic ...".
# A name is a whole run of name characters (the look-behind), which holds
# one of the words; the look-ahead finds that word without leaving the run.
_NAME_CHARS = r"A-Za-z0-9_\-"
_SECRET_WORDS = (
    "TOKEN|token|SECRET|secret|PASSWORD|password|KEYFILE|_KEY|Authorization|authorization"
)
_SECRET_WORD_LIST = tuple(_SECRET_WORDS.split("|"))
_NAMED_SECRET_RE = re.compile(
    rf"""(?<![{_NAME_CHARS}])(?P<name>(?=[{_NAME_CHARS}]*?(?:{_SECRET_WORDS}))"""
    rf"""[{_NAME_CHARS}]+['"]?\s*[:=]\s*)"""
    r"""(?P<quote>['"]?)(?P<value>(?:Basic |Bearer |token )?[^'"\s,}]+)"""
)
_WORD_RE = re.compile(r"[A-Za-z0-9_\-+/=.]{12,}")
# what a cut may leave half of: a run of the characters of secret words
_RUN_RE = re.compile(r"[A-Za-z0-9_\-+/=.]*")
# characters that would let a logged value start a new line or steer a terminal
_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


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
        self._longest_word = 0

    def add(self, secret):
        if not secret or len(secret) < 4:
            return
        secret = str(secret)
        with self._lock:
            if _WORD_RE.fullmatch(secret):
                self._words.add(secret)
                self._longest_word = max(self._longest_word, len(secret))
            else:
                self._phrases.add(secret)

    def discard(self, secret):
        with self._lock:
            self._words.discard(secret)
            self._phrases.discard(secret)

    def scrub(self, text):
        """``text`` with every known secret and secret-looking value replaced"""
        if not text:
            return text
        if "-----BEGIN " in text:
            text = _PEM_RE.sub(REDACTED, text)
        # a substring search is much faster than the pattern: most lines
        # name no secret at all
        if any(word in text for word in _SECRET_WORD_LIST):
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

    def cut(self, text, limit):
        """``(head, note)``: ``text`` cut to about ``limit`` characters, and
        a note of how much was cut ("" if nothing).

        The end of what the cut leaves of a word (as long as the longest
        known secret word) is replaced, as is the start of a known phrase at
        the end, so that a secret cut in two does not show its first half.
        A named secret's value cut short is still found by :meth:`scrub`.
        """
        if len(text) <= limit:
            return text, ""
        head = text[:limit]
        for phrase in tuple(self._phrases):
            head = _without_phrase_start(head, phrase)
        if _RUN_RE.match(text[limit]).end():
            # a known secret word cut in two ends the head: hide as much
            # of the last run as the longest known word
            run = _RUN_RE.match(head[::-1]).end()
            hidden = min(run, self._longest_word)
            if hidden:
                head = head[: len(head) - hidden] + REDACTED
        return head, f" [cut {len(text) - limit} characters]"

    def shorten(self, text, limit):
        """``text`` cut to about ``limit`` characters, the cut marked (see :meth:`cut`)"""
        return "".join(self.cut(text, limit))


def _without_phrase_start(text, phrase):
    """``text`` with a beginning of ``phrase`` at its end replaced"""
    for length in range(len(phrase) - 1, 0, -1):
        if text.endswith(phrase[:length]):
            return text[:-length] + REDACTED
    return text


secrets = SecretRegistry()


def escape_control(text):
    """``text`` with line breaks and other control characters escaped, so that
    text from a hub cannot start a log line of its own"""
    return _CONTROL_RE.sub(lambda m: repr(m.group(0))[1:-1], text)


def scrub_record(record):
    """Format a log record's message now, cut it to size, remove secrets from
    it and escape its control characters (one record, one line)"""
    try:
        message = record.getMessage()
    except Exception:
        message = str(record.msg)
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info))
    message, note = secrets.cut(message, MAX_MESSAGE_LENGTH)
    record.msg = escape_control(secrets.scrub(message)) + note
    record.args = ()
    if record.exc_text:
        exc_text, note = secrets.cut(record.exc_text, MAX_TRACEBACK_LENGTH)
        record.exc_text = secrets.scrub(exc_text) + note
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


# "hub/server/start_id - ...": how the Outpost's lines about one server begin
_LOG_NAME_RE = re.compile(r"(?P<hub>[A-Za-z0-9][A-Za-z0-9_.\-]*)/(?P<server>[^/\s]*)/(?P<start_id>[^/\s]+) - ")


class JSONLogFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``,
    ``logger``, ``message``, and ``hub``, ``server``, ``start_id`` where the
    line is about one server; ``exception`` with a traceback. Messages are
    already scrubbed (see :func:`install_scrubber`)."""

    def format(self, record):
        message = record.getMessage()
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        found = _LOG_NAME_RE.match(message)
        if found:
            entry.update(found.groupdict())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)

    def formatTime(self, record, datefmt=None):
        moment = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def scrub_url(url):
    """Drop the values of secret-looking query arguments from a URL.

    The rest of the URL is kept as it was sent (no decoding and re-encoding).
    """
    base, sep, query = url.partition("?")
    if not query:
        return url
    query, hash_sign, fragment = query.partition("#")
    arguments = []
    for argument in query.split("&"):
        name, equals, _ = argument.partition("=")
        if equals and unquote_plus(name).lower() in _SECRET_QUERY_KEYS:
            argument = f"{name}={REDACTED}"
        arguments.append(argument)
    return f"{base}{sep}{'&'.join(arguments)}{hash_sign}{fragment}"


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
    uri = secrets.shorten(scrub_url(request.uri), MAX_URI_LENGTH)
    access_log.log(
        level,
        "%s %s %s (%s@%s) %.2fms",
        status,
        request.method,
        uri,
        hub,
        request.remote_ip,
        duration_ms,
    )


def json_for_log(obj):
    """Compact JSON for a log line, with secrets scrubbed"""
    text, note = secrets.cut(json.dumps(obj, default=str, sort_keys=True), MAX_MESSAGE_LENGTH)
    return secrets.scrub(text) + note
