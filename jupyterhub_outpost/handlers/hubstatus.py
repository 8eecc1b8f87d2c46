"""GET /hub-status/{hub}/: a hub's part of the status page, for that hub's
admins, who sign in with their hub accounts (JupyterHub's OAuth for services)"""

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from tornado import web

from ..utils import url_path_join
from .status import TEMPLATES


def hub_oauth(outpost, hub):
    """The :class:`HubOAuth` of hub ``hub``, or None when it has no sign-in"""
    cache = outpost.status_page.hub_oauth
    if hub in cache:
        return cache[hub]
    settings = outpost.hub_api.get(hub) or {}
    auth = None
    if settings.get("oauth_client_id") and settings.get("oauth_redirect_uri"):
        api_url = settings["url"].rstrip("/")
        hub_url = settings.get("hub_url") or api_url.removesuffix("/hub/api")
        auth = HubOAuth(
            api_url=api_url,
            api_token=settings["token"],
            oauth_client_id=settings["oauth_client_id"],
            oauth_redirect_uri=settings["oauth_redirect_uri"],
            oauth_authorization_url=hub_url.rstrip("/") + "/hub/api/oauth2/authorize",
            # the sign-in cookie of one hub goes to its own pages only
            base_url=url_path_join(outpost.base_url, "hub-status", hub, ""),
            cookie_host_prefix_enabled=False,
            # any user the hub identifies; admins are told apart below
            access_scopes=set(),
        )
    cache[hub] = auth
    return auth


class _HubSignIn:
    """Picks the HubOAuth of the hub the path names (404 without one)"""

    @property
    def outpost(self):
        return self.settings["outpost"]

    def prepare(self):
        hub = self.path_args[0] if self.path_args else ""
        auth = hub_oauth(self.outpost, hub) if hub in self.outpost.hub_credentials else None
        if auth is None:
            raise web.HTTPError(404)
        self.hub_auth = auth
        self.hub_name = hub


class HubStatusPageHandler(_HubSignIn, HubOAuthenticated, web.RequestHandler):
    """The status page of one hub, for its admins"""

    def get_template_path(self):
        return TEMPLATES

    def set_default_headers(self):
        self.set_header("Content-Security-Policy",
                        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'")  # fmt: skip
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")

    @web.authenticated
    async def get(self, hub):
        user = self.current_user
        if not user.get("admin"):
            raise web.HTTPError(403, "Only the hub's admins see its status")
        model = await self.outpost.status_page.model(hub=hub)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.render("status.html", **model)


class HubStatusCallbackHandler(_HubSignIn, HubOAuthCallbackHandler):
    """Where the hub sends its user back after the sign-in"""

    async def get(self, hub):
        await super().get()


default_handlers = [
    (r"/hub-status/([^/]+)/oauth_callback", HubStatusCallbackHandler),
    (r"/hub-status/([^/]+)/?", HubStatusPageHandler),
]
