"""KubeSpawner: what the Outpost adds so that it serves several hubs.

:class:`~jupyterhub_outpost.servers.ServerManager` calls :func:`prepare` for
every Spawner it builds (a no-op for other Spawner classes) and
:func:`shutdown` when the Outpost stops. For a KubeSpawner, :func:`prepare`

- names the pod, its Service, secret and PVC from the hub as well as the
  user and server (:func:`hub_object_name`): two hubs whose users and
  servers have the same names never share a pod, and no hub can pick a name
  that another hub's pods use, whatever ``pod_name_template`` it sends;
- runs ``start()`` on the event loop (KubeSpawner's ``start`` is a plain
  function returning a Future) and ends it as soon as the pod fails in a
  way Kubernetes does not recover from by itself (ImagePullBackOff,
  CrashLoopBackOff, ...), with Kubernetes' own reason and message, instead
  of after ``start_timeout``;
- makes ``poll()`` raise while the shared pod watch cannot be started or
  gave up (its cache cannot tell whether a pod runs), instead of answering
  "stopped", and replaces such a watch at the next poll or start.

All KubeSpawners of the process share KubeSpawner's own class-level pod and
event reflectors (one list+watch per kind and namespace): a poll reads the
pod from that cache and costs no API request.
"""

import asyncio
import functools
import hashlib
import re
import sys

KUBESPAWNER = "kubespawner.spawner.KubeSpawner"

# container states Kubernetes does not recover from without a change: a start
# that meets one of them fails at once (ErrImagePull alone is retried first)
FAILED_REASONS = frozenset(
    {
        "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CrashLoopBackOff",
        "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
    }
)  # fmt: skip
# seconds between two looks at the shared pod cache while a start runs
FAILURE_CHECK_INTERVAL = 0.5
# seconds between two looks at the shared event cache for progress messages,
# and at most this long a finished start waits for its last ones to be sent
PROGRESS_INTERVAL = 0.25
PROGRESS_DRAIN = 2

# A hub name as it stands in object names: a lowercase DNS label of 2 to
# 24 characters without "--"; any other name becomes "hub-" + 22 hex digits
# of its SHA-256 (26 characters, so never equal to a name kept as it is).
_READABLE_HUB = re.compile(r"^[a-z](?:[a-z0-9]|-(?!-)){0,22}[a-z0-9]$")
# the longest name a Service (a DNS label) may have
MAX_NAME = 63


class KubeStartError(Exception):
    """The pod of a start failed in a way Kubernetes does not recover from"""


def is_kubespawner(spawner):
    """True for a KubeSpawner or a subclass (without importing kubespawner)"""
    return _is_kubespawner_class(type(spawner))


@functools.lru_cache(maxsize=64)  # a few classes: asked at every start
def _is_kubespawner_class(cls):
    return any(f"{c.__module__}.{c.__name__}" == KUBESPAWNER for c in cls.__mro__)


def hub_slug(hub):
    """The hub's part of object names: the name itself when it is a short
    lowercase DNS label without "--", else ``hub-<hash>``"""
    if _READABLE_HUB.match(hub):
        return hub
    return "hub-" + hashlib.sha256(hub.encode()).hexdigest()[:22]


def hub_object_name(hub, name):
    """``<hub slug>--<name>``, at most 63 characters.

    The hub's part contains no "--" and does not end with "-", so the first
    "--" ends it: names of two hubs never meet, whatever ``name`` is. A
    longer result is cut and ends with a hash of the whole name.
    """
    full = f"{hub_slug(hub)}--{name}"
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:10]
    return f"{full[:MAX_NAME - 11].rstrip('-')}-{digest}"


def pod_problem(pod):
    """Why a pod will not run without help (Kubernetes' reason and message), or None"""
    if pod is None:
        return None
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return f"{status.get('reason') or 'Failed'}: {status.get('message') or 'the pod failed'}"
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in FAILED_REASONS:
            text = f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
            last = (container.get("lastState") or {}).get("terminated") or {}
            if last:
                text += f" (exit code {last.get('exitCode')}{', ' + last['message'] if last.get('message') else ''})"
            return text
        if "terminated" in state and status.get("phase") != "Running":
            ended = state["terminated"]
            return f"{ended.get('reason') or 'Terminated'}: exit code {ended.get('exitCode')}"
    return None


def prepare(spawner, hub):
    """Adapt a freshly built Spawner to the Outpost (no-op unless a KubeSpawner).

    Runs after the hub's overrides were set and before a saved state is
    loaded (which keeps the names a server had).
    """
    if not is_kubespawner(spawner):
        return
    _name_objects(spawner, hub)
    own_start, own_poll = spawner.start, spawner.poll

    async def start():
        return await _start(spawner, own_start)

    async def poll():
        return await _poll(spawner, own_poll)

    spawner.start = start
    spawner.poll = poll
    spawner.progress = lambda: _progress(spawner)


