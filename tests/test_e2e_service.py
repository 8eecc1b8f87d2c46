"""The Outpost registered at a real JupyterHub as an external service, with
a role of exactly the scopes it uses, and that access in use: housekeeping
stops a server the hub does not know and keeps the ones it does."""

import http.cookies
import json
import re
import secrets
from urllib.parse import urlencode, urljoin

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .hub import JupyterHubProcess
from .test_e2e import OUTPOST_CONFIG, create_users, outpost_listing, start_server, stop_server, wait_ready
from .utils import (
    needs_hub_proxy,
    HUB_CREDENTIALS,
    OutpostProcess,
    api_request,
    database_independent,
    new_db_url,
    pids_with_env,
    start_body,
    wait_until,
)

pytestmark = [
    pytest.mark.e2e,
    # the hub's side of the registration; the records are test_e2e's
    database_independent,
    needs_hub_proxy,
]

SYSTEM = "outpost-e2e"

# the hub's jupyterhub_config.py, as the how-to shows it
REGISTRATION = """
c.JupyterHub.custom_scopes["custom:servers:list"] = {{
    "description": "List the servers of the OutpostSpawner (Outpost housekeeping)",
}}
c.JupyterHub.custom_scopes["custom:sshnode:restart"] = {{
    "description": "Rebuild the SSH forwards of one Outpost",
}}
c.JupyterHub.services.append({{
    "name": "{system}",
    "url": "http://127.0.0.1:{outpost_port}",
    "api_token": "{token}",
    "display": False,
    # the hub's admins sign in to their part of the Outpost's status page
    "oauth_client_id": "service-{system}",
    "oauth_redirect_uri": "http://127.0.0.1:{outpost_port}/hub-status/hub-a/oauth_callback",
    "oauth_no_confirm": True,
}})
c.Authenticator.admin_users = {{"boss"}}
c.JupyterHub.load_roles.append({{
    "name": "{system}",
    "services": ["{system}"],
    "scopes": ["custom:servers:list", "custom:sshnode:restart"],
}})
"""

OUTPOST_HUB_API = """
c.JupyterHubOutpost.cleanup_interval = 1
c.JupyterHubOutpost.hub_api = {{
    "hub-a": {{"url": "{api_url}", "token": "{token}", "system": "{system}",
              "housekeeping": {{"interval": 1, "grace": 0}},
              "oauth_client_id": "service-{system}", "hub_url": "{hub_url}",
              "oauth_redirect_uri": "http://127.0.0.1:{outpost_port}/hub-status/hub-a/oauth_callback"}},
}}
"""


@pytest.fixture(scope="module")
async def registered(tmp_path_factory):
    """(hub, outpost, the service's token): the Outpost registered at the hub"""
    token = secrets.token_hex(32)
    outpost_dir, hub_dir = tmp_path_factory.mktemp("svc-outpost"), tmp_path_factory.mktemp("svc-hub")
    outpost = OutpostProcess(outpost_dir, "")
    hub = JupyterHubProcess(hub_dir, f"http://127.0.0.1:{outpost.port}/services/", "hub-a",
                            HUB_CREDENTIALS["hub-a"])  # fmt: skip
    with open(hub.config_path, "a") as f:
        f.write(REGISTRATION.format(system=SYSTEM, outpost_port=outpost.port, token=token))
    with open(outpost.config_path, "w") as f:
        f.write(OUTPOST_CONFIG.format(workdir=outpost_dir, db_url=new_db_url(outpost_dir)))
        f.write(OUTPOST_HUB_API.format(api_url=hub.api_url, token=token, system=SYSTEM, hub_url=hub.url,
                                       outpost_port=outpost.port))  # fmt: skip
    outpost.start("--log-level=DEBUG")
    hub.start()
    yield hub, outpost, token
    hub.stop()
    hub.kill_proxy()
    for server in await outpost_listing(outpost):
        await api_request(outpost, "services", server["name"], server["start_id"], method="DELETE")
    outpost.terminate()


async def as_service(hub, token, path, method="GET"):
    request = HTTPRequest(f"{hub.api_url}/{path}", method=method, headers={"Authorization": f"token {token}"},
                          body=None if method == "GET" else "{}", request_timeout=30)  # fmt: skip
    return await AsyncHTTPClient().fetch(request, raise_error=False)


