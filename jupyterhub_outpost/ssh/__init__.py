"""The Outpost's SSH endpoint: hubs forward to their own servers, nothing else."""

from .keys import load_or_create_host_key, parse_authorized_keys
from .server import SSHEndpoint

__all__ = ["SSHEndpoint", "load_or_create_host_key", "parse_authorized_keys"]
