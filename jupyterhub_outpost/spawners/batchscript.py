"""What may reach a batch script: checks of every value for its place.

batchspawner formats its ``req_*`` traits into a shell script (``#SBATCH``
lines, then commands) that runs as the user, or as root when root submits.
A value a hub influenced (an override, a flavor's resources, the user name)
could otherwise add a directive or a command. Each value is checked against
what its place admits; anything else, and in any case a newline, a quote,
``$(``, a backtick or ``;``, is refused before anything is submitted.
These functions are pure: no I/O.
"""

import re

from ..utils import ACCOUNT_NAME_RE

# characters that end a directive or start a command wherever they appear
FORBIDDEN = ("\n", "\r", "\0", "'", '"', "$(", "`", ";")

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.+-]*"
_NAMES_RE = re.compile(rf"^{_NAME}(,{_NAME})*\Z")
# Slurm's time limits: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d+){0,2}\Z")
_MEMORY_RE = re.compile(r"^\d+[KMGTkmgt]?[Bb]?\Z")
_COUNT_RE = re.compile(r"^\d{1,6}\Z")
_GRES_RE = re.compile(r"^[A-Za-z0-9_.:,-]+\Z")
_CONSTRAINT_RE = re.compile(r"^[A-Za-z0-9_.,:&|*\[\]-]+\Z")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*(:\d+)?\Z")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_.@+/-]*\Z")
# words of plain characters separated by single spaces (options, commands)
_WORDS_RE = re.compile(r"^[A-Za-z0-9_.,:=+/@%-]+( [A-Za-z0-9_.,:=+/@%-]+)*\Z")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_ENV_NAMES_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(,[A-Za-z_][A-Za-z0-9_]*)*\Z")

# place of a req_* value -> (pattern, what it admits)
PLACES = {
    "partition": (_NAMES_RE, "partition names (letters, digits, '_.+-', comma separated)"),
    "account": (_NAMES_RE, "an account name (letters, digits, '_.+-')"),
    "qos": (_NAMES_RE, "QOS names (letters, digits, '_.+-', comma separated)"),
    "reservation": (_NAMES_RE, "a reservation name (letters, digits, '_.+-')"),
    "cluster": (_NAMES_RE, "cluster names (letters, digits, '_.+-', comma separated)"),
    "queue": (_NAMES_RE, "a queue name (letters, digits, '_.+-')"),
    "runtime": (_TIME_RE, "a Slurm time limit such as 90, 01:30:00 or 1-12:00:00"),
    "memory": (_MEMORY_RE, "a size such as 4000, 8G or 512M"),
    "nprocs": (_COUNT_RE, "a number"),
    "ngpus": (_COUNT_RE, "a number"),
    "gres": (_GRES_RE, "generic resources such as gpu:2 or gpu:a100:1"),
    "constraint": (_CONSTRAINT_RE, "node features such as intel&ib"),
    "host": (_HOST_RE, "a host name"),
    "homedir": (_PATH_RE, "an absolute path of letters, digits and '_.@+/-'"),
    "username": (ACCOUNT_NAME_RE, "an account name (letters, digits, '_.@+-')"),
    "keepvars": (_ENV_NAMES_RE, "environment variable names, comma separated"),
    "keepvars_extra": (_ENV_NAMES_RE, "environment variable names, comma separated"),
}


class ScriptValueRefusedError(ValueError):
    """A value that would reach the batch script does not fit its place"""


def value_problem(place, value):
    """Why ``value`` may not stand at ``place`` of a batch script, or None.

    ``place``: a ``req_*`` trait's name without ``req_`` (``partition``),
    or ``cmd`` for command words. An empty value is left out by the
    templates and always fits.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"expected text, not {type(value).__name__}"
    text = str(value)
    if text == "":
        return None
    for bad in FORBIDDEN:
        if bad in text:
            return f"{_shown(bad)} is not allowed here"
    pattern, admitted = PLACES.get(place, (_WORDS_RE, "words of letters, digits and '_.,:=+/@%-'"))
    if not pattern.match(text):
        return f"expected {admitted}"
    return None


def _shown(fragment):
    return {"\n": "a newline", "\r": "a carriage return", "\0": "a NUL character"}.get(
        fragment, repr(fragment)
    )


def check_values(values, configured, always=("username",)):
    """Raise :class:`ScriptValueRefusedError` naming the first bad setting.

    ``values``: place -> current value (``partition`` for ``req_partition``);
    ``configured``: place -> the value the operator's configuration gave.
    Values that differ from the configuration (set by an override, a flavor
    or a hook) and the places in ``always`` are checked; the operator's own
    values (a multi-line ``req_prologue``) are the operator's business.
    """
    for place in sorted(values):
        value = values[place]
        if place not in always and place in configured and value == configured[place]:
            continue
        problem = value_problem(place, value)
        if problem:
            raise ScriptValueRefusedError(
                f"The Outpost refused the value of req_{place} for the batch script: {problem}"
            )


def check_command(name, words, configured):
    """Check the words of a command trait (``cmd``, ``args``) a hub changed"""
    if list(words) == list(configured):
        return
    for word in words:
        problem = value_problem("cmd", word)
        if problem:
            raise ScriptValueRefusedError(
                f"The Outpost refused the value of {name} for the batch script: {problem}"
            )


def check_env_names(names):
    """Environment variable names travel in ``#SBATCH --export=``: plain names only"""
    for name in names:
        if not ENV_NAME_RE.match(name):
            raise ScriptValueRefusedError(
                f"The Outpost refused the environment variable name {name[:64]!r}: "
                "letters, digits and '_' only"
            )
