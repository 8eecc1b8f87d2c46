"""Flavors with limits and usage: ``GET /flavors``, ``POST /userflavors``;
credits: ``GET /credits``, ``POST /usercredits``"""

from tornado import web

from .base import OutpostAPIHandler


class FlavorAPIHandler(OutpostAPIHandler):
    """Base of the flavor handlers: they ask the policy"""

    @property
    def policy(self):
        """The :class:`~jupyterhub_outpost.policy.OutpostPolicy`"""
        return self.settings["policy"]

    def authentication(self):
        """The user's authentication object of the body (``{"name": ...,
        "groups": [...]}``), bare or under ``authentication``"""
        body = self.get_json_body()
        authentication = body.get("authentication", body)
        if not isinstance(authentication, dict):
            raise web.HTTPError(400, "'authentication' must be a JSON object")
        return authentication


class FlavorsAPIHandler(FlavorAPIHandler):
    """The flavors the calling hub may use, with limits and current usage"""

    async def get(self):
        self.write_json(await self.policy.flavor_usage(self.current_hub))


class UserFlavorsAPIHandler(FlavorAPIHandler):
    """The flavors one user may use"""

    async def post(self):
        self.write_json(await self.policy.user_flavors(self.current_hub, self.authentication()))


class CreditsAPIHandler(FlavorAPIHandler):
    """The credits the calling hub may use"""

    def get(self):
        self.write_json(self.policy.hub_credits(self.current_hub))


class UserCreditsAPIHandler(FlavorAPIHandler):
    """The credits one user may use"""

    async def post(self):
        self.write_json(await self.policy.user_credits(self.current_hub, self.authentication()))


default_handlers = [
    (r"/flavors/?", FlavorsAPIHandler),
    (r"/userflavors/?", UserFlavorsAPIHandler),
    (r"/credits/?", CreditsAPIHandler),
    (r"/usercredits/?", UserCreditsAPIHandler),
]
