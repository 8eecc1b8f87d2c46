"""LocalProcessSpawner: finding a server whose start was interrupted.

The state of a local process is its pid, known only once ``Popen`` returned.
If the Outpost dies between the birth of the process and the save of its
pid, the record of the interrupted start holds no pid. The process still
carries the server's own API token in its environment (the hub made that
token for this server alone), so it can be found on this host and stopped.
Reading another account's ``/proc/<pid>/environ`` needs the privileges the
Outpost has when it starts servers as other accounts (root).
"""

import os

from jupyterhub.spawner import LocalProcessSpawner

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
