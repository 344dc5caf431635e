"""Every boolean a recipe can set can be turned on and off from the command line (--flag/--no-flag),
and the command line wins over the recipe in both directions."""

import typing

import click
import pytest
import typer
from pydantic import BaseModel

from sentilens.cli import app
from sentilens.fusion.config import FusionConfig
from sentilens.mllm.train import MllmTrainConfig

COMMANDS = {("train", "fusion"): FusionConfig, ("ablate", "fusion"): FusionConfig, ("train", "mllm"): MllmTrainConfig}


def command(group: str, name: str) -> click.Command:
    root = typer.main.get_command(app)
    return root.commands[group].commands[name]


def boolean_fields(model: type[BaseModel]) -> list[str]:
    return [name for name, field in model.model_fields.items() if field.annotation is bool
            or typing.get_origin(field.annotation) is typing.Union and set(typing.get_args(field.annotation)) == {
                bool, type(None)}]


@pytest.mark.parametrize("path", list(COMMANDS))
def test_every_recipe_boolean_has_both_flags(path):
    options = {opt for param in command(*path).params for opt in (*param.opts, *param.secondary_opts)}
    fields = boolean_fields(COMMANDS[path])
    assert fields  # fine_tune_text, fine_tune_image; gradient_checkpointing and resume
    if path == ("ablate", "fusion"):
        fields = [f for f in fields if f in ("fine_tune_text", "fine_tune_image")]  # the rows set the rest
    for name in fields:
        flag = "--" + name.replace("_", "-")
        assert {flag, flag.replace("--", "--no-", 1)} <= options, name


def test_the_command_line_turns_a_recipe_boolean_off_and_on(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sentilens.fusion import train as fusion_train
    from sentilens.mllm import train as mllm_train

    seen = {}
    monkeypatch.setattr(mllm_train, "train_mllm", lambda cfg: seen.setdefault("mllm", cfg) and {})
    monkeypatch.setattr(fusion_train, "train_fusion", lambda config, *a, **k: seen.setdefault("fusion", config)
                        and {})
    runner = CliRunner()
    recipe = "configs/mvsa_single_llava15_7b.yaml"  # gradient_checkpointing: true
    for flag, expected in (("--no-gradient-checkpointing", False), ("--gradient-checkpointing", True), (None, True)):
        seen.clear()
        runner.invoke(app, ["train", "mllm", "--config", recipe, "--data", str(tmp_path), "--json",
                            *([flag] if flag else [])])
        assert seen["mllm"].gradient_checkpointing is expected, flag
    fusion_recipe = tmp_path / "fusion.yaml"
    fusion_recipe.write_text("fine_tune_text: true\nepochs: 2\n")
    for flag, expected in (("--no-fine-tune-text", False), ("--fine-tune-text", True), (None, True)):
        seen.clear()
        runner.invoke(app, ["train", "fusion", "--config", str(fusion_recipe), "--data", str(tmp_path), "--out",
                            str(tmp_path / "run"), "--json", *([flag] if flag else [])])
        assert seen["fusion"].fine_tune_text is expected, flag
