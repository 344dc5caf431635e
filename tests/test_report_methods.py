"""The report's methods table: one row per method, a column per keep ratio, the best accuracy in bold."""

from __future__ import annotations

from sentilens.report import methods_section


def row(strategy: str, ratio: float, accuracy: float, speedup: float) -> dict:
    return {"strategy": strategy, "ratio": ratio, "accuracy": accuracy, "speedup": speedup}


def test_methods_side_by_side_bold_the_best_of_each_ratio_and_name_the_refused():
    sweep = {"n": 40, "split": "test", "rows": [
        row("all", 1.0, 0.9, 1.0), row("all", 0.4, 0.85, 1.5), row("all", 0.2, 0.7, 2.0),
        row("divprune", 1.0, 0.9, 1.0), row("divprune", 0.4, 0.8, 1.4), row("divprune", 0.2, 0.75, 1.9)],
        "refused_strategies": {"downsample": "downsample is offered for LLaVA-1.5 only"}}
    text = methods_section(sweep)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| method | r = 0.4 | r = 0.2 |"
    assert table[2:] == ["| all | **0.850** (1.50x) | 0.700 (2.00x) |",
                         "| divprune | 0.800 (1.40x) | **0.750** (1.90x) |"]
    assert "40 test posts" in text and "`downsample` (downsample is offered for LLaVA-1.5 only)" in text


def test_one_method_gets_no_side_by_side_table():
    assert methods_section({"n": 4, "rows": [row("all", 1.0, 1.0, 1.0), row("all", 0.5, 1.0, 1.2)]}) == ""
