"""batchspawner's SlurmSpawner as the Outpost runs it.

:class:`OutpostSlurmSpawner` is batchspawner's ``SlurmSpawner`` with what
a login node serving many hubs needs:

- the job reports its port to the Outpost (:mod:`.batchcallback`), not to
  the hub, while the server still talks to the hub for OAuth and activity;
- polls read one shared ``squeue`` per interval (:mod:`.slurmqueue`); a
  queue that cannot be read raises (the API answers 503), a job that left
  the queue is looked up with ``sacct`` or reported ended;
- the job id is stored as soon as ``sbatch`` returns, so that a restarted
  Outpost still stops a job that was pending;
- a job that ends before reporting its port fails the start at once, with
  Slurm's reason and the tail of the job's output; a refused ``sbatch`` is
  shown in Slurm's words;
- progress events follow the job: submitted, pending (reason, expected
  start, position in the partition's queue), running on a node, server up;
- every value a hub influenced is checked for its place in the batch
  script (:mod:`.batchscript`) before anything is submitted.

Configure it with ``c.JupyterHubOutpost.spawner_class =
"jupyterhub_outpost.spawners.slurm.OutpostSlurmSpawner"``; settings under
``c.SlurmSpawner`` apply to it as well.
"""

import asyncio
import os
import pwd
import shlex
import socket
import sys
import time

from batchspawner import SlurmSpawner
from batchspawner.batchspawner import format_template
from traitlets import Float, Integer, List, Unicode, default

from . import batchcallback, batchscript
from .slurmqueue import GONE, SlurmUnavailableError, run_command, shared_queue

# req_* traits computed when first read (from the account, from get_env()):
# read before the start, they would keep values from before the hub's env
_COMPUTED = ("keepvars", "username", "homedir")


class SlurmJobError(RuntimeError):
    """The job ended, or Slurm refused it, before its server was up"""


