"""Sphinx configuration of the jupyterhub-outpost documentation.

The reference of the settings is generated from the code with
autodoc-traits, as JupyterHub's documentation does: the package must be
installed (``pip install -r docs/requirements.txt`` installs it). Without
it the build fails rather than publish a page without settings.
"""

import os

here = os.path.dirname(os.path.abspath(__file__))
_version_ns = {}
with open(os.path.join(here, "..", "..", "jupyterhub_outpost", "_version.py")) as f:
    exec(f.read(), {}, _version_ns)  # as setup.py does

try:
    import jupyterhub_outpost  # noqa: F401
except ImportError as e:
    raise RuntimeError(
        "The documentation documents the installed package: pip install -r docs/requirements.txt"
    ) from e

project = "jupyterhub-outpost"
author = "jupyterhub-outpost contributors"
copyright = "jupyterhub-outpost contributors"
release = _version_ns.get("__version__", "unknown")
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc", "autodoc_traits"]
autodoc_default_options = {"members": False}
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
