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


def method_rows(text: str) -> dict[str, list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    return {cells[0].strip("`"): cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                         for line in lines)}


def test_the_methods_table_has_a_row_and_a_cost_for_every_registered_method(numbers):
    from sentilens.mllm.pruning import STRATEGIES, parse_strategy, showcase_strategies

    assert set(numbers.METHOD_COST) == {cls.__name__ for cls in STRATEGIES.values()}
    rows = method_rows(numbers.pruning_methods())
    assert list(rows) == [f for f in showcase_strategies() if not parse_strategy(f).native_positions]
    assert rows["divprune"][:4] == ["vision", "features", "yes", "all five"]
    assert rows["fastv:0"][:3] == ["LM", "the text's attention at LM layer K", "no"]
    assert rows["dart:0"][2] == "yes" and rows["cdpruner"][3] == "LLaVA-1.5"


def test_the_families_column_is_read_off_the_refusals(numbers, monkeypatch):
    from sentilens.mllm.pruning import DiversityPrune

    monkeypatch.setattr(DiversityPrune, "families", ("llava", "qwen3-vl"))
    assert method_rows(numbers.pruning_methods())["divprune"][3] == "LLaVA-1.5, Qwen3-VL"


def test_the_methods_table_reads_demo_accuracy_and_measured_cost_off_the_results(numbers, monkeypatch):
    demo = {"sweep": {"n": 10, "image_tokens": 144, "rows": [
        {"strategy": "divprune", "ratio": r, "accuracy": a} for r, a in ((1.0, 0.9), (0.4, 0.8), (0.05, 0.5))]}}
    def llava(family: str, batch: int, methods: dict) -> dict:
        return {"device": "cpu", "family": family, "batch": batch, "tower_ms": 1000.0, "tower_layers": 24,
                "methods": methods}

    filtering = {"method_settings": [
        llava("llava", 1, {"all": {"selection_worst_ms": 12.0, "selection_share_of_tower": 0.012}, "feature": {}}),
        llava("llava", 16, {"feature": {"selection_worst_ms": 5.0, "selection_share_of_tower": 0.005}}),
        llava("qwen2.5-vl", 1, {"divprune": {"selection_worst_ms": 3.0, "selection_share_of_tower": 0.003}})]}
    monkeypatch.setattr(numbers, "result", {"demo_full": demo, "token_filtering": filtering}.__getitem__)
    rows = method_rows(numbers.pruning_methods())
    assert rows["divprune"][6] == "0.800 / — / 0.500" and rows["visionzip"][6] == "not measured yet"
    # only the LLaVA-1.5 proxy at batch 1 is N = 576 a post: another family's or batch's row is not read
    assert rows["all"][5] == "12.0 ms (1.2 % of the 24-layer tower)"
    assert rows["feature"][5] == rows["divprune"][5] == "not measured yet"
