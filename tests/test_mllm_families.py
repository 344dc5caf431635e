"""Model-family dispatch (issue 14): the checkpoint's config picks the family, ``--model tiny:<family>``
builds that family's tiny model, and anything else is a one-line error naming what is supported."""

from __future__ import annotations

import json

import pytest

from mllm_helpers import small_manifest
from sentilens.cli import main
from sentilens.errors import SentilensError
from sentilens.mllm.families import REGISTRY, family_for_config, get_family, parse_tiny, supported_classes
from sentilens.mllm.model import load_checkpoint


def test_tiny_is_tiny_llava_and_names_parse():
    assert parse_tiny("tiny") == "llava"
    assert parse_tiny("tiny:llava") == "llava"
    assert parse_tiny("llava-hf/llava-1.5-7b-hf") is None
    assert parse_tiny("/some/folder") is None
    with pytest.raises(SentilensError, match="unknown model family .gpt. in --model tiny:gpt: choose one of"):
        parse_tiny("tiny:gpt")


def test_every_registered_family_reads_its_own_model_type():
    for name in REGISTRY:
        family = get_family(name)
        assert family.name == name
        for model_type in family.model_types:
            assert family_for_config(type("Config", (), {"model_type": model_type})()) is family
    assert "LlavaForConditionalGeneration" in supported_classes()


def test_an_unsupported_checkpoint_class_is_one_line_naming_the_supported_ones(tmp_path):
    folder = tmp_path / "blip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(SentilensError) as err:
        load_checkpoint(folder)
    message = str(err.value)
    assert "\n" not in message
    assert "'blip-2' checkpoint" in message and supported_classes() in message


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``sentilens ARGS`` through the real entry point: (exit code, stderr)."""
    monkeypatch.setattr("sys.argv", ["sentilens", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    return code, capsys.readouterr().err


def test_cli_refuses_an_unknown_tiny_family_and_an_unsupported_checkpoint(tmp_path, monkeypatch, capsys):
    data = small_manifest(tmp_path, n_train=12, n_val=2, n_test=4)  # 12: the first posts with two labels
    code, err = cli(monkeypatch, capsys, "train", "mllm", "--data", str(data), "--out", str(tmp_path / "run"),
                    "--model", "tiny:nope", "--epochs", "1")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: unknown model family 'nope'")
    assert not (tmp_path / "run").exists()
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    code, err = cli(monkeypatch, capsys, "train", "mllm", "--data", str(data), "--out", str(tmp_path / "run2"),
                    "--model", str(folder), "--epochs", "1")
    assert code == 2 and "Traceback" not in err
    assert "'t5' checkpoint; the MLLM family supports LlavaForConditionalGeneration" in err.strip().splitlines()[-1]