async def test_the_hub_lists_the_outpost_with_exactly_its_scopes(registered):
    hub, _outpost, token = registered
    code, services = await hub.api("services")
    assert code == 200 and SYSTEM in services, services
    response = await as_service(hub, token, "user")
    model = json.loads(response.body)
    assert model["kind"] == "service" and model["name"] == SYSTEM
    assert set(model["scopes"]) == {"custom:servers:list", "custom:sshnode:restart"}
    assert (await as_service(hub, token, "servers")).code == 200
    # and nothing else of the hub's API
    for path, method in (("users", "GET"), ("users/anyone/servers/x", "POST"), ("proxy", "GET"),
                         ("users/anyone/tokens", "POST")):  # fmt: skip
        assert (await as_service(hub, token, path, method)).code == 403, path


async def test_housekeeping_through_the_registration_keeps_what_the_hub_knows(registered):
    hub, outpost, _token = registered
    await create_users(hub, "kim")
    await start_server(hub, "kim", "lab")
    await wait_ready(hub, "kim", "lab")
    # a server the hub never asked for: started at the Outpost directly
    stray = start_body(hub.api_url, user="kim", user_id=999, name="stray",
                       misc={"cmd": ["sh", "-c", "exec sleep 600"]})  # fmt: skip
    assert (await api_request(outpost, "services", method="POST", body=stray)).code == 200

    async def stray_gone():
        return [s for s in await outpost_listing(outpost) if s["name"] == "stray"] == []

    await wait_until(stray_gone, timeout=30, message="housekeeping to stop the stray server")
    assert "unknown to the hub; stopping" in outpost.log_text()
    # the hub's own server stays
    listing = await outpost_listing(outpost)
    assert [s["name"] for s in listing] == ["lab"]
    token = await hub.user_token("kim")
    assert (await hub.proxied("/user/kim/lab/api/status", token)).code == 200
    await stop_server(hub, "kim", "lab")
    await wait_until(lambda: not pids_with_env("JUPYTERHUB_SERVICE_PREFIX", "/user/kim/lab/"),
                     timeout=30, message="the server ended")  # fmt: skip


class Browser:
    """Requests with the cookies a browser keeps, redirects followed by hand"""

    def __init__(self):
        self.cookies = {}

    async def get(self, url, method="GET", body=None, headers=None):
        request = HTTPRequest(
            url, method=method, body=body, follow_redirects=False, request_timeout=30,
            headers={**(headers or {}), "Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())},
        )  # fmt: skip
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        for header in response.headers.get_list("Set-Cookie"):
            jar = http.cookies.SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return response

    async def follow(self, url, limit=10):
        """GET ``url`` and the redirects after it; the last answer"""
        for _ in range(limit):
            response = await self.get(url)
            if response.code not in (301, 302, 303, 307):
                return response
            url = urljoin(url, response.headers["Location"])
        raise AssertionError("too many redirects")


async def sign_in_at_hub(hub, name):
    """A browser signed in at the hub as ``name`` (the dummy authenticator)"""
    browser = Browser()
    form = await browser.get(f"{hub.url}/hub/login")
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form.body.decode()).group(1)
    response = await browser.get(f"{hub.url}/hub/login", method="POST",
                                 body=urlencode({"username": name, "password": "x", "_xsrf": xsrf}),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert response.code == 302, response.code
    return browser


async def test_a_hub_admin_signs_in_with_the_hub_and_sees_that_hub_only(registered):
    hub, outpost, _token = registered
    await create_users(hub, "boss", "pleb")
    page = f"http://127.0.0.1:{outpost.port}/hub-status/hub-a/"

    # not signed in: off to the hub's OAuth
    first = await Browser().get(page)
    assert first.code == 302 and first.headers["Location"].startswith(f"{hub.url}/hub/api/oauth2/authorize")

    boss = await sign_in_at_hub(hub, "boss")
    response = await boss.follow(page)
    assert response.code == 200, response.body[:500]
    html = response.body.decode()
    assert 'id="hub-hub-a"' in html and 'id="hub-hub-b"' not in html
    assert "process " not in html.split("<h2>", 1)[0]

    pleb = await sign_in_at_hub(hub, "pleb")
    refused = await pleb.follow(page)
    assert refused.code == 403

    # another hub's page has no sign-in here, and the operators' page stays closed
    assert (await boss.get(f"http://127.0.0.1:{outpost.port}/hub-status/hub-b/")).code == 404
    assert (await boss.get(f"http://127.0.0.1:{outpost.port}/")).code == 401
