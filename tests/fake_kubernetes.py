"""FakeKubernetesAPI: a stand-in for a Kubernetes API server and its kubelet.

No Kubernetes API server can run on the test machines, so this fake speaks
the part of the Kubernetes REST API (core/v1) that KubeSpawner 7 uses through
kubernetes_asyncio, and nothing more:

- ``GET /api/v1/namespaces/{ns}/{pods,events}`` as a list (with
  ``labelSelector``, ``fieldSelector``, ``resourceVersion``) and as a watch
  (``watch=true``): a chunked stream of ``{"type", "object"}`` lines from the
  given ``resourceVersion``, ended after ``timeoutSeconds``; a version older
  than the history kept gets an ``ERROR`` event with code 410, as the real
  server answers;
- ``POST``, ``GET`` and ``DELETE`` of pods, persistentvolumeclaims, secrets
  and services in a namespace (409 on a name taken, 404 on a missing one).

Deleting a pod also deletes what names it in ``ownerReferences`` (the
garbage collector of a real cluster). Requests need the bearer token of the
kubeconfig file the fake writes (:attr:`kubeconfig`); every request is
recorded (:meth:`calls`, :attr:`requests`).

A simulated kubelet moves each pod as a real node shows it: Pending with the
events Scheduled, Pulling, Pulled, Created and Started, then Running with a
``podIP`` of its own on the loopback network (127.1.x.y) once the container
ran for :attr:`ready_after` seconds. The container is a local process: the
pod's ``command`` + ``args`` with the pod's environment (``0.0.0.0`` in
``JUPYTERHUB_SERVICE_URL`` becomes the pod's IP, as a pod's own network
would make it); secret volumes are written to the pod's folder and
environment values under their mount path point there. An image whose name
contains ``does-not-exist`` cannot be pulled (ErrImagePull, then
ImagePullBackOff), one with ``slow-pull`` takes two minutes to pull; a
command that cannot be run or that exits leaves the container in
CrashLoopBackOff. As a real kubelet, it starts no container before the
secrets its volumes name exist. With ``run_containers=False`` (benchmarks)
the kubelet reports pods running without starting a process.

The fake runs its own event loop in a thread: tests drive it from any loop.
"""

import asyncio
import base64
import copy
import json
import os
import secrets
import shutil
import signal
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

KINDS = {
    "pods": "Pod",
    "events": "Event",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "secrets": "Secret",
    "services": "Service",
}
WATCHABLE = ("pods", "events")
HISTORY = 50000  # changes kept for watches that resume from a resourceVersion
MISSING_IMAGE_MARK = "does-not-exist"
SLOW_IMAGE_MARK = "slow-pull"  # an image that takes SLOW_PULL seconds to pull
SLOW_PULL = 120


def _now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selector(text):
    """``a=b,c=d`` (equality only, as KubeSpawner sends) -> list of (path, value)"""
    pairs = []
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        pairs.append((key.rstrip("="), value))
    return pairs


def _field(obj, path):
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _matches(obj, labels, fields):
    own = (obj.get("metadata") or {}).get("labels") or {}
    if any(own.get(k) != v for k, v in labels):
        return False
    return all(str(_field(obj, k)) == v for k, v in fields)


