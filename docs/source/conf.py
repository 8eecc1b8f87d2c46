"""Sphinx configuration of the jupyterhub-outpost documentation.

Import-safe: it neither imports jupyterhub_outpost nor needs it installed.
"""

import os

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
