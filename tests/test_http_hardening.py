"""What a hostile client meets at the HTTP layer: JSON errors with the right
status for any request, connections that end in bounded time, bodies that
are never kept whole, and a log that stays cheap, short, one line per
record and free of secrets.

Most tests talk raw HTTP over a socket, to send exactly the bytes (and
lies) a client may send.
"""

import asyncio
import base64
import json
import logging
import math
import sys
import textwrap
import time

import pytest

from jupyterhub_outpost.log import MAX_MESSAGE_LENGTH, MAX_URI_LENGTH
from jupyterhub_outpost.log import secrets as known_secrets

from .conftest import outpost_config, start_outpost, stop_outpost
from .utils import (
    ON_POSTGRES,
    OutpostProcess,
    api_request,
    basic_auth,
    database_independent,
    drop_databases,
    json_of,
    process_config,
    start_body,
)

pytestmark = database_independent

BODY_TIMEOUT = 2
IDLE_TIMEOUT = 3
MiB = 1024 * 1024


@pytest.fixture(scope="module")
async def outpost(tmp_path_factory, fake_hub):
    """An in-process Outpost with short connection timeouts; servers are ``sleep``"""
    workdir = tmp_path_factory.mktemp("http")
    cfg = outpost_config(
        workdir,
        spawner_cmd=["sleep", "600"],
        body_timeout=BODY_TIMEOUT,
        idle_connection_timeout=IDLE_TIMEOUT,
    )
    app = await start_outpost(cfg)
    yield app
    await stop_outpost(app)
    if ON_POSTGRES:
        drop_databases([app.db_url])


@pytest.fixture(scope="module")
def outpost_process(tmp_path_factory):
    """A real ``jupyterhub-outpost`` process with the default settings"""
    workdir = tmp_path_factory.mktemp("http-process")
    process = OutpostProcess(workdir, process_config(workdir, cmd=["sleep", "600"]))
    process.start()
    yield process
    process.end()


@pytest.fixture
def captured(outpost):
    """The Outpost's log records (formatted) while the test runs"""
    records = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Capture(logging.DEBUG)
    outpost.log.addHandler(handler)
    yield records
    outpost.log.removeHandler(handler)


# raw HTTP


def head_of(method, path, headers=None, auth=True):
    """A request head as bytes; header values are latin-1 text (raw bytes)"""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    all_headers = {"Authorization": basic_auth("hub-a")} if auth else {}
    all_headers.update(headers or {})
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_response(reader, timeout=30, to_head=False):
    """(status, headers with lower-case names, body) of one response
    (``to_head``: the answer to a HEAD request, which has no body)"""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    if to_head or not length:
        return int(status_line.split()[1]), headers, b""
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return int(status_line.split()[1]), headers, body


async def exchange(port, head, body=b"", chunked=False, timeout=30):
    """Send a whole request (body in 64 KiB pieces), then read the answer"""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for start in range(0, len(body), 65536):
            piece = body[start : start + 65536]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return await read_response(reader, timeout)
    finally:
        writer.close()


async def seconds_until_closed(reader, timeout):
    """How long until the server closes the connection (read returns EOF)"""
    start = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), timeout):
        pass
    return time.monotonic() - start


def assert_json_error(response, status):
    code, headers, body = response
    assert code == status, (code, body[:300])
    assert headers["content-type"].startswith("application/json"), headers
    model = json.loads(body)
    assert set(model) == {"status", "message"} and model["status"] == status, model
    return model["message"]


# the log: linear scrubbing, cut lines, one line per record

SCRUB_TIMING = textwrap.dedent(
    """
    import json, time
    from jupyterhub_outpost.log import secrets
    secrets.add("registered-secret-word-1234")
    N = 65536
    shapes = {
        "word characters": ("a" * N, "a" * N),
        "token= and 64 KiB": ("token=" + "a" * N, "token=[secret]"),
        "password pairs": ("password: x " * (N // 12), "password: [secret] " * (N // 12)),
        "unterminated PEM": ("-----BEGIN PRIVATE KEY-----\\n" + "A" * N, "[secret]"),
        "many PEM starts": ("-----BEGIN X----- " * (N // 18), "[secret]"),
        "registered words": (
            ("b" * 20 + " registered-secret-word-1234 ") * (N // 48),
            ("b" * 20 + " [secret] ") * (N // 48),
        ),
    }
    result = {}
    for name, (line, expected) in shapes.items():
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            scrubbed = secrets.scrub(line)
            seconds.append(time.perf_counter() - start)
        result[name] = [min(seconds), scrubbed == expected]
    print(json.dumps(result))
    """
)


