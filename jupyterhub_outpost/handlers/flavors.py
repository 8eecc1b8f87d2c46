"""Flavors with limits and usage: ``GET /flavors``, ``POST /userflavors``"""

from tornado import web

from .base import OutpostAPIHandler


class FlavorAPIHandler(OutpostAPIHandler):
    """Base of the flavor handlers: they ask the policy"""

    @property
    def policy(self):
        """The :class:`~jupyterhub_outpost.policy.OutpostPolicy`"""
        return self.settings["policy"]


class FlavorsAPIHandler(FlavorAPIHandler):
    """The flavors the calling hub may use, with limits and current usage"""

    async def get(self):
        self.write_json(await self.policy.flavor_usage(self.current_hub))


class UserFlavorsAPIHandler(FlavorAPIHandler):
    """The flavors one user may use; the body is the user's authentication
    object (``{"name": ..., "groups": [...]}``), bare or under ``authentication``"""

    async def post(self):
        body = self.get_json_body()
        authentication = body.get("authentication", body)
        if not isinstance(authentication, dict):
            raise web.HTTPError(400, "'authentication' must be a JSON object")
        self.write_json(await self.policy.user_flavors(self.current_hub, authentication))


default_handlers = [
    (r"/flavors/?", FlavorsAPIHandler),
    (r"/userflavors/?", UserFlavorsAPIHandler),
]
