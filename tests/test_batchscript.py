"""Pure checks: values for batch scripts, squeue output, queue positions."""

import pytest

from jupyterhub_outpost.spawners.batchscript import (
    ScriptValueRefusedError,
    check_env_names,
    check_values,
    value_problem,
)
from jupyterhub_outpost.spawners.slurmjob import with_port
from jupyterhub_outpost.spawners.slurmqueue import parse_jobs, queue_positions

from .utils import database_independent

pytestmark = database_independent


@pytest.mark.parametrize("place, value", [
    ("partition", "gpu"), ("partition", "gpu,batch"), ("runtime", "90"), ("runtime", "01:30:00"),
    ("runtime", "1-12:00:00"), ("memory", "8G"), ("memory", "4000"), ("nprocs", "4"),
    ("gres", "gpu:a100:2"), ("options", "--exclusive --comment=ok"), ("account", ""),
    ("username", "alice.smith@lab"), ("homedir", "/home/alice"),
])  # fmt: skip
def test_values_that_fit_their_place(place, value):
    assert value_problem(place, value) is None


@pytest.mark.parametrize("place, value", [
    ("partition", "gpu\n#SBATCH --comment=x"), ("partition", "gpu batch"), ("runtime", "1h"),
    ("memory", "8G; id"), ("nprocs", "$(id)"), ("options", "--comment=`id`"),
    ("options", "--comment='x'"), ("options", '--comment="x"'), ("options", "a  b"),
    ("options", "--comment=$HOME"), ("reservation", "r|id"), ("username", "a b"),
    ("homedir", "relative/path"), ("partition", ["list"]), ("qos", True),
])  # fmt: skip
def test_values_that_do_not_fit_are_refused(place, value):
    assert value_problem(place, value)


def test_only_changed_values_and_the_user_name_are_checked():
    configured = {"prologue": "module load jupyter\nsource env.sh", "partition": "batch"}
    check_values(dict(configured, username="alice"), configured)  # the operator's own lines
    with pytest.raises(ScriptValueRefusedError, match="req_partition"):
        check_values(dict(configured, username="alice", partition="b;id"), configured)
    with pytest.raises(ScriptValueRefusedError, match="req_username"):
        check_values(dict(configured, username="al\nice"), dict(configured, username="al\nice"))


def test_environment_names_for_export():
    check_env_names(["PATH", "JUPYTERHUB_API_TOKEN", "_X1"])
    with pytest.raises(ScriptValueRefusedError):
        check_env_names(["A,B"])
    with pytest.raises(ScriptValueRefusedError):
        check_env_names(["X\n#SBATCH"])


def test_squeue_lines_and_positions():
    text = (
        "12|PENDING|gpu|100|2026-12-02T10:00:00|n/a|Resources\n"
        "13|RUNNING|batch|50|2026-12-02T09:00:00|node7|None\n"
        "14|PENDING|gpu|100|N/A|n/a|ReqNodeNotAvail, Reserved for maintenance\n"
        "garbage\n"
    )
    jobs = parse_jobs(text)
    assert jobs["12"].pending and jobs["12"].reason == "Resources" and jobs["12"].node == ""
    assert jobs["13"].running and jobs["13"].node == "node7" and jobs["13"].reason == ""
    assert jobs["14"].start == "" and jobs["14"].reason.startswith("ReqNodeNotAvail")
    pending = "9|gpu|200\n12|gpu|100\n14|gpu|100\n11|batch|999\n"
    assert queue_positions(jobs, pending) == {"12": 2, "14": 3}


def test_the_job_puts_its_port_into_the_service_url():
    assert with_port("http://0.0.0.0:0/user/a/", 4321) == "http://0.0.0.0:4321/user/a/"
    assert with_port("http://127.0.0.1/user/a/", 80) == "http://127.0.0.1:80/user/a/"
