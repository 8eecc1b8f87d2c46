"""Small helpers shared by the modules of jupyterhub_outpost."""

import asyncio
import re
import time
from datetime import datetime, timezone

# A server name may be empty (the hub's default server); a start_id may not.
# Both become path segments (URLs, certificate directories): no slashes,
# no "." or "..", nothing outside a conservative character set.
_SEGMENT = r"[A-Za-z0-9_.@+\-]"
SERVER_NAME_RE = re.compile(rf"^(?!\.{{1,2}}$){_SEGMENT}{{0,255}}$")
START_ID_RE = re.compile(rf"^(?!\.{{1,2}}$){_SEGMENT}{{1,128}}$")


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
