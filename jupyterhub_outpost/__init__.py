"""jupyterhub-outpost: run JupyterHub Spawners on behalf of remote JupyterHubs."""

from ._version import __version__  # noqa: F401
