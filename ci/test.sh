#!/usr/bin/env bash
# Install everything the tests need and run the whole suite.
#
#     bash ci/test.sh            # all tests
#     bash ci/test.sh -k start   # extra arguments go to pytest
#
# Runs the suite on SQLite, then again on PostgreSQL when a server answers on
# 127.0.0.1:5432 (user postgres; the tests create and drop a database each).
# Exits non-zero if either run fails; a run that collects no test fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# System packages the tests need, space separated (installed only as root).
# munge, slurmctld, slurmd, slurm-client: a one-node Slurm for the batch job
# tests (tests/slurm.py starts it with ci/slurm-localhost.sh).
APT_PACKAGES="openssh-client chromium munge slurmctld slurmd slurm-client"

if [[ -n "${APT_PACKAGES// /}" ]]; then
    if [[ "$(id -u)" == 0 ]]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        # shellcheck disable=SC2086  # word splitting is wanted here
        apt-get install -y --no-install-recommends $APT_PACKAGES
    else
        echo "ci/test.sh: not root, skipping apt-get install of: $APT_PACKAGES" >&2
    fi
fi

# Node packages the end-to-end tests need (the hub's configurable-http-proxy),
# installed globally with npm when their command is missing. Without them
# those tests are skipped.
NPM_PACKAGES="configurable-http-proxy"

for package in $NPM_PACKAGES; do
    if command -v "$package" >/dev/null; then
        continue
    elif command -v npm >/dev/null; then
        npm install -g --no-fund --no-audit "$package" ||
            echo "ci/test.sh: could not install $package" >&2
    else
        echo "ci/test.sh: npm not found, not installing $package" >&2
    fi
done

python3 -m pip install --disable-pip-version-check --progress-bar off -e '.[test]'

PG_TEST_DB_URL="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

# run_suite NAME [ENV=VALUE...] -- PYTEST_ARGS...: pytest's status, 5 (nothing collected) too
run_suite() {
    local name=$1 status=0
    shift
    local env=()
    while [[ $1 != -- ]]; do env+=("$1"); shift; done
    shift
    echo "ci/test.sh: running the suite on $name"
    env "${env[@]}" python3 -m pytest tests -ra --durations=15 "$@" || status=$?
    if [[ $status == 5 ]]; then
        echo "ci/test.sh: pytest collected no tests on $name; failing" >&2
    fi
    return "$status"
}

postgres_answers() {
    if command -v pg_isready >/dev/null; then
        pg_isready -q -h 127.0.0.1 -p 5432 -t 5
    else
        python3 -c 'import psycopg; psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5").close()' 2>/dev/null
    fi
}

sqlite_status=0
run_suite SQLite -u OUTPOST_TEST_DB_URL -- "$@" || sqlite_status=$?

pg_status=0 pg_result=skipped
if postgres_answers; then
    run_suite PostgreSQL "OUTPOST_TEST_DB_URL=$PG_TEST_DB_URL" -- "$@" || pg_status=$?
    pg_result="exited $pg_status"
else
    echo "ci/test.sh: no PostgreSQL answers on 127.0.0.1:5432; the PostgreSQL half was skipped"
fi

echo "ci/test.sh: SQLite run exited $sqlite_status, PostgreSQL run $pg_result"
if [[ $sqlite_status != 0 ]]; then
    exit "$sqlite_status"
fi
exit "$pg_status"
