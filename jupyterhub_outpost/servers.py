"""Running JupyterHub Spawners on behalf of hubs.

:class:`ServerManager` owns every start, poll and stop. Each start of a
server is a :class:`ManagedServer`: one Spawner instance, built from the
hub's start request, driven in the order JupyterHub's own ``User.spawn``
uses (user options, ``pre_spawn_hook``, certificates, ``start()`` under
``start_timeout``), with its state written to the database as soon as it
exists. Poll and stop rebuild the Spawner from the database when this
process does not hold it (after a restart, or when another process started
it).
"""

import asyncio
import copy
import html
import inspect
import os
import shutil
import sys
import weakref
from functools import partial

from jupyterhub.utils import iterate_until, maybe_future
from traitlets import TraitError
from traitlets.config import LoggingConfigurable

from .flavors import FlavorError
from .errors import (
    AccountRefusedError,
    OutpostError,
    OverrideRefusedError,
    ServerNotFoundError,
    StartCancelledError,
    StartFailedError,
    StatusUnknownError,
    StopFailedError,
)
from . import certs
from .earlyexit import EarlyExitWatch
from .history import StartHistory
from .log import secrets
from .metrics import observed
from .orm import ServerRecord
from .pacing import Pacer
from .objects import OutpostDB, OutpostHub, OutpostORMSpawner, OutpostUser
from .spawnercalls import SpawnerCalls, hook_configured, runs_on_loop
from .spawners import kube, localprocess
from .statekeeper import StateKeepers, state_is_unknown, state_to_save
from .stops import StopClaims
from .utils import format_service_address, isoformat

# env keys that describe the Outpost side of a server (where it binds, where
# its certificates are): the Spawner's own values win over the hub's.
OUTPOST_SIDE_ENV = (
    "JUPYTERHUB_SERVICE_URL",
    "JUPYTERHUB_SSL_KEYFILE",
    "JUPYTERHUB_SSL_CERTFILE",
    "JUPYTERHUB_SSL_CLIENT_CA",
)

# seconds a stop waits for another process that is stopping the same server
OTHER_STOP_WAIT = 15

SECRET_ENV_KEYS = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_FLAVORS_UPDATE_TOKEN")


def _register_secrets(env):
    for key in SECRET_ENV_KEYS:
        secrets.add(env.get(key))


def _forget_secrets(env):
    for key in SECRET_ENV_KEYS:
        if env.get(key):
            secrets.discard(env[key])


class ManagedServer:
    """One start of one server: its Spawner and what belongs to it"""

    def __init__(self, manager, record, request, spawner, db):
        self.manager = manager
        self.outpost_db = db
        self.record = record
        self.request = request
        self.spawner = spawner
        self.start_task = None
        self.keeper = None  # a StateKeeper while the start runs
        self.state_unknown = False  # restored from a state that was not a dict
        self._poll_call = None  # a poll() running in a thread
        self.stop_call = None  # a stop() running in a thread
        self.log_name = "{}/{}/{}".format(*record.key)
        self.events = []  # the progress events of its start, for the history
        self.saved_state = None  # the state last stored, while the start runs
        self.output_path = None  # where the server's output goes, when the Outpost keeps it

    @property
    def env(self):
        return self.request["env"]

    @property
    def starting(self):
        return self.start_task is not None and not self.start_task.done()

    def forget_start_task(self, task):
        if self.start_task is task:
            self.start_task = None

    def release_memory(self):
        """Drop what a running server does not need between requests"""
        orm_spawner = self.spawner.orm_spawner
        if isinstance(orm_spawner, OutpostORMSpawner):
            orm_spawner.release_server(self.spawner)

    async def save_state(self, service=None, start_done=False, then=None):
        """Store the Spawner's state; False when a finished start was not
        recorded as done (another process asked for a stop meanwhile).
        ``then`` (a step of an :class:`~.orm.FollowUp`) is written with it when it was.
        During a start, a state stored already is not written again."""
        state = state_to_save(self.spawner)
        unchanged = self.starting and state == self.saved_state
        saved = await self.manager.db.save_state(
            self.record.id, None if unchanged else state, service, start_done, then
        )
        if self.starting:
            self.saved_state = copy.deepcopy(state)
        return saved

    async def poll(self, calls, timeout):
        """The Spawner's ``poll()``, raising ``asyncio.TimeoutError`` after ``timeout``"""
        poll = self.spawner.poll
        if runs_on_loop(poll):
            return await calls.call(poll, timeout=timeout)
        # a thread cannot be interrupted: never more than one poll() per server
        if self._poll_call is None or self._poll_call.done():
            self._poll_call = asyncio.ensure_future(calls.submit(poll))
        return await asyncio.wait_for(asyncio.shield(self._poll_call), timeout)

    async def stop(self, calls, timeout, now=False):
        """The Spawner's ``stop()``, raising ``asyncio.TimeoutError`` after ``timeout``"""
        stop = self.spawner.stop
        if runs_on_loop(stop):
            return await calls.call(stop, now=now, timeout=timeout)
        if self.stop_call is None or self.stop_call.done():
            self.stop_call = asyncio.ensure_future(calls.submit(stop, now=now))
        return await asyncio.wait_for(asyncio.shield(self.stop_call), timeout)


