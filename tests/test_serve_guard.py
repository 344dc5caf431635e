"""The server under attack: a real `sentilens serve` (subprocess, 127.0.0.1 only, ephemeral port) on a tiny fusion
run, probed the way an attacker or an unlucky client would. Every probe is bounded in count and time."""

from __future__ import annotations

import base64
import os
import signal
import socket
import time

import httpx
import pytest

from sentilens.cli import main
from serve_helpers import Server, chromium, png_bytes, train_tiny_fusion

pytestmark = pytest.mark.slow  # trains a real tiny model

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke showpage\n%%EOF\n"
IDLE_TIMEOUT_S = 0.5
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
WAIT_S = 30.0
"""Bound on any wait in these tests (a bound, not a speed requirement)."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_fusion(tmp_path_factory.mktemp("guard"))


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    server = Server(run, tmp_path_factory.mktemp("logs") / "guard.log",
                    ["--idle-timeout", str(IDLE_TIMEOUT_S), "--header-timeout", str(HEADER_TIMEOUT_S),
                     "--body-timeout", str(BODY_TIMEOUT_S), "--allowed-origin", "http://localhost:3000",
                     "--max-connections", "4", "--max-posts", "8"])
    yield server
    server.stop()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def closed_by_server(sock: socket.socket) -> bytes:
    """Read until the server closes the socket (raises socket.timeout after WAIT_S if it never does)."""
    sock.settimeout(WAIT_S)
    answer = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            return answer
        answer += piece


def test_eps_upload_is_refused_as_unsupported_not_decoded(http, server):
    """Defect 1: EPS (even named .jpg) went to Ghostscript; a gs failure was an uncaught 500."""
    for response in (http.post("/v1/predict", files={"image": ("photo.jpg", EPS, "image/jpeg")}),
                     http.post("/v1/predict", json={"image": base64.b64encode(EPS).decode()})):
        assert error_of(response, 415)["code"] == "unsupported_image"
    assert "Traceback" not in server.text()


def test_millions_of_empty_posts_are_refused_before_parsing(http):
    """Defect 2: 3.5 M empty posts (10 MB, under the body cap) were validated on the event loop (11 s, +1.8 GB)."""
    body = b'{"posts": [' + b",".join([b"{}"] * 3_400_000) + b"]}"  # 10.2 MB, under the 10 MiB cap
    error = error_of(http.post("/v1/predict/batch", content=body, headers={"content-type": "application/json"}), 422)
    assert error["code"] == "malformed_body" and "more values than any request within the limits" in error["message"]
    error = error_of(http.post("/v1/predict/batch", json={"posts": [{"text": "hi"}] * 9}), 422)
    assert error["code"] == "batch_too_large" and error["field"] == "posts"
    assert http.post("/v1/predict/batch", json={"posts": [{"text": "hi"}] * 8}).status_code == 200


def test_the_schema_carries_the_server_limits(http):
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["BatchRequest"]["properties"]["posts"]["maxItems"] == 8
    assert schemas["PredictRequest"]["properties"]["text"]["maxLength"] == 5000


def test_slow_headers_are_cut_off_and_healthz_answers_meanwhile(http, server):
    """Defect 3: clients sending headers slowly held their slots as long as they liked; /healthz got 503."""
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]  # twice --max-connections
    try:
        for sock in slow:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert http.get("/healthz").status_code == 200
        assert http.post("/v1/predict", json={"text": "a fine day"}).status_code == 200
        for sock in slow:
            sock.sendall(b"X-Drip: 1\r\n")  # still dripping: the deadline counts from the connection, not the byte
        for sock in slow:
            assert closed_by_server(sock) == b""
    finally:
        for sock in slow:
            sock.close()


def test_an_idle_kept_alive_connection_dripping_its_next_request_is_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(WAIT_S)
        answer = b""
        while not answer.endswith(b"}"):  # the whole first response (its JSON body ends the message)
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request, never finished
        assert closed_by_server(sock) == b""


def test_a_slow_body_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"text\": ")
        answer = closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer


def test_a_client_leaving_mid_upload_is_one_log_line_not_an_internal_error(http, server):
    """Defect 9: a disconnect mid-upload was logged as an internal error with 116 lines."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"text\": \"half")
        time.sleep(0.3)
    deadline = time.monotonic() + WAIT_S
    while "disconnected before sending its whole request" not in server.text():
        assert time.monotonic() < deadline, server.text()
        time.sleep(0.1)
    assert "Traceback" not in server.text() and "internal error" not in server.text()
    assert http.get("/healthz").status_code == 200


