"""Fakes for what cannot run in the test process: a hub's API; and
test-only Spawners: one whose start is slow, one whose servers are not
children of the Outpost process.

``FakeHubAPI`` is a small Tornado app that records what the Outpost posts
to a hub (progress events, flavor usage) and checks the token it was given.
"""

import asyncio
import json
import os
import subprocess
import sys
import time

from jupyterhub.spawner import SimpleLocalProcessSpawner
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from traitlets import Bool, Float, Integer


class _RecordingHandler(web.RequestHandler):
    def initialize(self, fake, kind):
        self.fake = fake
        self.kind = kind

    def check_xsrf_cookie(self):
        pass

    async def post(self, *args):
        await self.answer(json.loads(self.request.body or b"{}"), 204)

    async def get(self, *args):
        # GET /recreateforward/{system}: the hub rebuilds forwards in the background
        await self.answer(None, 202)

    async def answer(self, body, status):
        self.fake.arrivals.append((self.kind, self.request.path, time.monotonic()))
        delay = self.fake.delays.get(self.kind, 0)
        if delay:
            await asyncio.sleep(delay)
        auth = self.request.headers.get("Authorization", "")
        token = auth[len("token ") :] if auth.startswith("token ") else None
        if token not in self.fake.tokens:
            self.set_status(403)
            self.fake.rejected.append((self.kind, self.request.path))
            return
        status = self.fake.status_for(self.kind, self.request.path, status)
        self.fake.received.append({
            "kind": self.kind, "path": self.request.path, "token": token, "body": body,
            "status": status, "time": time.monotonic(),
        })  # fmt: skip
        self.set_status(status)


class _ServerListHandler(web.RequestHandler):
    """``GET /hub/api/servers``: the OutpostSpawner's server list (scope
    ``custom:servers:list``), as ``{user_id}_{name}_{start_id}`` strings"""

    def initialize(self, fake):
        self.fake = fake

    def get(self):
        auth = self.request.headers.get("Authorization", "")
        token = auth[len("token ") :] if auth.startswith("token ") else None
        self.fake.received.append(
            {"kind": "servers", "path": self.request.path, "token": token, "body": None}
        )
        if token not in self.fake.list_tokens:
            self.set_status(403)
            self.fake.rejected.append(("servers", self.request.path))
            return
        if self.fake.list_status != 200:
            self.set_status(self.fake.list_status)
            return
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(list(self.fake.server_list)))


class _VersionHandler(web.RequestHandler):
    """``GET /hub/api``: what jupyterhub-singleuser checks at startup"""

    def get(self):
        import jupyterhub

        self.set_header("X-JupyterHub-Version", jupyterhub.__version__)
        self.write({"version": jupyterhub.__version__})


class FakeHubAPI:
    """Stand-in for the hub endpoints the Outpost calls.

    ``url`` is the hub API root (like ``JUPYTERHUB_API_URL``); ``received``
    lists every accepted call with its kind (``event``, ``flavors``,
    ``setuptunnel``, ``recreateforward``), its answer (``status``) and its
    arrival (``time``, monotonic), and every request for the server list
    (kind ``servers``). The server list answers ``server_list`` to the
    tokens in ``list_tokens``, or fails with ``list_status`` when that is
    not 200. ``failures[kind] = (n, status)`` makes the first ``n`` calls
    of that kind to each path answer ``status``; ``delays[kind]`` makes
    every call of that kind wait that many seconds before it is answered;
    ``arrivals`` lists ``(kind, path, time)`` of every call as it comes in.
    """

    def __init__(self):
        self.received = []
        self.rejected = []
        self.tokens = set()
        self.list_tokens = set()
        self.server_list = []
        self.list_status = 200
        self.failures = {}
        self.delays = {}
        self.arrivals = []
        self._tries = {}
        self.app = web.Application(
            [
                (r"/hub/api/?", _VersionHandler),
                (r"/hub/api/servers/?", _ServerListHandler, {"fake": self}),
                (r"/hub/api/users/progress/events/(.*)", _RecordingHandler, {"fake": self, "kind": "event"}),
                (r"/hub/api/outpostflavors/(.*)", _RecordingHandler, {"fake": self, "kind": "flavors"}),
                (r"/hub/api/users/setuptunnel/(.*)", _RecordingHandler, {"fake": self, "kind": "setuptunnel"}),
                (r"/hub/api/recreateforward/(.*)", _RecordingHandler, {"fake": self, "kind": "recreateforward"}),
            ]
        )
        self.server = None
        self.port = None

    def start(self):
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.server = HTTPServer(self.app)
        self.server.add_sockets(sockets)

    def stop(self):
        if self.server:
            self.server.stop()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hub/api"

    def status_for(self, kind, path, status):
        """The answer to the next call of ``kind`` to ``path`` (see ``failures``)"""
        count, failing_status = self.failures.get(kind, (0, status))
        tries = self._tries[kind, path] = self._tries.get((kind, path), 0) + 1
        return failing_status if tries <= count else status

    def calls(self, kind, user=None, server=None):
        """Recorded calls of one kind, optionally for one user/server path"""
        result = [c for c in self.received if c["kind"] == kind]
        if user is not None:
            suffix = f"/{user}/{server}" if server else f"/{user}"
            result = [c for c in result if c["path"].endswith(suffix)]
        return result


