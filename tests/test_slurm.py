"""Servers as real Slurm jobs (OutpostSlurmSpawner) on a one-node cluster.

Real slurmctld, slurmd and munged (ci/slurm-localhost.sh), real sbatch,
squeue and scancel, real jupyterhub-singleuser servers in the jobs.
squeue runs through tests/squeue_switch.sh, which counts the calls and can
make squeue fail.
"""

import asyncio
import os
import re
import signal
import time

import pytest
from tornado.httpclient import AsyncHTTPClient

from .conftest import start_outpost, stop_outpost
from . import slurm
from .slurm import (
    REPO,
    cancel,
    ensure_user,
    job_script,
    job_state,
    requires_slurm,
    run,
    slurm_outpost_config,
    submit_blocker,
)
from .utils import (
    api_request,
    database_independent,
    json_of,
    server_answers,
    start_body,
    tokens_of,
    wait_until,
)

# the session's one-node cluster (a fixture of tests/slurm.py)
slurm_cluster = slurm.slurm_cluster

pytestmark = [requires_slurm, database_independent, pytest.mark.slurm]

SWITCH = os.path.join(REPO, "tests", "squeue_switch.sh")
# the port reporter needs the standard library only: any Python runs it
REPORTER = os.path.join(REPO, "jupyterhub_outpost", "spawners", "slurmjob.py")
# a light server: reports its port, then only sleeps (args become $0)
SLEEPER = ["/bin/sh", "-c", "exec sleep 600"]


@pytest.fixture(scope="module")
async def outpost(tmp_path_factory, slurm_cluster, fake_hub):
    workdir = tmp_path_factory.mktemp("slurm-outpost")
    switch_dir = workdir / "squeue"
    switch_dir.mkdir()
    app = await start_outpost(slurm_outpost_config(workdir, squeue_command=[SWITCH, str(switch_dir)]))
    app.workdir = workdir
    app.switch_dir = switch_dir
    yield app
    await stop_outpost(app)


def squeue_calls(outpost):
    path = outpost.switch_dir / "calls"
    return len(path.read_text().splitlines()) if path.exists() else 0


def new_body(fake_hub, **kwargs):
    body = start_body(fake_hub.url, **kwargs)
    fake_hub.tokens.update(tokens_of(body))
    return body


def messages(fake_hub, body):
    token = body["env"]["JUPYTERHUB_API_TOKEN"]
    return [c["body"].get("message", "") for c in fake_hub.calls("event") if c["token"] == token]


def managed(outpost, body):
    return outpost.server_manager.active[("hub-a", body["name"], body["user_options"]["start_id"])]


def path_of(body):
    return body["name"], body["user_options"]["start_id"]


async def start(outpost, body, run_async=False, client=None):
    headers = {"execution-type": "async"} if run_async else None
    return await api_request(outpost, "services", method="POST", body=body, headers=headers,
                             client=client)  # fmt: skip


async def poll(outpost, body, client=None):
    return await api_request(outpost, "services", *path_of(body), client=client)


async def stop(outpost, body, client=None):
    return await api_request(outpost, "services", *path_of(body), method="DELETE", client=client)


async def wait_message(fake_hub, body, text, timeout=20):
    async def seen():
        return any(text in m for m in messages(fake_hub, body))

    await wait_until(seen, timeout=timeout, message=f"event with {text!r}")


async def wait_job_ended(job_id, timeout=20):
    await wait_until(lambda: job_state(job_id) in ("", "CANCELLED", "COMPLETED", "FAILED"),
                     timeout=timeout, message=f"job {job_id} ended")  # fmt: skip


async def test_start_reports_the_job_and_the_server_answers(outpost, fake_hub):
    body = new_body(fake_hub, name="first")
    response = await start(outpost, body)
    assert response.code == 200, response.body
    address = json_of(response)["service"]
    assert address.startswith("localhost:")  # the job's node, as squeue names it
    prefix = body["env"]["JUPYTERHUB_SERVICE_PREFIX"]
    await wait_until(lambda: server_answers(address, prefix), timeout=30, message="server answers")
    job_id = managed(outpost, body).spawner.job_id
    assert job_state(job_id) == "RUNNING"
    shown = messages(fake_hub, body)
    assert f"Slurm: submitted batch job {job_id}" in shown
    assert f"Slurm: job {job_id} runs on node localhost" in shown
    assert f"Slurm: the server of job {job_id} listens on {address}" in shown
    assert json_of(await poll(outpost, body)) == {"status": None}
    response = await stop(outpost, body)
    assert response.code == 200, response.body
    await wait_job_ended(job_id, timeout=5)
    assert (await poll(outpost, body)).code == 404


