"""`sentilens serve` end to end: the real server (uvicorn in a subprocess, loopback, ephemeral port) on a tiny
MLLM run and a tiny fusion run, a real HTTP client, every endpoint and limit, the API key, back-pressure, the
OpenAPI schema, and the web page in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import socket

import httpx
import pytest
from PIL import Image

from mllm_helpers import small_manifest, train_tiny_mllm
from sentilens.cli import main
from sentilens.data.records import Post, read_split
from sentilens.predict import load_predictor
from serve_helpers import Server, chromium, png_bytes, train_tiny_fusion

pytestmark = pytest.mark.slow  # trains real models: left out of `make test-fast`, run by `make test`


MAX_UPLOAD = 256 * 1024
MAX_PIXELS = 150 * 150
MAX_TEXT = 300
MAX_POSTS = 4
PATCHES = 36  # the tiny LLaVA: 96 px / 16 px patches
KEY = "s3cret-test-key"
LIMITS = ["--max-upload-bytes", str(MAX_UPLOAD), "--max-pixels", str(MAX_PIXELS), "--max-text-chars", str(MAX_TEXT),
          "--max-posts", str(MAX_POSTS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_manifest(tmp_path_factory.mktemp("data"), n_train=8, n_val=4, n_test=8)


@pytest.fixture(scope="module")
def mllm_run(data, tmp_path_factory):
    return train_tiny_mllm(data, tmp_path_factory.mktemp("runs") / "tiny-mllm")


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    return train_tiny_fusion(tmp_path_factory.mktemp("fusion"))


@pytest.fixture(scope="module")
def mllm_server(mllm_run, tmp_path_factory):
    """Queue of one request and batches of one post: a burst must overflow it."""
    server = Server(mllm_run, tmp_path_factory.mktemp("logs") / "mllm.log",
                    ["--queue-size", "1", "--max-batch", "1", *LIMITS])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fusion_temp(tmp_path_factory):
    """The fusion server's TMPDIR, where it keeps the uploads of requests in flight."""
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="module")
def fusion_server(fusion_run, fusion_temp, tmp_path_factory):
    server = Server(fusion_run, tmp_path_factory.mktemp("logs") / "fusion.log",
                    ["--api-key-env", "SENTILENS_TEST_KEY", "--max-batch", "8"],
                    env={"SENTILENS_TEST_KEY": KEY, "TMPDIR": str(fusion_temp)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(mllm_server):
    with httpx.Client(base_url=mllm_server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def posts(data):
    return [p for p in read_split(data, "test") if p.image][:3]


@pytest.fixture(scope="module")
def mllm_predictor(mllm_run):
    return load_predictor(mllm_run, device="cpu")


def b64(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


def multipart(post: Post, **fields: str) -> dict:
    with open(post.image, "rb") as f:
        return {"files": {"image": ("post.png", f.read(), "image/png")}, "data": {"text": post.text, **fields}}


def form(**fields: str) -> dict:
    """Fields sent as multipart/form-data (httpx sends ``data=`` alone url-encoded)."""
    return {"files": {name: (None, value) for name, value in fields.items()}}


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if field is not None:
        assert error["field"] == field
    return error


def assert_same_prediction(answer: dict, expected) -> None:
    assert answer["label"] == expected.label
    assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
    assert answer["kept_tokens"] == expected.kept_tokens


# ----------------------------------------------------------------------------- endpoints


def test_healthz_and_model_describe_the_served_run(client, mllm_run):
    health = client.get("/healthz").json()
    assert health == {"status": "ok", "family": "mllm", "queue_pending": 0, "queue_capacity": 1}
    info = client.get("/v1/model").json()
    assert info["family"] == "mllm" and info["run"] == mllm_run.name
    assert info["labels"] == json.loads((mllm_run / "config.json").read_text())["labels"]
    assert info["base_model"] == "base-model" and info["supports_keep_ratio"] and info["supports_explain"]
    assert "random" in info["strategies"] and "+merge" in info["strategies"]
    assert info["config"]["mode"] == "full" and info["config"]["num_image_tokens"] == PATCHES
    assert info["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS, "max_aspect_ratio": 20,
                              "max_text_chars": MAX_TEXT, "max_posts": MAX_POSTS}


def test_multipart_and_json_predictions_equal_the_library_predictor(client, posts, mllm_predictor, mllm_run):
    post = posts[0]
    (expected,) = mllm_predictor.predict([post])
    by_form = client.post("/v1/predict", **multipart(post))
    by_json = client.post("/v1/predict", json={"text": post.text, "image": b64(post.image)})
    data_url = "data:image/png;base64," + b64(post.image)
    as_data_url = client.post("/v1/predict", json={"text": post.text, "image": data_url})
    for response in (by_form, by_json, as_data_url):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == {"label", "probabilities", "keep_ratio", "kept_tokens", "model", "latency_ms"}
        assert_same_prediction(answer, expected)
        assert answer["keep_ratio"] is None and answer["kept_tokens"] == PATCHES
        assert answer["model"] == f"mllm/{mllm_run.name}" and answer["latency_ms"] > 0


def test_keep_ratio_filters_the_visual_tokens_per_request(client, posts, mllm_predictor):
    post = posts[1]
    for ratio in (0.25, 1.0):
        (expected,) = mllm_predictor.predict([post], keep_ratio=ratio)
        answer = client.post("/v1/predict", **multipart(post, keep_ratio=str(ratio))).json()
        assert_same_prediction(answer, expected)
        assert answer["keep_ratio"] == ratio and answer["kept_tokens"] == math.ceil(ratio * PATCHES)


def test_batch_answers_every_post_in_order(client, posts, mllm_predictor):
    batch = [posts[0], Post(id="text-only", text="worst day ever"),
             Post(id="image-only", text="", image=posts[2].image)]
    expected = mllm_predictor.predict(batch, keep_ratio=0.5)
    body = {"keep_ratio": 0.5, "posts": [{"text": batch[0].text, "image": b64(batch[0].image)},
                                         {"id": "text-only", "text": batch[1].text},
                                         {"id": "image-only", "image": b64(batch[2].image)}]}
    response = client.post("/v1/predict/batch", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [p["id"] for p in answer["predictions"]] == ["0", "text-only", "image-only"]
    assert answer["keep_ratio"] == 0.5
    for got, want in zip(answer["predictions"], expected, strict=True):
        assert_same_prediction(got, want)
    assert answer["predictions"][1]["kept_tokens"] == 0


def test_explain_returns_the_heatmap_and_exactly_the_kept_patches(client, posts, mllm_predictor):
    post = posts[0]
    response = client.post("/v1/explain", **multipart(post, keep_ratio="0.3"))
    assert response.status_code == 200, response.text
    answer = response.json()
    heatmap = answer["heatmap"]
    kept = math.ceil(0.3 * PATCHES)
    assert answer["keep_ratio"] == 0.3 and answer["kept_tokens"] == kept
    assert_same_prediction(answer, mllm_predictor.predict([post], keep_ratio=0.3)[0])
    assert heatmap["grid"] == 6 and heatmap["patches"] == PATCHES and heatmap["kept_patches"] == kept
    assert sum(map(sum, heatmap["kept"])) == kept
    scores = [s for row in heatmap["scores"] for s in row]
    assert min(scores) == 0.0 and max(scores) == 1.0
    # the kept patches are the top-scored ones
    flags = [k for row in heatmap["kept"] for k in row]
    assert min(s for s, k in zip(scores, flags, strict=True) if k) >= max(
        s for s, k in zip(scores, flags, strict=True) if not k)
    picture = Image.open(io.BytesIO(base64.b64decode(heatmap["image"].split(",", 1)[1])))
    assert picture.format == "PNG" and picture.size == (96, 96)
    default = client.post("/v1/explain", json={"text": post.text, "image": b64(post.image)}).json()
    assert default["keep_ratio"] == 0.4 and default["heatmap"]["kept_patches"] == math.ceil(0.4 * PATCHES)


@pytest.fixture(scope="module")
def smolvlm_run(data, tmp_path_factory):
    return train_tiny_mllm(data, tmp_path_factory.mktemp("runs") / "tiny-smolvlm", model="tiny:smolvlm")


def test_a_smolvlm_run_serves_predictions_and_the_received_attention_heatmap(smolvlm_run, posts, tmp_path):
    """No CLS token: the heatmap shows the attention each pixel-shuffle block receives; a 2:1 image is a 1 x 2
    crop grid squared with a row of non-token cells, which score 0, are never kept and leave the scaling alone."""
    predictor = load_predictor(smolvlm_run, device="cpu")
    wide = tmp_path / "wide.png"
    picture = Image.new("RGB", (200, 100), (30, 90, 200))
    picture.paste((240, 240, 20), (20, 10, 80, 60))
    picture.save(wide)
    post = Post("wide", "sun and sea", str(wide))
    per_tile = predictor.builder.processor.image_seq_len
    server = Server(smolvlm_run, tmp_path / "smolvlm.log", [])
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            info = http.get("/v1/model").json()
            assert info["supports_keep_ratio"] and info["supports_explain"]
            answer = http.post("/v1/predict", **multipart(posts[0], keep_ratio="0.3")).json()
            assert_same_prediction(answer, predictor.predict([posts[0]], keep_ratio=0.3)[0])
            response = http.post("/v1/explain", **multipart(post, keep_ratio="0.3"))
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_same_prediction(answer, predictor.predict([post], keep_ratio=0.3)[0])
    n = predictor.predict([post], keep_ratio=1.0)[0].kept_tokens  # 2 crops + the global tile
    assert n == 3 * per_tile and answer["kept_tokens"] == math.ceil(0.3 * n)
    heatmap = answer["heatmap"]
    assert "attention received" in heatmap["score_name"]
    assert heatmap["content"] == [0.0, 0.0, 1.0, 0.5]
    side = heatmap["grid"]
    tokens = [[row < side // 2 for _ in range(side)] for row in range(side)]  # the crops fill the top half
    assert heatmap["patches"] == sum(map(sum, tokens)) == 2 * per_tile
    scores = [s for row in heatmap["scores"] for s in row]
    kept = [k for row in heatmap["kept"] for k in row]
    real = [t for row in tokens for t in row]
    assert all(s == 0.0 and not k for s, k, t in zip(scores, kept, real, strict=True) if not t)
    assert min(s for s, t in zip(scores, real, strict=True) if t) == 0.0
    assert max(s for s, t in zip(scores, real, strict=True) if t) == 1.0
    assert 0 < heatmap["kept_patches"] == sum(kept) <= answer["kept_tokens"]
    # the ceil(r N) budget is one threshold over every tile: a kept crop cell outscores every dropped one
    assert min(s for s, k in zip(scores, kept, strict=True) if k) >= max(
        s for s, k, t in zip(scores, kept, real, strict=True) if t and not k)


def test_the_openapi_schema_is_valid_and_types_every_body(client):
    from openapi_spec_validator import validate

    schema = client.get("/openapi.json").json()
    validate(schema)
    components = schema["components"]["schemas"]
    for path, model in (("/v1/predict", "PredictRequest"), ("/v1/predict/batch", "BatchRequest"),
                        ("/v1/explain", "PredictRequest")):
        operation = schema["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert content["application/json"]["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert {"413", "415", "422", "503"} <= set(operation["responses"])
        assert operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse")
    assert schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"PredictRequest", "PredictForm", "BatchRequest", "BatchPost", "PredictResponse", "BatchResponse",
            "ExplainResponse", "ModelInfo", "ErrorResponse"} <= set(components)
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(schema)))
    assert refs <= set(components)


def test_the_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text and client.get(asset).status_code == 200


# ----------------------------------------------------------------------------- limits


@pytest.mark.parametrize(("request_kwargs", "path", "status", "code", "field"), [
    ({"files": {"image": ("big.png", b"\0" * (MAX_UPLOAD + 1), "image/png")}}, "/v1/predict", 413,
     "payload_too_large", None),
    ({"files": {"image": ("wide.png", png_bytes(200, 200), "image/png")}}, "/v1/predict", 413, "too_many_pixels",
     "image"),
    ({"files": {"image": ("strip.png", png_bytes(400, 4), "image/png")}}, "/v1/predict", 422, "extreme_aspect_ratio",
     "image"),
    ({"files": {"image": ("notes.png", b"just some text, not a picture", "image/png")}}, "/v1/predict", 415,
     "unsupported_image", "image"),
    ({"files": {"image": ("cut.png", png_bytes(64, 64)[:60], "image/png")}}, "/v1/predict", 422, "corrupt_image",
     "image"),
    (form(text="x" * (MAX_TEXT + 1)), "/v1/predict", 422, "text_too_long", "text"),
    ({"json": {"posts": [{"text": "hi"}] * (MAX_POSTS + 1)}}, "/v1/predict/batch", 422, "batch_too_large", "posts"),
    ({"json": {"posts": [{"text": "hi"}, {"text": "y" * (MAX_TEXT + 1)}]}}, "/v1/predict/batch", 422, "text_too_long",
     "posts.1.text"),
    ({"json": {"posts": [{"text": "hi", "image": base64.b64encode(png_bytes(200, 200)).decode()}]}},
     "/v1/predict/batch", 413, "too_many_pixels", "posts.0.image"),
    ({"content": b'{"text": "unclosed', "headers": {"content-type": "application/json"}}, "/v1/predict", 422,
     "malformed_body", None),
    ({"json": {"text": 42}}, "/v1/predict", 422, "malformed_body", "text"),
    ({"json": {"text": "hi", "extra": 1}}, "/v1/predict", 422, "malformed_body", "extra"),
    ({"json": {"text": "hi", "image": "not base64 at all!"}}, "/v1/predict", 422, "malformed_body", "image"),
    ({"json": {"text": "hi", "keep_ratio": 1.5}}, "/v1/predict", 422, "malformed_body", "keep_ratio"),
    (form(text="hi", keep_ratio="0"), "/v1/predict", 422, "malformed_body", "keep_ratio"),
    (form(text="hi", keep_ratio="lots"), "/v1/predict", 422, "malformed_body", "keep_ratio"),
    (form(text="hi", colour="red"), "/v1/predict", 422, "malformed_body", "colour"),
    ({"content": b"--x\r\n\r\nhi\r\n--x--\r\n", "headers": {"content-type": "multipart/form-data"}}, "/v1/predict",
     422, "malformed_body", None),
    ({"content": b"--x\r\nContent-Disposition: form-data\r\n\r\nhi\r\n--x--\r\n",
      "headers": {"content-type": "multipart/form-data; boundary=x"}}, "/v1/predict", 422, "malformed_body", None),
    ({"json": {"posts": []}}, "/v1/predict/batch", 422, "malformed_body", "posts"),
    ({"json": {"text": "   "}}, "/v1/predict", 422, "empty_post", None),
    ({"content": b"text=hi", "headers": {"content-type": "text/plain"}}, "/v1/predict", 415,
     "unsupported_media_type", None),
    ({"data": {"text": "hi"}}, "/v1/predict/batch", 415, "unsupported_media_type", None),
    ({"json": {"text": "no picture"}}, "/v1/explain", 422, "image_required", "image"),
    ({}, "/v1/nowhere", 404, "not_found", None),
])
def test_each_limit_answers_its_status_with_a_json_error(client, request_kwargs, path, status, code, field):
    assert_error(client.post(path, **request_kwargs), status, code, field)
    assert client.get("/healthz").json()["status"] == "ok"


def raw_request(port: int, head: bytes, body_chunks=()) -> bytes:
    """Send a request head and body chunks over a plain socket, then read what the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            sock.sendall(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        return answer


def test_an_oversized_body_is_refused_while_it_arrives(mllm_server):
    """The body never ends (no last chunk; a Content-Length never met): only a cap enforced while reading answers."""
    chunk = b"a" * 32768
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (MAX_UPLOAD // len(chunk) + 1)
    chunked = raw_request(mllm_server.port, b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                          b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n", chunks)
    declared = raw_request(mllm_server.port, b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                           b"application/json\r\nContent-Length: 1000000000\r\n\r\n")
    for answer in (chunked, declared):
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_full_queue_answers_503_with_retry_after_and_never_500(mllm_server, posts):
    """Queue of one request, batches of one post: concurrent batch requests overflow the queue."""
    body = {"posts": [{"text": p.text, "image": b64(p.image)} for p in posts[:MAX_POSTS]]}

    async def burst(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=mllm_server.url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(http.post("/v1/predict/batch", json=body) for _ in range(n)))

    responses = []
    for _ in range(3):  # a burst of 16 overflows a queue of one in practice; a bounded number of bursts
        responses += asyncio.run(burst(16))
        if any(r.status_code == 503 for r in responses):
            break
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 503}, statuses
    refused = [r for r in responses if r.status_code == 503]
    assert refused and any(r.status_code == 200 for r in responses)
    for response in refused:
        assert_error(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1"
    for response in responses:
        if response.status_code == 200:
            assert len(response.json()["predictions"]) == len(body["posts"])
    with httpx.Client(base_url=mllm_server.url) as http:
        assert http.get("/healthz").json()["queue_pending"] == 0


# ----------------------------------------------------------------------------- fusion run, API key


def test_the_api_key_guards_every_v1_endpoint_but_not_healthz(fusion_server):
    with httpx.Client(base_url=fusion_server.url, timeout=60) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/").status_code == 200
        for method, path, kwargs in (("GET", "/v1/model", {}), ("POST", "/v1/predict", {"json": {"text": "hi"}}),
                                     ("POST", "/v1/predict/batch", {"json": {"posts": [{"text": "hi"}]}}),
                                     ("POST", "/v1/explain", {"json": {"text": "hi"}})):
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": "Bearer wrong"}):
                response = http.request(method, path, headers=headers, **kwargs)
                assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer"
        assert http.get("/v1/model", headers={"X-API-Key": KEY}).status_code == 200
        assert http.get("/v1/model", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        # the key, which no other site's page has, guards it: no Origin check on a server with a key
        assert http.post("/v1/predict", json={"text": "hi"}, headers={"X-API-Key": KEY,
                                                                      "Origin": "http://elsewhere.example"}
                         ).status_code == 200


def test_a_fusion_run_predicts_and_refuses_keep_ratio_and_heatmaps(fusion_server, fusion_run, posts):
    key = {"X-API-Key": KEY}
    post = posts[0]
    (expected,) = load_predictor(fusion_run, device="cpu").predict([post])
    with httpx.Client(base_url=fusion_server.url, timeout=60, headers=key) as http:
        info = http.get("/v1/model").json()
        assert info["family"] == "fusion" and not info["supports_keep_ratio"] and not info["supports_explain"]
        assert info["base_model"].endswith("resnet") and " + " in info["base_model"]
        assert info["strategies"] == []
        answer = http.post("/v1/predict", **multipart(post)).json()
        assert_same_prediction(answer, expected)
        assert answer["kept_tokens"] is None and answer["model"] == f"fusion/{fusion_run.name}"
        assert_error(http.post("/v1/predict", **multipart(post, keep_ratio="0.5")), 422, "keep_ratio_unsupported",
                     "keep_ratio")
        assert_error(http.post("/v1/predict/batch", json={"posts": [{"text": "hi"}], "keep_ratio": 0.5}), 422,
                     "keep_ratio_unsupported", "keep_ratio")
        assert_error(http.post("/v1/explain", **multipart(post)), 422, "explain_unsupported")


def test_uploads_are_private_files_deleted_with_their_request(fusion_server, fusion_temp, posts):
    body = {"posts": [{"text": p.text, "image": b64(p.image)} for p in posts]}
    with httpx.Client(base_url=fusion_server.url, timeout=60, headers={"X-API-Key": KEY}) as http:
        assert http.post("/v1/predict", **multipart(posts[0])).status_code == 200
        assert http.post("/v1/predict/batch", json=body).status_code == 200
        assert http.post("/v1/predict", files={"image": ("x.png", b"not an image", "image/png")}).status_code == 415
    (folder,) = fusion_temp.glob("sentilens-serve-*")
    assert folder.stat().st_mode & 0o777 == 0o700
    assert list(folder.iterdir()) == [folder / "server.pid"]  # the marker naming the server, no upload


# ----------------------------------------------------------------------------- CLI


def test_serve_reports_a_missing_run_key_variable_or_bad_limit_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SENTILENS_UNSET_KEY", raising=False)
    for args, problem in (([str(tmp_path / "nothing")], "not a run directory (no config.json)"),
                          ([str(tmp_path), "--api-key-env", "SENTILENS_UNSET_KEY"], "SENTILENS_UNSET_KEY is not set"),
                          ([str(tmp_path), "--queue-size", "0"], "--queue-size: Input should be greater")):
        monkeypatch.setattr("sys.argv", ["sentilens", "serve", "--run", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert problem in error and len(error.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the page in Chromium


def test_the_page_shows_label_bars_and_the_heatmap_with_the_kept_patches(mllm_server, client, posts, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    post = posts[0]
    expected = client.post("/v1/explain", **multipart(post, keep_ratio="0.25")).json()
    browser = chromium(tmp_path / "profile")
    try:
        browser.get(mllm_server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "ratio-row").is_displayed())
        browser.find_element(By.ID, "image").send_keys(post.image)
        browser.find_element(By.ID, "text").send_keys(post.text)
        browser.execute_script("const s = document.getElementById('keep-ratio'); s.value = '0.25';"
                               "s.dispatchEvent(new Event('input'));")
        assert browser.find_element(By.ID, "keep-ratio-value").text == "0.25"
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: b.find_element(By.ID, "heatmap").get_attribute("data-drawn") == "true")
        assert browser.find_element(By.ID, "label").text == expected["label"]
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        assert [b.get_attribute("data-label") for b in bars] == list(expected["probabilities"])
        assert browser.find_element(By.CSS_SELECTOR, "#bars .bar.top").get_attribute("data-label") == expected["label"]
        caption = browser.find_element(By.ID, "heatmap-caption").text
        assert f"{math.ceil(0.25 * PATCHES)} of {PATCHES} patches kept" in caption
        # a patch is outlined (pure white just inside its left edge) exactly when the server kept it
        outlined = browser.execute_script("""
            const canvas = document.getElementById('heatmap'), grid = arguments[0];
            const context = canvas.getContext('2d'), cell = canvas.width / grid, rows = [];
            for (let r = 0; r < grid; r++) {
              const row = [];
              for (let c = 0; c < grid; c++) {
                const p = context.getImageData(Math.floor(c * cell) + 2, Math.floor((r + 0.5) * cell), 1, 1).data;
                row.push(p[0] === 255 && p[1] === 255 && p[2] === 255);
              }
              rows.push(row);
            }
            return rows;""", expected["heatmap"]["grid"])
        assert outlined == expected["heatmap"]["kept"]
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    finally:
        browser.quit()


def test_connection_cap_answers_json_503_while_a_slow_upload_holds_the_only_slot(fusion_run, tmp_path):
    """--max-connections bounds requests still being read too; the refusal is the API's JSON error (defect 13),
    and /healthz is answered all the while (defect 3: slow clients made every probe 503)."""
    server = Server(fusion_run, tmp_path / "capped.log", ["--max-connections", "1"])
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/healthz").status_code == 200
            slow = socket.create_connection(("127.0.0.1", server.port))
            try:
                slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"text\": ")
                with httpx.Client(base_url=server.url, timeout=30) as other:
                    for _ in range(50):  # the slow request reaches the app on the server's next loop turn
                        refused = other.post("/v1/predict", json={"text": "hello"})
                        if refused.status_code == 503:
                            break
                    assert_error(refused, 503, "overloaded")
                    assert refused.headers["retry-after"] == "1"
                    assert other.get("/healthz").status_code == 200
            finally:
                slow.close()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for _ in range(50):  # the server notices the closed socket on its next loop turn
                if http.post("/v1/predict", json={"text": "hello"}).status_code == 200:
                    break
            else:
                pytest.fail("the slot was not freed after the slow client left")
    finally:
        server.stop()
