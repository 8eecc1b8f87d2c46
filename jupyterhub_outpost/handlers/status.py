"""GET /: the operators' status page (HTML, read only)"""

import base64
import binascii
import os

from tornado import web

from .base import OutpostAPIHandler

TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "templates")


class StatusPageHandler(OutpostAPIHandler):
    # an operator's credential, not a hub's (see StatusPage)
    auth_required = False

    def set_default_headers(self):
        super().set_default_headers()
        # nothing on the page runs scripts, loads from elsewhere or may be framed
        self.set_header("Content-Security-Policy",
                        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'")  # fmt: skip
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")

    def get_template_path(self):
        return TEMPLATES

    def _operator(self):
        page = self.outpost.status_page
        scheme, _, value = self.request.headers.get("Authorization", "").partition(" ")
        scheme, value = scheme.lower(), value.strip()
        allowed = False
        if scheme == "bearer" and value:
            allowed = page.allows(None, None, value)
        elif scheme == "basic" and value:
            try:
                name, sep, password = base64.b64decode(value, validate=True).decode("utf8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                sep = ""
            allowed = bool(sep) and page.allows(name, password, None)
        if not allowed:
            error = web.HTTPError(401, "Operator credentials needed")
            error.headers = {"WWW-Authenticate": 'Basic realm="jupyterhub-outpost status"'}
            raise error

    async def get(self):
        self._operator()
        model = await self.outpost.status_page.model()
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.render("status.html", **model)


default_handlers = [(r"/?", StatusPageHandler)]
