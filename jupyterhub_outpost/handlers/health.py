"""GET /ping: liveness without credentials"""

from .base import OutpostAPIHandler


class PingAPIHandler(OutpostAPIHandler):
    auth_required = False

    def get(self):
        self.write_json({"status": "ok"})

    def head(self):
        # load balancers' health checks: a GET's status and headers, no body
        self.get()


default_handlers = [(r"/ping/?", PingAPIHandler)]
