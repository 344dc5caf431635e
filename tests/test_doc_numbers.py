"""Numbers that cannot drift: every marked passage of README.md and docs/*.md is what
benchmarks/doc_numbers.py writes from benchmarks/results/*.json."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def numbers():
    spec = importlib.util.spec_from_file_location("doc_numbers", ROOT / "benchmarks" / "doc_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_marked_passage_equals_what_its_results_file_gives(numbers):
    assert numbers.stale() == [], "run: python benchmarks/doc_numbers.py"


def test_every_generator_is_quoted_by_a_page_and_every_mark_has_a_generator(numbers):
    used = {m["name"] for page in numbers.pages() for m in numbers.BLOCK.finditer(page.read_text(encoding="utf-8"))}
    assert used == set(numbers.GENERATORS)
    opened = sum(page.read_text(encoding="utf-8").count("<!-- numbers:") for page in numbers.pages())
    assert opened == sum(len(list(numbers.BLOCK.finditer(p.read_text(encoding="utf-8")))) for p in numbers.pages())


def test_a_results_file_that_changes_makes_its_pages_stale_and_the_script_rewrites_them(numbers, tmp_path,
                                                                                        monkeypatch):
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    demo = json.loads((results / "demo_full.json").read_text())
    demo["issue_11_bars"]["random_r02"] = 0.5
    (results / "demo_full.json").write_text(json.dumps(demo))
    monkeypatch.setattr(numbers, "RESULTS", results)
    monkeypatch.setattr(numbers, "ROOT", tmp_path)
    numbers.result.cache_clear()
    try:
        found = numbers.stale(tmp_path)
        assert "README.md: demo-headline" in found and "docs/benchmarks.md: demo-bars" in found
        assert numbers.main([]) == 0 and numbers.stale(tmp_path) == []
        assert "a random 20 % gives 0.500" in (tmp_path / "README.md").read_text()
        assert numbers.main(["--check"]) == 0
    finally:
        numbers.result.cache_clear()


def test_an_unknown_mark_is_an_error(numbers):
    with pytest.raises(KeyError, match="no generator for <!-- numbers:nope -->"):
        numbers.render("<!-- numbers:nope -->\nx\n<!-- /numbers:nope -->\n")
