"""HTTP handlers of the Outpost's REST API"""

from . import health, services

default_handlers = []
for _mod in (services, health):
    default_handlers.extend(_mod.default_handlers)