class ServerManager(LoggingConfigurable):
    """Starts, polls, stops and lists the servers of all hubs.

    Parameters:
        app: the :class:`~jupyterhub_outpost.app.JupyterHubOutpost` whose
            configuration (spawner class, hooks) applies
        policy: the :class:`~jupyterhub_outpost.policy.OutpostPolicy` that
            decides what a start may do (overrides, account, flavor)
    """

    def __init__(self, app, policy, **kwargs):
        super().__init__(parent=app, **kwargs)
        self.app = app
        self.policy = policy
        self.db = app.db
        self.hub_client = app.hub_client
        self.active = {}  # key -> ManagedServer held by this process
        self._restoring = {}  # key -> Future[ManagedServer]
        self._stopping = {}  # key -> Task
        self._background = set()
        self._hubs = {}  # hub env values -> OutpostHub
        # turns for the bookkeeping of stops (claiming, restoring the
        # Spawner); never held while waiting for anything but the database
        self._turns = asyncio.Semaphore(max(1, app.concurrent_bookkeeping))
        # the slices of work of a burst of starts, a few per turn of the loop
        self.pacer = Pacer(app.concurrent_bookkeeping)
        # this process, as named in the records of the starts and stops it runs
        self.owner = app.process_owner
        self.claims = StopClaims(
            self.db, self.owner, app.pending_timeout, app.stop_timeout + OTHER_STOP_WAIT
        )
        self.calls = SpawnerCalls(app.spawner_threads)
        self.collector = None  # the CollectorPolicy: told when servers come and go
        self._usage_updates = {}  # (hub, update url) -> None, or the next update's (env, log name)
        self.history = StartHistory(self.db, app.history_retention_days, app.history_per_user)
        self.early_exits = EarlyExitWatch(self, app.early_exit_window, localprocess.output_tail)
        self.keepers = StateKeepers(self.db, self.log)
        # called with the record of each server this process forgets
        self.forget_callbacks = []

    # building spawners

    def _spawner_class(self, name):
        cls = self.app.spawner_class
        if name and name != _class_name(cls):
            self.log.warning(
                "Server was started with %s, now using the configured %s", name, _class_name(cls)
            )
        return cls

    def build_spawner(self, record, request, auth_state=None, register_secrets=True):
        """A Spawner configured from the config file and the start request
        (its secrets registered with the log filter, unless the caller
        registers them itself)"""
        # a running server keeps its env: the variables' names, the same in
        # all starts (10-30 of them), are kept once, not once per server
        env = request["env"] = {sys.intern(k): v for k, v in request["env"].items()}
        hub = self._hub_object(env)
        # the local account; JUPYTERHUB_USER in the env stays the hub's name
        account = request.get("account") or env.get("JUPYTERHUB_USER", record.user_name)
        user = OutpostUser(account, _int(record.hub_user_id), hub, auth_state)
        orm_spawner = OutpostORMSpawner(
            record.name, request.get("user_options", {}), env.get("JUPYTERHUB_SERVICE_PREFIX")
        )
        # the Spawner holds its db, which reaches its ManagedServer only
        # weakly: no reference cycle, so a stopped server's objects are freed
        # at once, without waiting for a full garbage collection
        holder = {}
        db = OutpostDB(on_commit=lambda: self._commit_state(holder["managed"]()))
        spawner = self._spawner_class(record.spawner_class)(
            parent=self.app,
            user=user,
            hub=hub,
            orm_spawner=orm_spawner,
            _deprecated_db_session=db,
            user_options=request.get("user_options", {}),
            api_token=env.get("JUPYTERHUB_API_TOKEN", ""),
            oauth_client_id=env.get("JUPYTERHUB_CLIENT_ID", ""),
        )
        orm_spawner.spawner_built()
        self._apply_overrides(spawner, request.get("misc") or {}, record)
        kube.prepare(spawner, record.hub)
        _merge_env(spawner, env)
        managed = ManagedServer(self, record, request, spawner, db)
        holder["managed"] = weakref.ref(managed)
        if register_secrets:
            _register_secrets(env)
        return managed

    def _hub_object(self, env):
        """One OutpostHub per hub address, shared by its spawners (as in JupyterHub)"""
        key = tuple(env.get(k) for k in OutpostHub.ENV_KEYS)
        hub = self._hubs.get(key)
        if hub is None:
            if len(self._hubs) > 1000:  # addresses change rarely; never grow without bound
                self._hubs.clear()
            hub = self._hubs[key] = OutpostHub(env)
        return hub

    def _apply_overrides(self, spawner, misc, record):
        """Set the overrides the policy accepted (``OutpostPolicy.check_request``)"""
        for key, value in misc.items():
            if not spawner.has_trait(key):
                self.log.debug("%s/%s/%s - ignoring override of unknown trait %r", *record.key, key)
                continue
            try:
                setattr(spawner, key, value)
            except TraitError as e:
                raise OverrideRefusedError(f"Invalid value for {key}: {e}") from None

    async def _commit_state(self, managed):
        if managed is None:  # forgotten meanwhile
            return
        if managed.keeper is not None:
            managed.keeper.wake()  # a start runs: its keeper saves what changed
            return
        try:
            await managed.save_state()
        except Exception:
            self.log.exception("%s - could not store the spawner state", managed.log_name)

    # start

    def _refused(self, hub, env, error):
        """A start refused before anything ran"""
        if self.app.metrics is not None:
            self.app.metrics.start_refused(hub, error)
        self._report_usage(hub, env)

    async def start(self, hub, request, certs=None, trust_bundles=None, auth_state=None, run_async=False):
        """Start a server; return ``{"service": address}``.

        ``request`` holds ``name``, ``start_id``, ``env``, ``user_options``,
        ``misc`` and ``flavor``; certificates and auth state are only used,
        never stored. With ``run_async`` the start runs in the background and
        an empty service is returned at once.
        """
        env = request["env"]
        try:
            # a burst of starts is checked a few at a time (polls stay prompt);
            # the operator's hooks run outside the turns: they may take a while
            await self.pacer.wait()
            overrides = self.policy.check_request(hub, request)
            plan = await self.policy.plan_start(hub, request, overrides)
            flavor_name, flavor, check_limits, end_date = await self.policy.flavor_for_start(
                hub, request
            )
        except (OverrideRefusedError, AccountRefusedError, FlavorError) as e:
            self._refused(hub, env, e)
            raise
        stored = {
            "env": env,
            "user_options": request["user_options"],
            "misc": plan.overrides,
            "account": plan.account,
        }
        record = ServerRecord.new(
            hub,
            request["name"],
            request["start_id"],
            user_name=env.get("JUPYTERHUB_USER", ""),
            hub_user_id=env.get("JUPYTERHUB_USER_ID") or env.get("JUPYTERHUB_USER", ""),
            spawner_class=_class_name(self.app.spawner_class),
            flavor=flavor_name,
            end_date=end_date,
            owner=self.owner,
        )
        # the Spawner first, so that its state before the start is stored
        # with the record: one transaction, and nothing for the keeper to save
        try:
            await self.pacer.wait()
            managed = self.build_spawner(record, stored, auth_state, register_secrets=False)
            if flavor is not None:
                await maybe_future(self.app.apply_flavor_hook(managed.spawner, flavor_name, flavor))
            state = copy.deepcopy(state_to_save(managed.spawner))
        except Exception as e:
            self._report_usage(hub, env)
            raise StartFailedError(e) from e
        try:
            await self.db.add_server(
                record, stored, state, check_limits=check_limits, then=self.history.begin_row
            )
        except FlavorError as e:
            self._refused(hub, env, e)
            raise
        # registered only now: a start refused here (its key exists, say) must
        # not unregister the tokens of the server that holds the key
        _register_secrets(env)
        self.active[record.key] = managed
        managed.saved_state = state
        task = managed.start_task = asyncio.create_task(
            self._run_start(managed, certs or {}, trust_bundles or {}, run_async)
        )
        # a finished task is not kept: 10,000 running servers, 10,000 tasks less
        task.add_done_callback(managed.forget_start_task)
        if run_async:
            self._keep(task)
            return {"service": ""}
        await asyncio.wait([task])
        if task.cancelled():
            raise StartCancelledError("The start was cancelled by a stop request")
        return {"service": task.result()}

    @observed("start", lambda managed, *_: managed.record.hub)
    async def _run_start(self, managed, certs, trust_bundles, run_async):
        spawner = managed.spawner
        spawner._spawn_pending = True
        forwarder = start_future = None
        managed.keeper = self.keepers.add(
            managed, on_stop_requested=managed.start_task.cancel, saved=managed.saved_state
        )
        try:
            if self.policy.events_enabled(managed.record.hub):
                await self._send_event(
                    managed,
                    {"progress": 30, "message": f"Outpost: starting the server ({type(spawner).__name__})"},
                )
            if spawner.apply_user_options is not None:
                # as JupyterHub does, but only when configured: the protocol's
                # own keys (start_id, flavor) are not the spawner's business
                await spawner._run_apply_user_options(spawner.user_options)
            if hook_configured(spawner, "pre_spawn_hook"):  # else no thread for nothing
                await self.calls.call(spawner.run_pre_spawn_hook)
            if certs:
                await self._install_certs(managed, certs, trust_bundles)
            await self._capture_output(managed)
            start_future = asyncio.ensure_future(self.calls.submit(spawner.start))
            spawner._spawn_future = start_future
            if self.policy.events_enabled(managed.record.hub):
                forwarder = asyncio.create_task(self._forward_progress(managed, start_future))
            try:
                result = await asyncio.wait_for(asyncio.shield(start_future), spawner.start_timeout)
            except asyncio.TimeoutError:
                start_future.cancel()
                raise TimeoutError(
                    f"Spawner.start did not finish within {spawner.start_timeout} seconds"
                ) from None
            service = format_service_address(
                await maybe_future(self.app.sanitize_start_response(spawner, result))
            )
            spawner._spawn_pending = False
            spawner._spawn_future = None  # as JupyterHub does once a spawn finished
            if forwarder is not None:
                await asyncio.wait([forwarder], timeout=self.app.hub_client.request_timeout)
            # the state is saved once more below, with the address, the end
            # of the start and its history: one transaction
            await self._end_keeper(managed, last_save=False)
            await managed.outpost_db.flush_pending()
            await self.pacer.wait()  # the ends of a burst of starts are paced too
            ready = self.history.ready_step(
                self.db.hub_ids[managed.record.hub], *managed.record.key[1:], managed.events
            )
            done = await managed.save_state(service=service, start_done=True, then=ready)
            if not done:
                raise _StopRequested()
            if self.app.early_exit_window > 0 and managed.output_path:
                # servers whose output the Outpost keeps: it has their words to tell
                self.early_exits.watch(managed)  # it forgets the events when done
            else:
                managed.events = []
            managed.saved_state = None
            managed.release_memory()
            if self.collector is not None:
                self.collector.changed()
            self.log.info("%s - started at %s", managed.log_name, service or "(address follows)")
            self._after_change(managed)
            return service
        except (asyncio.CancelledError, _StopRequested) as e:
            self.log.info("%s - start cancelled by a stop request", managed.log_name)
            await self._record_history(
                self.history.end_start, managed.record.key, "cancelled", managed.events,
                "The start was cancelled by a stop request",
            )  # fmt: skip
            await self._end_start_future(managed, start_future)
            await self._end_keeper(managed)
            await self._discard_failed_start(managed)
            if isinstance(e, _StopRequested):
                raise StartCancelledError("The start was cancelled by a stop request") from None
            raise
        except Exception as e:
            self.log.error("%s - start failed: %s", managed.log_name, _describe(e))
            self.log.debug("%s - start failure", managed.log_name, exc_info=True)
            if run_async:
                await self._send_event(managed, _failed_event(e))
            await self._record_history(
                self.history.end_start, managed.record.key, "failed", managed.events, _describe(e)
            )
            await self._end_start_future(managed, start_future)
            await self._end_keeper(managed)
            await self._discard_failed_start(managed)
            raise StartFailedError(e) from e
        finally:
            spawner._spawn_pending = False
            localprocess.release_output(spawner)
            if managed.keeper is not None:
                await self._end_keeper(managed)
            if forwarder is not None and not forwarder.done():
                # start_future is done, so the forwarder ends by itself; cancelled
                # while iterate_until waits, it would orphan a pending __anext__()
                # task ("Task exception was never retrieved: StopAsyncIteration")
                await asyncio.wait([forwarder], timeout=1)
                if not forwarder.done():
                    forwarder.cancel()

    async def _end_keeper(self, managed, last_save=True):
        """Stop saving the state as it changes, after one last save (unless
        the caller saves it next)"""
        keeper, managed.keeper = managed.keeper, None
        if keeper is None:
            return
        try:
            await keeper.stop(last_save)
        except Exception as e:
            self.log.warning("%s - could not save the state: %s", managed.log_name, _describe(e))

    async def _end_start_future(self, managed, start_future, timeout=10):
        """Cancel a ``Spawner.start()`` still running and wait until it ended.

        ``start()`` runs shielded from the start task; without this a
        cancelled or timed-out start would go on (and launch a process)
        after the stop that follows it.
        """
        if start_future is None or start_future.done():
            return
        start_future.cancel()
        await asyncio.wait([start_future], timeout=timeout)
        if not start_future.done():
            self.log.warning("%s - Spawner.start() ignores cancellation", managed.log_name)

    async def _forward_progress(self, managed, start_future):
        try:
            async for event in iterate_until(start_future, managed.spawner.progress()):
                if not isinstance(event, dict):
                    continue
                event = {k: v for k, v in event.items() if k != "ready"}
                await self._send_event(managed, event)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("%s - could not forward progress", managed.log_name)

    async def _send_event(self, managed, event):
        managed.events.append(event)
        await self.hub_client.send_event(managed.env, event, managed.log_name)

    async def _record_history(self, call, *args):
        """Write to the spawn history; a failure there fails nothing else"""
        try:
            await call(*args)
        except Exception as e:
            self.log.warning("Spawn history not written (%s): %s", call.__name__, _describe(e))

    async def _discard_failed_start(self, managed):
        """After a failed or cancelled start: stop, forget, tell the hub.

        When that stop fails too, the record stays (start pending, no owner):
        what the start launched may still run, and cleanup tries again after
        ``pending_timeout``.
        """
        try:
            await managed.stop(self.calls, self.app.stop_timeout, now=True)
        except Exception as e:
            reason = _describe(e) if not isinstance(e, asyncio.TimeoutError) else "timed out"
            self.log.error("%s - stop after failed start: %s; keeping its record", managed.log_name, reason)
            await self.db.release_stop(managed.record.id, self.owner)
            if self.active.get(managed.record.key) is managed:
                del self.active[managed.record.key]
            return
        await self._forget(managed)

    async def _capture_output(self, managed):
        """Keep the server's output in a file of its own, where the Spawner allows"""
        if not localprocess.keeps_output(managed.spawner):
            return
        loop = asyncio.get_running_loop()
        opening = partial(localprocess.open_output, self.app.server_output_dir, managed.record.key)
        try:
            fd, managed.output_path = await loop.run_in_executor(None, opening)
        except (OSError, ValueError) as e:
            self.log.warning("%s - the server's output is not kept: %s", managed.log_name, e)
            return
        localprocess.use_output(managed.spawner, fd)

    async def _forget(self, managed, then=None):
        """Remove what belongs to a server and its record (with ``then``, a
        step of the same transaction)"""
        await self._remove_certs(managed)
        output = localprocess.output_file(self.app.server_output_dir, managed.record.key)
        await asyncio.get_running_loop().run_in_executor(None, _remove_file, output)
        await self.db.delete_server(managed.record.id, then)
        if self.active.get(managed.record.key) is managed:
            del self.active[managed.record.key]
        _forget_secrets(managed.env)
        if self.collector is not None:
            self.collector.released(managed.spawner)
        for callback in self.forget_callbacks:
            callback(managed.record)
        self._after_change(managed)

    def _after_change(self, managed):
        """Tell the hub its flavor usage changed (in the background)"""
        self._report_usage(managed.record.hub, managed.env, managed.log_name)

    def _report_usage(self, hub, env, log_name=""):
        """Send the hub its flavor usage, where it asked for it; one update
        per hub and address at a time, and one more after it when usage
        changed meanwhile (a burst of starts sends two, not one each)"""
        url = env.get("JUPYTERHUB_FLAVORS_UPDATE_URL")
        if not url or not env.get("JUPYTERHUB_FLAVORS_UPDATE_TOKEN"):
            return
        key = (hub, url)
        if key in self._usage_updates:
            self._usage_updates[key] = (env, log_name)  # sent when the one in flight is done
            return
        self._usage_updates[key] = None
        self._keep(asyncio.ensure_future(self._send_flavor_updates(key, hub, env, log_name)))

    async def _send_flavor_updates(self, key, hub, env, log_name):
        try:
            while True:
                usage = await self.policy.flavor_usage(hub)
                await self.hub_client.send_flavor_update(env, usage, log_name)
                again = self._usage_updates.get(key)
                if again is None:
                    break
                self._usage_updates[key] = None
                env, log_name = again
        finally:
            self._usage_updates.pop(key, None)

    def _keep(self, task):
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(self._retrieve_failure)

    def _retrieve_failure(self, task):
        """Collect a background task's exception, so that asyncio does not
        log "Task exception was never retrieved"; ours are logged already."""
        if task.cancelled():
            return
        e = task.exception()
        if e is not None and not isinstance(e, OutpostError):
            self.log.error("Background task failed: %s", _describe(e), exc_info=e)

    # poll

    async def _managed(self, key, record_id):
        """The ManagedServer of server ``record_id``, rebuilt from the database if needed"""
        managed = self.active.get(key)
        if managed is not None and managed.record.id == record_id:
            return managed
        future = self._restoring.get(key)
        if future is None:
            future = asyncio.ensure_future(self._restore(key))
            self._restoring[key] = future
            future.add_done_callback(lambda f: self._restoring.pop(key, None))
        return await asyncio.shield(future)

    async def _restore(self, key):
        full = await self.db.get_server(*key, secrets=True)
        if full is None:
            raise ServerNotFoundError()
        managed = self.build_spawner(full, full.request)
        if state_is_unknown(full.state) or (full.state is None and not full.start_pending):
            # get_state() gave no dict: nothing tells whether the server runs
            managed.state_unknown = True
        elif full.state:
            managed.spawner.load_state(full.state)
        if os.path.isdir(self._cert_dir(full)):
            managed.spawner.internal_ssl = True
        managed.release_memory()
        self.active[full.key] = managed
        if self.collector is not None:
            self.collector.changed()
        self.log.debug("%s - spawner restored from the database", managed.log_name)
        return managed

    @observed("poll", lambda hub, *_: hub)
    async def poll(self, hub, name, start_id, collect_logs=False):
        """``{"status": None}`` while running, the exit status when ended.

        The status is the Spawner's own ``poll()``, also while a stop runs
        or after one failed. When that cannot tell (it fails, runs past
        ``poll_timeout``, or the state was lost) the answer is 503, so that
        the hub keeps the server.
        """
        key = (hub, name, start_id)
        found = await self.db.server_status(hub, name, start_id)
        if found is None:
            self._drop_stale(key)
            raise ServerNotFoundError()
        record_id, start_pending, _stop_pending = found
        if start_pending:
            return {"status": None}
        managed = await self._managed(key, record_id)
        model = {"status": await self._spawner_status(managed)}
        if collect_logs:
            model["logs"] = await self._logs(managed)
        return model

    async def _spawner_status(self, managed):
        if managed.state_unknown:
            raise StatusUnknownError(
                "The server's status cannot be determined: its Spawner gave no state to keep"
            )
        timeout = self.app.poll_timeout
        try:
            return await managed.poll(self.calls, timeout)
        except asyncio.TimeoutError:
            self.log.error("%s - poll did not answer within %s s", managed.log_name, timeout)
            raise StatusUnknownError(
                f"The server's status cannot be determined: poll() did not answer within {timeout} s"
            ) from None
        except Exception as e:
            self.log.error("%s - poll failed: %s", managed.log_name, _describe(e))
            raise StatusUnknownError(
                f"The server's status cannot be determined: {_describe(e)}"
            ) from None

    async def _logs(self, managed):
        get_logs = getattr(managed.spawner, "get_logs", None)
        if not callable(get_logs):
            return []
        try:
            logs = await self.calls.call(get_logs, timeout=self.app.poll_timeout)
            return [str(line) for line in logs or []]
        except asyncio.TimeoutError:
            self.log.warning("%s - get_logs() did not answer in time", managed.log_name)
            return []
        except Exception as e:
            self.log.warning("%s - could not collect logs: %s", managed.log_name, _describe(e))
            return []

    # stop

    async def stop(self, hub, name, start_id, collect_logs=False, run_async=False, outcome="stopped"):
        """Stop a server and forget it; return ``{"logs": [...]}``.

        ``outcome`` is what the spawn history says of it: ``stopped``, or
        ``expired`` when its runtime ended."""
        record = await self.db.get_server(hub, name, start_id)
        if record is None:
            self._drop_stale((hub, name, start_id))
            raise ServerNotFoundError()
        task = self._stopping.get(record.key)
        if task is None:
            task = asyncio.create_task(self._run_stop(record, collect_logs, outcome))
            self._stopping[record.key] = task
            task.add_done_callback(lambda t: self._stopping.pop(record.key, None))
            self._keep(task)
        if run_async:
            return {}
        return {"logs": await asyncio.shield(task)}

    @observed("stop", lambda record, *_: record.hub)
    async def _run_stop(self, record, collect_logs, outcome="stopped"):
        key = record.key
        managed = self.active.get(key)
        if managed is not None and managed.starting:
            managed.start_task.cancel()
            await asyncio.wait([managed.start_task])
            return []
        record = await self.claims.claim(record)
        if record is None:
            self._drop_stale(key)
            return []  # another process stopped it
        async with self._turns:
            managed = await self._managed(record.key, record.id)
        if record.start_pending:
            await self._find_interrupted(managed)
        logs = await self._logs(managed) if collect_logs else []
        timeout = self.app.stop_timeout
        try:
            await managed.stop(self.calls, timeout)
        except Exception as e:
            reason = f"stop() did not finish within {timeout} s" if isinstance(
                e, asyncio.TimeoutError) else _describe(e)  # fmt: skip
            self.log.error("%s - stop failed: %s", managed.log_name, reason)
            await self.db.release_stop(record.id, self.owner)
            raise StopFailedError(f"The server could not be stopped: {reason}") from None
        try:
            if hook_configured(managed.spawner, "post_stop_hook"):
                await self.calls.call(managed.spawner.run_post_stop_hook, timeout=timeout)
        except Exception as e:
            self.log.error("%s - post_stop_hook failed: %s", managed.log_name, _describe(e))
        managed.spawner.clear_state()
        # its history says so in the transaction that deletes the record
        ended = self.history.server_ended_step(self.db.hub_ids[record.hub], *record.key[1:], outcome)
        await self._forget(managed, then=ended)
        self.log.info("%s - stopped", managed.log_name)
        return logs

    async def _find_interrupted(self, managed):
        """A start interrupted before its state was saved: find what it launched"""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(
            None, localprocess.recover_interrupted, managed.spawner, managed.env
        )
        if found:
            self.log.warning("%s - found process %s of the interrupted start", managed.log_name, found)

    def _drop_stale(self, key):
        """Forget this process' Spawner of a server whose record is gone
        (another process stopped it), and the secrets registered for it"""
        managed = self.active.get(key)
        if managed is None or managed.starting:
            return
        del self.active[key]
        _forget_secrets(managed.env)

    async def drop_forgotten(self):
        """Drop the Spawners of servers that another process stopped.

        Once a server is stopped, the hub sends no more requests for it, so
        this process would otherwise keep its Spawner for good.
        """
        held = list(self.active.items())  # before the read: their records exist already
        if not held:
            return
        recorded = await self.db.server_ids()
        for key, managed in held:
            if managed.record.id not in recorded and self.active.get(key) is managed:
                self._drop_stale(key)

    # certificates

    def _cert_dir(self, record):
        return certs.cert_dir(self.app.certs_dir, record.key)

    async def _install_certs(self, managed, pems, trust_bundles):
        loop = asyncio.get_running_loop()
        write = partial(certs.write_cert_files, self.app.certs_dir, managed.record.key, pems, trust_bundles)
        paths, bundles = await loop.run_in_executor(None, write)
        spawner = managed.spawner
        spawner.internal_ssl = True
        spawner.internal_trust_bundles = bundles
        spawner.internal_certs_location = self._cert_dir(managed.record)
        spawner.cert_paths = await maybe_future(spawner.move_certs(paths))

    async def _remove_certs(self, managed):
        directory = self._cert_dir(managed.record)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, partial(shutil.rmtree, directory, ignore_errors=True))

    # listing and housekeeping

    async def list(self, hub):
        """This hub's servers as listing models (no secrets)"""
        return [_list_model(r) for r in await self.db.list_servers(hub)]

    async def cleanup_interrupted(self):
        """Finish what a crash left behind.

        A start or stop whose process is gone (see :mod:`.liveness`), or that
        is pending for longer than ``pending_timeout`` without a known owner,
        was interrupted: its server is stopped with the state that was saved,
        and forgotten. Every process may do this; a claim in the database
        decides which one does.
        """
        records = await self.db.list_servers(pending_only=True)
        records = [r for r in records if r.key not in self.active and r.key not in self._stopping]
        taken = await self.claims.take_over_interrupted(records)
        await asyncio.gather(*(self._finish_interrupted(record) for record in taken))

    async def _finish_interrupted(self, record):
        self.log.warning("%s/%s/%s - stopping after an interrupted %s", *record.key,
                         "start" if record.start_pending else "stop")  # fmt: skip
        try:
            await self.stop(*record.key)
        except Exception as e:
            self.log.error("%s/%s/%s - cleanup failed: %s", *record.key, _describe(e))

    async def shutdown(self, timeout=10):
        """Cancel starts in flight and wait for stops; running servers keep running"""
        for managed in list(self.active.values()):
            if managed.starting:
                managed.start_task.cancel()
        pending = [t for t in self._background if not t.done()]
        pending += [m.start_task for m in self.active.values() if m.start_task and not m.start_task.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        await self.early_exits.stop()
        await kube.shutdown()
        self.calls.shutdown()


def _remove_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _merge_env(spawner, hub_env):
    """Make ``spawner.get_env()`` return the spawner's env updated with the hub's.

    Keys that describe the Outpost side (bind URL, certificate paths) keep
    the spawner's values.
    """
    own_get_env = spawner.get_env
    if inspect.ismethod(own_get_env):
        # the spawner holds this function: a weak reference back, no cycle
        own_get_env = weakref.WeakMethod(own_get_env)
    else:  # pragma: no cover (replaced on the instance before)
        own_get_env = partial(lambda f: f, own_get_env)

    def get_env():
        own = own_get_env()()
        env = dict(own)
        env.update(hub_env)
        for key in OUTPOST_SIDE_ENV:
            if key in own:
                env[key] = own[key]
            else:
                env.pop(key, None)
        return env

    spawner.get_env = get_env


class _StopRequested(Exception):
    """Another process asked for a stop while this one finished the start"""


def _class_name(cls):
    return f"{cls.__module__}.{cls.__name__}"


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _describe(e):
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _failed_event(e):
    reason = _describe(getattr(e, "original", e))
    return {
        "progress": 100,
        "failed": True,
        "message": f"Outpost: start failed: {reason}",
        "html_message": f"<details><summary>Outpost: start failed</summary>{html.escape(reason)}</details>",
    }


def _list_model(record):
    return {
        "name": record.name,
        "start_id": record.start_id,
        "user": record.user_name,
        "flavor": record.flavor,
        "start_date": isoformat(record.started),
        "last_update": isoformat(record.last_update),
        "start_pending": record.start_pending,
        "stop_pending": record.stop_pending,
    }