def _name_objects(spawner, hub):
    spawner.pod_name = hub_object_name(hub, spawner._expand_user_properties(spawner.pod_name_template))
    spawner.dns_name = spawner.dns_name_template.format(namespace=spawner.namespace, name=spawner.pod_name)
    spawner.secret_name = spawner._expand_user_properties(spawner.secret_name_template)
    if not spawner.secret_name.startswith(hub_slug(hub) + "--"):
        spawner.secret_name = hub_object_name(hub, spawner.secret_name)
    spawner.pvc_name = hub_object_name(hub, spawner._expand_user_properties(spawner.pvc_name_template))


async def _start(spawner, own_start):
    spawner._outpost_progress_done = asyncio.Event()
    spawner._outpost_progress_running = False
    spawner._outpost_failure = None
    # a watch broken earlier (the API server was away) is replaced first
    await _reflector(spawner, "pods")
    if spawner.events_enabled:
        await _reflector(spawner, "events")
    future = asyncio.ensure_future(own_start())
    watcher = asyncio.ensure_future(_first_failure(spawner, future))
    try:
        await asyncio.wait([future, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not future.done():
            spawner._outpost_failure = watcher.result()
            future.cancel()
            await asyncio.wait([future])
        elif future.exception() is not None:
            raise future.exception()
        if spawner._outpost_progress_running:
            # the hub sees the last events ("Started container", or why the
            # pod failed) before the answer to its start
            try:
                await asyncio.wait_for(spawner._outpost_progress_done.wait(), PROGRESS_DRAIN)
            except asyncio.TimeoutError:
                pass
        if spawner._outpost_failure is not None:
            raise spawner._outpost_failure
        return future.result()
    except asyncio.CancelledError:
        future.cancel()
        raise
    finally:
        watcher.cancel()


async def _first_failure(spawner, start_future):
    """A :class:`KubeStartError` once the starting pod failed (never returns otherwise)"""
    while True:
        await asyncio.sleep(FAILURE_CHECK_INTERVAL)
        reflector = spawner.pod_reflector
        if reflector is None:
            continue
        pod = reflector.pods.get(f"{spawner.namespace}/{spawner.pod_name}")
        problem = pod_problem(pod)
        if problem:
            return KubeStartError(f"Kubernetes: pod {spawner.pod_name}: {problem}")


async def _progress(spawner):
    """KubeSpawner's progress messages (one per event of the pod), read from
    the shared event cache every ``PROGRESS_INTERVAL`` seconds; ends after
    a last look once the start finished"""
    if not spawner.events_enabled:
        return
    spawner._outpost_progress_running = True
    await spawner._start_watching_events()
    seen, progress = 0, 0
    while True:
        future = spawner._start_future
        finished = future is not None and future.done()
        events = spawner.events
        for event in events[seen:]:
            progress += (90 - progress) / 3
            stamp = event.get("lastTimestamp") or event.get("eventTime")
            yield {"progress": int(progress), "message": f"{stamp} [{event['type']}] {event['message']}"}
        seen = max(seen, len(events))
        if finished:
            failure = getattr(spawner, "_outpost_failure", None)
            if failure is not None:
                yield {"progress": 100, "message": str(failure)}
            break
        await asyncio.sleep(PROGRESS_INTERVAL)
    done = getattr(spawner, "_outpost_progress_done", None)
    if done is not None:
        done.set()


def _watch_running(reflector):
    task = getattr(reflector, "watch_task", None)
    return task is not None and not task.done()


def _broken(reflector):
    """True for a reflector whose first list failed or whose watch gave up"""
    loaded = reflector.first_load_future
    if not loaded.done():
        return False  # still loading: wait for it
    return loaded.cancelled() or loaded.exception() is not None or not _watch_running(reflector)


# (kind, namespace) -> the task replacing that broken reflector: one at a time
_replacing = {}


async def _reflector(spawner, kind):
    """The shared reflector of ``kind`` ("pods", "events"), started if
    needed, replaced by a new one if it is broken (raises if that fails)"""
    start = spawner._start_watching_pods if kind == "pods" else spawner._start_watching_events
    key = spawner._get_reflector_key(kind)
    current = type(spawner).reflectors.get(key)
    if current is None or not _broken(current):
        return await start()
    task = _replacing.get(key)
    if task is None:
        task = _replacing[key] = asyncio.ensure_future(start(replace=True))
        task.add_done_callback(lambda t: _replacing.pop(key, None))
    return await asyncio.shield(task)


async def _poll(spawner, own_poll):
    reflector = await _reflector(spawner, "pods")
    if not _watch_running(reflector):
        raise RuntimeError("The pod watch is not running: the pod's status is not known")
    return await own_poll()


def watch_count():
    """The shared reflectors of this process (pods and events per namespace)"""
    module = sys.modules.get("kubespawner.spawner")
    return len(module.KubeSpawner.reflectors) if module else 0


async def shutdown():
    """Stop the shared watches (running pods keep running)"""
    module = sys.modules.get("kubespawner.spawner")
    if module is None:
        return
    try:
        await module.KubeSpawner._stop_all_reflectors()
    except Exception:
        pass
