"""Which Outpost processes still run: process leases in the database.

Each process renews a lease ``process:<owner>`` whose value tells where it
runs (host name, pid, the pid's start time). A pending start or stop names
the process that runs it (``servers.owner``). When that process is known to
be gone, its start or stop was interrupted, and any process may finish it
at once instead of waiting for ``pending_timeout``:

- its lease expired (it stopped renewing it), or
- it ran on this host and its pid is gone, or belongs to a newer process
  (a restart after ``kill -9`` is recognised without waiting for the lease).

A process whose lease is missing is not taken as gone: it may be writing it.
"""

import os
import socket


def _start_time(pid):
    """The start time of process ``pid`` (clock ticks after boot), or ""."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_identity():
    """``host:pid:start time`` of this process, the value of its lease"""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def known_gone(lease, now):
    """True when the process of ``lease`` (``(identity, expires)``) surely ended"""
    if lease is None:
        return False
    identity, expires = lease
    if expires is not None and expires < now:
        return True
    host, _, rest = identity.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or not started:
        return False
    return _start_time(int(pid)) != started
