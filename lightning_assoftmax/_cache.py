"""Where the library keeps what it builds once per machine (tokenized corpora)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$LIGHTNING_ASSOFTMAX_CACHE``, else ``$XDG_CACHE_HOME/lightning_assoftmax`` (``~/.cache``)."""
    explicit = os.environ.get("LIGHTNING_ASSOFTMAX_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lightning_assoftmax"
