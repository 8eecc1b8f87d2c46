#!/usr/bin/env bash
# Install everything the tests need and run the whole suite.
#
#     bash ci/test.sh            # all tests
#     bash ci/test.sh -k start   # extra arguments go to pytest
#
# Exits with pytest's status; a run that collects no test fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# System packages the tests need, space separated (installed only as root).
APT_PACKAGES=""

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

status=0
python3 -m pytest tests -ra --durations=15 "$@" || status=$?
if [[ $status == 5 ]]; then
    echo "ci/test.sh: pytest collected no tests; failing" >&2
fi
exit "$status"
