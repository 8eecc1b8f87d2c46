"""LocalProcessSpawner: finding a server whose start was interrupted, and
keeping its output where a failure can be told from it.

The state of a local process is its pid, known only once ``Popen`` returned.
If the Outpost dies between the birth of the process and the save of its
pid, the record of the interrupted start holds no pid. The process still
carries the server's own API token in its environment (the hub made that
token for this server alone), so it can be found on this host and stopped.
Reading another account's ``/proc/<pid>/environ`` needs the privileges the
Outpost has when it starts servers as other accounts (root).
"""

import os
import subprocess

from jupyterhub.spawner import LocalProcessSpawner

from ..utils import open_private_dir

TOKEN_KEY = "JUPYTERHUB_API_TOKEN"


def pids_with_token(token, proc="/proc"):
    """``{pid: parent pid}`` of live processes whose environment holds
    ``JUPYTERHUB_API_TOKEN=token``"""
    if not token:
        return {}
    needle = f"{TOKEN_KEY}={token}".encode()
    found = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "environ"), "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(os.path.join(proc, entry, "stat"), "rb") as f:
                state, ppid = f.read().rsplit(b") ", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if state != b"Z":  # a zombie ended, it is just not reaped yet
            found[int(entry)] = int(ppid)
    return found


def recover_interrupted(spawner, env):
    """Give a LocalProcessSpawner without a pid the pid of its server's process.

    Returns the pid found, or None (another Spawner, a pid known already, or
    no such process). Runs in a thread: it reads ``/proc``.
    """
    if not isinstance(spawner, LocalProcessSpawner) or spawner.pid:
        return None
    pids = pids_with_token(env.get(TOKEN_KEY, ""))
    # the server's own process, not its children (kernels inherit the env)
    roots = sorted(pid for pid, parent in pids.items() if parent not in pids)
    if not roots:
        return None
    spawner.pid = roots[0]
    return roots[0]


def output_file(base, key):
    """Where the output of server ``key`` (hub, name, start id) is kept"""
    hub, name, start_id = key
    return os.path.join(base, hub, f"{name}~{start_id}.log")


def keeps_output(spawner):
    """Whether the Outpost keeps this server's output: a LocalProcessSpawner
    whose ``popen_kwargs`` do not say where it goes"""
    if not isinstance(spawner, LocalProcessSpawner):
        return False
    kwargs = spawner.popen_kwargs or {}
    return "stdout" not in kwargs and "stderr" not in kwargs


def open_output(base, key):
    """Open (create, append) the output file of server ``key`` in a 0700
    folder per hub; return ``(fd, path)``. The Outpost opens it and the
    server inherits it: the server's account needs no access to the folder.
    Runs in a thread."""
    hub, name, start_id = key
    folder = open_private_dir(base, [hub])
    try:
        filename = f"{name}~{start_id}.log"
        fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=folder)  # fmt: skip
    finally:
        os.close(folder)
    return fd, output_file(base, key)


def use_output(spawner, fd):
    """Let the server's process write its output to ``fd`` (on the event loop:
    Spawner traits are watched there)"""
    spawner.popen_kwargs = dict(spawner.popen_kwargs or {}, stdout=fd, stderr=subprocess.STDOUT)


def release_output(spawner):
    """Close the Outpost's copy of the output file once the server has its own"""
    if not isinstance(spawner, LocalProcessSpawner):
        return
    fd = (spawner.popen_kwargs or {}).get("stdout")
    if isinstance(fd, int) and spawner.popen_kwargs.get("stderr") == subprocess.STDOUT:
        kwargs = dict(spawner.popen_kwargs)
        kwargs.pop("stdout"), kwargs.pop("stderr")
        spawner.popen_kwargs = kwargs
        try:
            os.close(fd)
        except OSError:
            pass


def output_tail(path, lines=20, limit=65536):
    """The last ``lines`` lines of an output file ("" when there is none)"""
    if not path:
        return ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        text = f.read().decode("utf8", "replace")
    return "\n".join(text.splitlines()[-lines:])