async def test_pending_jobs_show_reason_and_position_and_stop_cancels_them(outpost, fake_hub):
    blocker = submit_blocker()
    try:
        await wait_until(lambda: job_state(blocker) == "RUNNING", timeout=20, message="blocker runs")
        first, second = new_body(fake_hub, name="queued1"), new_body(fake_hub, name="queued2")
        assert (await start(outpost, first, run_async=True)).code == 202
        await wait_message(fake_hub, first, "reason: Resources")
        assert (await start(outpost, second, run_async=True)).code == 202
        await wait_message(fake_hub, second, "position 2 in the queue")
        # the backfill scheduler's estimate: when the blocker's time limit ends
        await wait_message(fake_hub, first, "expected start 20")
        pending = [m for m in messages(fake_hub, first) if "is pending" in m]
        job_id = managed(outpost, first).spawner.job_id
        assert any(f"job {job_id} is pending in partition debug, reason: Resources" in m
                   and "expected start 20" in m for m in pending), pending  # fmt: skip
        assert job_state(job_id) == "PENDING"
        assert json_of(await poll(outpost, first)) == {"status": None}
        # stop while pending: scancel, and the job leaves the queue
        response = await stop(outpost, first)
        assert response.code == 200, response.body
        await wait_job_ended(job_id, timeout=10)
        assert (await poll(outpost, first)).code == 404
        second_job = managed(outpost, second).spawner.job_id
        await wait_message(fake_hub, second, "position 1 in the queue")
    finally:
        cancel(blocker)
    await wait_message(fake_hub, second, "runs on node localhost")
    await wait_message(fake_hub, second, "listens on localhost:")
    await wait_until(lambda: poll_is(outpost, second, {"status": None}), timeout=20, message="running")
    assert job_state(second_job) == "RUNNING"
    assert (await stop(outpost, second)).code == 200
    await wait_job_ended(second_job, timeout=10)


async def poll_is(outpost, body, expected):
    response = await poll(outpost, body)
    return response.code == 200 and json_of(response) == expected


async def test_a_job_that_dies_early_fails_the_start_with_its_output(outpost, fake_hub):
    body = new_body(fake_hub, name="early", misc={"batchspawner_singleuser_cmd": "/no/such/python3"})
    before = time.monotonic()
    response = await start(outpost, body)
    took = time.monotonic() - before
    assert response.code == 419, response.body
    message = json_of(response)["args"][0]
    assert "ended before its server was up: FAILED" in message, message
    assert re.search(r"exit code [1-9]\d*:0", message), message
    assert "/no/such/python3: No such file or directory" in message  # the job's own output
    assert took < 10, took
    assert (await poll(outpost, body)).code == 404


async def test_early_death_of_an_async_start_is_a_failed_event(outpost, fake_hub):
    body = new_body(fake_hub, name="earlyasync", misc={"batchspawner_singleuser_cmd": "/bin/false"})
    assert (await start(outpost, body, run_async=True)).code == 202
    await wait_until(
        lambda: failed_events(fake_hub, body), timeout=10, message="failed event"
    )
    event = failed_events(fake_hub, body)[0]
    assert "ended before its server was up" in event["message"]


def failed_events(fake_hub, body):
    token = body["env"]["JUPYTERHUB_API_TOKEN"]
    return [c["body"] for c in fake_hub.calls("event") if c["token"] == token and c["body"].get("failed")]


async def test_sbatch_refusal_is_shown_in_slurms_words(outpost, fake_hub):
    body = new_body(fake_hub, name="badpart", misc={"req_partition": "nosuchpartition"})
    response = await start(outpost, body)
    assert response.code == 419, response.body
    message = json_of(response)["args"][0]
    assert message.startswith("Slurm refused the job: sbatch: error: ")
    assert "Invalid partition name specified" in message
    assert (await poll(outpost, body)).code == 404


INJECTIONS = [
    "debug\n#SBATCH --comment=INJECTED",
    "debug; touch {marker}",
    "$(touch {marker})",
    "`touch {marker}`",
    "debug' --comment=INJECTED '",
    'debug" --comment=INJECTED "',
]
INJECTABLE = ["req_partition", "req_runtime", "req_memory", "req_nprocs", "req_options",
              "req_reservation", "req_account", "req_qos"]  # fmt: skip


