#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1 for the tests, started without systemd.
#
#     bash ci/slurm-localhost.sh up     # configure and start munged, slurmctld, slurmd
#     bash ci/slurm-localhost.sh down   # cancel every job, stop what "up" started
#
# Needs root and Debian's packages munge, slurmctld, slurmd and slurm-client
# (ci/test.sh installs them). Both commands are idempotent: "up" leaves a
# running cluster with the same configuration alone. The node is named
# localhost whatever the host name, advertises SLURM_TEST_CPUS CPUs (default
# 64; more than the machine has, so that many light jobs run at once) and
# has one partition, "debug". Everything Slurm writes goes below
# SLURM_TEST_BASE (default /tmp/outpost-slurm); the configuration must be
# /etc/slurm/slurm.conf, the path Debian's Slurm is built with.
set -euo pipefail

BASE=${SLURM_TEST_BASE:-/tmp/outpost-slurm}
CPUS=${SLURM_TEST_CPUS:-64}
CONF=/etc/slurm/slurm.conf
HEADER="# written by jupyterhub-outpost's ci/slurm-localhost.sh"

say() { echo "slurm-localhost: $*" >&2; }

# running PIDFILE NAME: the pid in PIDFILE if it is a live process called NAME
running() {
    local pid comm state
    [[ -r $1 ]] || return 1
    pid=$(tr -cd '0-9' < "$1")
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$2" ]] || return 1
    state=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
    [[ $state != Z && $state != X ]] || return 1   # exited, not reaped yet
    echo "$pid"
}

# within SECONDS COMMAND...: retry COMMAND every 0.1 s until it succeeds
within() {
    local limit=$(( $1 * 10 )) i
    shift
    for ((i = 0; i < limit; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    say "gave up waiting for: $*"
    tail -n 20 "$BASE"/log/*.log >&2 2>/dev/null || true
    return 1
}

config() {
    cat <<CONF
$HEADER
ClusterName=outposttest
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# start jobs within about a second of their submission; estimate the start
# of pending jobs every second (backfill)
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=2
MinJobAge=60
MessageTimeout=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

up() {
    [[ $EUID == 0 ]] || { say "must run as root"; exit 1; }
    command -v slurmctld >/dev/null || { say "slurmctld is not installed"; exit 1; }
    install -d "$BASE"/{state,spool,run,log}
    # munge: Debian's package made the key; start the daemon unless it runs
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
    fi
    if ! running /run/munge/munged.pid munged >/dev/null; then
        runuser -u munge -- /usr/sbin/munged
    fi
    within 10 bash -c 'munge -n | unmunge'
    local changed=0
    if [[ ! -f $CONF ]] || ! cmp -s <(config) "$CONF"; then
        if [[ -f $CONF ]] && ! head -n1 "$CONF" | grep -qF "$HEADER"; then
            say "$CONF was not written by this script; not replacing it"
            exit 1
        fi
        config > "$CONF"
        changed=1
    fi
    local pid
    if ((changed)); then
        for daemon in slurmd slurmctld; do
            if pid=$(running "$BASE/run/$daemon.pid" "$daemon"); then
                kill "$pid"
                within 20 bash -c "! kill -0 $pid 2>/dev/null || grep -q '^State:.*Z' /proc/$pid/status"
            fi
        done
    fi
    if ! running "$BASE/run/slurmctld.pid" slurmctld >/dev/null; then
        slurmctld
    fi
    within 30 scontrol ping
    if ! running "$BASE/run/slurmd.pid" slurmd >/dev/null; then
        slurmd -N localhost
    fi
    within 30 bash -c '[[ $(sinfo -h -n localhost -o %t) == idle || $(sinfo -h -n localhost -o %t) == mix || $(sinfo -h -n localhost -o %t) == alloc ]]'
    say "up: node localhost with $CPUS CPUs, partition debug"
}

down() {
    local pid
    if running "$BASE/run/slurmctld.pid" slurmctld >/dev/null; then
        scancel --full --quiet --user=root 2>/dev/null || true
        scancel --quiet --state=PENDING 2>/dev/null || true
        scancel --quiet --state=RUNNING 2>/dev/null || true
    fi
    for daemon in slurmd slurmctld; do
        if pid=$(running "$BASE/run/$daemon.pid" "$daemon"); then
            kill "$pid"
        fi
    done
    say "down"
}

case "${1:-up}" in
    up) up ;;
    down) down ;;
    *) say "usage: $0 up|down"; exit 2 ;;
esac