class SlowStartSpawner(SimpleLocalProcessSpawner):
    """A real SimpleLocalProcessSpawner whose ``start()`` takes its time.

    It waits ``start_delay`` seconds before launching the process, or after
    launching it with ``delay_after_launch``, so that tests can stop a server
    while its start is still pending. Both traits may be set per start
    through the start request's ``misc``.
    """

    start_delay = Float(30, help="Seconds start() waits.").tag(config=True)
    delay_after_launch = Bool(
        False, help="Wait after launching the process instead of before."
    ).tag(config=True)

    unsaved_pid = Bool(
        False,
        help="get_state() leaves out the pid until start() returned: a crash "
        "meanwhile finds no pid saved, as when the Outpost dies right after the "
        "process was born.",
    ).tag(config=True)

    async def start(self):
        if not self.delay_after_launch:
            await asyncio.sleep(self.start_delay)
            return await super().start()
        result = await super().start()
        await asyncio.sleep(self.start_delay)
        return result

    def get_state(self):
        state = super().get_state()
        if self.unsaved_pid and self._spawn_pending:
            state.pop("pid", None)
        return state


# Starts the command in its arguments, prints its pid and exits without
# waiting: the command is orphaned, as a batch job or a pod is no child of
# the Outpost. Its output goes to the launcher's stderr (the Outpost's log).
_LAUNCHER = (
    "import subprocess, sys; "
    "print(subprocess.Popen(sys.argv[1:], stdout=sys.stderr.fileno()).pid, flush=True)"
)


class DetachedProcessSpawner(SimpleLocalProcessSpawner):
    """A SimpleLocalProcessSpawner whose servers are not the Outpost's children.

    ``start()`` runs the server through a launcher process that exits at
    once, so the server is re-parented to the nearest subreaper (the test
    process, see ``conftest._act_as_init``), which reaps it when it ends.
    Any Outpost process can then tell by its pid whether it still runs, as
    with servers of a batch system or Kubernetes; a LocalProcessSpawner's
    server that ended stays a zombie child of the process that started it
    until that process waits for it.
    """

    async def start(self):
        cmd, popen_kwargs = self.cmd, self.popen_kwargs
        self.cmd = [sys.executable, "-c", _LAUNCHER, *cmd]
        # the launcher's stdout carries the pid; the server writes to its
        # stderr, which is where the Outpost wants the server's output
        output = popen_kwargs.get("stdout") if popen_kwargs.get("stderr") == subprocess.STDOUT else None
        self.popen_kwargs = dict(popen_kwargs, stdout=subprocess.PIPE, stderr=output)
        try:
            address = await super().start()
        finally:
            self.cmd, self.popen_kwargs = cmd, popen_kwargs
        launcher, self.proc = self.proc, None
        output, _ = await asyncio.to_thread(launcher.communicate, timeout=30)
        if launcher.returncode != 0 or not output.strip().isdigit():
            raise RuntimeError(f"The launcher failed ({launcher.returncode}): {output!r}")
        self.pid = int(output)
        return address


class FaultySpawner(SimpleLocalProcessSpawner):
    """A real SimpleLocalProcessSpawner that misbehaves on request.

    Its traits (settable per start through ``misc``) make ``poll()`` hang,
    the first stops fail or hang, or ``get_state()`` return None, as a
    Spawner whose backend is unreachable or broken would.
    """

    poll_delay = Float(0, help="Seconds poll() waits before answering.").tag(config=True)
    failing_stops = Integer(0, help="How many stop() calls fail before one works.").tag(config=True)
    hanging_stops = Integer(0, help="How many stop() calls hang for an hour.").tag(config=True)
    stop_delay = Float(0, help="Seconds each stop() waits before stopping.").tag(config=True)
    state_none = Bool(False, help="get_state() returns None.").tag(config=True)

    async def poll(self):
        if self.poll_delay:
            await asyncio.sleep(self.poll_delay)
        return await super().poll()

    async def stop(self, now=False):
        if self.hanging_stops > 0:
            self.hanging_stops -= 1
            await asyncio.sleep(3600)
        if self.failing_stops > 0:
            self.failing_stops -= 1
            raise RuntimeError("the backend refused to stop the server")
        if self.stop_delay:
            await asyncio.sleep(self.stop_delay)
        return await super().stop(now=now)

    def get_state(self):
        if self.state_none:
            return None
        return super().get_state()


class BlockingPollSpawner(SimpleLocalProcessSpawner):
    """A SimpleLocalProcessSpawner whose ``poll()`` is a plain function that
    blocks for ``poll_delay`` seconds (a synchronous call to a slow backend)."""

    poll_delay = Float(2, help="Seconds poll() blocks.").tag(config=True)

    def poll(self):
        time.sleep(self.poll_delay)
        if not self.pid:
            return 0
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return 1
        return None
