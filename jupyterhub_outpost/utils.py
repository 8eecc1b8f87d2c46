"""Small helpers shared by the modules of jupyterhub_outpost."""

import asyncio
import json
import os
import re
import time
from datetime import datetime, timezone

# A server name may be empty (the hub's default server); a start_id may not.
# Both become path segments (URLs, certificate directories): no slashes,
# no "." or "..", nothing outside a conservative character set.
_SEGMENT = r"[A-Za-z0-9_.@+\-]"
SERVER_NAME_RE = re.compile(rf"^(?!\.{{1,2}}\Z){_SEGMENT}{{0,255}}\Z")
START_ID_RE = re.compile(rf"^(?!\.{{1,2}}\Z){_SEGMENT}{{1,128}}\Z")
# Hub names, user names at the hub and local account names become path
# segments too (certificate folders, home directories) and reach log lines
# and command lines: they begin with a letter, digit or "_" (never "." or "-").
_NAME = rf"[A-Za-z0-9_]{_SEGMENT}{{0,127}}"
HUB_NAME_RE = re.compile(rf"^{_NAME}\Z")
USER_NAME_RE = re.compile(rf"^{_NAME}\Z")
ACCOUNT_NAME_RE = re.compile(rf"^{_NAME}\Z")
# names of internal trust bundles become file names ("<name>.crt")
BUNDLE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}\Z")


def remember(cache, key, value, kept):
    """Store ``value`` as the newest entry of ``cache`` (an OrderedDict,
    oldest first), dropping the oldest entries beyond ``kept``"""
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > kept:
        cache.popitem(last=False)


def utcnow():
    """Timezone-aware now in UTC"""
    return datetime.now(timezone.utc)


def as_utc(dt):
    """A datetime with tzinfo (naive values, as SQLite returns them, are UTC)"""
    if dt is not None and dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt


def isoformat(dt):
    """ISO 8601 text for a datetime (naive values are taken as UTC), or None"""
    if dt is None:
        return None
    return as_utc(dt).isoformat().replace("+00:00", "Z")


def json_from_env(name):
    """The JSON object in environment variable ``name``, {} when it is unset or empty"""
    text = os.environ.get(name)
    return json.loads(text) if text else {}


def url_path_join(*pieces):
    """Join URL path pieces with exactly one slash between them.

    Keeps a leading slash of the first piece and a trailing slash of the last.
    """
    initial = pieces[0].startswith("/")
    final = pieces[-1].endswith("/")
    stripped = [s.strip("/") for s in pieces]
    result = "/".join(s for s in stripped if s)
    if initial:
        result = "/" + result
    if final and result != "/":
        result = result + "/"
    return result or "/"


def format_service_address(result):
    """Turn what Spawner.start() returned into the address the hub connects to.

    A ``(host, port)`` tuple becomes ``host:port``; a URL keeps its scheme and
    loses any path (the hub splits the address on ``:``). Anything else is
    returned as text.
    """
    if result is None:
        return ""
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return f"{result[0]}:{result[1]}"
    text = str(result)
    match = re.match(r"^(https?://)?([^/]+)", text)
    if match:
        return (match.group(1) or "") + match.group(2)
    return text


async def wait_until(condition, timeout, interval=0.05, message="condition"):
    """Wait until ``condition()`` (sync or async) is truthy; return its value.

    Raises ``TimeoutError`` naming ``message`` when ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"Timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)
        interval = min(interval * 1.5, 1)


def path_inside(base, path):
    """True if ``path`` resolves (symlinks followed) to ``base`` or below it"""
    real_base = os.path.realpath(base)
    real = os.path.realpath(path)
    return os.path.commonpath([real_base, real]) == real_base


def open_private_dir(base, segments):
    """Create ``base/seg1/seg2/...`` (mode 0700) and open the last folder.

    Returns a file descriptor of it. Each segment must be a plain name; an
    existing segment that is a symlink or no folder raises ``OSError``
    instead of being followed, so that nothing is created outside ``base``.
    """
    os.makedirs(base, mode=0o700, exist_ok=True)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for segment in segments:
            if not segment or segment in (".", "..") or "/" in segment or "\0" in segment:
                raise ValueError(f"Not a plain folder name: {segment!r}")
            try:
                os.mkdir(segment, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            child = os.open(segment, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd
