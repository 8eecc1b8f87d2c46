"""A Spawner that launches nothing: for measuring the Outpost itself.

``start()`` waits ``start_delay`` seconds and returns ``("127.0.0.1", port)``;
``poll()`` answers from the spawner's state (``None`` while "running", 0
after ``stop()``). The state survives ``get_state()``/``load_state()``, so a
restarted Outpost polls and stops these servers like real ones.

Each start logs one line with the time ``start()`` itself took::

    NoopSpawner start <start_id> took 200.153 ms

which ``bench_overhead.py`` reads to subtract the spawner's share from the
request latency.

Use it with::

    c.JupyterHubOutpost.spawner_class = "benchmarks.noop_spawner.NoopSpawner"
    c.NoopSpawner.start_delay = 0.2   # or per start: misc {"start_delay": 5}
"""

import asyncio
import random
import time

from jupyterhub.spawner import Spawner
from traitlets import Bool, Float


class NoopSpawner(Spawner):
    """Pretends to start a server; nothing runs and nothing listens"""

    start_delay = Float(
        0.0,
        help="""Seconds ``start()`` waits before it reports success (default 0).

        A start request may override it with ``misc: {"start_delay": 5}``.
        """,
    ).tag(config=True)

    running = Bool(False, help="Whether the pretend server is running (state, not config).")

    async def start(self):
        began = time.perf_counter()
        if not self.port:
            self.port = random.randint(20000, 60000)
        if self.start_delay > 0:
            await asyncio.sleep(self.start_delay)
        self.running = True
        self.log.info(
            "NoopSpawner start %s took %.3f ms",
            self.user_options.get("start_id", "-"),
            1000 * (time.perf_counter() - began),
        )
        return ("127.0.0.1", self.port)

    async def poll(self):
        return None if self.running else 0

    async def stop(self, now=False):
        self.running = False

    def get_state(self):
        state = super().get_state()
        if self.running:
            state["running"] = True
            state["port"] = self.port
        return state

    def load_state(self, state):
        super().load_state(state)
        self.running = bool(state.get("running", False))
        if state.get("port"):
            self.port = int(state["port"])

    def clear_state(self):
        super().clear_state()
        self.running = False
