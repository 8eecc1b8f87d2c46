"""HTTP handlers of the Outpost's REST API"""

from . import health, services, spec

default_handlers = []
for _mod in (services, health, spec):
    default_handlers.extend(_mod.default_handlers)
