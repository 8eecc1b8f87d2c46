"""The operators' status page: behind an operator credential, what runs and
what failed, with everything a hub sent shown as text, in a real browser"""

import asyncio
import base64
import os
import shutil
import subprocess
import tempfile

import pytest

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import HUB_CREDENTIALS, api_request, start_body, wait_until

OPERATORS = {"ops": "operator-password-for-tests"}
TOKEN = "operator-token-for-tests-0123456789"
SLEEP = ["sh", "-c", "exec sleep 600"]
MARKUP = ['/no/such/<script>document.title="owned"</script>', '/no/such/"><img src=x onerror=alert(2)>']
FLAVORS = {"small": {"max": 4, "display_name": "Small <b>2 GB</b>"}, "big": {"display_name": "Big"}}

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def status_config(workdir):
    cfg = outpost_config(workdir, flavors=FLAVORS)
    cfg.StatusPage.operator_credentials = OPERATORS
    cfg.StatusPage.operator_token = TOKEN
    return cfg


@pytest.fixture(scope="module")
async def watched(tmp_path_factory, fake_hub):
    outpost = await start_outpost(status_config(tmp_path_factory.mktemp("status")))
    yield outpost
    await stop_outpost(outpost)


def basic(name, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


async def page(app, **headers):
    return await api_request(app, auth=False, headers=headers)


async def test_only_operators_see_the_page(watched):
    for headers in ({}, basic("hub-a", HUB_CREDENTIALS["hub-a"]), basic("ops", "wrong"),
                    {"Authorization": "Bearer wrong"}):  # fmt: skip
        response = await page(watched, **headers)
        assert response.code == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    for headers in (basic("ops", OPERATORS["ops"]), {"Authorization": f"Bearer {TOKEN}"}):
        response = await page(watched, **headers)
        assert response.code == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]


async def test_the_page_shows_servers_flavors_and_failures_as_text(watched, fake_hub, tmp_path):
    running = start_body(fake_hub.url, user="una", name="lab", misc={"cmd": SLEEP},
                         user_options={"flavor": "small"})  # fmt: skip
    assert (await api_request(watched, "services", method="POST", body=running)).code == 200
    for i, path in enumerate(MARKUP):
        body = start_body(fake_hub.url, user="una", name=f"broken{i}", misc={"cmd": [path]},
                          user_options={"flavor": "big"})  # fmt: skip
        assert (await api_request(watched, "services", method="POST", body=body)).code == 419

    response = await page(watched, **basic("ops", OPERATORS["ops"]))
    html = response.body.decode()
    assert "<script>" not in html and "<img" not in html and "<b>2 GB" not in html
    assert "&lt;script&gt;" in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    for secret in (*OPERATORS.values(), TOKEN, HUB_CREDENTIALS["hub-a"], running["env"]["JUPYTERHUB_API_TOKEN"]):
        assert secret not in html
    assert "holds the background lease" in html or "does not hold" in html

    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing; ci/test.sh installs it", pytrace=False)
        pytest.skip("chromium is not installed")
    url = f"http://ops:{OPERATORS['ops']}@127.0.0.1:{watched.bound_port}/"
    screenshot = tmp_path / "status-page.png"
    dom, shot = await asyncio.gather(
        browser("--dump-dom", url), browser(f"--screenshot={screenshot}", "--window-size=412,1400", url)
    )
    text = visible_text(dom)
    # what the browser shows: the reasons as text, no element made of them
    assert 'document.title="owned"' in text and "onerror=alert(2)" in text
    assert "<title>jupyterhub-outpost status</title>" in dom and "owned</title>" not in dom
    assert dom.count("<img") == 0 and dom.count("<script") == 0
    assert "hub-a" in text and "Small <b>2 GB</b>" in text
    await wait_until(screenshot.exists, timeout=10, message="the screenshot")
    print(f"\nstatus page screenshot (phone width): {screenshot}")

    await api_request(watched, "services", "lab", running["user_options"]["start_id"], method="DELETE")


async def browser(*args):
    """What headless Chromium prints for ``args`` (a profile of its own each)"""
    with tempfile.TemporaryDirectory(prefix="outpost-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, err.decode()[-2000:]
    return out.decode()


def visible_text(dom):
    """The text of a DOM dump, entities decoded (as the browser shows it)"""
    import html
    import re

    body = dom.split("<body>", 1)[-1]
    return html.unescape(re.sub(r"<[^>]+>", " ", body))
