"""YAML recipes under ``configs/``: a mapping of option: value that a command's flags override."""

from __future__ import annotations

from pathlib import Path

import yaml

from sentilens.errors import SentilensError
from sentilens.validation import MAX_DEPTH, check_tree, decode_utf8


def read_recipe(path: str | Path) -> dict:
    """The mapping in a YAML recipe; a missing file, bad YAML or a non-mapping is a user error."""
    path = Path(path)
    if not path.is_file():
        raise SentilensError("no such recipe file", path)
    text = decode_utf8(path.read_bytes(), path)
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise SentilensError(f"not valid YAML ({getattr(err, 'problem', err)})", path,
                             None if mark is None else mark.line + 1) from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise SentilensError(f"not a usable recipe: nested more than {MAX_DEPTH} levels deep", path) from None
    if not isinstance(recipe, dict):
        raise SentilensError("a recipe must be a mapping of option: value", path)
    check_tree(recipe, path)
    if not all(isinstance(key, str) for key in recipe):
        raise SentilensError("a recipe's options must be names (strings)", path)
    return recipe