class OutpostSlurmSpawner(SlurmSpawner):
    """Each server is a Slurm job; see the module's description."""

    squeue_interval = Float(
        10,
        help="""Seconds between the Outpost's ``squeue`` calls while servers
        run and no start or stop waits. One call reads every job of this
        Outpost process; polls read its result. A status older than two
        intervals and ``slurm_command_timeout`` counts as unknown (503). Default: 10.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    squeue_busy_interval = Float(
        1,
        help="""Seconds between ``squeue`` calls while a start or a stop waits
        for its job (still one call for all jobs). Default: 1.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    slurm_command_timeout = Float(
        15,
        help="""Seconds ``squeue``, ``sbatch``, ``scancel``, ``sacct`` and
        ``scontrol`` may take before they are killed; an ``squeue`` killed so
        makes polls answer 503. Default: 15.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    squeue_command = List(
        Unicode(),
        default_value=["squeue"],
        help="""The ``squeue`` command (argv list) of the shared queue reads.
        It runs as the Outpost's own user, without ``exec_prefix``: that
        user must see every user's jobs (no ``PrivateData=jobs``, or an
        operator account). Default: ``["squeue"]``.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    sacct_command = List(
        Unicode(),
        default_value=["sacct"],
        help="""The ``sacct`` command (argv list) that tells how a job ended
        once ``squeue`` no longer lists it. Without accounting
        (``AccountingStorageType=accounting_storage/none``) such a job is
        reported ended with status 1. Default: ``["sacct"]``.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    scontrol_command = List(
        Unicode(),
        default_value=["scontrol"],
        help="""The ``scontrol`` command (argv list) that describes a job that
        ended during its start (reason, exit code, output file). Default:
        ``["scontrol"]``.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    port_report_url = Unicode(
        "",
        help="""The URL the job reports its server's port to: this Outpost
        process's ``/batchspawner`` endpoint, reachable from compute nodes.
        Default: built from the Outpost's ``ip`` (or the host's fully
        qualified name when it listens on all addresses), its port and
        ``base_url``. With several processes behind one address, give each
        its own reachable URL.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    output_tail_lines = Integer(
        20,
        help="""Lines of a job's output shown to the user when the job ended
        before its server was up. Default: 20.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    req_homedir = Unicode(
        help="""The folder the job starts in and writes its output to
        (``{homedir}`` in ``batch_script``). Default: the home directory of
        the job's account on this host.

        .. versionadded:: 0.2
        """,
    ).tag(config=True)

    @default("req_homedir")
    def _req_homedir_default(self):
        return pwd.getpwnam(self.user.name).pw_dir

    @default("batchspawner_singleuser_cmd")
    def _singleuser_cmd_default(self):
        return f"{sys.executable} -m jupyterhub_outpost.spawners.slurmjob"

    @default("env_keep")
    def _env_keep_default(self):
        # JupyterHub 5+ keeps no PATH: the job would not find its commands
        return ["PATH", "LANG", "LC_ALL", "JUPYTERHUB_SINGLEUSER_APP"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # what the configuration gave, before overrides and flavors
        self._configured = self._script_values()
        self._configured_cmd = {"cmd": list(self.cmd), "args": list(self.args),
                                "batchspawner_singleuser_cmd": [self.batchspawner_singleuser_cmd]}  # fmt: skip
        self._events = []
        self._new_event = asyncio.Event()
        self._created = time.monotonic()
        self.timings = {}  # seconds of the last start: outpost, sbatch, queue, server

    # checks

    def _script_values(self):
        values = {}
        for name in self.trait_names():
            if not name.startswith("req_"):
                continue
            if name[4:] in _COMPUTED and name not in self._trait_values:
                continue  # not set: computed from the account or the env when used
            values[name[4:]] = getattr(self, name)
        return values

    def check_script_values(self):
        """Refuse values a hub influenced that do not fit their place"""
        values = self._script_values()
        values["username"] = self.req_username
        batchscript.check_values(values, self._configured)
        batchscript.check_command("cmd", self.cmd, self._configured_cmd["cmd"])
        batchscript.check_command("args", self.args, self._configured_cmd["args"])
        batchscript.check_command(
            "batchspawner_singleuser_cmd", self.batchspawner_singleuser_cmd.split(),
            self._configured_cmd["batchspawner_singleuser_cmd"][0].split(),
        )  # fmt: skip
        batchscript.check_env_names(self.get_env().keys())

    # the shared queue

    @property
    def queue(self):
        return shared_queue(
            self.squeue_command, self.squeue_interval, self.squeue_busy_interval,
            self.slurm_command_timeout,
        )  # fmt: skip

    # events

    def _event(self, progress, message):
        self.log.info("%s: %s", self._log_name, message)
        self._events.append({"progress": progress, "message": message})
        self._new_event.set()

    async def progress(self):
        sent = 0
        while True:
            while sent < len(self._events):
                yield self._events[sent]
                sent += 1
            self._new_event.clear()
            await self._new_event.wait()

    # start

    def _default_report_url(self):
        app = self.parent
        ip = getattr(app, "ip", "") or ""
        host = socket.getfqdn() if ip in ("", "0.0.0.0", "::") else ip
        if ":" in host:
            host = f"[{host}]"
        base = (getattr(app, "base_url", "/") or "/").rstrip("/")
        return f"http://{host}:{getattr(app, 'bound_port', 0)}{base}/batchspawner"

    def cmd_formatted_for_batch(self):
        url = self.port_report_url or self._default_report_url()
        words = [self.batchspawner_singleuser_cmd, shlex.quote(url)]
        return " ".join(words + [shlex.quote(w) for w in self.cmd + self.get_args()])

    async def start(self):
        # the server binds to ip (0.0.0.0 by default) on a port it chooses;
        # ip becomes the job's node once it runs
        self.port = 0
        if self.server:
            self.server.port = 0
        self._events.clear()
        self.check_script_values()
        report = batchcallback.expect_port(self.api_token)
        try:
            submitted = time.monotonic()
            await self.submit_batch_script()
            self.timings["outpost"] = submitted - self._created
            self.timings["sbatch"] = time.monotonic() - submitted
            self._event(40, f"Slurm: submitted batch job {self.job_id}")
            self._store_state()  # the job id is stored now, not once the server is up
            port = await self._wait_for_port(report)
        except BaseException:
            if self.job_id:
                self.queue.untrack(self.job_id)
            raise
        finally:
            batchcallback.forget(self.api_token, report)
        self.port = port
        self._store_state()
        self._event(90, f"Slurm: the server of job {self.job_id} listens on {self.ip}:{port}")
        self.log.info(
            "%s: job %s up after sbatch %.2f s, queue %.2f s, server start %.2f s", self._log_name,
            self.job_id, self.timings["sbatch"], self.timings.get("queue", 0), self.timings["server"],
        )  # fmt: skip
        return self.ip, port

    def _store_state(self):
        """Have the Outpost store get_state() now (its stand-in for the hub's db)"""
        db = getattr(self, "_deprecated_db_session", None)  # what the Outpost passes
        (db if db is not None else self.db).commit()

    async def submit_batch_script(self):
        subvars = self.get_req_subvars()
        command = " ".join((
            format_template(self.exec_prefix, **subvars),
            format_template(self.batch_submit_cmd, **subvars),
        ))  # fmt: skip
        # user_options stay out of the script: hubs set resources through
        # overrides, which the operator allows and which are checked
        subvars["cmd"] = self.cmd_formatted_for_batch()
        script = await self._get_batch_script(**subvars)
        self.log.debug("%s: submitting with %s:\n%s", self._log_name, command, script)
        try:
            code, out, err = await _shell(command, self.slurm_command_timeout, script, self.get_env())
        except asyncio.TimeoutError:
            raise SlurmJobError(
                f"sbatch did not answer within {self.slurm_command_timeout} s"
            ) from None
        if code != 0:
            raise SlurmJobError(f"Slurm refused the job: {err.strip() or f'sbatch exited with {code}'}")
        self.job_id = self.parse_job_id(out)
        return self.job_id

    async def _wait_for_port(self, report):
        queue = self.queue
        shown = None
        waited_from = time.monotonic()
        with queue.busy():
            while True:
                try:
                    info = await queue.status(self.job_id)
                except SlurmUnavailableError as e:
                    self.log.warning("%s: waiting for job %s: %s", self._log_name, self.job_id, e)
                    info = None
                if info is not None:
                    self.job_status = f"{info.state} {info.node}".strip()
                    if info is GONE or info.ended:
                        if report.done():
                            break  # reported, then ended: the hub's check finds out
                        raise SlurmJobError(await self._early_end(info))
                    if info.running and info.node and shown != "running":
                        shown = "running"
                        self.ip = info.node
                        self.timings["queue"] = time.monotonic() - waited_from
                        self._event(70, f"Slurm: job {self.job_id} runs on node {info.node}")
                    elif info.pending and shown != ("pending", info.reason, info.start, info.position):
                        shown = ("pending", info.reason, info.start, info.position)
                        self._event(50, _pending_message(info))
                if report.done() and shown == "running":
                    break
                waits = [queue.next_refresh()] + ([] if report.done() else [report])
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        self.timings["server"] = time.monotonic() - waited_from - self.timings.get("queue", 0)
        return report.result()

    async def _early_end(self, info):
        """What the user is told about a job that ended before its server was up"""
        details = await self._job_details()
        state = details.get("JobState") or (info.state if info is not GONE else "ended")
        parts = [f"Slurm job {self.job_id} ended before its server was up: {state}"]
        reason = details.get("Reason") or (info.reason if info is not GONE else "")
        if reason and reason != "None":
            parts.append(f"reason {reason}")
        if details.get("ExitCode"):
            parts.append(f"exit code {details['ExitCode']}")
        message = ", ".join(parts)
        tail = await self._output_tail(details.get("StdOut", ""))
        if tail:
            message += f". Last lines of its output:\n{tail}"
        return message

    async def _job_details(self):
        try:
            code, out, _ = await run_command(
                self.scontrol_command + ["show", "job", "-o", self.job_id],
                self.slurm_command_timeout,
            )
        except (asyncio.TimeoutError, OSError):
            return {}
        if code != 0:
            return {}
        details = {}
        for word in out.split():
            key, sep, value = word.partition("=")
            if sep and key in ("JobState", "Reason", "ExitCode", "StdOut"):
                details[key] = value
        return details

    async def _output_tail(self, path):
        """The last lines of the job's output file, read as the job's user"""
        if not path.startswith("/"):
            return ""
        prefix = format_template(self.exec_prefix, **self.get_req_subvars())
        command = f"{prefix} tail -n {int(self.output_tail_lines)} -- {shlex.quote(path)}"
        try:
            code, out, _ = await _shell(command, self.slurm_command_timeout)
        except asyncio.TimeoutError:
            return ""
        return out.strip() if code == 0 else ""

    # poll and stop

    async def poll(self):
        if not self.job_id:
            return 1  # nothing was submitted, or its job ended and was forgotten
        info = await self.queue.status(self.job_id)  # SlurmUnavailableError: can't tell
        if info is not GONE and not info.ended:
            self.job_status = f"{info.state} {info.node}".strip()
            return None
        status = await self._exit_status(info)
        self.queue.untrack(self.job_id)
        self.clear_state()
        return status

    async def _exit_status(self, info):
        """The exit status of a job that ended; raises if it cannot be told"""
        if info is not GONE:
            return 0 if info.state == "COMPLETED" else 1
        try:
            code, out, err = await run_command(
                self.sacct_command + ["-n", "-X", "-P", "-j", self.job_id, "-o", "State,ExitCode"],
                self.slurm_command_timeout,
            )
        except (asyncio.TimeoutError, OSError) as e:
            raise SlurmUnavailableError(f"sacct could not tell how job {self.job_id} ended: {e}") from None
        if code != 0:
            if "accounting storage is disabled" in err.lower():
                return 1  # no accounting: Slurm forgot the job, so it ended
            raise SlurmUnavailableError(f"sacct exited with {code}: {err.strip()[:300]}")
        for line in out.splitlines():
            state, _, exit_code = line.partition("|")
            if state.split() and state.split()[0] in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED"):
                raise SlurmUnavailableError(f"squeue no longer lists job {self.job_id}, sacct says {state}")
            code_text = exit_code.split(":")[0]
            return int(code_text) if code_text.isdigit() and int(code_text) else (
                0 if state.startswith("COMPLETED") else 1)  # fmt: skip
        return 1  # neither squeue nor accounting knows the job

    async def cancel_batch_job(self):
        subvars = self.get_req_subvars()
        subvars["job_id"] = self.job_id
        command = " ".join((
            format_template(self.exec_prefix, **subvars),
            format_template(self.batch_cancel_cmd, **subvars),
        ))  # fmt: skip
        self.log.info("%s: cancelling job %s", self._log_name, self.job_id)
        code, _, err = await _shell(command, self.slurm_command_timeout)
        if code != 0 and "Invalid job id" not in err and "already completing" not in err:
            raise SlurmJobError(f"scancel failed: {err.strip()[:300]}")

    async def stop(self, now=False):
        if not self.job_id:
            return
        await self.cancel_batch_job()
        queue = self.queue
        if now:
            queue.untrack(self.job_id)
            return
        deadline = time.monotonic() + 10
        queue.track(self.job_id)
        with queue.busy():
            while time.monotonic() < deadline:
                await queue.next_refresh()
                try:
                    info = queue.usable(self.job_id)
                except SlurmUnavailableError:
                    continue
                if info is GONE or (info is not None and info.ended):
                    break
            else:
                self.log.warning("%s: job %s may still run after scancel", self._log_name, self.job_id)
        queue.untrack(self.job_id)


def _pending_message(info):
    parts = [f"Slurm: job {info.job_id} is pending in partition {info.partition or '(default)'}"]
    if info.reason:
        parts.append(f"reason: {info.reason}")
    if info.position:
        parts.append(f"position {info.position} in the queue")
    if info.start:
        parts.append(f"expected start {info.start}")
    return ", ".join(parts)


async def _shell(command, timeout, stdin=None, env=None):
    """``(returncode, stdout, stderr)`` of a shell command line"""
    proc = await asyncio.create_subprocess_shell(
        command,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else dict(os.environ),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
