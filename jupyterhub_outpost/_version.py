"""jupyterhub-outpost version info"""

version_info = (0, 1, 0)
__version__ = ".".join(map(str, version_info))
