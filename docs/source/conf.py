"""Sphinx configuration of the jupyterhub-outpost documentation.

It does not import jupyterhub_outpost. The reference page of the settings
embeds the output of ``jupyterhub-outpost --help-all``, generated here at
build time so that it cannot drift from the code.
"""

import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
_version_ns = {}
with open(os.path.join(here, "..", "..", "jupyterhub_outpost", "_version.py")) as f:
    exec(f.read(), {}, _version_ns)  # as setup.py does: no package import

project = "jupyterhub-outpost"
author = "jupyterhub-outpost contributors"
copyright = "jupyterhub-outpost contributors"
release = _version_ns.get("__version__", "unknown")
version = release

extensions = ["myst_parser"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

try:
    import pydata_sphinx_theme  # noqa: F401

    html_theme = "pydata_sphinx_theme"
except ImportError:
    html_theme = "alabaster"
html_title = f"jupyterhub-outpost {release}"


def _write_help_all():
    """reference/help-all.txt: the settings as the installed command lists them"""
    target = os.path.join(here, "reference", "help-all.txt")
    try:
        text = subprocess.run(
            [sys.executable, "-m", "jupyterhub_outpost", "--help-all"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        text = f"(jupyterhub-outpost --help-all was not available when this was built: {e})\n"
    with open(target, "w") as f:
        f.write(text)


_write_help_all()

