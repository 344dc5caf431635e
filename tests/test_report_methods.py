"""The report's methods table: one row per method, a column per keep ratio, the best accuracy in bold; the method
per budget chosen on val (never on the swept test split); the accuracy-against-speedup plot; old sweep.json files."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
from PIL import Image

from sentilens.report import build_report, methods_figure, methods_section


def row(strategy: str, ratio: float, accuracy: float, speedup: float) -> dict:
    return {"strategy": strategy, "ratio": ratio, "accuracy": accuracy, "speedup": speedup}


def table(text: str, after: str = "## ") -> list[str]:
    """The lines of the first markdown table after ``after``."""
    lines = text.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_methods_side_by_side_bold_the_best_of_each_ratio_and_name_the_refused():
    sweep = {"n": 40, "split": "test", "rows": [
        row("all", 1.0, 0.9, 1.0), row("all", 0.4, 0.85, 1.5), row("all", 0.2, 0.7, 2.0),
        row("divprune", 1.0, 0.9, 1.0), row("divprune", 0.4, 0.8, 1.4), row("divprune", 0.2, 0.75, 1.9)],
        "refused_strategies": {"downsample": "downsample is offered for LLaVA-1.5 only"}}
    text = methods_section(sweep)
    lines = table(text)
    assert lines[0] == "| method | r = 0.4 | r = 0.2 |"
    assert lines[2:] == ["| all | **0.850** (1.50x) | 0.700 (2.00x) |",
                         "| divprune | 0.800 (1.40x) | **0.750** (1.90x) |"]
    assert "40 test posts" in text and "`downsample` (downsample is offered for LLaVA-1.5 only)" in text
    # no val rows in this sweep: said in one line, and nothing is marked as chosen
    assert "This sweep holds no val rows (`sentilens sweep --select-on val` scores them)" in text
    assert "†" not in text


def test_one_method_gets_no_side_by_side_table():
    assert methods_section({"n": 4, "rows": [row("all", 1.0, 1.0, 1.0), row("all", 0.5, 1.0, 1.2)]}) == ""


def disagreeing_sweep() -> dict:
    """Test says `all` at r = 0.4 and `divprune` at r = 0.2; val says the opposite (and ties `random` at 0.2)."""
    test_rows = [row("all", 1.0, 0.9, 1.0), row("all", 0.4, 0.85, 1.5), row("all", 0.2, 0.70, 2.0),
                 row("divprune", 1.0, 0.9, 1.0), row("divprune", 0.4, 0.80, 1.4), row("divprune", 0.2, 0.75, 1.9),
                 row("random", 1.0, 0.9, 1.0), row("random", 0.4, 0.60, 1.5), row("random", 0.2, 0.50, 2.0)]
    val = [{"strategy": s, "ratio": r, "accuracy": a, "weighted_f1": f} for s, r, a, f in [
        ("all", 1.0, 0.9, 0.9), ("all", 0.4, 0.70, 0.68), ("all", 0.2, 0.80, 0.79),
        ("divprune", 1.0, 0.9, 0.9), ("divprune", 0.4, 0.75, 0.74), ("divprune", 0.2, 0.60, 0.61),
        ("random", 1.0, 0.9, 0.9), ("random", 0.4, 0.74, 0.72), ("random", 0.2, 0.81, 0.79)]]
    return {"n": 40, "split": "test", "rows": test_rows,
            "selection": {"on": "val", "metric": "weighted_f1", "strategy": "all", "ratio": 0.2, "n": 30,
                          "candidates": val}}


def test_the_selection_cost_is_listed_where_the_rows_have_it():
    sweep = disagreeing_sweep()
    for row in sweep["rows"]:
        row["selection_ms"] = {"all": 0.25, "divprune": 3.5, "random": 0.01}[row["strategy"]] * (2 - row["ratio"])
    text = methods_section(sweep)
    assert "selection cost at r = 0.2 (ms per post" in text and "`all` 0.45, `divprune` 6.30, `random` 0.02." in text
    assert "selection cost" not in methods_section(disagreeing_sweep()), "rows of an older sweep have none"


def test_the_method_per_budget_is_chosen_on_val_not_on_test():
    text = methods_section(disagreeing_sweep(), "val")
    lines = table(text)
    # bold: test's best; †: val's choice, which test disagrees with at both ratios
    assert lines[2:] == ["| all | **0.850** (1.50x) | 0.700 (2.00x) † |",
                         "| divprune | 0.800 (1.40x) † | **0.750** (1.90x) |",
                         "| random | 0.600 (1.50x) | 0.500 (2.00x) |"]
    chosen = table(text, "chosen on val (30 posts")
    assert chosen[0] == "| ratio | chosen on val | val weighted F1 | test accuracy | also the test best |"
    # r = 0.2: all and random tie on val's weighted F1 (0.79): the method listed first, not random's better accuracy
    assert chosen[2:] == ["| 0.4 | `divprune` | 0.740 | 0.800 | no |", "| 0.2 | `all` | 0.790 | 0.700 | no |"]
    assert "reported on test, which did not choose it" in text


def test_choosing_on_the_swept_split_or_a_split_the_sweep_lacks_chooses_nothing():
    on_test = methods_section(disagreeing_sweep(), "test")
    assert "cannot choose the method it reports" in on_test and "†" not in on_test
    assert "no train rows" in methods_section(disagreeing_sweep(), "train")
    assert "chosen on" not in methods_section(disagreeing_sweep(), None)


def test_the_plot_draws_accuracy_against_measured_speedup_a_line_per_method():
    figure = methods_figure(disagreeing_sweep())
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert list(lines) == ["all", "divprune", "random"]
    assert list(lines["divprune"].get_xdata()) == [1.0, 1.4, 1.9]  # ratios 1, 0.4, 0.2 in turn
    assert list(lines["divprune"].get_ydata()) == [0.9, 0.8, 0.75]
    assert [t.get_text() for t in figure.axes[0].texts][:3] == ["1", "0.4", "0.2"]
    plt.close(figure)


def old_run(tmp_path, rows: list[dict]):
    """A run whose sweep.json was written before the methods fields (no selection_ms, no per-layer tokens, no
    selection); the fields a row had then: ratio, kept tokens, scores, latency, speedup."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"family": "mllm", "labels": ["negative", "positive"]}))
    old = [{"ratio": r["ratio"], "kept_tokens": 10, "image_tokens": 36, "accuracy": r["accuracy"],
            "weighted_f1": r["accuracy"], "latency_ms_per_post": 5.0, "speedup": r["speedup"],
            **({"strategy": r["strategy"]} if "strategy" in r else {})} for r in rows]
    (run / "sweep.json").write_text(json.dumps({"n": 8, "ratios": [1.0, 0.5], "repeats": 1, "rows": old}))
    return run


def test_an_old_sweep_json_still_reports(tmp_path):
    earliest = old_run(tmp_path, [{"ratio": 1.0, "accuracy": 0.9, "speedup": 1.0},
                                  {"ratio": 0.5, "accuracy": 0.8, "speedup": 1.6}])  # before strategies too
    report = build_report(tmp_path / "out", [earliest]).read_text()
    assert "## Token filtering" in report and "## Pruning methods side by side" not in report
    assert not (tmp_path / "out" / "plots" / "methods-run.png").exists()


def test_an_old_sweep_of_two_methods_gets_the_table_and_the_plot(tmp_path):
    run = old_run(tmp_path, [row("all", 1.0, 0.9, 1.0), row("all", 0.5, 0.85, 1.6),
                             row("random", 1.0, 0.9, 1.0), row("random", 0.5, 0.7, 1.6)])
    report = build_report(tmp_path / "out", [run]).read_text()
    section = report.split("## Pruning methods side by side", 1)[1]
    assert "| all | **0.850** (1.60x) |" in section and "no val rows" in section
    assert "![accuracy against measured speedup](plots/methods-run.png)" in section
    with Image.open(tmp_path / "out" / "plots" / "methods-run.png") as png:
        assert png.format == "PNG" and png.size == (750, 480)
