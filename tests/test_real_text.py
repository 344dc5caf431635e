"""Real tweets in CI: 440 HFM sarcasm tweets (tests/data, attributed in its README), embedded MiniLM.

The sample is balanced, so chance accuracy is 0.5: the text variant must beat it with 95 %
confidence (the lower end of its bootstrap interval above 0.5), and the ablation must produce the
probe's baseline row beside it, with the positive class's F1 (``sarcastic``).
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sentilens.cli import app
from sentilens.runs import read_json

SAMPLE = Path(__file__).parent / "data" / "hfm_sarcasm_sample.jsonl"
runner = CliRunner()


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("SENTILENS_QUIET", "1")


def test_text_variant_beats_chance_and_the_probe_row_is_produced(tmp_path):
    data = tmp_path / "data"
    result = runner.invoke(app, ["data", "prepare", "--format", "table", "--root", str(SAMPLE), "--out", str(data)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["ablate", "fusion", "--data", str(data), "--out", str(tmp_path / "ablation"),
                                 "--variants", "text", "--epochs", "10", "--cache", str(tmp_path / "cache"), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["variant"]: row for row in json.loads(result.stdout)["variants"]}
    assert list(rows) == ["probe", "text"]
    for row in rows.values():
        assert row["positive_label"] == "sarcastic" and 0.0 <= row["binary_f1"] <= 1.0
        low, high = row["accuracy_ci"]
        assert low <= row["accuracy"] <= high
    assert rows["text"]["accuracy_ci"][0] > 0.5, rows["text"]  # beats chance on the balanced test split
    assert rows["probe"]["accuracy_ci"][0] > 0.5, rows["probe"]
    markdown = (tmp_path / "ablation" / "ablation.md").read_text()
    assert "| probe |" in markdown and "F1 of sarcastic" in markdown
    assert read_json(tmp_path / "ablation" / "probe" / "metrics-test.json")["n"] == 120


def test_the_real_text_benchmark_measures_an_ensemble_of_its_runs(tmp_path, monkeypatch):
    """``benchmarks/real_text.py`` on the sample: the probe, the head, and their ensemble with offsets, whose
    row adds the members' training to the combining pass and is compared, paired, with today's default."""
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    import real_text

    out = tmp_path / "real_text.json"
    monkeypatch.setattr(sys, "argv", ["real_text.py", "--set", f"sample={SAMPLE}", "--work", str(tmp_path / "work"),
                                      "--variants", "probe,text,ensemble-probe-text+decision", "--cost-posts", "0",
                                      "--out", str(out)])
    real_text.main()
    entry = read_json(out)["sets"][0]
    rows = {row["variant"]: row for row in entry["variants"]}
    ensemble = rows["ensemble-probe-text+decision"]
    assert ensemble["config"] == {"members": ["probe", "text"], "tune_decision": True}
    assert ensemble["members_train_seconds"] == rows["probe"]["train_seconds"] + rows["text"]["train_seconds"]
    assert ensemble["train_seconds"] == ensemble["members_train_seconds"] + ensemble["ensemble_seconds"]
    assert set(ensemble["decision"]["offsets"]) == {"sarcastic", "not_sarcastic"} and ensemble["predict_end_to_end"]
    run = tmp_path / "work" / "sample" / "runs" / "ensemble-probe-text+decision"
    assert read_json(run / "metrics-test.json")["weighted_f1"] == ensemble["weighted_f1"]
    assert read_json(run / "config.json")["members"] == ["1-probe", "2-text"]
    low, high = entry["minus_text"]["ensemble-probe-text+decision"]["weighted_f1_diff_ci"]
    assert low <= high and "ensemble-probe-text+decision" in entry["minus_probe"]
