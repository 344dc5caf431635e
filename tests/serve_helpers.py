"""Helpers of the serve tests: the real server in a subprocess on a loopback ephemeral port, test images,
and headless Chromium for the page."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

STARTED = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 240
"""A bound, not a speed requirement: the model loads before the port opens, on a busy machine."""

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1000,1400")


class Server:
    """``sentilens serve`` running in a subprocess; ``url`` once it listens."""

    def __init__(self, run: Path, log: Path, options: list[str], env: dict[str, str] | None = None):
        self.log = log
        self.output = log.open("wb")
        environment = {**os.environ, "SENTILENS_QUIET": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sentilens", "serve", "--run", str(run), "--port", "0", *options],
            stdout=self.output, stderr=subprocess.STDOUT, env=environment)
        self.url = self._wait_for_port()

    def _wait_for_port(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = STARTED.search(self.log.read_text(errors="replace"))
            if found:
                return f"http://127.0.0.1:{found.group(1)}"
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start:\n{self.log.read_text(errors='replace')}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.close()


def png_bytes(width: int, height: int, colour: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def chromium(profile: Path):
    """Headless Debian Chromium under Selenium, or a skip naming what is missing."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (`make test` installs them when run "
                    "as root; elsewhere: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def train_tiny_fusion(folder: Path) -> Path:
    """A one-epoch fusion run on tiny saved encoders (GPT-2, ResNet): a real run that loads in seconds."""
    from fusion_helpers import save_tiny_gpt2, save_tiny_resnet, subset_manifest
    from mllm_helpers import small_manifest
    from sentilens.fusion.config import FusionConfig
    from sentilens.fusion.train import train_fusion

    data = small_manifest(folder / "source", n_train=8, n_val=4, n_test=8)
    manifest = subset_manifest(data, folder / "data", {"train": 8, "val": 4, "test": 4})
    config = FusionConfig(text_encoder=str(save_tiny_gpt2(folder / "gpt2")),
                          image_encoder=str(save_tiny_resnet(folder / "resnet")), image_size=64, epochs=1, batch_size=8)
    train_fusion(config, manifest, folder / "tiny-fusion", device="cpu")
    return folder / "tiny-fusion"
