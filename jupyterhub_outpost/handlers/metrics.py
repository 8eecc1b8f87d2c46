"""GET /metrics: Prometheus' text format, for a scraper with the metrics token"""

import base64
import binascii

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado import web

from .base import OutpostAPIHandler


class MetricsAPIHandler(OutpostAPIHandler):
    # not a hub's credential: the metrics token (see OutpostMetrics)
    auth_required = False

    @property
    def metrics(self):
        return self.outpost.metrics

    def _credential(self):
        """The bearer token, or the password of Basic credentials; None without"""
        scheme, _, value = self.request.headers.get("Authorization", "").partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and value:
            return value
        if scheme == "basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            _, sep, password = decoded.partition(":")
            return password if sep else None
        return None

    def get(self):
        if self.metrics is None:
            raise web.HTTPError(404, "Metrics are turned off (c.OutpostMetrics.enabled)")
        if not self.metrics.allows(self.request.remote_ip, self._credential()):
            error = web.HTTPError(401, "Wrong or missing metrics credentials")
            error.headers = {"WWW-Authenticate": 'Bearer realm="jupyterhub-outpost metrics"'}
            raise error
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.metrics.registry))


default_handlers = [(r"/metrics/?", MetricsAPIHandler)]
