"""HTTP handlers of the Outpost's REST API"""

from ..spawners import batchcallback
from . import flavors, health, services, spec

default_handlers = []
for _mod in (services, flavors, health, spec, batchcallback):
    default_handlers.extend(_mod.default_handlers)