def test_foreign_host_headers_are_refused_and_responses_carry_security_headers(http):
    """Defect 12: a key-less server answered any Host (DNS rebinding), with no CSP or nosniff."""
    error = error_of(http.get("/v1/model", headers={"host": "evil.example"}), 400)
    assert error["code"] == "invalid_host"
    error_of(http.get("/healthz", headers={"host": "evil.example:8000"}), 400)
    for host in ("127.0.0.1", "localhost:1234", "[::1]:80"):
        assert http.get("/healthz", headers={"host": host}).status_code == 200
    for path in ("/", "/healthz", "/v1/model", "/static/app.js"):
        response = http.get(path)
        assert response.status_code == 200
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_an_empty_image_is_an_error_not_a_text_only_post(http):
    """Defect 14: a 0-byte upload was silently treated as a text-only post (200)."""
    for response in (http.post("/v1/predict", files={"image": ("empty.png", b"", "image/png")},
                               data={"text": "hello"}),
                     http.post("/v1/predict", json={"text": "hello", "image": ""}),
                     http.post("/v1/predict/batch", json={"posts": [{"text": "hello", "image": ""}]})):
        error = error_of(response, 422)
        assert error["code"] == "corrupt_image" and "empty" in error["message"]
    assert http.post("/v1/predict", json={"text": "hello", "image": base64.b64encode(png_bytes(32, 32)).decode()}
                     ).status_code == 200


