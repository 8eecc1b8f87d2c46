"""Prometheus metrics of one Outpost process.

Every metric lives in the :class:`OutpostMetrics` instance's own registry
(with the library's process, platform and garbage-collector collectors),
served at ``GET /metrics``. Labels have bounded values: hub names and
flavor names come from the configuration, outcomes and kinds from the
fixed sets below; never a user or server name.

The server gauges are read from a summary of the records that a task
refreshes every ``refresh_interval`` seconds (one grouped query), so a
scrape never touches the database however many servers run.
"""

import asyncio
import functools
import hmac
import ipaddress
import os
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from traitlets import Bool, Float, List, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from .errors import (
    AccountRefusedError,
    OverrideRefusedError,
    ServerNotFoundError,
    StartCancelledError,
    StatusUnknownError,
)
from ._version import __version__
from .flavors import FlavorError, limit

PREFIX = "jupyterhub_outpost"

POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
START_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
STOP_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# the kinds of calls to the hub whose failures are counted
CALLBACK_KINDS = ("event", "flavor_update", "setuptunnel", "recreateforward", "housekeeping")
DB_KINDS = ("read", "write", "poll")
REFUSAL_REASONS = ("override", "account", "flavor")
OUTCOMES = {
    "start": ("success", "failure", "cancelled"),
    "poll": ("running", "ended", "unknown", "not_found"),
    "stop": ("success", "failure"),
}


def _uses_slurm(spawner_class):
    return any(cls.__name__ == "OutpostSlurmSpawner" for cls in getattr(spawner_class, "__mro__", ()))


def refusal_reason(error):
    """The ``reason`` label of a refused start, or None when ``error`` is none"""
    if isinstance(error, OverrideRefusedError):
        return "override"
    if isinstance(error, AccountRefusedError):
        return "account"
    if isinstance(error, FlavorError):
        return "flavor"
    return None


def _outcome(action, result=None, error=None):
    if error is None:
        if action == "poll":
            return "running" if result.get("status") is None else "ended"
        return "success"
    if isinstance(error, (StartCancelledError, asyncio.CancelledError)):
        return "cancelled"
    if action == "poll":
        if isinstance(error, ServerNotFoundError):
            return "not_found"
        if isinstance(error, StatusUnknownError):
            return "unknown"
    return "failure"


def observed(action, hub_of):
    """Count and time a :class:`~jupyterhub_outpost.servers.ServerManager`
    coroutine method as ``action`` (start, poll, stop) of the hub that
    ``hub_of(*args)`` names."""

    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self, *args, **kwargs):
            metrics = self.app.metrics
            if metrics is None:
                return await method(self, *args, **kwargs)
            began = time.perf_counter()
            try:
                result = await method(self, *args, **kwargs)
            except BaseException as e:
                metrics.record(action, hub_of(*args), _outcome(action, error=e), time.perf_counter() - began)
                raise
            metrics.record(action, hub_of(*args), _outcome(action, result), time.perf_counter() - began)
            return result

        return wrapper

    return decorate


class _ServersCollector:
    """The gauges of servers and flavor usage, from the latest summary"""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        servers = GaugeMetricFamily(
            f"{PREFIX}_servers",
            "Servers recorded now, by hub, flavor and state (pending, running, stopping)",
            labels=["hub", "flavor", "state"],
        )
        for (hub, flavor, state), count in sorted(self.metrics.summary.items()):
            servers.add_metric([hub, flavor, state], count)
        yield servers

        usage = GaugeMetricFamily(
            f"{PREFIX}_flavor_servers",
            "Servers of each flavor that count against its limit (running or starting, not stopping)",
            labels=["flavor"],
        )
        limits = GaugeMetricFamily(
            f"{PREFIX}_flavor_limit",
            "The most servers of each flavor that may run at once (absent when unlimited)",
            labels=["flavor"],
        )
        counts = {}
        for (_hub, flavor, state), count in self.metrics.summary.items():
            if state != "stopping":
                counts[flavor] = counts.get(flavor, 0) + count
        for name, flavor in sorted(self.metrics.flavors().items()):
            usage.add_metric([name], counts.get(name, 0))
            most = limit(flavor.get("max"))
            if most is not None:
                limits.add_metric([name], int(most))
        yield usage
        yield limits

        age = GaugeMetricFamily(
            f"{PREFIX}_servers_summary_age_seconds",
            "Seconds since the server gauges were read from the database",
        )
        age.add_metric([], time.monotonic() - self.metrics.summary_time if self.metrics.summary_time else -1)
        yield age


class _WritesCollector:
    """Database writes and the transactions they shared (group commit)"""

    def __init__(self, app):
        self.app = app

    def collect(self):
        writes = getattr(self.app.db, "writes", None)
        calls = CounterMetricFamily(f"{PREFIX}_db_writes", "Database write calls")
        batches = CounterMetricFamily(
            f"{PREFIX}_db_write_transactions",
            "Transactions that database writes ran in (writes that queue up together share one)",
        )
        calls.add_metric([], writes.calls if writes is not None else 0)
        batches.add_metric([], writes.batches if writes is not None else 0)
        yield calls
        yield batches


