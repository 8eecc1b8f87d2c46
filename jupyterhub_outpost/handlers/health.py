"""GET /ping: liveness without credentials"""

from .base import OutpostAPIHandler


class PingAPIHandler(OutpostAPIHandler):
    auth_required = False

    def get(self):
        self.write_json({"status": "ok"})


default_handlers = [(r"/ping/?", PingAPIHandler)]
