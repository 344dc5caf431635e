"""Issue 15, the server's share: a real `sentilens serve` (subprocess, 127.0.0.1 only, ephemeral port) on a tiny
fusion run, probed the way an attacker or an unlucky client would. Every probe is bounded in count and time."""

from __future__ import annotations

import base64
import socket
import time

import httpx
import pytest

from sentilens.cli import main
from serve_helpers import Server, png_bytes, train_tiny_fusion

pytestmark = pytest.mark.slow  # trains a real tiny model

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke showpage\n%%EOF\n"
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
WAIT_S = 30.0
"""Bound on any wait in these tests (a bound, not a speed requirement)."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_fusion(tmp_path_factory.mktemp("guard"))


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    server = Server(run, tmp_path_factory.mktemp("logs") / "guard.log",
                    ["--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
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
