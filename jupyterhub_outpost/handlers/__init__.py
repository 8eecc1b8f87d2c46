"""HTTP handlers of the Outpost's REST API"""

from ..spawners import batchcallback
from . import flavors, health, history, hubstatus, metrics, services, spec, status

default_handlers = []
for _mod in (services, history, flavors, health, metrics, spec, batchcallback, hubstatus, status):
    default_handlers.extend(_mod.default_handlers)
