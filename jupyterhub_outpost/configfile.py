"""The commented configuration file of ``jupyterhub-outpost --generate-config``.

traitlets writes each setting as its help, ``Default: <repr>`` and a
commented assignment of that repr. For a setting whose default is computed
when the Outpost starts, that repr is a placeholder (``traitlets.Undefined``,
``0.0``, ``{}``) that contradicts the help, or is no Python at all. For the
Outpost's own settings this module writes the computed default instead: the
value a fresh Outpost computes when it is literal Python, and for defaults
read from the environment or that are functions, a statement of where they
come from and an assignment that is valid as written.
"""

import ast
import re

from traitlets.traitlets import DefaultHandler

# defaults never computed here: those read from the environment (or files it
# names), so that no secret of this machine reaches the file, and those that
# differ in each process
DESCRIBED = {
    "hub_credentials": (
        "from OUTPOST_HUB_CREDENTIALS_FILE, else OUTPOST_HUB_CREDENTIALS (see above)",
        '{"my-hub": "a-long-random-password"}',
    ),
    "crypt_keys": (
        "from OUTPOST_CRYPT_KEY, else a key generated once into crypt_key_file",
        '["<a Fernet key: python -c \'from cryptography.fernet import Fernet; '
        'print(Fernet.generate_key().decode())\'>"]',
    ),
    "ssh_authorized_keys": (
        "from OUTPOST_SSH_AUTHORIZED_KEYS (see above)",
        '{"my-hub": ["ssh-ed25519 AAAA... my-hub"]}',
    ),
    "token": ("from OUTPOST_METRICS_TOKEN (see above)", '"a-long-random-token"'),
    "operator_credentials": ("from OUTPOST_OPERATOR_CREDENTIALS (see above)",
                             '{"operator": "a-long-random-password"}'),
    "operator_token": ("from OUTPOST_OPERATOR_TOKEN (see above)", '"a-long-random-token"'),
    # differs from process to process
    "instance_name": ("this host's name and the process id, e.g. 'login1-4242'", '"login1"'),
}

# defaults that are functions: how to write them as Python
FUNCTIONS = {
    "apply_flavor_hook": (
        "jupyterhub_outpost.flavors.apply_resources",
        '__import__("jupyterhub_outpost.flavors", fromlist=["apply_resources"]).apply_resources',
    ),
    "sanitize_start_response": (
        "the response unchanged",
        "lambda spawner, response: response",
    ),
}


def _literal(value):
    """``repr(value)`` if it reads back as the same value, else None"""
    text = repr(value)
    try:
        return text if ast.literal_eval(text) == value else None
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def computed_defaults(cls, fresh):
    """``{name: (what the Default: line says, the assignment's value)}`` for
    the settings of ``cls`` whose default is computed; ``fresh()`` gives an
    instance of ``cls`` built without configuration"""
    generators = {
        value.trait_name
        for klass in cls.__mro__
        for value in vars(klass).values()
        if isinstance(value, DefaultHandler)
    }
    found = {}
    for name, trait in cls.class_own_traits(config=True).items():
        if name not in generators and "Undefined" not in trait.default_value_repr():
            continue
        if name in DESCRIBED:
            found[name] = DESCRIBED[name]
        elif name in FUNCTIONS:
            found[name] = FUNCTIONS[name]
        else:
            text = _literal(getattr(fresh(), name))
            if text is None:
                raise ValueError(f"{cls.__name__}.{name}: no Python form of its default")
            if text != trait.default_value_repr():
                found[name] = (f"{text} (computed when the Outpost starts: see above)", text)
    return found


def fix_section(text, cls, computed):
    """``text`` (a generated file) with the settings of ``cls`` in
    ``computed`` written as their computed defaults"""
    for name, (said, value) in computed.items():
        pattern = re.compile(
            rf"^#  Default: .*\n# c\.{cls.__name__}\.{name} = .*$", re.MULTILINE
        )
        replacement = f"#  Default: {said}\n# c.{cls.__name__}.{name} = {value}"
        text, count = pattern.subn(lambda _: replacement, text)
        if count != 1:
            raise ValueError(f"{cls.__name__}.{name} not found once in the generated file")
    return text


def generated(text, classes):
    """``text`` with the computed defaults of ``classes``: ``{cls: fresh}``"""
    for cls, fresh in classes.items():
        text = fix_section(text, cls, computed_defaults(cls, fresh))
    return text
