"""The docs site builds with ``mkdocs build --strict``: a broken link, a missing anchor or a page left out of
the navigation fails the test run (the Makefile's `docs` target serves the same site)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(out)], capture_output=True, text=True, env=env, timeout=300)


def test_the_site_builds_strictly(tmp_path):
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    for page in ("index", "data", "fusion", "fine-tuning", "pruning", "training", "serving", "reports",
                 "benchmarks", "cli", "architecture"):
        assert (tmp_path / "site" / page / "index.html").is_file() or page == "index", page
    assert (tmp_path / "site" / "index.html").is_file()


def test_a_broken_link_or_an_unlisted_page_fails_the_build(tmp_path):
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "data.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [nowhere](no-such-page.md).\n", encoding="utf-8")
    done = build(tmp_path, tmp_path / "site")
    assert done.returncode != 0 and "no-such-page.md" in done.stderr
    page.write_text(page.read_text(encoding="utf-8").replace("See [nowhere](no-such-page.md).", ""), "utf-8")
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n", encoding="utf-8")
    done = build(tmp_path, tmp_path / "site")
    assert done.returncode != 0 and "orphan.md" in done.stderr
