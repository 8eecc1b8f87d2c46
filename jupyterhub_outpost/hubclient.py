"""Calls from the Outpost to a hub's API: progress events, flavor usage.

Every call has a timeout; failures are logged (without the token) and never
break the start or stop they belong to.
"""

import asyncio
import json

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Float, Integer
from traitlets.config import LoggingConfigurable

from .log import scrub_url


class HubClient(LoggingConfigurable):
    """Posts events and flavor usage to the hubs"""

    request_timeout = Float(
        10,
        help="Timeout in seconds for each request the Outpost sends to a hub.",
    ).tag(config=True)

    retries = Integer(
        2,
        help="How many times a failed flavor-usage update is retried "
        "(with 1 s, 2 s, ... between tries).",
    ).tag(config=True)

    @property
    def client(self):
        return AsyncHTTPClient()

    async def _post(self, url, token, body, what, log_name):
        request = HTTPRequest(
            url,
            method="POST",
            headers={
                "Authorization": f"token {token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            body=json.dumps(body),
            connect_timeout=self.request_timeout,
            request_timeout=self.request_timeout,
        )
        try:
            await self.client.fetch(request)
        except HTTPClientError as e:
            self.log.warning(
                "%s - %s to %s failed: %s", log_name, what, scrub_url(url), e.code
            )
            return False
        except Exception as e:
            self.log.warning(
                "%s - %s to %s failed: %s", log_name, what, scrub_url(url), e
            )
            return False
        return True

    async def send_event(self, env, event, log_name=""):
        """POST one progress event to ``JUPYTERHUB_EVENTS_URL`` of a server"""
        url = env.get("JUPYTERHUB_EVENTS_URL")
        token = env.get("JUPYTERHUB_API_TOKEN")
        if not url or not token:
            return False
        return await self._post(url, token, event, "progress event", log_name)

    async def list_servers(self, api_url, token, log_name=""):
        """The servers a hub knows, as ``{user_id}_{name}_{start_id}`` strings.

        Asks the hub's ``GET {api_url}/servers`` (the OutpostSpawner's list,
        scope ``custom:servers:list``). None when the hub cannot answer.
        """
        url = api_url.rstrip("/") + "/servers"
        request = HTTPRequest(
            url,
            headers={"Authorization": f"token {token}", "Accept": "application/json"},
            connect_timeout=self.request_timeout,
            request_timeout=self.request_timeout,
        )
        try:
            response = await self.client.fetch(request)
            names = json.loads(response.body)
        except HTTPClientError as e:
            self.log.warning("%s - server list from %s failed: %s", log_name, scrub_url(url), e.code)
            return None
        except Exception as e:
            self.log.warning("%s - server list from %s failed: %s", log_name, scrub_url(url), e)
            return None
        if not isinstance(names, list):
            self.log.warning("%s - server list from %s is not a list", log_name, scrub_url(url))
            return None
        return {str(n) for n in names}

    async def send_flavor_update(self, env, usage, log_name=""):
        """POST this hub's flavor usage to ``JUPYTERHUB_FLAVORS_UPDATE_URL``"""
        url = env.get("JUPYTERHUB_FLAVORS_UPDATE_URL")
        token = env.get("JUPYTERHUB_FLAVORS_UPDATE_TOKEN")
        if not url or not token:
            return False
        for attempt in range(self.retries + 1):
            if await self._post(url, token, usage, "flavor update", log_name):
                return True
            if attempt < self.retries:
                await asyncio.sleep(attempt + 1)
        return False
