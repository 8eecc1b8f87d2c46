"""A real JupyterHub (subprocess) whose OutpostSpawner talks to a test Outpost."""

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .utils import basic_auth, free_port, wait_for_port

HUB_CONFIG = """
import outpostspawner  # registers the OutpostSpawner's API handlers at the hub

c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.should_start = True
c.JupyterHub.cleanup_servers = False
c.JupyterHub.cleanup_proxy = False
c.JupyterHub.db_url = "sqlite:///{workdir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{workdir}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{workdir}/jupyterhub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.allow_named_servers = True
c.JupyterHub.last_activity_interval = 3600
# answer start requests at once (202) so that tests can follow the progress
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
c.JupyterHub.custom_scopes = {{
    "custom:outpostflavors:set": {{"description": "Outposts report their flavor usage"}},
}}
c.JupyterHub.services = [
    {{"name": "e2e-admin", "api_token": "{admin_token}"}},
    {{"name": "outpost-flavors", "api_token": "{flavors_token}"}},
]
c.JupyterHub.load_roles = [
    {{"name": "e2e-admin", "scopes": ["admin:users", "admin:servers", "tokens",
      "read:servers", "access:servers", "list:users", "read:users", "list:services",
      "read:services"],
      "services": ["e2e-admin"]}},
    {{"name": "outpost-flavors", "scopes": ["custom:outpostflavors:set"],
      "services": ["outpost-flavors"]}},
]

c.JupyterHub.spawner_class = "outpostspawner.OutpostSpawner"
c.OutpostSpawner.request_url = "{request_url}"
c.OutpostSpawner.request_headers = {{"Authorization": "{authorization}"}}
c.OutpostSpawner.ssh_during_startup = False
# the test machine binds servers to the loopback interface only
c.OutpostSpawner.custom_misc_disable_default = True
c.OutpostSpawner.custom_misc = lambda spawner, user_options: dict(user_options.get("misc", {{}}))
c.OutpostSpawner.custom_poll_interval = {poll_interval_ms}
c.OutpostSpawner.start_timeout = 90
c.OutpostSpawner.http_timeout = 60
c.OutpostSpawner.start_async = {start_async}
c.OutpostSpawner.stop_async = {stop_async}

def custom_env(spawner, user_options, api_url):
    return {{
        "JUPYTERHUB_FLAVORS_UPDATE_URL": api_url.rstrip("/") + "/outpostflavors/outpost-e2e",
        "JUPYTERHUB_FLAVORS_UPDATE_TOKEN": "{flavors_token}",
    }}

c.OutpostSpawner.custom_env = custom_env
"""


class JupyterHubProcess:
    """``jupyterhub`` with the OutpostSpawner, on random loopback ports"""

    def __init__(self, workdir, outpost_url, hub_name, password, start_async=False,
                 stop_async=False, poll_interval_ms=2000):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.port = free_port()
        self.hub_port = free_port()
        self.proxy_api_port = free_port()
        self.admin_token = secrets.token_hex(16)
        self.flavors_token = secrets.token_hex(16)
        self.config_path = os.path.join(self.workdir, "jupyterhub_config.py")
        with open(self.config_path, "w") as f:
            f.write(
                textwrap.dedent(HUB_CONFIG).format(
                    port=self.port, hub_port=self.hub_port, proxy_api_port=self.proxy_api_port,
                    workdir=self.workdir, admin_token=self.admin_token,
                    flavors_token=self.flavors_token, request_url=outpost_url,
                    authorization=basic_auth(hub_name, password),
                    poll_interval_ms=poll_interval_ms, start_async=start_async, stop_async=stop_async,
                )
            )
        self.env = dict(os.environ)
        self.env["CONFIGPROXY_AUTH_TOKEN"] = secrets.token_hex(16)
        self.proc = None
        self.log_path = os.path.join(self.workdir, "jupyterhub.log")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self):
        return f"http://127.0.0.1:{self.hub_port}/hub/api"

    def start(self):
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", self.config_path, "--debug"],
            cwd=self.workdir, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.hub_port, timeout=60)
        wait_for_port(self.port, timeout=60)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()

    def kill_proxy(self):
        """The proxy outlives the hub (cleanup_proxy=False): end it at teardown"""
        subprocess.run(["pkill", "-f", f"configurable-http-proxy.*{self.proxy_api_port}"], check=False)

    def log_text(self):
        with open(self.log_path, encoding="utf8", errors="replace") as f:
            return f.read()

    async def api(self, path, method="GET", body=None, token=None):
        """Call the hub's REST API; return (status, parsed JSON or None)"""
        request = HTTPRequest(
            f"{self.api_url}/{path.lstrip('/')}",
            method=method,
            headers={"Authorization": f"token {token or self.admin_token}"},
            body=None if body is None and method == "GET" else json.dumps(body or {}),
            allow_nonstandard_methods=True,
            request_timeout=120,
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        try:
            data = json.loads(response.body) if response.body else None
        except ValueError:
            data = None
        return response.code, data

    async def progress(self, user, server, token=None, timeout=120):
        """The server's progress events until it is ready or failed"""
        events = []
        buffer = b""

        def on_chunk(chunk):
            nonlocal buffer
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                for line in block.splitlines():
                    if line.startswith(b"data:"):
                        events.append(json.loads(line[5:]))

        request = HTTPRequest(
            f"{self.api_url}/users/{user}/servers/{server}/progress",
            headers={"Authorization": f"token {token or self.admin_token}",
                     "Accept": "text/event-stream"},
            streaming_callback=on_chunk,
            request_timeout=timeout,
        )
        await AsyncHTTPClient().fetch(request, raise_error=False)
        return events

    async def user_token(self, user):
        code, data = await self.api(f"users/{user}/tokens", method="POST", body={"note": "e2e"})
        assert code == 201, (code, data)
        return data["token"]

    async def proxied(self, path, token):
        """GET through the hub's proxy (as a browser would) with a token"""
        request = HTTPRequest(
            f"{self.url}/{path.lstrip('/')}",
            headers={"Authorization": f"token {token}"},
            follow_redirects=False,
            request_timeout=30,
        )
        return await AsyncHTTPClient().fetch(request, raise_error=False)
