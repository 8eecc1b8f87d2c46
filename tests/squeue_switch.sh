#!/bin/sh
# The real squeue, counted, that fails on request (for the tests).
#     squeue_switch.sh DIR SQUEUE-ARGS...
#   DIR/calls   one line per call
#   DIR/fail    if present: exit 1 as squeue does when it cannot reach slurmctld
dir=$1
shift
echo "$*" >> "$dir/calls"
if [ -e "$dir/fail" ]; then
    echo "slurm_load_jobs error: Unable to contact slurm controller (connect failure)" >&2
    exit 1
fi
exec squeue "$@"