async def test_values_that_would_change_the_batch_script_are_refused(outpost, fake_hub):
    marker = outpost.workdir / "INJECTED"
    jobs_before = run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split()
    for setting in INJECTABLE + ["cmd"]:
        for template in INJECTIONS:
            value = template.format(marker=marker)
            misc = {setting: [SLEEPER[0], value] if setting == "cmd" else value}
            body = new_body(fake_hub, name="inject", misc=misc)
            response = await start(outpost, body)
            assert response.code == 419, (setting, value, response.body)
            assert setting in json_of(response)["args"][0], (setting, json_of(response)["args"])
    # the user name: the request itself is refused (the name also names the
    # account and the folders of the server), before any policy or script
    for template in INJECTIONS:
        body = new_body(fake_hub, name="inject", user=template.format(marker=marker))
        response = await start(outpost, body)
        assert response.code == 400, response.body
        assert "JUPYTERHUB_USER" in json_of(response)["message"]
    jobs_after = run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split()
    assert set(jobs_after) <= set(jobs_before), "a job was submitted"
    assert not marker.exists()
    # what fits its place goes into the script as it is, and nothing else does
    body = new_body(fake_hub, name="fits", misc={
        "req_runtime": "00:30:00", "req_options": "--comment=fine", "cmd": SLEEPER})  # fmt: skip
    response = await start(outpost, body)
    assert response.code == 200, response.body
    script = job_script(managed(outpost, body).spawner.job_id)
    assert "#SBATCH --time=00:30:00\n" in script and "#SBATCH --comment=fine" in script
    assert "INJECTED" not in script and str(marker) not in script
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert len(directives) == 7, directives
    assert (await stop(outpost, body)).code == 200


async def test_squeue_failures_answer_503_and_keep_the_server(outpost, fake_hub):
    body = new_body(fake_hub, name="outage", misc={"cmd": SLEEPER})
    assert (await start(outpost, body)).code == 200
    job_id = managed(outpost, body).spawner.job_id
    fail = outpost.switch_dir / "fail"
    fail.touch()
    try:
        await wait_until(lambda: poll_code(outpost, body, 503), timeout=10, message="503 on failure")
    finally:
        fail.unlink()
    await wait_until(lambda: poll_is(outpost, body, {"status": None}), timeout=10, message="recovered")
    # slurmctld stops answering: squeue hangs, is killed after its timeout
    pid = int(open("/tmp/outpost-slurm/run/slurmctld.pid").read())
    os.kill(pid, signal.SIGSTOP)
    try:
        await wait_until(lambda: poll_code(outpost, body, 503), timeout=15, message="503 on a hang")
        listing = json_of(await api_request(outpost, "services"))
        assert body["name"] in [s["name"] for s in listing]
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_until(lambda: poll_is(outpost, body, {"status": None}), timeout=15, message="recovered")
    assert job_state(job_id) == "RUNNING"
    # a job that ended is a status, not a guess: scancel behind the Outpost's back
    cancel(job_id)
    await wait_until(lambda: poll_is(outpost, body, {"status": 1}), timeout=15, message="status 1")
    # what an operator's Prometheus sees of it
    found = scraped(outpost)
    assert found["jupyterhub_outpost_squeue_failures_total"] >= 2
    assert found["jupyterhub_outpost_squeue_calls_total"] >= found["jupyterhub_outpost_squeue_failures_total"]
    assert found['jupyterhub_outpost_polls_total{hub="hub-a",outcome="unknown"}'] >= 2


