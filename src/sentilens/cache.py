"""Where sentilens keeps what it can rebuild but would rather not: encoder features, pretrained towers."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SENTILENS_CACHE``, else ``$XDG_CACHE_HOME/sentilens``, else ``~/.cache/sentilens``."""
    root = os.environ.get("SENTILENS_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sentilens"
