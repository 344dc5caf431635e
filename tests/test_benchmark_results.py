"""The committed benchmark results say what they measured: no GPU figures where no GPU was used."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_token_filtering_results_say_whether_the_gpu_part_ran():
    result = json.loads((RESULTS / "token_filtering.json").read_text())
    devices = {setting["device"] for setting in result["settings"]}
    if result["machine"]["gpu"] is None:
        assert result["gpu_part"].startswith("not run") and devices == {"cpu"}
    else:
        assert result["gpu_part"].startswith("run") and "cuda" in devices