async def test_scrubbing_a_64k_line_takes_milliseconds():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRUB_TIMING, stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 60)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail("scrubbing six 64 KiB lines three times took over a minute")
    result = json.loads(out)
    for name, (seconds, scrubbed_right) in result.items():
        assert scrubbed_right, name
        assert seconds < 0.05, (name, seconds)


async def test_long_messages_are_cut_without_half_a_secret(outpost, captured):
    word = "Zq9registeredword" + "7" * 20
    phrase = "correct horse battery staple!"
    key = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(["MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"] * 900)
    known_secrets.add(word)
    known_secrets.add(phrase)
    try:
        cut_in_word = "y " * ((MAX_MESSAGE_LENGTH - 10) // 2) + word + " rest"
        cut_in_phrase = "y " * ((MAX_MESSAGE_LENGTH - 14) // 2) + phrase + " rest"
        for message in (cut_in_word, cut_in_phrase, "x " + key):
            outpost.log.warning("hub said: %s", message)
    finally:
        known_secrets.discard(word)
        known_secrets.discard(phrase)
    lines = [r.getMessage() for r in captured if r.getMessage().startswith("hub said")]
    assert len(lines) == 3
    for line in lines:
        assert len(line) < MAX_MESSAGE_LENGTH + 100, len(line)
        assert "[cut " in line
    assert word[:6] not in lines[0]
    assert "correct horse" not in lines[1]
    assert "-----BEGIN" not in lines[2] and "MIIEvQ" not in lines[2]


async def test_access_log_line_has_no_control_characters(outpost, captured):
    """Bytes 0x80-0xFF may appear in a request line; C1 controls among them are escaped"""
    head = b"GET /services/x\x85[E_fake_line]\x9b31m/1 HTTP/1.1\r\nHost: a\r\n\r\n"
    assert_json_error(await exchange(outpost.bound_port, head), 401)
    outpost.log.warning("a hub sent %r and %s", "a\nb", "line one\nline two\r\x1b[2J")
    messages = [r.getMessage() for r in captured]
    access = [m for m in messages if "GET /services/x" in m]
    assert access and "\\x85[E_fake_line]\\x9b31m" in access[0], access
    sent = [m for m in messages if m.startswith("a hub sent")]
    assert sent == ["a hub sent 'a\\nb' and line one\\nline two\\r\\x1b[2J"]


def _rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _long_path_requests(port, stop, answers):
    """Requests with a path near the 64 KiB header limit and no credentials, in a loop"""
    head = head_of("GET", "/services/" + "a" * 60000 + "/x", auth=False)
    while not stop.is_set():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not stop.is_set():
                writer.write(head)
                code, _, _ = await read_response(reader, timeout=600)
                answers.append(code)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # closed by the server: connect again
        finally:
            writer.close()


async def test_ping_stays_fast_while_long_paths_arrive(outpost_process):
    port = outpost_process.port
    stop, answers = asyncio.Event(), []
    attackers = [
        asyncio.ensure_future(_long_path_requests(port, stop, answers)) for _ in range(3)
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies = []
    try:
        await asyncio.sleep(0.2)  # let the attack begin
        for _ in range(200):
            start = time.monotonic()
            writer.write(head_of("GET", "/ping", auth=False))
            try:
                code, _, _ = await read_response(reader, timeout=5)
                assert code == 200
            except asyncio.TimeoutError:
                latencies.append(5.0)
                break
            latencies.append(time.monotonic() - start)
    finally:
        stop.set()
        writer.close()
        await asyncio.wait(attackers, timeout=10)
        for task in attackers:
            task.cancel()
    latencies.sort()
    p99 = latencies[math.ceil(0.99 * len(latencies)) - 1]
    print(f"/ping p99 {1000 * p99:.1f} ms, max {1000 * latencies[-1]:.1f} ms,"
          f" {len(latencies)} pings, {len(answers)} long-path requests answered")
    assert len(answers) >= 20 and set(answers) == {401}, (len(answers), set(answers))
    assert p99 < 0.05, f"/ping p99 {1000 * p99:.1f} ms during {len(answers)} long-path requests"
    # the access log shows each of them cut short
    lines = [line for line in outpost_process.log_text().splitlines() if "401 GET" in line]
    assert lines and all(len(line) < MAX_URI_LENGTH + 200 and "[cut " in line for line in lines)


async def test_huge_body_is_dropped_as_it_arrives(outpost_process):
    """200 MiB answered 413 at the end, read and dropped: the process does not grow"""
    pid = outpost_process.proc.pid
    before = _rss_bytes(pid)
    head = head_of("POST", "/services", {"Content-Length": str(200 * MiB)})
    reader, writer = await asyncio.open_connection("127.0.0.1", outpost_process.port)
    try:
        writer.write(head)
        piece = b"x" * MiB
        for _ in range(200):
            writer.write(piece)
            await writer.drain()
        response = await read_response(reader)
    finally:
        writer.close()
    assert_json_error(response, 413)
    assert _rss_bytes(pid) - before < 32 * MiB


# request bodies: size, credentials first, nesting


@pytest.mark.parametrize("size", [3 * MiB, 20 * MiB], ids=["3MiB", "20MiB"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    "password, status", [(None, 413), ("wrong", 401)], ids=["right-password", "wrong-password"]
)
async def test_large_body_answer_after_credentials(outpost, size, chunked, password, status):
    headers = {"Authorization": basic_auth("hub-a", password)}
    headers.update({"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(size)})
    head = head_of("POST", "/services", headers)
    response = await exchange(outpost.bound_port, head, b"x" * size, chunked=chunked)
    assert_json_error(response, status)
    if status == 401:
        assert response[1]["www-authenticate"].startswith("Basic")


async def test_large_body_to_unknown_path_is_404(outpost):
    head = head_of("PUT", "/nowhere", {"Content-Length": str(6 * MiB)}, auth=False)
    assert_json_error(await exchange(outpost.bound_port, head, b"x" * 6 * MiB), 404)


async def test_client_waiting_for_100_continue_gets_the_answer_at_once(outpost):
    """With ``Expect: 100-continue`` the body is never sent: answer without it"""
    for password, status in ((None, 413), ("wrong", 401)):
        headers = {
            "Authorization": basic_auth("hub-a", password),
            "Content-Length": str(20 * MiB),
            "Expect": "100-continue",
        }
        reader, writer = await asyncio.open_connection("127.0.0.1", outpost.bound_port)
        try:
            writer.write(head_of("POST", "/services", headers))
            assert_json_error(await read_response(reader, timeout=5), status)
        finally:
            writer.close()


def _nested(depth):
    return "[" * depth + "]" * depth


def _with_misc(fake_url, misc_json):
    body = json.dumps(start_body(fake_url, name="deep", misc={"x": "MISC"}))
    return body.replace('"MISC"', misc_json)


NESTED_BODIES = {
    "top level, 1000": lambda url: _nested(1000),
    "objects, 1000": lambda url: '{"a": ' * 1000 + "1" + "}" * 1000,
    "in misc, 1000": lambda url: _with_misc(url, _nested(1000)),
    "in misc, 200": lambda url: _with_misc(url, _nested(200)),
    "33 levels": lambda url: _with_misc(url, _nested(31)),
}


@pytest.mark.parametrize("case", list(NESTED_BODIES))
async def test_deeply_nested_json_is_400(outpost, fake_hub, case):
    raw = NESTED_BODIES[case](fake_hub.url)
    response = await api_request(outpost, "services", method="POST", raw_body=raw)
    assert response.code == 400, response.body[:300]
    assert "nested deeper than 32" in json_of(response)["message"]
    assert json_of(await api_request(outpost, "services")) == []


@pytest.mark.parametrize(
    "raw, hint",
    [
        (b"null", "JSON object"),
        (b"[]", "JSON object"),
        (b'{"name": 1' + b"1" * 5000 + b"}", "not valid JSON"),
        (b"\xff\xfe\x00{", "not valid JSON"),
        (b'{"name": "\xc0\xaf"}', "not valid JSON"),
    ],
    ids=["null", "array", "5000 digits", "not UTF-8", "overlong UTF-8"],
)
async def test_odd_json_bodies_are_400(outpost, raw, hint):
    response = await api_request(outpost, "services", method="POST", raw_body=raw)
    assert response.code == 400, response.body[:300]
    assert hint in json_of(response)["message"]


async def test_json_nested_32_levels_starts(outpost, fake_hub):
    raw = _with_misc(fake_hub.url, _nested(30))
    response = await api_request(outpost, "services", method="POST", raw_body=raw)
    assert response.code == 200, response.body[:300]
    servers = json_of(await api_request(outpost, "services"))
    assert [s["name"] for s in servers] == ["deep"]


async def test_lone_surrogate_in_body_is_400(outpost, fake_hub):
    body = start_body(fake_hub.url, name="surrogate")
    body["env"]["BROKEN"] = "\ud800"
    response = await api_request(outpost, "services", method="POST", raw_body=json.dumps(body))
    assert response.code == 400, response.body[:300]
    assert "surrogate" in json_of(response)["message"]
    # a pair written as two escapes is one character, and fine
    body["env"]["BROKEN"] = "\U0001f600"
    response = await api_request(outpost, "services", method="POST", raw_body=json.dumps(body))
    assert response.code == 200, response.body[:300]


async def test_chunked_start_body_is_read(outpost, fake_hub):
    body = json.dumps(start_body(fake_hub.url, name="chunked")).encode()
    head = head_of("POST", "/services", {"Transfer-Encoding": "chunked"})
    code, _, answer = await exchange(outpost.bound_port, head, body, chunked=True)
    assert code == 200, answer
    servers = json_of(await api_request(outpost, "services"))
    assert [s["name"] for s in servers] == ["chunked"]


async def test_content_length_shorter_than_body(outpost):
    """The body is what Content-Length says; the rest is a broken next request"""
    head = head_of("POST", "/services", {"Content-Length": "5"})
    reader, writer = await asyncio.open_connection("127.0.0.1", outpost.bound_port)
    try:
        writer.write(head + b'{"name": "short", "env": {}}\r\n\r\n')
        message = assert_json_error(await read_response(reader), 400)
        assert "JSON" in message
        assert await seconds_until_closed(reader, timeout=10) < 10
    finally:
        writer.close()
    assert json_of(await api_request(outpost, "services")) == []


# connections that stall


async def test_body_that_never_ends_is_closed_after_body_timeout(outpost):
    head = head_of("POST", "/services", {"Content-Length": "1000"})
    reader, writer = await asyncio.open_connection("127.0.0.1", outpost.bound_port)
    try:
        writer.write(head + b'{"name": "' + b"x" * 490)
        await writer.drain()
        elapsed = await seconds_until_closed(reader, timeout=BODY_TIMEOUT + 10)
    finally:
        writer.close()
    assert BODY_TIMEOUT * 0.8 < elapsed < BODY_TIMEOUT + 3


async def test_idle_kept_alive_connection_is_closed_after_idle_timeout(outpost):
    reader, writer = await asyncio.open_connection("127.0.0.1", outpost.bound_port)
    try:
        writer.write(head_of("GET", "/ping", auth=False))
        code, headers, _ = await read_response(reader)
        assert code == 200 and headers.get("connection", "").lower() != "close"
        elapsed = await seconds_until_closed(reader, timeout=IDLE_TIMEOUT + 10)
    finally:
        writer.close()
    assert IDLE_TIMEOUT * 0.8 < elapsed < IDLE_TIMEOUT + 3


async def test_headers_that_never_end_are_closed_after_idle_timeout(outpost):
    reader, writer = await asyncio.open_connection("127.0.0.1", outpost.bound_port)
    try:
        writer.write(b"GET /ping HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        await writer.drain()
        elapsed = await seconds_until_closed(reader, timeout=IDLE_TIMEOUT + 10)
    finally:
        writer.close()
    assert elapsed < IDLE_TIMEOUT + 3


async def test_timeouts_must_be_positive(tmp_path):
    from traitlets import TraitError

    from jupyterhub_outpost.app import JupyterHubOutpost

    for name in ("body_timeout", "idle_connection_timeout"):
        with pytest.raises(TraitError, match=name):
            JupyterHubOutpost(**{name: 0})


# headers and credentials


def _basic(raw):
    return "Basic " + base64.b64encode(raw).decode()


ODD_AUTHORIZATION = {
    "not ASCII": "Basic \xe9\xe9\xe9\xe9",
    "enormous": "Basic " + "QUFB" * 15000,
    "NUL in name": _basic(b"hub-a\x00:password-of-hub-a"),
    "NUL in password": _basic(b"hub-a:password-of-hub-a\x00"),
    "not UTF-8": _basic(b"\xff\xfe:\xc0\xaf"),
    "only a colon": _basic(b":"),
    "scheme only": "Basic",
    "base64 with a space": "Basic aHViLWE6 cGFzc3dvcmQtb2YtaHViLWE=",
}


@pytest.mark.parametrize("case", list(ODD_AUTHORIZATION))
async def test_odd_authorization_is_401(outpost, case):
    head = head_of("GET", "/services", {"Authorization": ODD_AUTHORIZATION[case]}, auth=False)
    response = await exchange(outpost.bound_port, head)
    assert_json_error(response, 401)
    assert response[1]["www-authenticate"].startswith("Basic")


async def test_basic_scheme_is_case_insensitive(outpost):
    credentials = basic_auth("hub-a").split(" ", 1)[1]
    head = head_of("GET", "/services", {"Authorization": "bAsIc " + credentials}, auth=False)
    code, _, body = await exchange(outpost.bound_port, head)
    assert code == 200 and json.loads(body) == []


async def test_many_headers_are_fine(outpost):
    headers = {f"X-Header-{i}": "v" * 16 for i in range(1500)}
    code, _, body = await exchange(outpost.bound_port, head_of("GET", "/services", headers))
    assert code == 200 and json.loads(body) == []


async def test_headers_over_64k_end_the_connection_not_the_service(outpost):
    head = head_of("GET", "/services", {"X-Huge": "h" * 70000})
    reader, writer = await asyncio.open_connection("127.0.0.1", outpost.bound_port)
    try:
        writer.write(head)
        try:
            assert await asyncio.wait_for(reader.read(65536), 10) == b""
        except ConnectionResetError:
            pass
    finally:
        writer.close()
    assert_json_error(await exchange(outpost.bound_port, head_of("GET", "/nope")), 404)


# methods, paths, query arguments


async def test_unknown_method_is_json_405_with_allow(outpost):
    for path, allow in (("/services", "GET, POST"), ("/services/x/1", "GET, DELETE")):
        response = await exchange(outpost.bound_port, head_of("FROB", path))
        assert_json_error(response, 405)
        assert response[1]["allow"] == allow


async def test_options_is_json_405_after_credentials(outpost):
    assert_json_error(await exchange(outpost.bound_port, head_of("OPTIONS", "/ping")), 405)
    response = await exchange(outpost.bound_port, head_of("OPTIONS", "/services", auth=False))
    assert_json_error(response, 401)


async def test_head_ping_answers_like_get_without_body(outpost):
    reader, writer = await asyncio.open_connection("127.0.0.1", outpost.bound_port)
    try:
        writer.write(head_of("HEAD", "/ping", auth=False) + head_of("GET", "/ping", auth=False))
        head_status, head_headers, _ = await read_response(reader, to_head=True)
        # a HEAD answer has no body: the next bytes are the GET's answer
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert head_status == 200
    assert head_headers["content-length"] == str(len(json.dumps({"status": "ok"})))
    assert status_line.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "path, status",
    [
        ("/services/a%00/1", 404),
        ("/services/a/%00", 404),
        ("/services/%ff/1", 400),
        ("/services/%c0%af/1", 400),
        ("/services/x/1?collect_logs=%ff", 400),
        ("/services/x/1?collect_logs=%00", 404),
        ("/services/x/1?collect_logs=true&collect_logs=TRUE", 404),
        ("/services/x/1?collect_logs=" + "t" * 10000, 404),
        ("/no%00where", 404),
        ("/no%ffwhere?%ff=%ff", 404),
    ],
)
async def test_odd_paths_and_arguments_are_json_errors(outpost, path, status):
    for method in ("GET", "DELETE"):
        response = await exchange(outpost.bound_port, head_of(method, path))
        assert_json_error(response, status)