def scraped(outpost):
    """The Outpost's metrics as ``{name{labels}: value}``"""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(generate_latest(outpost.metrics.registry).decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def poll_code(outpost, body, code):
    return (await poll(outpost, body)).code == code


async def test_one_squeue_per_interval_serves_the_polls_of_all_servers(outpost, fake_hub):
    count = 50
    # no srun step: 50 job steps at once take a while to launch
    light = {"cmd": SLEEPER, "req_srun": ""}
    bodies = [new_body(fake_hub, name=f"many{i}", misc=light) for i in range(count)]
    # a client of its own: the shared one's 10 connections also carry the Outpost's events
    client = AsyncHTTPClient(force_instance=True, max_clients=count)
    responses = await asyncio.gather(*(start(outpost, b, client=client) for b in bodies))
    assert [r.code for r in responses] == [200] * count, [r.body for r in responses if r.code != 200][:3]
    interval = managed(outpost, bodies[0]).spawner.squeue_interval
    await asyncio.sleep(interval)  # the starts' quick reads are over
    before, began = squeue_calls(outpost), time.monotonic()
    rounds = 0
    while time.monotonic() - began < 3 * interval:  # every server polled, again and again
        polls = await asyncio.gather(*(poll(outpost, b, client=client) for b in bodies))
        assert all(json_of(p) == {"status": None} for p in polls)
        rounds += 1
    elapsed = time.monotonic() - began
    calls = squeue_calls(outpost) - before
    print(f"{count} servers, {rounds * count} polls in {elapsed:.1f} s: {calls} squeue calls")
    assert rounds >= 3
    assert calls <= elapsed / interval + 1, calls
    await asyncio.gather(*(stop(outpost, b, client=client) for b in bodies))
    client.close()
    assert run("squeue", "-h", "-o", "%i").stdout.split() == []


async def test_port_reports_need_the_token_of_a_waiting_start(outpost, fake_hub):
    async def report(token, body):
        headers = {"Authorization": f"token {token}"} if token else {}
        return await api_request(outpost, "batchspawner", method="POST", auth=False,
                                 headers=headers, body=body)  # fmt: skip

    assert (await report("no-such-token", {"port": 1234})).code == 404
    assert (await report("", {"port": 1234})).code == 404
    assert (await report("tok", {"port": "1234"})).code == 400
    assert (await report("tok", {"port": 70000})).code == 400
    # a server that runs already: its token no longer reports
    body = new_body(fake_hub, name="reported", misc={"cmd": SLEEPER})
    assert (await start(outpost, body)).code == 200
    response = await report(body["env"]["JUPYTERHUB_API_TOKEN"], {"port": 1234})
    assert response.code == 404, response.body
    assert (await stop(outpost, body)).code == 200


async def test_a_job_that_slurm_no_longer_knows_has_ended(outpost, fake_hub):
    body = new_body(fake_hub, name="forgotten", misc={"cmd": SLEEPER})
    assert (await start(outpost, body)).code == 200
    spawner = managed(outpost, body).spawner
    real_job = spawner.job_id
    # as once Slurm purged a finished job (MinJobAge): squeue answers
    # "Invalid job id", and sacct has no accounting to ask on this cluster
    spawner.job_id = "99999999"
    try:
        await wait_until(lambda: poll_is(outpost, body, {"status": 1}), timeout=10,
                         message="reported ended")  # fmt: skip
    finally:
        cancel(real_job)


async def test_jobs_run_as_the_users_own_accounts(tmp_path, slurm_cluster, fake_hub):
    user = ensure_user("outposthpc")
    cfg = slurm_outpost_config(
        tmp_path, exec_prefix="runuser -u {username} --", req_homedir=None, cmd=SLEEPER,
        # the Outpost's Python lives below root's home here; the system's runs the reporter
        batchspawner_singleuser_cmd=f"/usr/bin/python3 {REPORTER}",
    )  # fmt: skip
    cfg.JupyterHubOutpost.account_name_template = "{username}"
    cfg.JupyterHubOutpost.min_account_uid = 1000
    cfg.JupyterHubOutpost.denied_accounts = ["root"]
    outpost = await start_outpost(cfg)
    try:
        body = new_body(fake_hub, user=user, name="own")
        response = await start(outpost, body)
        assert response.code == 200, response.body
        job_id = managed(outpost, body).spawner.job_id
        assert run("squeue", "-h", "-j", job_id, "-o", "%u").stdout.strip() == user
        log = f"/home/{user}/jupyterhub_slurmspawner_{job_id}.log"
        assert os.stat(log).st_uid == int(run("id", "-u", user).stdout)
        assert json_of(await poll(outpost, body)) == {"status": None}
        assert (await stop(outpost, body)).code == 200  # scancel as the user
        await wait_job_ended(job_id, timeout=10)
        # a failed job's output is read as its user
        body = new_body(fake_hub, user=user, name="own", misc={"batchspawner_singleuser_cmd": "/no/such/x"})
        response = await start(outpost, body)
        assert response.code == 419, response.body
        assert "/no/such/x: No such file or directory" in json_of(response)["args"][0]
        # root is refused as an account, before anything is submitted
        response = await start(outpost, new_body(fake_hub, user="root", name="own"))
        assert response.code == 419 and "root" in json_of(response)["args"][0], response.body
    finally:
        await stop_outpost(outpost)
