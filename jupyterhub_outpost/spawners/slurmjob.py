"""Runs inside a batch job: pick a port, report it to the Outpost, run the server.

    python3 -m jupyterhub_outpost.spawners.slurmjob REPORT_URL COMMAND [ARGS...]

Standard library only, so that it runs with the compute node's Python. The
report goes to ``REPORT_URL`` (the Outpost's ``/batchspawner``), with the
server's ``JUPYTERHUB_API_TOKEN``; ``JUPYTERHUB_API_URL`` keeps pointing at
the hub, which the server talks to for OAuth and activity. The port goes
into ``JUPYTERHUB_SERVICE_URL``, and COMMAND replaces this process.
"""

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

ATTEMPTS = 5


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def report(url, token, port):
    """POST the port; retried a few times, since the Outpost may be restarting"""
    request = urllib.request.Request(
        url,
        data=json.dumps({"port": port}).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    for attempt in range(ATTEMPTS):
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                return response.status
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise SystemExit(f"slurmjob: the Outpost refused the port report: HTTP {e.code}")
            error = e
        except OSError as e:
            error = e
        time.sleep(min(2**attempt, 10))
    raise SystemExit(f"slurmjob: could not report the port to {url}: {error}")


def with_port(service_url, port):
    parts = urlsplit(service_url or "http://0.0.0.0/")
    host = parts.hostname or "0.0.0.0"
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


def main(argv):
    if len(argv) < 2:
        raise SystemExit("usage: slurmjob REPORT_URL COMMAND [ARGS...]")
    url, command = argv[0], argv[1:]
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        raise SystemExit("slurmjob: JUPYTERHUB_API_TOKEN is not set")
    port = free_port()
    report(url, token, port)
    os.environ["JUPYTERHUB_SERVICE_URL"] = with_port(os.environ.get("JUPYTERHUB_SERVICE_URL"), port)
    sys.stdout.flush()
    try:
        os.execvp(command[0], command)
    except OSError as e:
        raise SystemExit(f"slurmjob: cannot run {command[0]}: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
