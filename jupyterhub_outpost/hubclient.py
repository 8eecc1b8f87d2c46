"""Calls from the Outpost to a hub's API: progress events, flavor usage,
rebuilding SSH port forwards.

Every call has a timeout; failures are logged (without the token) and never
break the start or stop they belong to.
"""

import asyncio
import json
import random

from tornado.escape import url_escape
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Float, Integer
from traitlets.config import LoggingConfigurable

from .log import scrub_url

# answers after which a tunnel request is tried again: no answer (599), a
# hub that is overloaded or restarting; any other 4xx is final (the hub
# refused: unknown server, token without scope, forward failed)
RETRY_STATUS = {429, 502, 503, 504, 599}

# the longest wait between two tries of a tunnel request, in seconds
MAX_BACKOFF = 60


# what a failed call is counted as (OutpostMetrics' hub_callback_failures)
FAILURE_KINDS = {
    "progress event": "event",
    "flavor update": "flavor_update",
    "setuptunnel": "setuptunnel",
    "recreateforward": "recreateforward",
    "server list": "housekeeping",
}


class HubClient(LoggingConfigurable):
    """Posts events and flavor usage to the hubs"""

    # called with the kind of each call that failed (see FAILURE_KINDS)
    on_failure = None

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

    def _json_post(self, url, token, body, timeout=None):
        """A POST of ``body`` as JSON with ``Authorization: token ...``"""
        timeout = timeout or self.request_timeout
        return HTTPRequest(
            url,
            method="POST",
            headers={
                "Authorization": f"token {token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            body=json.dumps(body),
            connect_timeout=min(timeout, self.request_timeout),
            request_timeout=timeout,
        )

    async def _post(self, url, token, body, what, log_name):
        request = self._json_post(url, token, body)
        try:
            await self.client.fetch(request)
        except HTTPClientError as e:
            self.log.warning(
                "%s - %s to %s failed: %s", log_name, what, scrub_url(url), e.code
            )
            self._failed(what)
            return False
        except Exception as e:
            self.log.warning(
                "%s - %s to %s failed: %s", log_name, what, scrub_url(url), e
            )
            self._failed(what)
            return False
        return True

    def _failed(self, what):
        if self.on_failure is not None:
            self.on_failure(FAILURE_KINDS[what])

    async def _fetch_status(self, request, what, log_name):
        """Send ``request``; its HTTP status, 599 when no answer came"""
        try:
            response = await self.client.fetch(request)
        except HTTPClientError as e:
            return e.code
        except Exception as e:
            self.log.debug("%s - %s to %s: %s", log_name, what, scrub_url(request.url), e)
            return 599
        return response.code

    async def _with_retries(self, make_request, what, log_name, retries, backoff):
        """Send a tunnel request until it is answered, retrying with backoff.

        Waits ``backoff`` seconds after the first failure, doubling after
        each (at most ``MAX_BACKOFF``, plus up to a quarter at random so
        that many servers do not retry at the same moment). Returns
        ``(status, tries)``; only ``RETRY_STATUS`` answers are retried.
        """
        tries = 0
        while True:
            request = make_request()
            tries += 1
            status = await self._fetch_status(request, what, log_name)
            if status >= 300:
                self._failed(what)
            if status < 300 or status not in RETRY_STATUS or tries > retries:
                return status, tries
            wait = min(backoff * 2 ** (tries - 1), MAX_BACKOFF)
            wait *= 1 + random.random() / 4
            self.log.warning(
                "%s - %s to %s failed (%s); try %i of %i in %.1fs",
                log_name, what, scrub_url(request.url), status, tries + 1, retries + 1, wait,
            )  # fmt: skip
            await asyncio.sleep(wait)

    async def setup_tunnel(self, env, service, log_name="", retries=0, backoff=1, timeout=None):
        """POST ``{"service": service}`` to ``JUPYTERHUB_SETUPTUNNEL_URL`` of a server.

        The hub rebuilds the server's SSH port forward and answers 204.
        Returns ``(status, tries)``; status 0 when the server's environment
        has no such URL or token.
        """
        url = env.get("JUPYTERHUB_SETUPTUNNEL_URL")
        token = env.get("JUPYTERHUB_API_TOKEN")
        if not url or not token:
            return 0, 0
        timeout = timeout or self.request_timeout

        def make_request():
            return self._json_post(url, token, {"service": service}, timeout)

        return await self._with_retries(make_request, "setuptunnel", log_name, retries, backoff)

    async def recreate_forward(self, api_url, token, system, log_name="", retries=0, backoff=1,
                               timeout=None):  # fmt: skip
        """``GET {api_url}/recreateforward/{system}``: the hub rebuilds every
        forward to ``system`` (the OutpostSpawner's hub answers 202 and works
        on in the background; its token needs the scope
        ``custom:sshnode:restart``). Returns ``(status, tries)``."""
        url = f"{api_url.rstrip('/')}/recreateforward/{url_escape(system, plus=False)}"
        timeout = timeout or self.request_timeout

        def make_request():
            return HTTPRequest(
                url,
                headers={"Authorization": f"token {token}", "Accept": "application/json"},
                connect_timeout=min(timeout, self.request_timeout),
                request_timeout=timeout,
            )

        return await self._with_retries(make_request, "recreateforward", log_name, retries, backoff)

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
            self._failed("server list")
            return None
        except Exception as e:
            self.log.warning("%s - server list from %s failed: %s", log_name, scrub_url(url), e)
            self._failed("server list")
            return None
        if not isinstance(names, list):
            self.log.warning("%s - server list from %s is not a list", log_name, scrub_url(url))
            self._failed("server list")
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
