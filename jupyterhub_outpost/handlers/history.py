"""The spawn history, for the hub that made the starts:
``GET /services/{name}/{start_id}/events`` and ``GET /history/{user}``"""

from tornado import web

from ..utils import SERVER_NAME_RE, START_ID_RE
from .base import OutpostAPIHandler


class HistoryAPIHandler(OutpostAPIHandler):
    @property
    def history(self):
        """The :class:`~jupyterhub_outpost.history.StartHistory`"""
        return self.servers.history


class StartEventsAPIHandler(HistoryAPIHandler):
    """One start of this hub: its outcome, failure reason and progress events"""

    async def get(self, name, start_id):
        if not SERVER_NAME_RE.match(name) or not START_ID_RE.match(start_id):
            raise web.HTTPError(404, "No such start")
        found = await self.history.of_start(self.current_hub, name, start_id)
        if found is None:
            raise web.HTTPError(404, "No such start")
        self.write_json(found)


class UserHistoryAPIHandler(HistoryAPIHandler):
    """The recent starts of one user of this hub, newest first"""

    async def get(self, user):
        self.write_json(await self.history.of_user(self.current_hub, user))


default_handlers = [
    (r"/services/([^/]*)/([^/]*)/events/?", StartEventsAPIHandler),
    (r"/history/([^/]+)/?", UserHistoryAPIHandler),
]
