"""The README's five-minute tour, run as a new user would: the commands between ``<!-- tour -->`` and
``<!-- /tour -->`` are read from README.md and run in order, in a fresh folder holding a small CSV of posts
and their photos, through to a prediction from the served model."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sentilens.data.records import read_manifest
from sentilens.data.synth import LABELS, make_synthetic

pytestmark = pytest.mark.slow  # trains the embedded fusion default: left out of `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def tour_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- tour -->\n```\n(.*?)```\n<!-- /tour -->", readme, re.S)
    assert block, "README.md has no <!-- tour --> block"
    return [line for line in block[1].splitlines() if line.strip()]


def write_posts(folder: Path, n: int = 60) -> None:
    """``posts.csv`` (id,text,image,label; images as JPEGs under photos/, named by id) and ``new-posts.jsonl``."""
    make_synthetic(folder / "synth", n=n, seed=0, image_size=64)
    posts = [p for split in read_manifest(folder / "synth").values() for p in split]
    (folder / "photos").mkdir()
    rows = ["id,text,image,label"]
    for i, post in enumerate(posts, 1):
        with Image.open(post.image) as image:
            image.convert("RGB").save(folder / "photos" / f"{i}.jpg", quality=90)
        text = post.text.replace('"', '""')
        rows.append(f'{i},"{text}",photos/{i}.jpg,{post.label}')
    (folder / "posts.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    new = [{"id": f"new-{i}", "text": posts[i].text, "image": f"photos/{i + 1}.jpg"} for i in range(5)]
    new.append({"id": "text-only", "text": "what a lovely morning"})
    (folder / "new-posts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in new), encoding="utf-8")
    shutil.rmtree(folder / "synth")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sentilens(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sentilens", *args]


def wait_until_served(port: int, server: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"serve exited with {server.returncode}: {server.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("serve did not answer /healthz in time")


def curl(args: list[str], cwd: Path) -> dict:
    """The README's curl line: run by curl where it is installed, else the same form posted by httpx."""
    if shutil.which("curl"):
        done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args[1:]], cwd=cwd, capture_output=True,
                              text=True, timeout=120)
        body, _, status = done.stdout.rpartition("\n")
        assert done.returncode == 0 and status == "200", done.stdout + done.stderr
        return json.loads(body)
    import httpx

    fields, files, url = {}, {}, args[-1]
    for flag, value in zip(args[1:-1:2], args[2:-1:2], strict=True):
        assert flag == "-F", args
        name, _, content = value.partition("=")
        if content.startswith("@"):
            files[name] = (Path(content[1:]).name, (cwd / content[1:]).read_bytes())
        else:
            fields[name] = content
    response = httpx.post(url, data=fields, files=files, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_readme_tour_goes_from_a_csv_to_a_served_prediction(tmp_path):
    commands = tour_commands()
    verbs = [shlex.split(c)[:2] if not c.startswith("curl") else ["curl"] for c in commands]
    assert verbs == [["sentilens", "data"], ["sentilens", "train"], ["sentilens", "eval"], ["sentilens", "predict"],
                     ["sentilens", "predict"], ["sentilens", "serve"], ["curl"]], commands
    write_posts(tmp_path)
    env = {**os.environ, "SENTILENS_CACHE": str(tmp_path / "cache"), "SENTILENS_QUIET": "1"}
    server = None
    port = free_port()
    try:
        for command in commands:
            args = shlex.split(command)
            if args[0] == "curl":
                args = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in args]
                answer = curl(args, tmp_path)
                assert answer["label"] in LABELS and set(answer["probabilities"]) == set(LABELS), answer
                continue
            if args[1] == "serve":
                args = [str(port) if a == "8000" else a for a in args]
                server = subprocess.Popen(sentilens(args[1:]), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True)
                wait_until_served(port, server)
                continue
            done = subprocess.run(sentilens(args[1:]), cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=900)
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    run = tmp_path / "runs" / "mine"
    assert (run / "model.safetensors").is_file() and (run / "plots" / "training.png").is_file()
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [f"new-{i}" for i in range(5)] + ["text-only"]
    assert all(p["label"] in LABELS for p in predictions)
