"""YAML recipes under ``configs/``: a mapping of option: value that a command's flags override."""

from __future__ import annotations

from pathlib import Path

import yaml

from sentilens.errors import SentilensError


def read_recipe(path: str | Path) -> dict:
    """The mapping in a YAML recipe; a missing file, bad YAML or a non-mapping is a user error."""
    path = Path(path)
    if not path.is_file():
        raise SentilensError("no such recipe file", path)
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise SentilensError(f"not valid YAML ({getattr(err, 'problem', err)})", path,
                             None if mark is None else mark.line + 1) from None
    if not isinstance(recipe, dict):
        raise SentilensError("a recipe must be a mapping of option: value", path)
    return recipe