def test_a_port_in_use_is_one_line_and_exit_2(run, monkeypatch, capsys):
    """Defect 16: a port clash exited 3 with uvicorn's text, after loading the model."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        monkeypatch.setattr("sys.argv", ["sentilens", "serve", "--run", str(run), "--port", str(port)])
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--port {port}: cannot listen there" in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "problem"), [
    (["--port", "99999"], "--port 99999: a TCP port is between 0 and 65535"),
    (["--port", "-1"], "--port -1: a TCP port is between 0 and 65535"),
    (["--idle-timeout", "0"], "--idle-timeout: Input should be greater than 0"),
    (["--header-timeout", "-1"], "--header-timeout: Input should be greater than 0"),
    (["--max-client-connections", "0"], "--max-client-connections: Input should be greater than or equal to 1"),
])
def test_a_bad_port_or_connection_limit_is_one_line_and_exit_2(run, monkeypatch, capsys, args, problem):
    monkeypatch.setattr("sys.argv", ["sentilens", "serve", "--run", str(run), *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert problem in error and len(error.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- idle sockets


def open_by_server(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock`` open (it has sent nothing on it, nor closed it)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def test_an_idle_connection_is_closed_sooner_than_one_sending_headers(server):
    """A socket that sends nothing is closed after --idle-timeout; one that has begun a request has until
    --header-timeout."""
    with socket.create_connection(("127.0.0.1", server.port)) as idle, \
            socket.create_connection(("127.0.0.1", server.port)) as started:
        started.sendall(b"GET /healthz HTTP/1.1\r\n")
        deadline = time.monotonic() + WAIT_S
        while open_by_server(idle):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert open_by_server(started)
        assert closed_by_server(started) == b""


def test_healthz_and_predictions_answer_within_a_second_under_an_idle_socket_flood(run, tmp_path):
    """An idle-socket flood past the socket cap (300 sockets against a cap of 256 and 16 per client: the same
    picture as 1,100 against the default 1,024) closed every new connection, /healthz included, until the flood
    timed out; now each newcomer takes the place of the longest-idle socket. Long timeouts: the flood is held."""
    server = Server(run, tmp_path / "flood.log", ["--max-connections", "4", "--max-client-connections", "16",
                                                  "--idle-timeout", "60", "--header-timeout", "60"])
    flood: list[socket.socket] = []

    def connect(n: int) -> list[socket.socket]:
        opened = [socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) for _ in range(n)]
        flood.extend(opened)
        time.sleep(0.5)  # the server accepts them
        return opened

    try:
        connect(100)  # under the total cap; past this client's 16, but young
        time.sleep(1.0)  # now idle: this client's new sockets replace its oldest idle ones
        late = connect(10)
        assert all(open_by_server(sock) for sock in late)
        assert sum(open_by_server(sock) for sock in flood) == 100  # 10 in, 10 of the oldest out
        connect(200)  # 300 in all, faster than any grace: the total cap closes the longest-idle ones
        took = []
        for _ in range(5):
            started = time.perf_counter()
            with httpx.Client(base_url=server.url, timeout=WAIT_S) as fresh:  # a new connection each time
                assert fresh.get("/healthz").status_code == 200
            took.append(time.perf_counter() - started)
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as fresh:
            started = time.perf_counter()
            assert fresh.post("/v1/predict", json={"text": "a fine day"}).status_code == 200
            took.append(time.perf_counter() - started)
        assert max(took) < 1.0, took
        assert sum(open_by_server(sock) for sock in flood) <= 256
        assert "Traceback" not in server.text()
    finally:
        for sock in flood:
            sock.close()
        server.stop()


# ----------------------------------------------------------------------------- framing, Host, HEAD, Origin


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(data)
        return closed_by_server(sock)


def test_content_length_with_transfer_encoding_is_400_and_the_connection_closed(server):
    """RFC 9112 6.1: behind a proxy that frames by the other header, the pipelined GET would be a smuggled request."""
    answer = raw_exchange(server.port, b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                          b"application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                          b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"code":"conflicting_framing"' in answer and b"connection: close" in answer.lower()
    assert answer.count(b"HTTP/1.1") == 1  # the pipelined request was never answered


def test_a_request_h11_cannot_parse_gets_the_json_error_shape(server):
    answer = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n"
                          b"Content-Length: 2\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head and b"nosniff" in head
    assert b'"code":"bad_request"' in body


@pytest.mark.parametrize(("host", "status"), [
    ("[::1]:8000", 200), ("[::1]", 200), ("[0:0::1]:1", 200), ("127.0.0.1:", 200), ("LOCALHOST:9", 200),
    ("[::1]evil.example", 400), ("[::1]evil.example:80", 400), ("::1", 400), ("[::1]:80x", 400),
    ("[::1", 400), ("[not-an-ip]", 400), ("127.0.0.1:80:80", 400), ("user@127.0.0.1", 400), ("", 400),
])
def test_host_parsing_reads_ipv6_literals_exactly(http, host, status):
    response = http.get("/healthz", headers={"host": host})
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["code"] == "invalid_host"


def test_head_answers_wherever_get_does(http):
    for path in ("/", "/healthz", "/v1/model", "/openapi.json", "/docs", "/static/app.js"):
        got, head = http.get(path), http.head(path)
        assert got.status_code == head.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-length"] == got.headers["content-length"]
        assert head.headers["content-type"] == got.headers["content-type"]
        assert "default-src 'self'" in head.headers["content-security-policy"]
    refused = http.head("/v1/predict")  # as GET is: 405, naming the method that works
    assert refused.status_code == 405 and refused.headers["allow"] == "POST" and refused.content == b""


def test_an_image_sent_as_a_text_part_is_422_naming_the_field(http):
    response = http.post("/v1/predict", files={"text": (None, "hello"), "image": (None, "iVBORw0KGgo=")})
    error = error_of(response, 422)
    assert error["code"] == "image_not_a_file" and error["field"] == "image"


def test_a_keyless_server_refuses_cross_site_posts_but_not_its_own_page(http, server):
    """Any web page can POST a form to 127.0.0.1 (the Host is right, so the rebinding check passes)."""
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{server.port + 1}",
                   f"https://127.0.0.1:{server.port}", f"http://[::1]:{server.port}", "http://127.0.0.1"):
        response = http.post("/v1/predict", json={"text": "hi"}, headers={"origin": origin})
        assert error_of(response, 403)["code"] == "cross_origin", origin
    for headers in ({}, {"origin": server.url}, {"origin": f"http://LOCALHOST:{server.port}",
                                                 "host": f"localhost:{server.port}"},
                    {"origin": "http://localhost:3000"}):  # --allowed-origin
        assert http.post("/v1/predict", json={"text": "hi"}, headers=headers).status_code == 200, headers
    assert http.get("/v1/model", headers={"origin": "http://evil.example"}).status_code == 200  # reads change nothing


# ----------------------------------------------------------------------------- the upload folder


def upload_folders(temp) -> list:
    return sorted(path for path in temp.glob("sentilens-serve-*") if path.is_dir() and not path.is_symlink())


def test_a_killed_servers_upload_folder_is_swept_at_the_next_start_and_nothing_else(run, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    foreign = temp / "sentilens-serve-foreign"  # no marker: not a server's folder, or one still being made
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not the server's")
    live = temp / "sentilens-serve-live"  # the marker of a running process (this test's)
    live.mkdir()
    namespace = os.readlink("/proc/self/ns/pid")
    (live / "server.pid").write_text(f"{os.getpid()} - {namespace}\n")
    (live / "inflight.upload").write_bytes(b"image")
    container = temp / "sentilens-serve-container"  # a dead-looking id of another PID namespace
    container.mkdir()
    (container / "server.pid").write_text("999999999 - pid:[1]\n")
    elsewhere = tmp_path / "elsewhere"  # a link to a dead-looking folder is not followed
    elsewhere.mkdir()
    (elsewhere / "server.pid").write_text(f"999999999 - {namespace}\n")
    (temp / "sentilens-serve-link").symlink_to(elsewhere)
    (temp / "sentilens-serve-note.txt").write_text("a file, not a folder")
    env = {"TMPDIR": str(temp)}

    killed = Server(run, tmp_path / "killed.log", [], env=env)
    (own,) = set(upload_folders(temp)) - {foreign, live, container}
    assert (own / "server.pid").read_text().split()[0] == str(killed.process.pid)
    with httpx.Client(base_url=killed.url, timeout=WAIT_S) as http:
        assert http.post("/v1/predict", files={"image": ("p.png", png_bytes(32, 32), "image/png")}).status_code == 200
    (own / "0123.upload").write_bytes(png_bytes(32, 32))  # an upload in flight when the server dies
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait(timeout=WAIT_S)
    killed.stop()
    assert own.exists()

    restarted = Server(run, tmp_path / "restarted.log", [], env=env)
    try:
        assert not own.exists()
        (new,) = set(upload_folders(temp)) - {foreign, live, container}
        assert (new / "server.pid").read_text().split()[0] == str(restarted.process.pid)
        assert (foreign / "keep.txt").read_text() == "not the server's"
        assert (live / "inflight.upload").exists() and (container / "server.pid").exists()
        assert (elsewhere / "server.pid").exists() and (temp / "sentilens-serve-link").is_symlink()
        assert (temp / "sentilens-serve-note.txt").exists()
    finally:
        restarted.stop()
    assert restarted.process.returncode == 0 or restarted.process.returncode == -signal.SIGTERM
    assert not new.exists()  # emptied and removed on stop
    assert sorted(p.name for p in temp.glob("sentilens-serve-*")) == [
        "sentilens-serve-container", "sentilens-serve-foreign", "sentilens-serve-link", "sentilens-serve-live",
        "sentilens-serve-note.txt"]


# ----------------------------------------------------------------------------- API docs


def test_the_api_docs_render_the_operations_offline_under_the_csp(http, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = http.get("/docs")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # every asset from this server
    assert error_of(http.get("/redoc"), 404)["code"] == "not_found"
    browser = chromium(tmp_path / "profile")
    try:
        browser.get(server.url + "/docs")
        WebDriverWait(browser, WAIT_S).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) >= 5)
        paths = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
        assert paths == ["/healthz", "/v1/model", "/v1/predict", "/v1/predict/batch", "/v1/explain"]
        method = browser.find_element(By.CSS_SELECTOR, ".opblock-post .opblock-summary-method")
        assert method.text == "POST" and method.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"
        blocked = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert blocked == []  # no Content-Security-Policy violation, no failed load
    finally:
        browser.quit()