class _CollectorPauses:
    """The garbage collector's pauses (timed by the CollectorPolicy) and freezes"""

    def __init__(self, policy):
        self.policy = policy

    def collect(self):
        from .gcpolicy import PAUSE_BUCKETS

        policy = self.policy
        pauses = HistogramMetricFamily(
            f"{PREFIX}_gc_pause_seconds",
            "Garbage collections by generation, and how long each stopped the process",
            labels=["generation"],
        )
        for generation in range(3):
            counts = policy.pause_counts[generation]
            cumulative, buckets = 0, []
            for bound, count in zip((*PAUSE_BUCKETS, float("inf")), counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            pauses.add_metric([str(generation)], buckets, policy.pause_sums[generation])
        yield pauses
        longest = GaugeMetricFamily(f"{PREFIX}_gc_pause_longest_seconds",
                                    "The longest garbage collection pause since the process started")  # fmt: skip
        longest.add_metric([], policy.longest_pause)
        yield longest
        # counts, not gc.get_freeze_count(): that walks every frozen object
        # (65 ms with 10,000 servers, a stall at each scrape)
        freezes = CounterMetricFamily(f"{PREFIX}_gc_freezes",
                                      "Freezes of the objects that exist (out of full collections' sight)")  # fmt: skip
        freezes.add_metric([], policy.freezes)
        yield freezes
        unfreezes = CounterMetricFamily(f"{PREFIX}_gc_unfreezes",
                                        "Frozen objects handed back to the collector (Spawners kept by cycles)")  # fmt: skip
        unfreezes.add_metric([], policy.unfreezes)
        yield unfreezes


class _SlurmCollector:
    """Slurm's shared queue, when Slurm servers run in this process"""

    def collect(self):
        from .spawners import slurmqueue

        queues = slurmqueue.queues()
        calls = CounterMetricFamily(f"{PREFIX}_squeue_calls", "squeue invocations (all servers share them)")
        failures = CounterMetricFamily(f"{PREFIX}_squeue_failures",
                                       "Refreshes of the shared queue that failed (polls answered 503)")  # fmt: skip
        jobs = GaugeMetricFamily(f"{PREFIX}_slurm_jobs", "Slurm jobs the shared queue follows")
        age = GaugeMetricFamily(f"{PREFIX}_squeue_snapshot_age_seconds",
                                "Seconds since the queue was last read (-1: not yet)")  # fmt: skip
        now = time.monotonic()
        calls.add_metric([], sum(q.calls for q in queues))
        failures.add_metric([], sum(q.failures for q in queues))
        jobs.add_metric([], sum(len(q.tracked) for q in queues))
        snapshots = [q.snapshot_time for q in queues if q.snapshot_time is not None]
        age.add_metric([], now - max(snapshots) if snapshots else -1)
        yield from (calls, failures, jobs, age)


class OutpostMetrics(LoggingConfigurable):
    """Prometheus metrics at ``GET /metrics``, and who may read them.

    By default a scrape needs the token of ``token`` (as ``Authorization:
    Bearer <token>``, or as the password of HTTP Basic credentials, any user
    name), like JupyterHub's ``authenticate_prometheus``.
    """

    enabled = Bool(
        True,
        help="""Whether this process keeps metrics and serves ``GET /metrics``.
        Default: True.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    authenticate = Bool(
        True,
        help="""Whether ``GET /metrics`` needs credentials. Default: True.

        With False, anyone who reaches the Outpost's port reads the metrics
        (hub names, flavor names and counts; never secrets or user names).
        To open them to a scrape network only, keep True and set
        ``open_networks``.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    token = Unicode(
        help="""The credential a scraper sends to read ``GET /metrics``:
        ``Authorization: Bearer <token>``, or HTTP Basic credentials with this
        as password. Default: the environment variable
        ``OUTPOST_METRICS_TOKEN``; without either, only ``open_networks``
        may read the metrics.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    @default("token")
    def _token_default(self):
        return os.environ.get("OUTPOST_METRICS_TOKEN", "")

    open_networks = List(
        Unicode(),
        help="""Networks (CIDR, e.g. ``10.42.0.0/16``) whose requests read
        ``GET /metrics`` without credentials: a cluster's monitoring network.
        Default: none.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    @validate("open_networks")
    def _open_networks_valid(self, proposal):
        for network in proposal.value:
            ipaddress.ip_network(network, strict=False)  # raises ValueError
        return proposal.value

    refresh_interval = Float(
        15,
        help="""Seconds between the reads of the records behind the server
        gauges (one grouped query). Default: 15, as a usual scrape interval.

        .. versionadded:: 0.3
        """,
    ).tag(config=True)

    def __init__(self, app, **kwargs):
        super().__init__(parent=app, **kwargs)
        self.app = app
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.summary = {}  # (hub, flavor, state) -> servers
        self.summary_time = 0.0
        self._refresher = None
        self._networks = [ipaddress.ip_network(n, strict=False) for n in self.open_networks]

        def metric(kind, name, doc, labels=(), **kwargs):
            return kind(f"{PREFIX}_{name}", doc, labels, registry=registry, **kwargs)

        self.counts = {
            "start": metric(Counter, "starts", "Starts by hub and outcome (success, failure, cancelled)",
                            ["hub", "outcome"]),
            "poll": metric(Counter, "polls",
                           "Polls by hub and outcome (running, ended, unknown: answered 503, not_found)",
                           ["hub", "outcome"]),
            "stop": metric(Counter, "stops", "Stops by hub and outcome (success, failure)",
                           ["hub", "outcome"]),
        }  # fmt: skip
        self.durations = {
            "start": metric(Histogram, "start_duration_seconds",
                            "Time from a start request until the server runs or the start failed",
                            ["hub"], buckets=START_BUCKETS),
            "poll": metric(Histogram, "poll_duration_seconds", "Time to answer a poll",
                           ["hub"], buckets=POLL_BUCKETS),
            "stop": metric(Histogram, "stop_duration_seconds", "Time to stop a server",
                           ["hub"], buckets=STOP_BUCKETS),
        }  # fmt: skip
        self.refused = metric(Counter, "refused_starts", "Starts refused before anything ran, by reason",
                              ["hub", "reason"])  # fmt: skip
        self.db_calls = metric(Histogram, "db_call_duration_seconds",
                               "Database calls by kind (read, write, poll: the read behind a poll)",
                               ["kind"], buckets=DB_BUCKETS)  # fmt: skip
        self.db_errors = metric(Counter, "db_errors", "Database calls that failed, by kind", ["kind"])
        self.callback_failures = metric(Counter, "hub_callback_failures",
                                        "Calls to a hub that failed, by kind", ["kind"])  # fmt: skip
        lease = metric(Gauge, "background_lease_held",
                       "1 while this process holds the background lease (housekeeping, tunnels)")  # fmt: skip
        lease.set_function(lambda: 1 if getattr(app.background, "holds_lease", False) else 0)
        info = metric(Gauge, "info", "This Outpost's version and spawner class",
                      ["version", "spawner_class"])  # fmt: skip
        spawner = app.spawner_class
        info.labels(__version__, f"{spawner.__module__}.{spawner.__name__}").set(1)
        registry.register(_ServersCollector(self))
        registry.register(_WritesCollector(app))
        if getattr(app, "collector", None) is not None:
            registry.register(_CollectorPauses(app.collector))
        if _uses_slurm(app.spawner_class):
            registry.register(_SlurmCollector())
        # every series present from the start, at 0: rate() and increase()
        # need a first sample, and an alert on a series that never existed is silent
        for hub in app.hub_credentials:
            for action, outcomes in OUTCOMES.items():
                for outcome in outcomes:
                    self.counts[action].labels(hub, outcome)
                self.durations[action].labels(hub)
            for reason in REFUSAL_REASONS:
                self.refused.labels(hub, reason)
        for kind in DB_KINDS:
            self.db_calls.labels(kind)
            self.db_errors.labels(kind)
        for kind in CALLBACK_KINDS:
            self.callback_failures.labels(kind)

    # recording (any thread)

    def record(self, action, hub, outcome, seconds):
        self.counts[action].labels(hub, outcome).inc()
        if not (action == "poll" and outcome == "not_found"):
            self.durations[action].labels(hub).observe(seconds)

    def start_refused(self, hub, error):
        reason = refusal_reason(error)
        if reason is not None:
            self.refused.labels(hub, reason).inc()

    def db_call(self, kind, seconds, failed):
        self.db_calls.labels(kind).observe(seconds)
        if failed:
            self.db_errors.labels(kind).inc()

    def callback_failed(self, kind):
        self.callback_failures.labels(kind).inc()

    def flavors(self):
        return self.app.policy.flavors if self.app.policy is not None else {}

    # access

    def allows(self, remote_ip, credential):
        """Whether a scrape from ``remote_ip`` with ``credential`` (a bearer
        token or Basic password, or None) may read the metrics"""
        if not self.authenticate:
            return True
        if self._networks and remote_ip:
            try:
                address = ipaddress.ip_address(remote_ip)
            except ValueError:
                address = None
            if address is not None and any(address in network for network in self._networks):
                return True
        return bool(self.token) and credential is not None and hmac.compare_digest(
            credential.encode(), self.token.encode()
        )

    # the server gauges

    def start(self):
        self._refresher = asyncio.ensure_future(self._refresh_forever())

    async def stop(self):
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)

    async def refresh(self):
        self.summary = await self.app.db.server_summary()
        self.summary_time = time.monotonic()

    async def _refresh_forever(self):
        while True:
            try:
                await self.refresh()
            except Exception as e:
                self.log.warning("Metrics: could not read the server summary: %s", e)
            await asyncio.sleep(self.refresh_interval)
