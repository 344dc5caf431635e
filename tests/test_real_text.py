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