class _Handler(web.RequestHandler):
    def initialize(self, fake):
        self.fake = fake

    def check_xsrf_cookie(self):
        pass

    def prepare(self):
        self.fake.requests.append((self.request.method, self.request.path, self._query()))
        if self.fake.unavailable:
            self._status(503, "ServiceUnavailable", "the fake API server is unavailable")
            self.finish()
        elif self.request.headers.get("Authorization") != f"Bearer {self.fake.token}":
            self._status(401, "Unauthorized", "no valid bearer token")
            self.finish()

    def _query(self):
        return {k: self.get_query_argument(k) for k in self.request.query_arguments}

    def _status(self, code, reason, message):
        self.set_status(code)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Failure", "message": message, "reason": reason,
                               "code": code}))  # fmt: skip

    def _send(self, obj, code=200):
        self.set_status(code)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(obj))

    def _kind(self, kind):
        if kind not in KINDS:
            self._status(404, "NotFound", f"the server could not find the resource {kind}")
            return False
        return True

    async def get(self, namespace, kind, name=None):
        if not self._kind(kind):
            return
        if name is not None:
            obj = self.fake.store[kind].get((namespace, name))
            if obj is None:
                return self._status(404, "NotFound", f'{kind} "{name}" not found')
            return self._send(obj)
        labels = _selector(self.get_query_argument("labelSelector", ""))
        fields = _selector(self.get_query_argument("fieldSelector", ""))
        if self.get_query_argument("watch", "").lower() in ("true", "1"):
            return await self._watch(namespace, kind, labels, fields)
        items = [o for (ns, _), o in self.fake.store[kind].items()
                 if (namespace is None or ns == namespace) and _matches(o, labels, fields)]  # fmt: skip
        self._send({"kind": KINDS[kind] + "List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.fake.version)}, "items": items})  # fmt: skip

    async def _watch(self, namespace, kind, labels, fields):
        fake = self.fake
        since = self.get_query_argument("resourceVersion", "0") or "0"
        timeout = float(self.get_query_argument("timeoutSeconds", "1800"))
        queue = asyncio.Queue()
        watcher = (kind, namespace, labels, fields, queue)
        self.set_header("Content-Type", "application/json")
        self.set_header("Transfer-Encoding", "chunked")
        if since == "0":
            backlog = [("ADDED", o) for (ns, _), o in fake.store[kind].items()
                       if namespace is None or ns == namespace]  # fmt: skip
        elif fake.history and int(since) < fake.history[0][0] - 1:
            self.write(json.dumps({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                "reason": "Expired", "message": f"too old resource version: {since}"}}) + "\n")  # fmt: skip
            return
        else:
            backlog = [(t, o) for rv, k, t, o in fake.history if k == kind and rv > int(since)
                       and (namespace is None or o["metadata"]["namespace"] == namespace)]  # fmt: skip
        fake.watchers.append(watcher)
        fake.open_watches += 1
        try:
            for event_type, obj in backlog:
                if _matches(obj, labels, fields):
                    self.write(json.dumps({"type": event_type, "object": obj}) + "\n")
            await self.flush()
            deadline = time.monotonic() + timeout
            while not (fake.stopping or fake.unavailable):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    event_type, obj = await asyncio.wait_for(queue.get(), min(left, 1))
                except asyncio.TimeoutError:
                    continue
                self.write(json.dumps({"type": event_type, "object": obj}) + "\n")
                await self.flush()
        except Exception:  # the client went away
            pass
        finally:
            fake.watchers.remove(watcher)
            fake.open_watches -= 1

    def post(self, namespace, kind):
        if not self._kind(kind):
            return
        try:
            body = json.loads(self.request.body)
            name = body["metadata"]["name"]
        except (ValueError, KeyError, TypeError):
            return self._status(400, "BadRequest", "no object with a metadata.name")
        if (namespace, name) in self.fake.store[kind]:
            return self._status(409, "AlreadyExists", f'{kind} "{name}" already exists')
        self.fake.received[kind].append(copy.deepcopy(body))
        self._send(self.fake.create(namespace, kind, body), 201)

    async def delete(self, namespace, kind, name):
        if not self._kind(kind):
            return
        obj = self.fake.store[kind].get((namespace, name))
        if obj is None:
            return self._status(404, "NotFound", f'{kind} "{name}" not found')
        self.fake.deleted[kind].append(name)
        if kind == "pods":
            grace = self.get_query_argument("gracePeriodSeconds", None)
            try:
                body = json.loads(self.request.body or b"{}")
            except ValueError:
                body = {}
            grace = body.get("gracePeriodSeconds", grace) if isinstance(body, dict) else grace
            self.fake.delete_pod(namespace, name, float(grace) if grace is not None else 30)
            return self._send(obj)
        self.fake.remove(namespace, kind, name)
        self._send({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})


class _NotFoundHandler(web.RequestHandler):
    def initialize(self, fake):
        self.fake = fake

    def prepare(self):
        self.fake.requests.append((self.request.method, self.request.path, {}))
        self.fake.unknown.append((self.request.method, self.request.path))
        raise web.HTTPError(404)


class FakeKubernetesAPI:
    """The fake API server and kubelet (see the module docstring).

    Parameters:
        workdir: folder for the kubeconfig file and the pods' folders and logs
        run_containers: start each pod's command as a local process (default);
            False: report pods running without a process (benchmarks)
        base_env: environment every container process starts from (PATH etc.;
            default: this process' PATH)
        entrypoints: image name -> the image's ENTRYPOINT (argv), run before
            the container's ``args`` when the pod gives no ``command``
        ready_after: seconds a container must run before it counts as ready
    """

    def __init__(self, workdir, run_containers=True, base_env=None, entrypoints=None,
                 ready_after=0.5):
        self.workdir = str(workdir)
        self.entrypoints = dict(entrypoints or {})
        self.run_containers = run_containers
        self.base_env = base_env or {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self.ready_after = ready_after
        self.token = secrets.token_hex(16)
        self.store = {kind: {} for kind in KINDS}
        self.received = {kind: [] for kind in KINDS}  # bodies as created, in order
        self.deleted = {kind: [] for kind in KINDS}
        self.requests = []  # (method, path, query) of every request
        self.unknown = []
        self.history = deque(maxlen=HISTORY)  # (resourceVersion, kind, type, object)
        self.watchers = []
        self.open_watches = 0
        self.version = 1
        self.stopping = False
        self.unavailable = False  # True: every request gets 503, watches end
        self.processes = {}  # (ns, pod name) -> asyncio subprocess
        # pod name -> {"created": t, "running": t} (time.monotonic())
        self.timeline = {}
        self._tasks = {}
        self._next_ip = 1
        self.loop = None
        self.port = None

    # running

    def start(self):
        """Listen on 127.0.0.1 (random port) in a thread; write the kubeconfig"""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name="fake-kubernetes")  # fmt: skip
        self._thread.start()
        ready.wait(10)
        self.kubeconfig = os.path.join(self.workdir, "kubeconfig")
        with open(self.kubeconfig, "w") as f:
            f.write(KUBECONFIG.format(port=self.port, token=self.token))
        return self

    def _run(self, ready):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        route = r"/api/v1/namespaces/([a-z0-9-]+)/([a-z]+)"
        app = web.Application([
            (route, _Handler, {"fake": self}),
            (route + r"/([a-z0-9.-]+)", _Handler, {"fake": self}),
            (r".*", _NotFoundHandler, {"fake": self}),
        ])  # fmt: skip
        sockets = bind_sockets(0, address="127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self._server = HTTPServer(app)
        self._server.add_sockets(sockets)
        ready.set()
        self.loop.run_forever()

    def stop(self):
        """Kill every container process, stop listening"""
        if self.loop is None:
            return
        self.call(self._shutdown)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _shutdown(self):
        self.stopping = True
        self._server.stop()
        for proc in list(self.processes.values()):
            _kill(proc, signal.SIGKILL)
        for task in list(self._tasks.values()):
            task.cancel()

    def call(self, fn, *args, timeout=30):
        """Run ``fn(*args)`` (a coroutine function or a plain one) on the fake's loop"""

        async def run():
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    # what tests read

    def calls(self):
        """The (verb, resource) pairs requested, as RBAC names them"""
        found = set()
        for method, path, query in list(self.requests):
            parts = path.strip("/").split("/")
            if len(parts) < 5 or parts[:3] != ["api", "v1", "namespaces"]:
                found.add((method, path))
                continue
            resource, named = parts[4], len(parts) > 5
            if method == "GET":
                verb = "get" if named else ("watch" if query.get("watch", "").lower() in ("true", "1") else "list")
            else:
                verb = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}[method]
            found.add((verb, resource))
        return found

    def request_count(self):
        return len(self.requests)

    def pod(self, name, namespace=None):
        """The stored pod (as the API serves it), or None"""
        for (ns, pod_name), obj in list(self.store["pods"].items()):
            if pod_name == name and namespace in (None, ns):
                return copy.deepcopy(obj)
        return None

    def pod_names(self):
        return sorted(name for _, name in list(self.store["pods"]))

    def names(self, kind):
        return sorted(name for _, name in list(self.store[kind]))

    def events_of(self, pod_name):
        return [e for e in list(self.store["events"].values())
                if e["involvedObject"]["name"] == pod_name]  # fmt: skip

    def delete_behind(self, name, namespace):
        """Delete a pod as ``kubectl delete pod`` would, behind the Outpost's back"""
        self.call(self.delete_pod, namespace, name, 1)

    # the store

    def _bump(self):
        self.version += 1
        return str(self.version)

    def _publish(self, kind, event_type, obj):
        snapshot = copy.deepcopy(obj)
        self.history.append((self.version, kind, event_type, snapshot))
        ns = obj["metadata"]["namespace"]
        for w_kind, w_ns, labels, fields, queue in list(self.watchers):
            if w_kind == kind and w_ns in (None, ns) and _matches(snapshot, labels, fields):
                queue.put_nowait((event_type, snapshot))

    def create(self, namespace, kind, body):
        meta = body.setdefault("metadata", {})
        meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(),
                    resourceVersion=self._bump())  # fmt: skip
        body.setdefault("apiVersion", "v1")
        body.setdefault("kind", KINDS[kind])
        if kind == "pods":
            body["status"] = {"phase": "Pending", "conditions": [], "qosClass": "Burstable"}
        self.store[kind][(namespace, meta["name"])] = body
        self._publish(kind, "ADDED", body)
        if kind == "pods":
            self.timeline[meta["name"]] = {"created": time.monotonic()}
            key = (namespace, meta["name"])
            self._tasks[key] = asyncio.ensure_future(self._kubelet(key))
        return body

    def update(self, kind, obj):
        obj["metadata"]["resourceVersion"] = self._bump()
        self._publish(kind, "MODIFIED", obj)

    def remove(self, namespace, kind, name):
        obj = self.store[kind].pop((namespace, name), None)
        if obj is None:
            return
        obj["metadata"]["resourceVersion"] = self._bump()
        self._publish(kind, "DELETED", obj)
        uid = obj["metadata"]["uid"]
        for other_kind in ("secrets", "services"):  # the garbage collector
            for (ns, other), dependent in list(self.store[other_kind].items()):
                owners = dependent["metadata"].get("ownerReferences") or []
                if ns == namespace and any(o.get("uid") == uid for o in owners):
                    self.remove(ns, other_kind, other)
        if kind == "pods":  # events expire; here with their pod
            for (ns, event_name), event in list(self.store["events"].items()):
                if ns == namespace and event["involvedObject"].get("uid") == uid:
                    self.store["events"].pop((ns, event_name))

    def event(self, pod, reason, message, event_type="Normal"):
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        event_name = f"{name}.{uuid.uuid4().hex[:16]}"
        self.create(namespace, "events", {
            "metadata": {"name": event_name},
            "involvedObject": {"kind": "Pod", "namespace": namespace, "name": name,
                               "uid": pod["metadata"]["uid"], "apiVersion": "v1"},
            "reason": reason, "message": message, "type": event_type,
            "source": {"component": "kubelet", "host": "fake-node"},
            "firstTimestamp": _now(), "lastTimestamp": _now(), "eventTime": None, "count": 1,
        })  # fmt: skip

    # the kubelet

    def _container(self, pod):
        containers = pod["spec"]["containers"]
        return next((c for c in containers if c["name"] == "notebook"), containers[0])

    def _status_of(self, container, state, ready=False, last=None):
        status = {"name": container["name"], "image": container["image"], "imageID": "",
                  "ready": ready, "started": ready, "restartCount": 0, "state": state}  # fmt: skip
        if last:
            status["lastState"] = last
        return status

    async def _kubelet(self, key):
        pod = self.store["pods"].get(key)
        try:
            await self._run_pod(key, pod)
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.pop(key, None)

    async def _run_pod(self, key, pod):
        namespace, name = key
        container = self._container(pod)
        image = container["image"]
        pod["spec"]["nodeName"] = "fake-node"
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
        self.update("pods", pod)
        self.event(pod, "Scheduled", f"Successfully assigned {namespace}/{name} to fake-node")
        await asyncio.sleep(0.05)
        self.event(pod, "Pulling", f'Pulling image "{image}"')
        await asyncio.sleep(SLOW_PULL if SLOW_IMAGE_MARK in image else 0.05)
        if MISSING_IMAGE_MARK in image:
            message = f'Failed to pull image "{image}": {image} not found'
            self.event(pod, "Failed", message, "Warning")
            pod["status"]["containerStatuses"] = [self._status_of(
                container, {"waiting": {"reason": "ErrImagePull", "message": message}})]
            self.update("pods", pod)
            await asyncio.sleep(0.1)
            message = f'Back-off pulling image "{image}"'
            self.event(pod, "BackOff", message)
            pod["status"]["containerStatuses"] = [self._status_of(
                container, {"waiting": {"reason": "ImagePullBackOff", "message": message}})]
            self.update("pods", pod)
            return
        self.event(pod, "Pulled", f'Successfully pulled image "{image}" in 50ms')
        await self._wait_for_secrets(pod)
        self.event(pod, "Created", f"Created container {container['name']}")
        ip = self._pod_ip()
        proc, problem = await self._start_process(pod, container, ip)
        if problem:
            await self._crashed(pod, container, 128, "StartError", problem)
            return
        self.event(pod, "Started", f"Started container {container['name']}")
        if proc is not None:
            try:
                code = await asyncio.wait_for(proc.wait(), self.ready_after)
            except asyncio.TimeoutError:
                code = None
            if code is not None:
                await self._crashed(pod, container, code, "Error", "")
                return
        pod["status"].update(
            phase="Running", podIP=ip, podIPs=[{"ip": ip}], hostIP="127.0.0.1", startTime=_now(),
            conditions=[{"type": t, "status": "True"} for t in
                        ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            containerStatuses=[self._status_of(container, {"running": {"startedAt": _now()}}, True)],
        )  # fmt: skip
        self.update("pods", pod)
        self.timeline.setdefault(name, {})["running"] = time.monotonic()
        if proc is not None:
            code = await proc.wait()
            if key in self.store["pods"] and "deletionTimestamp" not in pod["metadata"]:
                await self._crashed(pod, container, code, "Error" if code else "Completed", "")

    async def _wait_for_secrets(self, pod):
        """As a kubelet does: no container before its secret volumes exist
        (KubeSpawner creates the internal_ssl secret after the pod)"""
        namespace = pod["metadata"]["namespace"]
        names = [v["secret"]["secretName"] for v in pod["spec"].get("volumes") or [] if v.get("secret")]
        reported = False
        began = time.monotonic()
        while any((namespace, name) not in self.store["secrets"] for name in names):
            if not reported and time.monotonic() - began > 1:
                missing = [n for n in names if (namespace, n) not in self.store["secrets"]]
                self.event(pod, "FailedMount", f'MountVolume.SetUp failed: secret "{missing[0]}" not found',
                           "Warning")  # fmt: skip
                reported = True
            await asyncio.sleep(0.05)

    async def _crashed(self, pod, container, code, reason, message):
        terminated = {"terminated": {"exitCode": code, "reason": reason, "message": message,
                                     "finishedAt": _now()}}  # fmt: skip
        name = container["name"]
        self.event(pod, "BackOff", f"Back-off restarting failed container {name} in pod "
                                   f"{pod['metadata']['name']}", "Warning")  # fmt: skip
        waiting = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off 10s restarting failed container={name}"}}  # fmt: skip
        pod["status"]["containerStatuses"] = [self._status_of(container, waiting, last=terminated)]
        self.update("pods", pod)

    def _pod_ip(self):
        n = self._next_ip
        self._next_ip += 1
        return f"127.1.{n // 250}.{n % 250 + 1}"

    def _env(self, pod, container, ip, root):
        env = dict(self.base_env)
        limits = (container.get("resources") or {}).get("limits") or {}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"] or "")
                continue
            source = item.get("valueFrom") or {}
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[item["name"]] = {"status.podIP": ip, "metadata.name": pod["metadata"]["name"],
                                     "metadata.namespace": pod["metadata"]["namespace"]}.get(path, "")  # fmt: skip
            elif "resourceFieldRef" in source:
                env[item["name"]] = str(limits.get(source["resourceFieldRef"]["resource"], ""))
        url = env.get("JUPYTERHUB_SERVICE_URL")
        if url:
            env["JUPYTERHUB_SERVICE_URL"] = url.replace("0.0.0.0", ip)
        env.setdefault("HOME", root)
        env["HOME"] = root
        # secret volumes: files in the pod's folder, the environment points there
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            secret = (volumes.get(mount["name"]) or {}).get("secret")
            if not secret:
                continue
            local = os.path.join(root, "mounts", mount["mountPath"].strip("/"))
            os.makedirs(local, exist_ok=True)
            stored = self.store["secrets"].get((pod["metadata"]["namespace"], secret["secretName"]))
            for file_name, data in ((stored or {}).get("data") or {}).items():
                with open(os.path.join(local, file_name), "wb") as f:
                    f.write(base64.b64decode(data))
            mount_path = mount["mountPath"].rstrip("/")
            for k, v in list(env.items()):
                if v == mount_path or v.startswith(mount_path + "/"):
                    env[k] = os.path.join(local, v[len(mount_path):].lstrip("/"))
        return env

    async def _start_process(self, pod, container, ip):
        """(process or None, problem text or None)"""
        if not self.run_containers:
            return None, None
        root = os.path.join(self.workdir, "pods", pod["metadata"]["name"] + "-" + pod["metadata"]["uid"][:8])
        os.makedirs(root, exist_ok=True)
        command = container.get("command") or self.entrypoints.get(container["image"], [])
        argv = list(command) + list(container.get("args") or [])
        env = self._env(pod, container, ip, root)
        if not argv:
            return None, "no command: the fake has no image entrypoints"
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            return None, f'exec: "{argv[0]}": executable file not found in $PATH'
        log = open(os.path.join(root, "container.log"), "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=root, stdout=log, stderr=log,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as e:
            return None, str(e)
        finally:
            log.close()
        self.processes[(pod["metadata"]["namespace"], pod["metadata"]["name"])] = proc
        return proc, None

    def delete_pod(self, namespace, name, grace=30):
        """Delete a pod: SIGTERM, SIGKILL after ``grace`` seconds, then gone"""
        pod = self.store["pods"].get((namespace, name))
        if pod is None or "deletionTimestamp" in pod["metadata"]:
            return
        pod["metadata"]["deletionTimestamp"] = _now()
        pod["metadata"]["deletionGracePeriodSeconds"] = int(grace)
        self.update("pods", pod)
        asyncio.ensure_future(self._terminate(namespace, name, pod, grace))

    async def _terminate(self, namespace, name, pod, grace):
        task = self._tasks.pop((namespace, name), None)
        if task is not None:
            task.cancel()
        proc = self.processes.pop((namespace, name), None)
        if proc is not None and proc.returncode is None:
            self.event(pod, "Killing", f"Stopping container {self._container(pod)['name']}")
            _kill(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                _kill(proc, signal.SIGKILL)
                await proc.wait()
        self.remove(namespace, "pods", name)


def _kill(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster:
      server: http://127.0.0.1:{port}
users:
  - name: outpost
    user:
      token: {token}
contexts:
  - name: fake
    context:
      cluster: fake
      user: outpost
current-context: fake
"""
