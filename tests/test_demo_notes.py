"""The demo report's methods note: the best method per budget read off the sweep's rows, the kinds compared."""

from __future__ import annotations

from sentilens.demo import method_kind, methods_note

CUE = {"mass_over_area": 7.14}


def row(strategy: str, ratio: float, accuracy: float, kept: int) -> dict:
    return {"strategy": strategy, "ratio": ratio, "accuracy": accuracy, "kept_tokens": kept}


def test_the_note_names_the_best_method_of_each_budget_from_the_rows():
    sweep = {"n": 120, "rows": [
        row("divprune", 1.0, 0.97, 144), row("divprune", 0.4, 0.96, 58), row("divprune", 0.05, 0.70, 8),
        row("visionzip", 1.0, 0.97, 144), row("visionzip", 0.4, 0.96, 58), row("visionzip", 0.05, 0.90, 8),
        row("random", 1.0, 0.97, 144), row("random", 0.4, 0.93, 58), row("random", 0.05, 0.72, 8),
        row("downsample", 1.0, 0.97, 144), row("downsample", 0.4, 0.91, 58), row("downsample", 0.05, 0.65, 8)]}
    note = methods_note(sweep, CUE)
    assert ("at r = 0.4 (58 tokens) `divprune`, `visionzip` held 0.960 (r = 1: 0.970); "
            "at r = 0.05 (8 tokens) `visionzip` held 0.900 (r = 1: 0.970).") in note
    assert ("At r = 0.05, the best of each kind of method: the tower's attention 0.900 (`visionzip`); "
            "chance 0.720 (`random`); diversity 0.700 (`divprune`); pooling 0.650 (`downsample`).") in note
    assert "7.1x the box's share" in note and "evidence sits in one small box" in note
    assert "so at small budgets the box can go" in note and "held level" not in note  # divprune 0.70 < 0.90


def test_the_note_says_diversity_held_level_only_when_its_rows_do():
    rows = [row("all", 1.0, 0.96, 144), row("all", 0.05, 0.958, 8), row("dpp", 1.0, 0.96, 144),
            row("dpp", 0.05, 0.95, 8)]
    note = methods_note({"n": 120, "rows": rows}, CUE)
    assert "held level with it here" in note and "the box can go" not in note
    below = methods_note({"n": 120, "rows": [*rows[:3], row("dpp", 0.05, 0.94, 8)]}, CUE)
    assert "the box can go" in below and "held level" not in below


def test_one_method_gets_no_note():
    assert methods_note({"n": 4, "rows": [row("all", 1.0, 1.0, 36), row("all", 0.5, 1.0, 18)]}, CUE) == ""


def test_a_method_s_kind_comes_from_its_registry_class():
    kinds = {text: method_kind(text) for text in ("all", "feature+merge", "visionzip", "inverse", "divprune", "dpp",
                                                  "cdpruner", "downsample", "random", "fastv:0", "dart:1", "lm:0")}
    assert kinds == {"all": "the tower's attention", "feature+merge": "the tower's attention",
                     "visionzip": "the tower's attention", "inverse": "the least attention (the control)",
                     "divprune": "diversity", "dpp": "diversity", "cdpruner": "diversity", "downsample": "pooling",
                     "random": "chance", "fastv:0": "text attention in the LM", "dart:1": "diversity in the LM",
                     "lm:0": "text attention in the LM"}
