"""Where leafe keeps what it builds or downloads once: the cache root.

`$LEAFE_CACHE`, default `~/.cache/leafe`. Below it: `models/` (built-in models), `litellm/`
(reply cache), `alfworld/`, `textworld/`, `webshop/` (generated games and synthetic data), and
`data/` unless `$LEAFE_DATA` points elsewhere. Everything that needs the root asks here.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$LEAFE_CACHE` (default `~/.cache/leafe`), user-expanded; read at each call, so a test or
    a caller that sets the variable later is followed."""
    return Path(os.environ.get("LEAFE_CACHE") or os.path.join("~", ".cache", "leafe")).expanduser()
